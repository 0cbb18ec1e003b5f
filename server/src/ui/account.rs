//! My account: change the password (forced at first login), my sessions
//! and API tokens (create, with the secret shown once; revoke).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use maud::{Markup, html};

use super::format;
use super::layout::{self, Nav, heading};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::Error as ServiceError;
use crate::service::accounts::{
    self, CreatedApiToken, CredentialKind, MAX_TOKEN_DAYS, MIN_PASSWORD, NewApiToken,
    PasswordChange,
};

fn password_form(s: &Session, error: Option<&str>) -> Markup {
    html! {
        section.panel #password-panel {
            h2 { "Change your password" }
            @if s.op.must_change_password {
                p.notice role="status" #must-change {
                    "You logged in with a one-time password. Choose your own before anything else."
                }
            }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/ui/account/password" {
                (csrf_field(s))
                div.field { label for="current_password" { "Current password" }
                    input #current_password type="password" name="current_password" required autocomplete="current-password"; }
                div.field { label for="new_password" { "New password (at least " (MIN_PASSWORD) " characters)" }
                    input #new_password type="password" name="new_password" required minlength=(MIN_PASSWORD) autocomplete="new-password"; }
                div.field { label for="new_password_again" { "New password, again" }
                    input #new_password_again type="password" name="new_password_again" required minlength=(MIN_PASSWORD) autocomplete="new-password"; }
                div.field.actions { button.primary type="submit" { "Change password" } }
                p.sub { "Your other sessions end; this one stays." }
            }
        }
    }
}

fn role_options(max: Role) -> Markup {
    html! {
        @for r in [Role::ReadOnly, Role::Ops, Role::Admin] {
            @if r <= max {
                option value=(r.as_str()) selected[r == max] { (r.as_str().replace('_', "-")) }
            }
        }
    }
}

