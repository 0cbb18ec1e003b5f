//! Deployments: "assign release R to devices D…". Sets each device's desired
//! release and tracks per-device state; rollout waves build on this.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{Operator, Role};
use crate::http::{ApiJson, Error, Result, audited};
use crate::store::{new_id, now_ms};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/deployments", get(list).post(create))
        .route("/deployments/{id}", get(detail))
}

/// A new deployment.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeployment {
    /// Release id.
    pub release_id: String,
    /// Device ids (the `id` of `/devices`).
    pub devices: Vec<String>,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// One device's state in a deployment.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceState {
    /// Device id.
    pub device: String,
    /// assigned, downloading, installed, rebooted, committed, reverted, failed.
    pub state: String,
    /// Bytes downloaded.
    pub bytes_done: Option<i64>,
    /// Bytes to download.
    pub bytes_total: Option<i64>,
    /// Reason (reverted/failed).
    pub reason: Option<String>,
    /// Last change, unix ms.
    pub updated_at: i64,
}

/// A deployment.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deployment {
    /// Id.
    pub id: String,
    /// Release id.
    pub release_id: String,
    /// pending, in_progress, success, failed, rolled_back.
    pub status: String,
    /// Free text.
    pub description: String,
    /// Created, unix ms.
    pub created_at: i64,
    /// Per-device state (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceState>>,
}

/// Assign a release to devices (ops).
#[utoipa::path(post, path = "/api/v1/deployments", request_body = NewDeployment,
    responses((status = 201, body = Deployment), (status = 403), (status = 404), (status = 422)))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewDeployment>,
) -> Result<(StatusCode, ApiJson<Deployment>)> {
    op.require(Role::Ops)?;
    audited(&state, &op, "deployment.create", &format!("release:{}", req.release_id), async {
        if req.devices.is_empty() || req.devices.len() > 10_000 {
            return Err(Error::BadRequest("devices: 1 to 10000 device ids".into()));
        }
        let release = sqlx::query("SELECT compatible FROM releases WHERE id = $1 AND org_id = $2")
            .bind(&req.release_id)
            .bind(&op.org_id)
            .fetch_optional(state.store.pool())
            .await?
            .ok_or(Error::NotFound("no such release"))?;
        let compatible: String = release.try_get("compatible")?;
        let id = new_id()?;
        let now = now_ms();
        let mut tx = state.store.begin_write().await?;
        sqlx::query(
            "INSERT INTO deployments (id, org_id, release_id, status, description, created_by, created_at) VALUES ($1, $2, $3, 'in_progress', $4, $5, $6)",
        )
        .bind(&id)
        .bind(&op.org_id)
        .bind(&req.release_id)
        .bind(&req.description)
        .bind(&op.user_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut seen = std::collections::BTreeSet::new();
        for device in &req.devices {
            if !seen.insert(device.as_str()) {
                continue;
            }
            let row = sqlx::query("SELECT hardware_class FROM devices WHERE id = $1 AND org_id = $2")
                .bind(device)
                .bind(&op.org_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(Error::NotFound("no such device"))?;
            let class: String = row.try_get("hardware_class")?;
            if class != compatible {
                return Err(Error::Unprocessable(format!(
                    "device {device} is {class}, the release is for {compatible}"
                )));
            }
            sqlx::query(
                "INSERT INTO deployment_devices (deployment_id, device_pk, state, updated_at) VALUES ($1, $2, 'assigned', $3)",
            )
            .bind(&id)
            .bind(device)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE devices SET desired_release_id = $1 WHERE id = $2 AND org_id = $3")
                .bind(&req.release_id)
                .bind(device)
                .bind(&op.org_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let target = format!("deployment:{id}");
        Ok((
            (
                StatusCode::CREATED,
                ApiJson(Deployment {
                    id,
                    release_id: req.release_id.clone(),
                    status: "in_progress".into(),
                    description: req.description.clone(),
                    created_at: now,
                    devices: None,
                }),
            ),
            target,
        ))
    })
    .await
}

fn deployment(r: &sqlx::any::AnyRow) -> Result<Deployment> {
    Ok(Deployment {
        id: r.try_get("id")?,
        release_id: r.try_get("release_id")?,
        status: r.try_get("status")?,
        description: r.try_get("description")?,
        created_at: r.try_get("created_at")?,
        devices: None,
    })
}

/// List deployments, newest first.
#[utoipa::path(get, path = "/api/v1/deployments", responses((status = 200, body = [Deployment])))]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Vec<Deployment>>> {
    let rows = sqlx::query(
        "SELECT id, release_id, status, description, created_at FROM deployments WHERE org_id = $1 ORDER BY created_at DESC LIMIT 500",
    )
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    Ok(ApiJson(rows.iter().map(deployment).collect::<Result<_>>()?))
}

/// A deployment with per-device progress.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", responses((status = 200, body = Deployment), (status = 404)))]
pub async fn detail(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Deployment>> {
    let row = sqlx::query(
        "SELECT id, release_id, status, description, created_at FROM deployments WHERE id = $1 AND org_id = $2",
    )
    .bind(&id)
    .bind(&op.org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound("no such deployment"))?;
    let mut d = deployment(&row)?;
    let rows = sqlx::query(
        "SELECT device_pk, state, bytes_done, bytes_total, reason, updated_at FROM deployment_devices WHERE deployment_id = $1 ORDER BY device_pk",
    )
    .bind(&id)
    .fetch_all(state.store.pool())
    .await?;
    let mut devices = Vec::new();
    for r in rows {
        devices.push(DeviceState {
            device: r.try_get("device_pk")?,
            state: r.try_get("state")?,
            bytes_done: r.try_get("bytes_done")?,
            bytes_total: r.try_get("bytes_total")?,
            reason: r.try_get("reason")?,
            updated_at: r.try_get("updated_at")?,
        });
    }
    d.devices = Some(devices);
    Ok(ApiJson(d))
}
