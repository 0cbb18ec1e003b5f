//! The audit log (filtered), users and roles, the organisation's keyring.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use maud::html;
use serde::Deserialize;

use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::audit::{self, Search};
use crate::service::users::{self, Keyring, NewUser};

/// Audit filters; all optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before: Option<String>,
}

/// An audit target as a link to its page when it names one
/// (`device:ID`, `rollout:ID`, `release:ID`, `deployment:ID`, `user:ID`).
fn target_link(target: &str) -> maud::Markup {
    let page = target.split_once(':').and_then(|(kind, id)| {
        let base = match kind {
            "device" => "/ui/devices/",
            "rollout" => "/ui/rollouts/",
            "release" => "/ui/releases/",
            "deployment" => "/ui/deployments/",
            _ => return None,
        };
        let plain = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        plain.then(|| format!("{base}{id}"))
    });
    match page {
        Some(href) => html! { a href=(href) { (target) } },
        None => html! { (target) },
    }
}

fn clean(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

const PAGE: i64 = 200;

/// `GET /ui/audit`: the audit log, newest first, filtered by who, what, on
/// what and when; and whether the hash chain verifies.
pub async fn audit(
    State(state): State<AppState>,
    s: Session,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let Ok(Query(q)) = query else {
        return Err(UiError::bad_request(
            "This address has a parameter the audit log does not know. \
             Its filters are actor, action, target, since, until and before.",
        ));
    };
    let (actor, action, target) = (clean(q.actor), clean(q.action), clean(q.target));
    let (since_s, until_s) = (clean(q.since), clean(q.until));
    let date = |v: &Option<String>, what: &str| -> UiResult<Option<i64>> {
        match v {
            None => Ok(None),
            Some(d) => format::parse_date(d).map(Some).ok_or_else(|| {
                UiError::bad_request(format!("{what}: a date as YYYY-MM-DD, not {d:?}."))
            }),
        }
    };
    let since = date(&since_s, "From")?;
    // Inclusive: the whole `until` day.
    let until = date(&until_s, "To")?.map(|t| t + 86_400_000);
    let before = match clean(q.before) {
        None => None,
        Some(b) => Some(
            b.parse::<i64>()
                .map_err(|_| UiError::bad_request("before: a sequence number."))?,
        ),
    };
    let search = Search {
        actor: actor.clone(),
        action: action.clone(),
        target: target.clone(),
        since,
        until,
        before,
    };
    let entries = audit::search(&state, &s.op, &search, PAGE).await?;
    let broken = audit::chain_broken_at(&state, &s.op).await?;
    let key = audit::signing_key(&state)?;
    let older = (entries.len() as i64 == PAGE)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    let keep = |name: &str, v: &Option<String>| {
        v.as_ref()
            .map(|v| format!("&{name}={}", format::url_encode(v)))
            .unwrap_or_default()
    };
    let filters = [
        keep("actor", &actor),
        keep("action", &action),
        keep("target", &target),
        keep("since", &since_s),
        keep("until", &until_s),
    ]
    .concat();
    let input =
        |name: &'static str, label: &'static str, kind: &'static str, v: &Option<String>| {
            html! {
                div.field {
                    label for=(name) { (label) }
                    input id=(name) type=(kind) name=(name) value=(v.as_deref().unwrap_or(""));
                }
            }
        };
    Ok(layout::page(
        &s,
        Nav::Audit,
        "Audit log",
        html! {
            (heading("Audit log", Some(html! {
                @match broken {
                    None => { (status_badge("ok")) " The hash chain verifies: no entry was changed or removed." }
                    Some(seq) => { (status_badge("error")) " The hash chain breaks at entry " (seq) ": the log was tampered with." }
                }
            })))
            form.filters method="get" action="/ui/audit" {
                (input("actor", "User", "text", &actor))
                (input("action", "Action", "text", &action))
                (input("target", "Target", "text", &target))
                (input("since", "From", "date", &since_s))
                (input("until", "To", "date", &until_s))
                div.field.actions { button type="submit" { "Filter" } a href="/ui/audit" { "Clear" } }
            }
            details.audit-key {
                summary { "Signing key: " code { (key.public_key) } }
                p.small { "This instance signs the chain's head every " (key.checkpoint_entries) " entries or " (key.checkpoint_minutes) " minutes with this Ed25519 key. Save the PEM below and check a copy of the database offline with " code { "kernex-server audit verify --public-key FILE DATABASE" } "." }
                pre.small { (key.public_key_pem) }
            }
            @if entries.is_empty() { p.empty { "No entry matches." } } @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "#" } th scope="col" { "Time" } th scope="col" { "User" } th scope="col" { "Action" } th scope="col" { "Target" } th scope="col" { "Result" } } }
                    tbody { @for e in &entries { tr {
                        td { (e.seq) } td.nowrap { (format::time(e.at)) } td { (e.actor) } td { code { (e.action) } } td.small.reason { (target_link(&e.target)) }
                        td { @if e.result == "ok" { (status_badge("ok")) } @else { span.badge.bad { (e.result) } } }
                    } } }
                } }
                @if let Some(seq) = older { p { a href={ "/ui/audit?before=" (seq) (filters) } { "Older entries" } } }
            }
        },
    ))
}

