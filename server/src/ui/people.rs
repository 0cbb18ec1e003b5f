//! A user as an admin manages them: role, disable and re-enable, delete,
//! their login throttle (clear a lockout), and their live sessions and API
//! tokens (revoke).

use axum::extract::{Path, State};
use maud::html;

use super::account::credential_table;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::accounts::{self, UserUpdate};
use crate::service::login_throttle;

/// `GET /ui/users/{id}` (admin).
pub async fn detail(State(state): State<AppState>, Path(id): Path<String>, s: Session) -> UiResult {
    if !s.can(Role::Admin) {
        return Err(UiError::forbidden());
    }
    let user = accounts::user(&state, &s.op, &id).await?;
    let list = accounts::credentials(&state, &s.op, &id).await?;
    let held = login_throttle::held(&state, &s.op, &id).await?;
    let me = user.id == s.op.user_id;
    Ok(layout::page(
        &s,
        Nav::Users,
        &user.email,
        html! {
            (heading(&user.email, Some(html! {
                span.badge.role { (user.role.as_str().replace('_', "-")) } " "
                @if user.disabled { (status_badge("disabled")) span #user-state hidden { "disabled" } }
                @else { (status_badge("ok")) span #user-state hidden { "enabled" } }
                @if user.must_change_password { " must change the password at the next login" }
            })))
            @if me { p.notice { "This is you: another admin changes your role or disables you." } } @else {
                section.panel {
                    h2 { "Role" }
                    form method="post" action={ "/ui/users/" (user.id) } {
                        (csrf_field(&s))
                        input type="hidden" name="action" value="role";
                        div.field { label for="role" { "Role" }
                            select #role name="role" {
                                @for r in [Role::ReadOnly, Role::Ops, Role::Admin] {
                                    option value=(r.as_str()) selected[r == user.role] { (r.as_str().replace('_', "-")) }
                                }
                            }
                        }
                        div.field.actions { button #change-role type="submit" { "Change role" } }
                    }
                    p.sub { "Takes effect on their next request." }
                }
                section.panel {
                    h2 { "Access" }
                    @if user.disabled {
                        form method="post" action={ "/ui/users/" (user.id) } {
                            (csrf_field(&s))
                            input type="hidden" name="action" value="enable";
                            button #enable-user type="submit" { "Re-enable" }
                        }
                    } @else {
                        form method="post" action={ "/ui/users/" (user.id) } data-confirm={ "Disable " (user.email) "? Every session and token of theirs stops working at once." } {
                            (csrf_field(&s))
                            input type="hidden" name="action" value="disable";
                            button.danger #disable-user type="submit" { "Disable" }
                        }
                    }
                    form method="post" action={ "/ui/users/" (user.id) } data-confirm={ "Delete " (user.email) "? This cannot be undone; the audit log keeps their email." } {
                        (csrf_field(&s))
                        input type="hidden" name="action" value="delete";
                        button.danger #delete-user type="submit" { "Delete" }
                    }
                }
            }
            section.panel #login-throttle {
                h2 { "Login throttle" }
                @if held.failures == 0 {
                    p #throttle-state data-failures="0" { "No failed logins held against this account." }
                } @else {
                    p #throttle-state data-failures=(held.failures) {
                        (held.failures) " failed logins held against this account"
                        @if held.locked_addresses > 0 { "; locked out from " (held.locked_addresses) " address(es)" }
                        ": further logins back off."
                    }
                }
                form method="post" action={ "/ui/users/" (user.id) } {
                    (csrf_field(&s))
                    input type="hidden" name="action" value="clear-throttle";
                    button #clear-login-throttle type="submit" { "Clear lockout" }
                }
                p.sub { "Ends their lockout and backoff now, on this server process (audited)." }
            }
            section {
                h2 { "Sessions and API tokens" }
                (credential_table(&s, &list, &format!("/ui/users/{}/credentials", user.id)))
            }
        },
    ))
}

/// `POST /ui/users/{id}`: role, disable, enable, delete or clear-throttle
/// (admin, enforced by the service).
pub async fn act(State(state): State<AppState>, Path(id): Path<String>, form: Form) -> UiResult {
    let op = &form.session.op;
    match form.required("action", "The action")? {
        "role" => {
            let role = form
                .get("role")
                .and_then(Role::parse)
                .ok_or_else(|| UiError::bad_request("Role: read_only, ops or admin."))?;
            let req = UserUpdate {
                role: Some(role),
                disabled: None,
            };
            accounts::update_user(&state, op, &id, req).await?;
        }
        a @ ("disable" | "enable") => {
            let req = UserUpdate {
                role: None,
                disabled: Some(a == "disable"),
            };
            accounts::update_user(&state, op, &id, req).await?;
        }
        "delete" => {
            accounts::delete_user(&state, op, &id).await?;
            return Ok(see_other("/ui/users"));
        }
        "clear-throttle" => {
            login_throttle::clear(&state, op, &id).await?;
        }
        _ => {
            return Err(UiError::bad_request(
                "Action: role, disable, enable, delete or clear-throttle.",
            ));
        }
    }
    Ok(see_other(&format!("/ui/users/{id}")))
}
