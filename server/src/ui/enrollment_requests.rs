//! Re-enrollments waiting for an operator (`service::devices::pending`),
//! on the devices page: each with the device it claims, the fingerprint
//! of the key it brings and the token it used; ops approve or reject.

use axum::extract::{Path, State};
use maud::{Markup, html};

use super::format;
use super::{Form, Session, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::devices::pending;

/// The pending requests section (nothing when there is none).
pub async fn section(state: &AppState, s: &Session) -> UiResult<Markup> {
    let waiting = pending::list(state, &s.op, None).await?;
    if waiting.is_empty() {
        return Ok(html! {});
    }
    Ok(html! {
        section.attention {
            h2 { "Enrollment requests" }
            p.small {
                "These requests name an enrolled device id without proving they are that device "
                "(its key or its TPM). They hold no credential; the device keeps working. "
                "Approve only a device you re-flashed or replaced: its key then becomes the device's."
            }
            table {
                thead { tr { th { "Request" } th { "Device" } th { "Key (SHA-256)" } th { "Token" } th { "When" } th {} } }
                tbody {
                    @for r in &waiting {
                        tr {
                            td.mono { (r.id) }
                            td { a href={ "/ui/devices/" (r.device_pk) } { (r.device_id) } }
                            td.mono { (r.key_fingerprint.get(..16).unwrap_or(&r.key_fingerprint)) "…" }
                            td.mono { (r.enrollment_token_id) }
                            td { (format::time(r.created_at)) }
                            td {
                                @if s.can(Role::Ops) {
                                    form.inline method="post" action={ "/ui/enrollment-requests/" (r.id) "/approve" } data-confirm={ "Give device " (r.device_id) " this new key? Its current key stops working." } {
                                        (csrf_field(s))
                                        button type="submit" { "Approve" }
                                    }
                                    form.inline method="post" action={ "/ui/enrollment-requests/" (r.id) "/reject" } {
                                        (csrf_field(s))
                                        button.danger type="submit" { "Reject" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

/// `POST /ui/enrollment-requests/{id}/approve` (ops).
pub async fn approve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    form: Form,
) -> UiResult {
    pending::decide(&state, &form.session.op, &id, true).await?;
    Ok(see_other("/ui/devices"))
}

/// `POST /ui/enrollment-requests/{id}/reject` (ops).
pub async fn reject(State(state): State<AppState>, Path(id): Path<String>, form: Form) -> UiResult {
    pending::decide(&state, &form.session.op, &id, false).await?;
    Ok(see_other("/ui/devices"))
}