async fn account_page(
    state: &AppState,
    s: &Session,
    status: StatusCode,
    error: Option<&str>,
    created: Option<&CreatedApiToken>,
) -> UiResult {
    let list = accounts::credentials(state, &s.op, &s.op.user_id).await?;
    let body = html! {
        (heading("My account", Some(html! { (s.op.email) " · " (s.op.role.as_str().replace('_', "-")) })))
        @if let Some(t) = created {
            section.panel role="status" #created-token {
                h2 { "API token " (t.name) " created" }
                p { "Copy it now: it is shown only this once and stored only as a hash." }
                p { code #new-token { (t.token) } " " button.small type="button" data-copy="#new-token" { "Copy" } }
                p.sub { "Use it as " code { "Authorization: Bearer <token>" } "; role " (t.role.as_str()) ", expires " (format::time(t.expires_at)) "." }
            }
        }
        (password_form(s, error))
        section.panel {
            h2 { "New API token" }
            p.sub { "For automation (a CI pipeline uploading releases): a name, a role no higher than yours, an expiry." }
            form method="post" action="/ui/account/tokens" {
                (csrf_field(s))
                div.field { label for="token-name" { "Name" } input #token-name type="text" name="name" required maxlength="100"; }
                div.field { label for="token-role" { "Role" } select #token-role name="role" { (role_options(s.op.role)) } }
                div.field { label for="token-days" { "Expires in (days)" }
                    input #token-days type="number" name="expires_in_days" required min="1" max=(MAX_TOKEN_DAYS) value="90"; }
                div.field.actions { button.primary type="submit" { "Create token" } }
            }
        }
        section {
            h2 { "My sessions and API tokens" }
            (credential_table(s, &list, &format!("/ui/users/{}/credentials", s.op.user_id)))
        }
    };
    let mut response = layout::page(s, Nav::Account, "My account", body);
    *response.status_mut() = status;
    Ok(response)
}

/// The live sessions and tokens of a user, with revoke buttons posting to
/// `{base}/{id}/revoke`.
pub fn credential_table(s: &Session, list: &[accounts::Credential], base: &str) -> Markup {
    html! {
        @if list.is_empty() { p.empty { "No live session or token." } } @else {
            div.table-wrap { table #credentials {
                thead { tr { th scope="col" { "Kind" } th scope="col" { "Name" } th scope="col" { "Role" } th scope="col" { "Created" } th scope="col" { "Expires" } th scope="col" { "" } } }
                tbody { @for c in list {
                    tr data-credential=(c.id) data-kind=(if c.kind == CredentialKind::ApiToken { "api_token" } else { "session" }) data-name=(c.name.as_deref().unwrap_or("")) {
                        td { @if c.kind == CredentialKind::ApiToken { "API token" } @else { "session" } @if c.current { " (this one)" } }
                        td { (c.name.as_deref().unwrap_or("—")) }
                        td { (c.role.map(|r| r.as_str().replace('_', "-")).unwrap_or_else(|| "—".into())) }
                        td.nowrap { (format::time(c.created_at)) }
                        td.nowrap { (format::time(c.expires_at)) }
                        td { form method="post" action={ (base) "/" (c.id) "/revoke" } data-confirm="Revoke it? It stops working at once." {
                            (csrf_field(s))
                            button.danger type="submit" { "Revoke" }
                        } }
                    }
                } }
            } }
        }
    }
}

/// `GET /ui/account`.
pub async fn page(State(state): State<AppState>, s: Session) -> UiResult {
    account_page(&state, &s, StatusCode::OK, None, None).await
}

/// `GET /ui/account/password`: where an operator who must change the
/// password is sent.
pub async fn password_page(s: Session) -> UiResult {
    if !s.op.must_change_password {
        return Ok(see_other("/ui/account"));
    }
    let body = html! {
        (heading("Choose your password", None))
        (password_form(&s, None))
    };
    Ok(layout::page(&s, Nav::Account, "Change your password", body))
}

/// `POST /ui/account/password`.
pub async fn change_password(State(state): State<AppState>, form: Form) -> UiResult {
    let s = form.session.clone();
    let current = form
        .required("current_password", "The current password")?
        .to_string();
    let new = form
        .required("new_password", "The new password")?
        .to_string();
    let again = form.get("new_password_again").unwrap_or_default();
    let retry = |e: &str| -> UiResult {
        let body = html! {
            (heading("Change your password", None))
            (password_form(&s, Some(e)))
        };
        let mut r = layout::page(&s, Nav::Account, "Change your password", body);
        *r.status_mut() = StatusCode::BAD_REQUEST;
        Ok(r)
    };
    if new != again {
        return retry("The two new passwords differ.");
    }
    let req = PasswordChange {
        current_password: current,
        new_password: new,
    };
    match accounts::change_password(&state, &s.op, req).await {
        Ok(()) => Ok(see_other(if s.op.must_change_password {
            "/ui/"
        } else {
            "/ui/account?changed=1"
        })),
        Err(ServiceError::Invalid(d) | ServiceError::Refused(d)) => retry(&capital(&d)),
        Err(e) => Err(e.into()),
    }
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect::<String>() + ".",
        None => String::new(),
    }
}

/// `POST /ui/account/tokens`: the page again, with the new token shown once.
pub async fn create_token(State(state): State<AppState>, form: Form) -> UiResult {
    let s = form.session.clone();
    let name = form.required("name", "The name")?.to_string();
    let role = form
        .get("role")
        .and_then(Role::parse)
        .ok_or_else(|| UiError::bad_request("Role: read_only, ops or admin."))?;
    let days = form
        .required("expires_in_days", "The expiry")?
        .parse::<u32>()
        .map_err(|_| UiError::bad_request("Expiry: a number of days."))?;
    let req = NewApiToken {
        name,
        role: Some(role),
        expires_in_days: days,
    };
    match accounts::create_api_token(&state, &s.op, req).await {
        Ok(created) => account_page(&state, &s, StatusCode::CREATED, None, Some(&created)).await,
        Err(e) => Err(e.into()),
    }
}

/// `POST /ui/users/{id}/credentials/{credential}/revoke` (admin, or your
/// own).
pub async fn revoke_credential(
    State(state): State<AppState>,
    Path((user, credential)): Path<(String, String)>,
    form: Form,
) -> UiResult {
    let op = &form.session.op;
    accounts::revoke_credential(&state, op, &user, &credential).await?;
    Ok(see_other(&if user == op.user_id {
        "/ui/account".to_string()
    } else {
        format!("/ui/users/{user}")
    }))
}
