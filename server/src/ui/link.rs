//! A device's link class, site and time zone on its page: what the rollout
//! planner uses (the enrollment token's or an operator's), and what the
//! device claims for itself, which an operator may accept.

use axum::extract::{Path, State};
use maud::{Markup, html};

use super::device::Edit;
use super::{Form, Session, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::rollouts::link::{self, DeviceLink, LinkView};

fn fields(l: &DeviceLink) -> Markup {
    html! {
        "link " (l.link_class.as_deref().unwrap_or("ethernet"))
        " · site " (l.site.as_deref().unwrap_or("none"))
        " · time zone " (l.time_zone.as_deref().unwrap_or("UTC"))
    }
}

/// The device page's "Link" section.
pub async fn panel(state: &AppState, s: &Session, id: &str, edit: &Edit) -> UiResult<Markup> {
    let LinkView {
        link: current,
        hint,
    } = link::link_view(state, &s.op, id).await?;
    let differs = hint.as_ref().is_some_and(|h| {
        h.link_class
            .as_ref()
            .is_some_and(|v| Some(v) != current.link_class.as_ref())
            || h.site
                .as_ref()
                .is_some_and(|v| Some(v) != current.site.as_ref())
            || h.time_zone
                .as_ref()
                .is_some_and(|v| Some(v) != current.time_zone.as_ref())
    });
    Ok(html! {
        section #link {
            h2 { "Link" }
            p { (fields(&current)) }
            @if let (true, Some(h)) = (differs, &hint) {
                p #link-hint { "The device claims: " (fields(h)) ". A claim is only a hint until accepted." }
                @if s.can(Role::Ops) {
                    form.inline method="post" action={ "/ui/devices/" (id) "/link/accept" } {
                        (csrf_field(s))
                        button.small type="submit" { "Accept the device's claim" }
                    }
                }
            }
            @if s.can(Role::Ops) {
                @let typed = |k: &str, now: &Option<String>| edit.value("link", k).map(str::to_string).or_else(|| now.clone()).unwrap_or_default();
                @let error = edit.error("link");
                form.filters #link-form method="post" action={ "/ui/devices/" (id) "/link" } {
                    (csrf_field(s))
                    div.field {
                        label for="link_class" { "Link class" }
                        input #link_class type="text" name="link_class" list="link-classes" value=(typed("link_class", &current.link_class))
                            placeholder="ethernet" maxlength="128" aria-invalid=[error.filter(|e| e.contains("link_class")).map(|_| "true")];
                        datalist #link-classes { option value="ethernet" {} option value="wifi" {} option value="metered-4g" {} }
                    }
                    div.field {
                        label for="site" { "Site" }
                        input #site type="text" name="site" value=(typed("site", &current.site)) maxlength="128"
                            aria-invalid=[error.filter(|e| e.contains("site")).map(|_| "true")];
                    }
                    div.field {
                        label for="time_zone" { "Time zone (IANA)" }
                        input #time_zone type="text" name="time_zone" value=(typed("time_zone", &current.time_zone))
                            placeholder="UTC" maxlength="64" aria-invalid=[error.filter(|e| e.contains("time_zone")).map(|_| "true")];
                    }
                    div.field.actions { button type="submit" { "Save link" } }
                    @if let Some(e) = error { p.error #link-error role="alert" { (e) } }
                }
            }
        }
    })
}

/// `POST /ui/devices/{id}/link/accept`.
pub async fn accept(State(state): State<AppState>, Path(id): Path<String>, form: Form) -> UiResult {
    link::accept_hint(&state, &form.session.op, &id).await?;
    Ok(see_other(&format!("/ui/devices/{id}#link")))
}
