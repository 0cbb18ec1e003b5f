//! An admin's clear of a user's login throttle (`service::login_throttle`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::delete;

use crate::AppState;
use crate::auth::Operator;
use crate::http::Result;
use crate::service::login_throttle;

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/users/{id}/login-throttle", delete(clear))
}

/// End a user's login lockout and backoff now (admin), on this server
/// process.
#[utoipa::path(delete, path = "/api/v1/users/{id}/login-throttle",
    responses((status = 204), (status = 403), (status = 404)))]
pub async fn clear(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    login_throttle::clear(&state, &op, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
