//! Deployments: "assign release R to devices D…" (`service::deployments`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};

use crate::AppState;
use crate::auth::Operator;
use crate::http::{ApiJson, Result};
use crate::service::deployments;
pub use crate::service::deployments::{Deployment, DeviceState, NewDeployment};
use crate::service::patches::per_device::{self, DeploymentPreview};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/deployments", get(list).post(create))
        .route("/deployments/preview", post(preview))
        .route("/deployments/{id}", get(detail))
        .route("/deployments/{id}/preview", get(preview_of))
}

/// What a deployment would take, per device: the delta planner's method
/// and exact bytes (the body of `POST /deployments`; nothing is made).
#[utoipa::path(post, path = "/api/v1/deployments/preview", request_body = NewDeployment,
    responses((status = 200, body = DeploymentPreview), (status = 400), (status = 404), (status = 422)))]
pub async fn preview(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewDeployment>,
) -> Result<ApiJson<DeploymentPreview>> {
    Ok(ApiJson(
        per_device::preview(&state, &op.org_id, &req.release_id, &req.devices).await?,
    ))
}

/// What a deployment's devices fetch, per device (final once its patch
/// jobs are done: `patches_building` is 0).
#[utoipa::path(get, path = "/api/v1/deployments/{id}/preview",
    responses((status = 200, body = DeploymentPreview), (status = 404)))]
pub async fn preview_of(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<DeploymentPreview>> {
    let d = deployments::detail(&state, &op, &id).await?;
    let devices: Vec<String> = d
        .devices
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.device)
        .collect();
    Ok(ApiJson(
        per_device::preview(&state, &op.org_id, &d.release_id, &devices).await?,
    ))
}

/// Assign a release to devices (ops).
#[utoipa::path(post, path = "/api/v1/deployments", request_body = NewDeployment,
    responses((status = 201, body = Deployment), (status = 403), (status = 404), (status = 422)))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewDeployment>,
) -> Result<(StatusCode, ApiJson<Deployment>)> {
    let d = deployments::create(&state, &op, req).await?;
    Ok((StatusCode::CREATED, ApiJson(d)))
}

/// List deployments, newest first.
#[utoipa::path(get, path = "/api/v1/deployments", responses((status = 200, body = [Deployment])))]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Vec<Deployment>>> {
    Ok(ApiJson(deployments::list(&state, &op).await?))
}

/// A deployment with per-device progress.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", responses((status = 200, body = Deployment), (status = 404)))]
pub async fn detail(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Deployment>> {
    Ok(ApiJson(deployments::detail(&state, &op, &id).await?))
}
