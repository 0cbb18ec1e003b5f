//! Rollouts: create with a preview (bytes, metered cost and projected
//! duration per wave, as a table and charts), then watch each wave live,
//! and pause, resume, abort or roll back (each confirmed). Everything goes
//! through the rollouts service, as the API does.

mod form;
mod preview;

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use maud::{Markup, html};
use serde::Deserialize;

use self::form::{FieldError, SpecForm, refuse, spec_form, spec_form_to};
use self::preview::preview_view;
use super::charts::{self, Series};
use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::releases::{self, Release};
use crate::service::rollouts::edit as edits;
use crate::service::rollouts::preview as previews;
use crate::service::rollouts::progress::{self, Rollout};
use crate::service::rollouts::transitions::{self, Action};

async fn release_list(state: &AppState, s: &Session) -> UiResult<Vec<Release>> {
    Ok(releases::list(state, &s.op).await?)
}

/// `GET /ui/rollouts`.
/// Query of the rollouts page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The release the new-rollout form starts with.
    release: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    s: Session,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let mut f = SpecForm::defaults();
    if let Ok(Query(ListQuery { release: Some(r) })) = query {
        f.set("release_id", &r);
    }
    list_page(&state, &s, &f, None).await
}

/// The rollouts and the new-rollout form (with `error` next to its field
/// and the values kept: a 400).
async fn list_page(
    state: &AppState,
    s: &Session,
    f: &SpecForm,
    error: Option<&FieldError>,
) -> UiResult {
    let list = progress::list(state, &s.op).await?;
    let releases = release_list(state, s).await?;
    let versions: HashMap<&str, &str> = releases
        .iter()
        .map(|r| (r.id.as_str(), r.version.as_str()))
        .collect();
    let page = layout::page(
        s,
        Nav::Rollouts,
        "Rollouts",
        html! {
            (heading("Rollouts", Some(html! { "Staged waves with health gates, maintenance windows and a bandwidth budget." })))
            @if s.can(Role::Ops) {
                section.panel #new-rollout {
                    h2 { "New rollout" }
                    @if releases.is_empty() { p.empty { "Upload a release first." } }
                    @else { (spec_form(s, f, &releases, error)) }
                }
            }
            @if list.is_empty() { p.empty { "No rollout yet." } } @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Rollout" } th scope="col" { "Release" } th scope="col" { "Status" } th scope="col" { "Wave" }
                        th scope="col" { "Committed" } th scope="col" { "Created" } } }
                    tbody { @for r in &list {
                        @let committed = r.states.get("committed").copied().unwrap_or(0);
                        tr {
                            td { a href={ "/ui/rollouts/" (r.id) } { @if r.name.is_empty() { (r.id.get(..8).unwrap_or(&r.id)) } @else { (r.name) } } }
                            td { (versions.get(r.release_id.as_str()).copied().unwrap_or("deleted")) }
                            td { (status_badge(&r.status)) @if let Some(why) = &r.status_reason { br; span.small { (why) } } }
                            td { (r.current_wave) " / " (r.spec.waves.len()) }
                            td { (charts::progress(committed, r.devices_total, "committed")) " " span.small { (committed) " / " (r.devices_total) } }
                            td { (format::time(r.created_at)) }
                        }
                    } }
                } }
            }
        },
    );
    Ok(if error.is_some() {
        (StatusCode::BAD_REQUEST, page).into_response()
    } else {
        page
    })
}

/// `POST /ui/rollouts/preview`: the preview of the form's rollout, and the
/// form again to adjust or create it.
pub async fn preview(State(state): State<AppState>, form: Form) -> UiResult {
    let s = &form.session;
    if !s.can(Role::Ops) {
        return Err(UiError::forbidden());
    }
    let f = SpecForm::from_form(&form);
    let spec = match f.spec() {
        Ok(spec) => spec,
        Err(e) => return list_page(&state, s, &f, Some(&e)).await,
    };
    let p = match previews::preview(&state, &s.op, &spec, None, true).await {
        Ok(p) => p,
        Err(crate::service::Error::Invalid(why) | crate::service::Error::Unprocessable(why)) => {
            return list_page(&state, s, &f, Some(&refuse("form", format!("{why}.")))).await;
        }
        Err(e) => return Err(e.into()),
    };
    let releases = release_list(&state, s).await?;
    Ok(layout::page(
        s,
        Nav::Rollouts,
        "Rollout preview",
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/rollouts" { "Rollouts" } " / preview" }
            (heading(&format!("Preview: {} to {} device(s)", p.version, p.targets), None))
            (preview_view(&p))
            section.panel {
                h2 { "Create it" }
                p { "The rollout is saved as a draft; it starts when you start it." }
                form method="post" action="/ui/rollouts" {
                    (csrf_field(s))
                    (f.hidden())
                    button.primary type="submit" disabled[p.targets == 0] { "Create rollout" }
                }
            }
            section.panel {
                h2 { "Adjust" }
                (spec_form(s, &f, &releases, None))
            }
        },
    ))
}

