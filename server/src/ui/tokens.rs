//! Enrollment tokens: create (shown once), list with their expiry, use
//! count and allowed tags, revoke. A refused form comes back with the
//! error next to it and what was typed kept.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use maud::{Markup, html};

use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::{self, enrollment};
use kernex_protocol::api::NewEnrollmentToken;

/// What the new-token form shows: the values typed, and why they were
/// refused.
#[derive(Debug, Default)]
struct Draft {
    label: String,
    tags: String,
    allowed_tags: String,
    expires_days: String,
    max_uses: String,
    error: Option<String>,
}

fn new_token_form(s: &Session, d: &Draft) -> Markup {
    html! {
        section.panel {
            h2 { "New token" }
            form method="post" action="/ui/enrollment-tokens" {
                (csrf_field(s))
                @if let Some(e) = &d.error {
                    p.error #token-error role="alert" { (e) }
                }
                div.field {
                    label for="label" { "Label" }
                    input #label type="text" name="label" required maxlength="200" placeholder="factory line 2, batch 2026-11" value=(d.label);
                }
                div.field {
                    label for="tags" { "Tags every device gets (separated by spaces or commas)" }
                    input #tags type="text" name="tags" placeholder="site-a metered" value=(d.tags);
                }
                div.field {
                    label for="allowed_tags" { "Tags a device may ask for (others are refused)" }
                    input #allowed_tags type="text" name="allowed_tags" placeholder="canary lab" value=(d.allowed_tags);
                }
                div.field {
                    label for="expires_days" { "Expires after (days)" }
                    input #expires_days type="number" name="expires_days" required min="1" value=(d.expires_days);
                }
                div.field {
                    label for="max_uses" { "Devices that may enroll with it (empty: no cap)" }
                    input #max_uses type="number" name="max_uses" min="1" value=(d.max_uses);
                }
                div.field {
                    label { input type="checkbox" name="require_preauthorization" value="1"; " Only pre-authorised devices (the factory line records each serial or TPM)" }
                }
                div.field {
                    label { input type="checkbox" name="require_tpm" value="1"; " Only devices with a TPM (credential activation at enrollment)" }
                }
                div.field.actions { button.primary type="submit" { "Create token" } }
            }
        }
    }
}

async fn tokens_page(
    state: &AppState,
    s: &Session,
    created: Option<(String, String)>,
    draft: Draft,
) -> UiResult {
    let list = enrollment::list(state, &s.op).await?;
    let max_ttl = state.config.limits.enrollment_token_max_ttl_ms();
    let now = crate::store::now_ms();
    Ok(layout::page(
        s,
        Nav::Tokens,
        "Enrollment tokens",
        html! {
            (heading("Enrollment tokens", Some(html! { "A factory line enrolls devices with a token; every device enrolled with it gets its tags. A token expires, and may be capped to a number of devices." })))
            @if let Some((label, token)) = &created {
                section.panel.secret role="status" {
                    h2 { "Token created: " (label) }
                    p { "Copy it now: it is shown only once and stored only as a hash." }
                    p { code #new-token.mono { (token) } " " button.small type="button" data-copy="#new-token" { "Copy" } }
                }
            }
            @if s.can(Role::Ops) { (new_token_form(s, &draft)) }
            @if list.is_empty() { p.empty { "No enrollment token yet." } } @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Label" } th scope="col" { "Tags" } th scope="col" { "May ask for" } th scope="col" { "Created" } th scope="col" { "Expires" } th scope="col" { "Uses" } th scope="col" { "State" }
                        @if s.can(Role::Ops) { th scope="col" { span.visually-hidden { "Actions" } } } } }
                    tbody { @for t in &list {
                        @let expires = t.expires_at.unwrap_or(t.created_at.saturating_add(max_ttl));
                        @let used_up = t.max_uses.is_some_and(|m| t.uses >= m);
                        tr {
                        td { (t.label) }
                        td { @for tag in &t.tags { span.tag { (tag) } " " } }
                        td { @for tag in &t.allowed_tags { span.tag { (tag) } " " } }
                        td { (format::time(t.created_at)) }
                        td { (format::time(expires)) }
                        td.uses { (t.uses) @if let Some(m) = t.max_uses { " of " (m) } }
                        td { @if t.revoked { (status_badge("revoked")) } @else if expires <= now { (status_badge("expired")) } @else if used_up { (status_badge("used up")) } @else { (status_badge("ok")) } }
                        @if s.can(Role::Ops) { td {
                            @if !t.revoked {
                                form.inline method="post" action={ "/ui/enrollment-tokens/" (t.id) "/revoke" } data-confirm={ "Revoke the token \u{201c}" (t.label) "\u{201d}? Devices already enrolled stay." } {
                                    (csrf_field(s))
                                    button.danger.small type="submit" { "Revoke" span.visually-hidden { " " (t.label) } }
                                }
                            }
                        } }
                    } } }
                } }
            }
        },
    ))
}

