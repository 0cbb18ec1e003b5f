//! A device's history as operators read it: its log lines, heartbeat
//! load, and the deployments and rollouts it was in.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::Operator;
use crate::service::Result;

/// Log filters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogFilter {
    /// Only this level: debug, info, warn, error.
    pub level: Option<String>,
    /// Only lines before this time, unix ms (paging).
    pub before: Option<i64>,
    /// At most this many (default 200, max 2000).
    pub limit: Option<i64>,
}

/// One log line of a device, as operators read it (the device sends
/// `kernex_protocol::api::LogLine`).
#[derive(Debug, Serialize, ToSchema, FromRow)]
pub struct DeviceLogEntry {
    /// When, unix ms.
    pub at: i64,
    /// Level.
    pub level: String,
    /// Message.
    pub message: String,
}

/// A device's log lines, newest first.
pub async fn logs(
    state: &AppState,
    op: &Operator,
    id: &str,
    f: &LogFilter,
) -> Result<Vec<DeviceLogEntry>> {
    super::fleet::exists(state, op, id).await?;
    Ok(sqlx::query_as::<_, DeviceLogEntry>(
        "SELECT at, level, message FROM device_logs WHERE device_pk = $1 AND org_id = $2 AND ($3 IS NULL OR level = $3) AND at < $4 ORDER BY at DESC LIMIT $5",
    )
    .bind(id)
    .bind(&op.org_id)
    .bind(&f.level)
    .bind(f.before.unwrap_or(i64::MAX))
    .bind(f.limit.unwrap_or(200).clamp(1, 2000))
    .fetch_all(state.store.pool())
    .await?)
}

/// One heartbeat's load figures.
#[derive(Debug, FromRow)]
pub struct Load {
    /// When, unix ms.
    pub at: i64,
    /// CPU use, percent.
    pub cpu_percent: Option<f64>,
    /// Memory use, percent.
    pub memory_percent: Option<f64>,
}

/// A device's heartbeats since `since` (unix ms), oldest first, at most
/// the latest 1440.
pub async fn load_history(
    state: &AppState,
    op: &Operator,
    id: &str,
    since: i64,
) -> Result<Vec<Load>> {
    let mut rows = sqlx::query_as::<_, Load>(
        "SELECT at, cpu_percent, memory_percent FROM heartbeats WHERE device_pk = $1 AND org_id = $2 AND at >= $3 ORDER BY at DESC LIMIT 1440",
    )
    .bind(id)
    .bind(&op.org_id)
    .bind(since)
    .fetch_all(state.store.pool())
    .await?;
    rows.reverse();
    Ok(rows)
}

/// A device's part in a deployment.
#[derive(Debug, FromRow)]
pub struct DeploymentEntry {
    /// Deployment id.
    pub deployment_id: String,
    /// The device's state in it.
    pub state: String,
    /// Bytes downloaded.
    pub bytes_done: Option<i64>,
    /// Bytes to download.
    pub bytes_total: Option<i64>,
    /// Why (reverted, failed).
    pub reason: Option<String>,
    /// Last change, unix ms.
    pub updated_at: i64,
    /// The release's version.
    pub version: String,
}

/// The deployments a device was in, latest change first (at most 50).
pub async fn deployments(
    state: &AppState,
    op: &Operator,
    id: &str,
) -> Result<Vec<DeploymentEntry>> {
    Ok(sqlx::query_as::<_, DeploymentEntry>(
        "SELECT dd.deployment_id, dd.state, dd.bytes_done, dd.bytes_total, dd.reason, dd.updated_at, r.version FROM deployment_devices dd JOIN deployments dep ON dep.id = dd.deployment_id JOIN releases r ON r.id = dep.release_id WHERE dd.device_pk = $1 AND dep.org_id = $2 ORDER BY dd.updated_at DESC LIMIT 50",
    )
    .bind(id)
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?)
}

/// A device's part in a rollout.
#[derive(Debug, FromRow)]
pub struct RolloutEntry {
    /// Rollout id.
    pub rollout_id: String,
    /// 0-based wave.
    pub wave: i64,
    /// The device's state in it.
    pub state: String,
    /// The version it ran at the start.
    pub from_version: Option<String>,
    /// Exact bytes planned.
    pub delta_bytes: i64,
    /// Bytes downloaded.
    pub bytes_done: i64,
    /// Why (reverted, failed).
    pub reason: Option<String>,
    /// Last change, unix ms.
    pub updated_at: i64,
    /// The rollout's name.
    pub name: String,
    /// The rollout's status.
    pub status: String,
    /// The release's version.
    pub version: String,
}

/// The rollouts a device was in, latest change first (at most 50).
pub async fn rollouts(state: &AppState, op: &Operator, id: &str) -> Result<Vec<RolloutEntry>> {
    Ok(sqlx::query_as::<_, RolloutEntry>(
        "SELECT rd.rollout_id, rd.wave, rd.state, rd.from_version, rd.delta_bytes, rd.bytes_done, rd.reason, rd.updated_at, ro.name, ro.status, r.version FROM rollout_devices rd JOIN rollouts ro ON ro.id = rd.rollout_id JOIN releases r ON r.id = ro.release_id WHERE rd.device_pk = $1 AND ro.org_id = $2 ORDER BY rd.updated_at DESC LIMIT 50",
    )
    .bind(id)
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?)
}