/// `POST /ui/rollouts`: creates the draft.
pub async fn create(State(state): State<AppState>, form: Form) -> UiResult {
    let f = SpecForm::from_form(&form);
    let s = &form.session;
    let spec = match f.spec() {
        Ok(spec) => spec,
        Err(e) => return list_page(&state, s, &f, Some(&e)).await,
    };
    match transitions::create(&state, &s.op, spec).await {
        Ok(r) => Ok(see_other(&format!("/ui/rollouts/{}", r.id))),
        Err(crate::service::Error::Invalid(why)) => {
            list_page(&state, s, &f, Some(&refuse("form", format!("{why}.")))).await
        }
        Err(e) => Err(e.into()),
    }
}

fn state_class(state: &str) -> &'static str {
    match state {
        "committed" => "good",
        "downloading" | "installed" | "rebooting" | "scheduled" | "rolling_back" => "busy",
        "offline" => "warn",
        "failed" | "reverted" => "bad",
        _ => "neutral",
    }
}

/// Devices per page of a rollout's device list.
const DEVICES_PAGE: i64 = 100;

/// The rollout's devices, one page (not refreshed: the numbers above are).
fn devices_section(r: &Rollout, page: &progress::DevicePage, after: Option<&str>) -> Markup {
    html! {
        @if !page.devices.is_empty() {
            details #devices open[after.is_some()] {
                summary { "Devices (" (r.devices_total) ")" }
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Device" } th scope="col" { "Wave" } th scope="col" { "State" } th scope="col" { "Link" } th scope="col" { "Download (of planned)" } th scope="col" { "Window" } } }
                    tbody { @for d in &page.devices {
                        @let (done, planned) = charts::download_share(&d.stored_state, d.bytes_done, d.delta_bytes);
                        tr data-device=(d.device_id) {
                            td { a href={ "/ui/devices/" (d.id) } { (d.device_id) } } td { (d.wave) }
                            td { (status_badge(&d.state)) @if let Some(why) = &d.reason { br; span.small.reason { (why) } } }
                            td { (d.link_class) }
                            td { (charts::progress(done, planned, "download")) " " span.small { (format::ibytes(done)) " / " (format::ibytes(planned)) } }
                            td.small { @if let Some(w) = &d.download_window { (format::time(w.not_before_ms)) " – " (format::clock(w.not_after_ms)) } }
                        }
                    } }
                } }
                nav.pager aria-label="Device pages" {
                    @if after.is_some() { a href={ "/ui/rollouts/" (r.id) "#devices" } { "← First page" } " " }
                    @if let Some(n) = &page.next { a #devices-next href={ "/ui/rollouts/" (r.id) "?devices_after=" (n) "#devices" } { "Next " (DEVICES_PAGE) " →" } }
                }
            }
        }
    }
}

/// The buttons of the actions the rollout's state allows now (part of the
/// live fragment, so they follow the state).
fn action_bar(s: &Session, r: &Rollout) -> Markup {
    html! {
        @if s.can(Role::Ops) {
            div.actions-bar #actions data-status=(r.status) {
                @for (action, label, question) in actions(&r.status) {
                    form.inline method="post" action={ "/ui/rollouts/" (r.id) "/" (action) } data-confirm=(question) {
                        (csrf_field(s))
                        button.{ @if action == "rollback" || action == "abort" { "danger" } @else { "primary" } } type="submit" data-action=(action) { (label) }
                    }
                    " "
                }
                @if actions(&r.status).is_empty() { span.small { "No action: the rollout is " (r.status) "." } }
            }
        }
    }
}

