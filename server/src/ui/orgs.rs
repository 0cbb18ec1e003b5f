//! Organisations, for the instance admin: list, create (with the first
//! admin, whose one-time password is shown once), rename, disable and
//! re-enable, add an admin.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use maud::{Markup, html};

use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::service::orgs::{self, CreatedAdmin, NewOrgAdmin, NewOrganization, OrganizationUpdate};

fn created_admin(a: &CreatedAdmin) -> Markup {
    html! {
        section.panel role="status" #created-admin {
            h2 { "Admin " (a.email) " of " (a.organization) " created" }
            p { "One-time password (shown only now; it must be changed at the first login): " code #one-time-password { (a.password) } }
            p.sub { "They log in with the organisation " code { (a.organization) } "." }
        }
    }
}

async fn list_page(
    state: &AppState,
    s: &Session,
    status: StatusCode,
    created: Option<&CreatedAdmin>,
) -> UiResult {
    let list = orgs::list(state, &s.op).await?;
    let body = html! {
        (heading("Organisations", Some(html! { "Each organisation's users, devices, releases and audit log are its own." })))
        @if let Some(a) = created { (created_admin(a)) }
        section.panel {
            h2 { "New organisation" }
            form method="post" action="/ui/organizations" {
                (csrf_field(s))
                div.field { label for="org-name" { "Name" } input #org-name type="text" name="name" required maxlength="64" pattern="[A-Za-z0-9._-]+"; }
                div.field { label for="org-admin" { "First admin's email" } input #org-admin type="email" name="admin_email" maxlength="254"; }
                div.field.actions { button.primary type="submit" { "Create organisation" } }
            }
        }
        div.table-wrap { table #organizations {
            thead { tr { th scope="col" { "Name" } th scope="col" { "State" } th scope="col" { "Users" } th scope="col" { "Devices" } th scope="col" { "Created" } th scope="col" { "" } } }
            tbody { @for o in &list { tr data-org=(o.name) {
                td { (o.name) }
                td { @if o.disabled != 0 { (status_badge("disabled")) } @else { (status_badge("ok")) } }
                td { (o.users) } td { (o.devices) } td.nowrap { (format::time(o.created_at)) }
                td {
                    form.inline method="post" action={ "/ui/organizations/" (o.id) } {
                        (csrf_field(s))
                        input type="hidden" name="action" value="rename";
                        label.sr-only for={ "rename-" (o.id) } { "New name" }
                        input id={ "rename-" (o.id) } type="text" name="name" required maxlength="64" placeholder="new name";
                        button type="submit" { "Rename" }
                    }
                    form.inline method="post" action={ "/ui/organizations/" (o.id) } {
                        (csrf_field(s))
                        input type="hidden" name="action" value="add-admin";
                        label.sr-only for={ "admin-" (o.id) } { "Admin email" }
                        input id={ "admin-" (o.id) } type="email" name="email" required maxlength="254" placeholder="admin email";
                        button type="submit" { "Add admin" }
                    }
                    @if o.disabled != 0 {
                        form.inline method="post" action={ "/ui/organizations/" (o.id) } {
                            (csrf_field(s))
                            input type="hidden" name="action" value="enable";
                            button type="submit" { "Re-enable" }
                        }
                    } @else if o.id != s.op.org_id {
                        form.inline method="post" action={ "/ui/organizations/" (o.id) } data-confirm={ "Disable " (o.name) "? Its operators and devices are refused." } {
                            (csrf_field(s))
                            input type="hidden" name="action" value="disable";
                            button.danger type="submit" { "Disable" }
                        }
                    }
                }
            } } }
        } }
    };
    let mut r = layout::page(s, Nav::Orgs, "Organisations", body);
    *r.status_mut() = status;
    Ok(r)
}

/// `GET /ui/organizations` (instance admin).
pub async fn list(State(state): State<AppState>, s: Session) -> UiResult {
    list_page(&state, &s, StatusCode::OK, None).await
}

/// `POST /ui/organizations`: create (instance admin).
pub async fn create(State(state): State<AppState>, form: Form) -> UiResult {
    let s = form.session.clone();
    let req = NewOrganization {
        name: form.required("name", "The name")?.to_string(),
        admin_email: form.get("admin_email").map(str::to_string),
    };
    let created = orgs::create(&state, &s.op, req).await?;
    match created.admin {
        Some(a) => list_page(&state, &s, StatusCode::CREATED, Some(&a)).await,
        None => Ok(see_other("/ui/organizations")),
    }
}

/// `POST /ui/organizations/{id}`: rename, disable, enable, add-admin.
pub async fn act(State(state): State<AppState>, Path(id): Path<String>, form: Form) -> UiResult {
    let s = form.session.clone();
    let update =
        |name: Option<String>, disabled: Option<bool>| OrganizationUpdate { name, disabled };
    match form.required("action", "The action")? {
        "rename" => {
            let name = form.required("name", "The new name")?.to_string();
            orgs::update(&state, &s.op, &id, update(Some(name), None)).await?;
        }
        a @ ("disable" | "enable") => {
            orgs::update(&state, &s.op, &id, update(None, Some(a == "disable"))).await?;
        }
        "add-admin" => {
            let email = form.required("email", "The email")?.to_string();
            let admin = orgs::add_admin(&state, &s.op, &id, NewOrgAdmin { email }).await?;
            return list_page(&state, &s, StatusCode::CREATED, Some(&admin)).await;
        }
        _ => {
            return Err(UiError::bad_request(
                "Action: rename, disable, enable or add-admin.",
            ));
        }
    }
    Ok(see_other("/ui/organizations"))
}
