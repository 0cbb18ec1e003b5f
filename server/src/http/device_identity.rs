//! The device key scheme's endpoints (`service::devices::identity`): a
//! nonce to sign, a signed nonce traded for an access token, a key
//! registered (a device migrating from its bearer credential) or rotated;
//! and, for operators, the re-enrollments waiting for a decision
//! (`service::devices::pending`).

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use kernex_protocol::api::{AccessToken, Challenge, DeviceAuth, EnrollmentRequest, KeyProof};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::AppState;
use crate::auth::{Device, Operator};
use crate::http::{ApiJson, Result};
use crate::service::devices::{identity, pending};

/// Device routes (under `/device`).
pub fn device_router() -> Router<AppState> {
    Router::new()
        .route("/challenge", post(challenge))
        .route("/auth", post(auth))
        .route("/key", post(key))
}

/// Operator routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/enrollment-requests", get(list))
        .route("/enrollment-requests/{id}/approve", post(approve))
        .route("/enrollment-requests/{id}/reject", post(reject))
}

/// A fresh nonce for the device to sign (enrollment, authentication, key
/// registration); accepted once, for two minutes.
#[utoipa::path(post, path = "/api/v1/device/challenge", responses((status = 200, body = Challenge)))]
pub async fn challenge(State(state): State<AppState>) -> Result<ApiJson<Challenge>> {
    Ok(ApiJson(identity::challenge(&state).await?))
}

/// Trade a nonce signed by the device's key for an access token.
#[utoipa::path(post, path = "/api/v1/device/auth", request_body = DeviceAuth,
    responses((status = 200, body = AccessToken), (status = 401, description = "unknown or revoked device, no key, bad signature, unknown or used nonce")))]
pub async fn auth(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DeviceAuth>,
) -> Result<ApiJson<AccessToken>> {
    state.limits.check(
        &format!("device-auth:{}", req.id),
        state.config.device_requests_per_minute,
    )?;
    let answer = identity::authenticate(&state, &req).await;
    if answer.is_err() {
        tracing::warn!(device = %req.id, "device authentication refused");
    }
    Ok(ApiJson(answer?))
}

/// Register the device's key (with its bearer credential, which stops
/// working) or rotate it (with an access token of the old key).
#[utoipa::path(post, path = "/api/v1/device/key", request_body = KeyProof,
    responses((status = 200, body = AccessToken), (status = 400), (status = 401)))]
pub async fn key(
    State(state): State<AppState>,
    device: Device,
    ApiJson(proof): ApiJson<KeyProof>,
) -> Result<ApiJson<AccessToken>> {
    Ok(ApiJson(
        identity::register_key(&state, &device, &proof).await?,
    ))
}

/// Which requests to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RequestFilter {
    /// pending (default), approved or rejected.
    pub status: Option<String>,
}

/// Re-enrollments of enrolled device ids that did not prove they are
/// that device, newest first.
#[utoipa::path(get, path = "/api/v1/enrollment-requests", params(RequestFilter),
    responses((status = 200, body = [EnrollmentRequest])))]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
    filter: Result<Query<RequestFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<Vec<EnrollmentRequest>>> {
    let Query(f) = filter?;
    Ok(ApiJson(
        pending::list(&state, &op, f.status.as_deref()).await?,
    ))
}

/// Approve a request (ops): its key becomes the device's; the old key's
/// tokens stop working.
#[utoipa::path(post, path = "/api/v1/enrollment-requests/{id}/approve",
    responses((status = 204), (status = 403), (status = 404), (status = 409)))]
pub async fn approve(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    pending::decide(&state, &op, &id, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Reject a request (ops): that key is refused for that device from now on.
#[utoipa::path(post, path = "/api/v1/enrollment-requests/{id}/reject",
    responses((status = 204), (status = 403), (status = 404), (status = 409)))]
pub async fn reject(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    pending::decide(&state, &op, &id, false).await?;
    Ok(StatusCode::NO_CONTENT)
}