async fn live_body(
    state: &AppState,
    s: &Session,
    id: &str,
    with_devices: bool,
) -> UiResult<(Rollout, Markup)> {
    let r = progress::detail(state, &s.op, id, with_devices).await?;
    let samples = progress::samples(state, &s.op, id).await?;
    let waves = r.waves.as_deref().unwrap_or_default();
    let rows: Vec<(String, Vec<(String, u64)>)> = waves
        .iter()
        .map(|w| {
            (
                format!("wave {}", w.wave),
                w.states
                    .iter()
                    .map(|(k, v)| (k.clone(), u64::try_from(*v).unwrap_or(0)))
                    .collect(),
            )
        })
        .collect();
    let egress: Vec<(i64, f64)> = samples
        .iter()
        .map(|x| (x.at, x.reserved_bytes_per_sec as f64 / 1e6))
        .collect();
    let peak = egress.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let cap = r.spec.bandwidth.egress_cap_bytes_per_sec as f64 / 1e6;
    let markup = html! {
        (action_bar(s, &r))
        p data-status=(r.status) { "Status: " (status_badge(&r.status))
            @if let Some(why) = &r.status_reason { " " span { (why) } }
            " · wave " (r.current_wave) " of " (r.spec.waves.len()) " · " (r.devices_total) " device(s)" }
        @if !r.left_out.is_empty() {
            p.notice data-left-out { "Left out at the start: "
                @for (why, n) in &r.left_out { (n) " " (match why.as_str() {
                    "no_tpm" => "without a TPM (every wave they could join requires attestation)",
                    "unactivated" => "that have not activated their TPM",
                    other => other,
                }) "; " } }
        }
        @if !waves.is_empty() && r.status != "draft" {
            (charts::stacked("Progress per wave", &rows, state_class))
            div.table-wrap { table.waves {
                thead { tr { th scope="col" { "Wave" } th scope="col" { "Status" } th scope="col" { "Devices" } th scope="col" { "Committed" } th scope="col" { "Error rate" } th scope="col" { "States" } } }
                tbody { @for w in waves { tr data-wave=(w.wave) data-wave-status=(w.status) {
                    td { (w.wave) } td { (status_badge(&w.status)) } td { (w.devices) }
                    td { (charts::progress((w.committed_ratio * 1000.0).round() as i64, 1000, "committed")) }
                    td { (format!("{:.1} %", w.error_rate * 100.0)) }
                    td.small { @for (k, v) in &w.states { (k) ": " (v) " " } }
                } } }
            } }
        }
        @if egress.len() > 1 {
            (charts::lines("Reserved egress (MB/s)", &[Series { name: "reserved", class: "s1", points: egress }], cap.max(peak).max(0.001), ""))
        }
    };
    Ok((r, markup))
}

/// The actions a rollout in `status` allows, in display order.
fn actions(status: &str) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut out = Vec::new();
    if status == "draft" {
        out.push((
            "start",
            "Start",
            "Start this rollout? Devices of the first wave get download windows.",
        ));
    }
    if matches!(status, "running" | "scheduled") {
        out.push((
            "pause",
            "Pause",
            "Pause this rollout? No new download windows; devices already installing finish.",
        ));
    }
    if status == "paused" {
        out.push((
            "resume",
            "Resume",
            "Resume this rollout? A wave a gate paused is promoted after its soak.",
        ));
    }
    if matches!(status, "draft" | "scheduled" | "running" | "paused") {
        out.push(("abort", "Abort", "Abort this rollout? Devices that have not started are cancelled; updated devices keep the new release."));
    }
    if matches!(
        status,
        "scheduled" | "running" | "paused" | "completed" | "aborted"
    ) {
        out.push(("rollback", "Roll back", "Roll back every updated device to its previous release? Each boots its other slot: no download."));
    }
    out
}

/// Query of a rollout's page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailQuery {
    devices_after: Option<String>,
}

/// `GET /ui/rollouts/{id}`.
pub async fn detail(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    query: Result<Query<DetailQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let Ok(Query(q)) = query else {
        return Err(UiError::bad_request(
            "This address has a parameter the rollout page does not know; its only one is devices_after.",
        ));
    };
    render(&state, &s, &id, q.devices_after.as_deref(), None, None).await
}

/// An edit of the policy that was refused: the form as typed, the error.
type Refused<'a> = Option<(&'a SpecForm, &'a FieldError)>;

