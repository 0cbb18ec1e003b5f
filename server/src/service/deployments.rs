//! Deployments: "assign release R to devices D…". Sets each device's
//! desired release and tracks per-device state; rollout waves build on
//! this.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::ToSchema;

use super::anti_rollback;
use super::audit::Audited;
use super::users::require;
use super::{Error, Result};
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::store::{new_id, now_ms};

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
#[derive(Debug, Serialize, ToSchema, FromRow)]
pub struct DeviceState {
    /// Device id.
    #[sqlx(rename = "device_pk")]
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
#[derive(Debug, Serialize, ToSchema, FromRow)]
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
    #[sqlx(skip)]
    pub devices: Option<Vec<DeviceState>>,
}

/// Assigns a release to devices (ops): each must be of the release's
/// hardware class, and none may have an anti-rollback floor above the
/// release's security version (409, naming them).
pub async fn create(state: &AppState, op: &Operator, req: NewDeployment) -> Result<Deployment> {
    require(op, Role::Ops)?;
    let audit_target = &format!("release:{}", req.release_id);
    let audit = Audited::new(state, op, "deployment.create", audit_target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        if req.devices.is_empty() || req.devices.len() > 10_000 {
            return Err(Error::Invalid("devices: 1 to 10000 device ids".into()));
        }
        let (compatible, version, security_version): (String, String, i64) =
            sqlx::query_as("SELECT compatible, version, security_version FROM releases WHERE id = $1 AND org_id = $2")
                .bind(&req.release_id)
                .bind(&op.org_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(Error::NotFound("no such release"))?;
        let id = new_id()?;
        let now = now_ms();
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
        let mut above_floor = Vec::new();
        for device in &req.devices {
            if !seen.insert(device.as_str()) {
                continue;
            }
            let (class, device_id, floor): (String, String, Option<i64>) =
                sqlx::query_as("SELECT hardware_class, device_id, security_floor FROM devices WHERE id = $1 AND org_id = $2")
                    .bind(device)
                    .bind(&op.org_id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or(Error::NotFound("no such device"))?;
            if class != compatible {
                return Err(Error::Unprocessable(format!(
                    "device {device} is {class}, the release is for {compatible}"
                )));
            }
            if anti_rollback::refuses(floor, security_version) {
                above_floor.push(anti_rollback::AboveFloor {
                    device_id,
                    security_floor: floor.unwrap_or_default(),
                    version: version.clone(),
                    security_version,
                });
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
        // The planner: patch jobs for the releases the devices run, in
        // this transaction, so no device's poll sees the assignment before
        // its job exists (it waits for the patch: `devices::poll`).
        let from: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT r.id FROM devices d JOIN releases r ON r.org_id = d.org_id AND r.version = d.current_version AND r.compatible = d.hardware_class \
             WHERE d.org_id = $1 AND d.desired_release_id = $2",
        )
        .bind(&op.org_id)
        .bind(&req.release_id)
        .fetch_all(&mut *tx)
        .await?;
        let from: Vec<String> = from.into_iter().map(|(id,)| id).collect();
        crate::service::patches::enqueue(
            &mut tx,
            state.config.server_patches,
            &op.org_id,
            &req.release_id,
            &from,
            now,
        )
        .await?;
        if !above_floor.is_empty() {
            // Nothing is written: `finish` rolls the transaction back.
            return Err(anti_rollback::refusal(
                &format!("deploy {version}"),
                &above_floor,
                above_floor.len(),
            ));
        }
        let target = format!("deployment:{id}");
        Ok((
            Deployment {
                id,
                release_id: req.release_id.clone(),
                status: "in_progress".into(),
                description: req.description.clone(),
                created_at: now,
                devices: None,
            },
            target,
        ))
    }
    .await;
    let created = audit.finish(tx, outcome).await?;
    crate::service::patches::build::spawn(state);
    Ok(created)
}

/// The organisation's deployments, newest first (at most 500).
pub async fn list(state: &AppState, op: &Operator) -> Result<Vec<Deployment>> {
    Ok(sqlx::query_as::<_, Deployment>(
        "SELECT id, release_id, status, description, created_at FROM deployments WHERE org_id = $1 ORDER BY created_at DESC LIMIT 500",
    )
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?)
}

/// A deployment with per-device progress.
pub async fn detail(state: &AppState, op: &Operator, id: &str) -> Result<Deployment> {
    let mut d = sqlx::query_as::<_, Deployment>(
        "SELECT id, release_id, status, description, created_at FROM deployments WHERE id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(&op.org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound("no such deployment"))?;
    let devices = sqlx::query_as::<_, DeviceState>(
        "SELECT device_pk, state, bytes_done, bytes_total, reason, updated_at FROM deployment_devices WHERE deployment_id = $1 ORDER BY device_pk",
    )
    .bind(id)
    .fetch_all(state.store.pool())
    .await?;
    d.devices = Some(devices);
    Ok(d)
}