/// Query of the users page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersQuery {
    created: Option<String>,
}

/// `GET /ui/users` (admin).
pub async fn users(
    State(state): State<AppState>,
    s: Session,
    query: Result<Query<UsersQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    if !s.can(Role::Admin) {
        return Err(UiError::forbidden());
    }
    let created = query.ok().and_then(|q| q.0.created);
    users_page(&state, &s, created, &UserDraft::default()).await
}

/// A new-user form as typed, and why it was refused.
#[derive(Debug, Default)]
struct UserDraft {
    email: String,
    role: String,
    error: Option<String>,
}

async fn users_page(
    state: &AppState,
    s: &Session,
    created: Option<String>,
    draft: &UserDraft,
) -> UiResult {
    if !s.can(Role::Admin) {
        return Err(UiError::forbidden());
    }
    let list = users::list_users(state, &s.op).await?;
    let page = layout::page(
        s,
        Nav::Users,
        "Users",
        html! {
            (heading("Users and roles", Some(html! { "read-only: sees everything · ops: also uploads, deploys, enrolls · admin: also users and keyring" })))
            @if let Some(e) = created { p.notice role="status" { "Created " (e) "." } }
            section.panel {
                h2 { "New user" }
                form method="post" action="/ui/users" {
                    (csrf_field(s))
                    @if let Some(e) = &draft.error { p.error #user-error role="alert" { (e) } }
                    div.field { label for="email" { "Email" } input #email type="email" name="email" required maxlength="254" autocomplete="off" value=(draft.email); }
                    div.field { label for="password" { "Initial password (at least 12 characters)" } input #password type="password" name="password" required minlength="12" autocomplete="new-password"; }
                    div.field { label for="role" { "Role" }
                        select #role name="role" {
                            option value="read_only" selected[draft.role == "read_only"] { "read-only" }
                            option value="ops" selected[draft.role == "ops"] { "ops" }
                            option value="admin" selected[draft.role == "admin"] { "admin" }
                        }
                    }
                    div.field.actions { button.primary type="submit" { "Create user" } }
                }
            }
            div.table-wrap { table #users {
                thead { tr { th scope="col" { "Email" } th scope="col" { "Role" } th scope="col" { "State" } } }
                tbody { @for u in &list { tr data-user=(u.email) {
                    td { a href={ "/ui/users/" (u.id) } { (u.email) } }
                    td { span.badge.role { (u.role.as_str().replace('_', "-")) } }
                    td { @if u.disabled { (status_badge("disabled")) } @else { (status_badge("ok")) } }
                } } }
            } }
        },
    );
    Ok(if draft.error.is_some() {
        (StatusCode::BAD_REQUEST, page).into_response()
    } else {
        page
    })
}

/// `POST /ui/users` (admin, enforced by the service).
pub async fn create_user(State(state): State<AppState>, form: Form) -> UiResult {
    let email = form.get("email").unwrap_or("").to_string();
    let mut draft = UserDraft {
        email: email.clone(),
        role: form.get("role").unwrap_or("").to_string(),
        error: None,
    };
    let refusal = match (form.get("password"), form.get("role").and_then(Role::parse)) {
        _ if email.is_empty() => "The email is required.".to_string(),
        (None, _) => "The password is required.".to_string(),
        (_, None) => "Role: read_only, ops or admin.".to_string(),
        (Some(password), Some(role)) => {
            let new = NewUser {
                email: email.clone(),
                password: password.to_string(),
                role,
            };
            match users::create_user(&state, &form.session.op, new).await {
                Ok(_) => {
                    return Ok(see_other(&format!(
                        "/ui/users?created={}",
                        format::url_encode(&email)
                    )));
                }
                Err(
                    crate::service::Error::Invalid(why)
                    | crate::service::Error::Conflict(why)
                    | crate::service::Error::Refused(why),
                ) => why,
                Err(e) => return Err(e.into()),
            }
        }
    };
    draft.error = Some(format!("Not created: {refusal}"));
    users_page(&state, &form.session, None, &draft).await
}

/// `GET /ui/keyring`: the CA certificates bundles must chain to.
pub async fn keyring(State(state): State<AppState>, s: Session) -> UiResult {
    keyring_page(&state, &s, "", None).await
}

async fn keyring_page(state: &AppState, s: &Session, typed: &str, error: Option<&str>) -> UiResult {
    let list = users::keyring_certificates(state, &s.op).await?;
    let page = layout::page(
        s,
        Nav::Keyring,
        "Keyring",
        html! {
            (heading("Organisation keyring", Some(html! { "Release bundles must be signed by a certificate that chains to one of these CAs." })))
            @if list.is_empty() { p.notice { "No keyring set: no release can be uploaded until an admin sets one." } } @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Subject" } th scope="col" { "Issuer" } th scope="col" { "Expires" } th scope="col" { "SHA-256 fingerprint" } } }
                    tbody { @for c in &list { tr { td { (c.subject) } td { (c.issuer) } td { (c.not_after) } td.mono.small { (c.sha256) } } } }
                } }
            }
            @if s.can(Role::Admin) {
                section.panel {
                    h2 { "Replace the keyring" }
                    form method="post" action="/ui/keyring" data-confirm="Replace the organisation's keyring? Bundles signed under other CAs will be refused." {
                        (csrf_field(s))
                        div.field {
                            label for="pem" { "CA certificates (PEM)" }
                            textarea #pem name="pem" rows="8" required placeholder="-----BEGIN CERTIFICATE-----"
                                aria-invalid=[error.map(|_| "true")] aria-describedby=[error.map(|_| "pem-error")] { (typed) }
                            @if let Some(e) = error { span.error #pem-error role="alert" { (e) } }
                        }
                        div.field.actions { button.primary type="submit" { "Set keyring" } }
                    }
                }
            }
        },
    );
    Ok(if error.is_some() {
        (StatusCode::BAD_REQUEST, page).into_response()
    } else {
        page
    })
}

/// `POST /ui/keyring` (admin, enforced by the service); a refused
/// keyring is shown again with the reason next to it.
pub async fn set_keyring(State(state): State<AppState>, form: Form) -> UiResult {
    let pem = form.get("pem").unwrap_or("").to_string();
    if pem.is_empty() {
        return keyring_page(&state, &form.session, "", Some("The PEM text is required.")).await;
    }
    match users::set_keyring(&state, &form.session.op, Keyring { pem: pem.clone() }).await {
        Ok(_) => Ok(see_other("/ui/keyring")),
        Err(crate::service::Error::Invalid(why) | crate::service::Error::Unprocessable(why)) => {
            keyring_page(
                &state,
                &form.session,
                &pem,
                Some(&format!("Not set: {why}")),
            )
            .await
        }
        Err(e) => Err(e.into()),
    }
}