async fn render(
    state: &AppState,
    s: &Session,
    id: &str,
    devices_after: Option<&str>,
    refusal: Option<String>,
    edit: Refused<'_>,
) -> UiResult {
    let (r, live) = live_body(state, s, id, false).await?;
    let devices = progress::devices_page(state, &s.op, id, devices_after, DEVICES_PAGE).await?;
    let editable = s.can(Role::Ops) && matches!(r.status.as_str(), "draft" | "paused");
    let edit_form = if editable {
        let current = SpecForm::from_spec(&r.spec);
        let (f, error) = match edit {
            Some((f, e)) => (f.clone(), Some(e)),
            None => (current, None),
        };
        let releases = release_list(state, s).await?;
        let mine: Vec<Release> = releases
            .into_iter()
            .filter(|x| x.id == r.release_id)
            .collect();
        Some(html! {
            details.panel #edit open[error.is_some()] {
                summary { "Edit the policy" }
                p.small { @if r.status == "draft" { "Anything may change but the release." }
                    @else { "Paused: the devices and waves are chosen; gates, soak, start, windows and bandwidth may change. They apply when you resume." }
                    " Every wave gets the soak and gates shown. Edits are in the audit log." }
                (spec_form_to(s, &f, &mine, error, &format!("/ui/rollouts/{}/edit", r.id), "Save the policy"))
            }
        })
    } else {
        None
    };
    let draft_preview = if r.status == "draft" {
        let p = previews::preview_saved(state, &s.op, id, true).await?;
        Some(preview_view(&p))
    } else {
        None
    };
    let release = releases::detail(state, &s.op, &r.release_id).await?;
    let title = if r.name.is_empty() {
        format!("Rollout of {}", release.version)
    } else {
        r.name.clone()
    };
    Ok(layout::page(
        s,
        Nav::Rollouts,
        &title,
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/rollouts" { "Rollouts" } " / " (title) }
            (heading(&title, Some(html! { "release " a href={ "/ui/releases/" (release.id) } { (release.version) } " (" (release.compatible) ") · created " (format::time(r.created_at)) })))
            @if let Some(why) = &refusal {
                p.notice #refused role="alert" { "Not done: " (why) ". The rollout is now " (r.status) "; the buttons below are what it allows." }
            }
            div #live data-refresh={ "/ui/rollouts/" (r.id) "/live" } data-interval="3" aria-live="polite" { (live) }
            @if let Some(e) = edit_form { (e) }
            (devices_section(&r, &devices, devices_after))
            @if let Some(p) = draft_preview {
                h2 { "Preview" }
                (p)
            }
        },
    ))
}

/// `GET /ui/rollouts/{id}/live`.
pub async fn live(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> UiResult {
    let (_, body) = live_body(&state, &s, &id, false).await?;
    Ok(layout::fragment(body))
}

/// `POST /ui/rollouts/{id}/{action}`: start, pause, resume, abort,
/// rollback (ops, enforced by the service).
pub async fn act(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    form: Form,
) -> UiResult {
    let Some(action) = Action::parse(&action) else {
        return Err(UiError::not_found(format!("No rollout action {action:?}.")));
    };
    match transitions::act(&state, &form.session.op, &id, action).await {
        Ok(_) => Ok(see_other(&format!("/ui/rollouts/{id}"))),
        // The state changed under the operator: say so in place, with
        // the buttons of the state it is in now.
        Err(crate::service::Error::Conflict(why)) => {
            let page = render(&state, &form.session, &id, None, Some(why), None).await?;
            Ok((StatusCode::CONFLICT, page).into_response())
        }
        Err(crate::service::Error::Unprocessable(why)) => {
            let page = render(&state, &form.session, &id, None, Some(why), None).await?;
            Ok((StatusCode::UNPROCESSABLE_ENTITY, page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /ui/rollouts/{id}/edit` (ops): a draft's or paused rollout's new
/// policy; refused, the form again with the error next to the field.
pub async fn edit(State(state): State<AppState>, Path(id): Path<String>, form: Form) -> UiResult {
    let s = &form.session;
    let f = SpecForm::from_form(&form);
    let refused = |e: FieldError, status: StatusCode| {
        let f = f.clone();
        let state = state.clone();
        let id = id.clone();
        async move {
            let page = render(&state, s, &id, None, None, Some((&f, &e))).await?;
            Ok::<_, UiError>((status, page).into_response())
        }
    };
    let spec = match f.spec() {
        Ok(spec) => spec,
        Err(e) => return refused(e, StatusCode::BAD_REQUEST).await,
    };
    match edits::edit(&state, &s.op, &id, spec).await {
        Ok(_) => Ok(see_other(&format!("/ui/rollouts/{id}"))),
        Err(crate::service::Error::Invalid(why)) => {
            refused(refuse("form", format!("{why}.")), StatusCode::BAD_REQUEST).await
        }
        Err(crate::service::Error::Conflict(why)) => {
            let page = render(&state, s, &id, None, Some(why), None).await?;
            Ok((StatusCode::CONFLICT, page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}