/// `GET /ui/enrollment-tokens`.
pub async fn tokens(State(state): State<AppState>, s: Session) -> UiResult {
    let draft = Draft {
        expires_days: state
            .config
            .limits
            .enrollment_token_default_ttl_days
            .to_string(),
        ..Draft::default()
    };
    tokens_page(&state, &s, None, draft).await
}

fn tag_list(v: &str) -> Vec<String> {
    v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// The request the form makes, or why it cannot be made.
fn request(form: &Form, d: &Draft) -> Result<NewEnrollmentToken, String> {
    if d.label.is_empty() {
        return Err("The label is required.".into());
    }
    let expires_in_secs = match d.expires_days.parse::<i64>() {
        Ok(days) if days >= 1 => days.saturating_mul(86_400),
        _ => return Err("Expiry: a whole number of days, 1 or more.".into()),
    };
    let max_uses = match d.max_uses.as_str() {
        "" => None,
        n => match n.parse::<i64>() {
            Ok(n) if n >= 1 => Some(n),
            _ => return Err("Devices: a whole number, 1 or more, or empty for no cap.".into()),
        },
    };
    Ok(NewEnrollmentToken {
        label: d.label.clone(),
        tags: tag_list(&d.tags),
        allowed_tags: tag_list(&d.allowed_tags),
        expires_at: None,
        expires_in_secs: Some(expires_in_secs),
        max_uses,
        link_class: None,
        site: None,
        time_zone: None,
        require_preauthorization: form.get("require_preauthorization").is_some(),
        require_tpm: form.get("require_tpm").is_some(),
    })
}

/// `POST /ui/enrollment-tokens`: creates a token and shows it once (the
/// page is not cached and a reload does not show it again). A refusal
/// (400) shows the form again with the reason and the values typed.
pub async fn create_token(State(state): State<AppState>, form: Form) -> UiResult {
    // The role first: a read-only operator learns nothing from the form.
    if !form.session.can(Role::Ops) {
        return Err(UiError::forbidden());
    }
    let value = |k: &str| form.get(k).unwrap_or("").to_string();
    let mut draft = Draft {
        label: value("label"),
        tags: value("tags"),
        allowed_tags: value("allowed_tags"),
        expires_days: value("expires_days"),
        max_uses: value("max_uses"),
        error: None,
    };
    let refused = match request(&form, &draft) {
        Err(why) => why,
        Ok(req) => match enrollment::create(&state, &form.session.op, req).await {
            Ok(created) => {
                let token = created
                    .token
                    .ok_or_else(|| anyhow::anyhow!("the created token has no secret"))?;
                let mut response = tokens_page(
                    &state,
                    &form.session,
                    Some((draft.label, token)),
                    Draft {
                        expires_days: state
                            .config
                            .limits
                            .enrollment_token_default_ttl_days
                            .to_string(),
                        ..Draft::default()
                    },
                )
                .await?;
                *response.status_mut() = StatusCode::CREATED;
                return Ok(response);
            }
            Err(service::Error::Invalid(why)) => why,
            Err(other) => return Err(UiError::from(other)),
        },
    };
    draft.error = Some(refused);
    let mut response = tokens_page(&state, &form.session, None, draft).await?;
    *response.status_mut() = StatusCode::BAD_REQUEST;
    Ok(response)
}

/// `POST /ui/enrollment-tokens/{id}/revoke`.
pub async fn revoke_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    form: Form,
) -> UiResult {
    enrollment::revoke(&state, &form.session.op, &id).await?;
    Ok(see_other("/ui/enrollment-tokens"))
}
