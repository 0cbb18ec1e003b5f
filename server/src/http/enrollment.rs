//! Enrollment tokens: issued per factory batch by an operator, presented by
//! devices at enrollment (`service::enrollment`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use kernex_protocol::api::{EnrollmentToken, NewEnrollmentToken, TokenCheck};

use crate::AppState;
use crate::auth::Operator;
use crate::http::{ApiJson, Result};
use crate::service::enrollment;

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/enrollment-tokens", post(create).get(list))
        .route("/enrollment-tokens/{id}", delete(revoke))
        .route("/enrollment-tokens/check", post(check))
}

/// Check an enrollment token before it goes onto a device (ops; the
/// factory line's `kernex-image provision`): 200 with the token (no
/// secret) when devices can enroll with it now, 404 when it is unknown in
/// this organisation, revoked or expired.
#[utoipa::path(post, path = "/api/v1/enrollment-tokens/check", request_body = TokenCheck,
    responses((status = 200, body = EnrollmentToken), (status = 403),
        (status = 404, description = "unknown, revoked or expired")))]
pub async fn check(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<TokenCheck>,
) -> Result<ApiJson<EnrollmentToken>> {
    Ok(ApiJson(enrollment::check(&state, &op, &req.token).await?))
}

pub use crate::service::names::check_tags;

/// Create an enrollment token (ops).
#[utoipa::path(post, path = "/api/v1/enrollment-tokens", request_body = NewEnrollmentToken,
    responses((status = 201, body = EnrollmentToken), (status = 403)))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewEnrollmentToken>,
) -> Result<(StatusCode, ApiJson<EnrollmentToken>)> {
    let token = enrollment::create(&state, &op, req).await?;
    Ok((StatusCode::CREATED, ApiJson(token)))
}

/// List enrollment tokens (without secrets).
#[utoipa::path(get, path = "/api/v1/enrollment-tokens", responses((status = 200, body = [EnrollmentToken])))]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
) -> Result<ApiJson<Vec<EnrollmentToken>>> {
    Ok(ApiJson(enrollment::list(&state, &op).await?))
}

/// Revoke an enrollment token (ops). Devices already enrolled stay.
#[utoipa::path(delete, path = "/api/v1/enrollment-tokens/{id}",
    responses((status = 204), (status = 403), (status = 404)))]
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    enrollment::revoke(&state, &op, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
