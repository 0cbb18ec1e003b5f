//! Devices as operators see them: the list with filters, the detail with
//! the latest inventory, revoke, tags, logs, heartbeat history, and the
//! rollouts and deployments a device was in.

use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use sqlx::any::AnyRow;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::attestation as verdict;
use crate::service::audit::Audited;
use crate::service::names::check_tags;
use crate::service::users::require;
use crate::service::{Error, Result};
use crate::store::now_ms;

/// A device's attestation as operators see it.
pub type AttestationView = verdict::AttestationView;

/// The statuses a device can have, in display order.
pub const STATUSES: [&str; 6] = [
    "online", "updating", "degraded", "reverted", "error", "offline",
];

/// Filters for the device list; all optional, combined with AND.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeviceFilter {
    /// Has this tag.
    pub tag: Option<String>,
    /// Hardware class.
    pub hardware_class: Option<String>,
    /// Current version.
    pub version: Option<String>,
    /// Status: online, offline, degraded, updating, reverted, error.
    pub status: Option<String>,
    /// At most this many (default 500, max 5000).
    pub limit: Option<i64>,
}

/// A device.
#[derive(Debug, Serialize, ToSchema)]
pub struct Device {
    /// Internal id.
    pub id: String,
    /// The device's own id.
    pub device_id: String,
    /// Hardware class.
    pub hardware_class: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Running version.
    pub current_version: Option<String>,
    /// Version assigned.
    pub desired_version: Option<String>,
    /// Release assigned.
    pub desired_release_id: Option<String>,
    /// Booted slot.
    pub booted_slot: Option<String>,
    /// Primary slot.
    pub primary_slot: Option<String>,
    /// Anti-rollback floor the device reports: the highest release
    /// security version it committed; it refuses anything below (None:
    /// not reported yet).
    pub security_floor: Option<i64>,
    /// online, offline, degraded, updating, reverted, error.
    pub status: String,
    /// Why (e.g. the revert reason).
    pub status_reason: Option<String>,
    /// Credential revoked.
    pub revoked: bool,
    /// Last contact, unix ms.
    pub last_seen_at: Option<i64>,
    /// Enrolled, unix ms.
    pub registered_at: i64,
    /// Hardware metadata given at enrollment.
    #[schema(value_type = Object)]
    pub hardware_metadata: serde_json::Value,
    /// TPM attestation of the running image.
    pub attestation: AttestationView,
    /// The latest heartbeat's inventory (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub inventory: Option<serde_json::Value>,
}

const SELECT: &str = "SELECT d.id, d.device_id, d.hardware_class, d.hardware_metadata, d.current_version, d.desired_release_id, r.version AS desired_version, d.booted_slot, d.primary_slot, d.security_floor, d.status, d.status_reason, d.revoked, d.last_seen_at, d.registered_at, d.attestation, d.attestation_reason, d.attested_version, d.attested_at, d.ek_fingerprint FROM devices d LEFT JOIN releases r ON r.id = d.desired_release_id";

/// The device columns of [`SELECT`] (the attestation columns are read by
/// the verdict).
#[derive(FromRow)]
struct DeviceRow {
    id: String,
    device_id: String,
    hardware_class: String,
    hardware_metadata: String,
    current_version: Option<String>,
    desired_release_id: Option<String>,
    desired_version: Option<String>,
    booted_slot: Option<String>,
    primary_slot: Option<String>,
    security_floor: Option<i64>,
    status: String,
    status_reason: Option<String>,
    revoked: i64,
    last_seen_at: Option<i64>,
    registered_at: i64,
}

fn offline_after_ms(state: &AppState) -> i64 {
    i64::try_from(state.config.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn attestation(state: &AppState, row: &AnyRow) -> Result<AttestationView> {
    Ok(verdict::view(state, &verdict::ViewRow::from_row(row)?))
}

async fn device(state: &AppState, row: &AnyRow) -> Result<Device> {
    let r = DeviceRow::from_row(row)?;
    let tags: Vec<(String,)> =
        sqlx::query_as("SELECT tag FROM device_tags WHERE device_pk = $1 ORDER BY tag")
            .bind(&r.id)
            .fetch_all(state.store.pool())
            .await?;
    let offline = r
        .last_seen_at
        .is_none_or(|t| now_ms().saturating_sub(t) > offline_after_ms(state));
    Ok(Device {
        attestation: attestation(state, row)?,
        id: r.id,
        device_id: r.device_id,
        hardware_class: r.hardware_class,
        tags: tags.into_iter().map(|(t,)| t).collect(),
        current_version: r.current_version,
        desired_version: r.desired_version,
        desired_release_id: r.desired_release_id,
        booted_slot: r.booted_slot,
        primary_slot: r.primary_slot,
        security_floor: r.security_floor,
        status: if offline { "offline".into() } else { r.status },
        status_reason: r.status_reason,
        revoked: r.revoked != 0,
        last_seen_at: r.last_seen_at,
        registered_at: r.registered_at,
        hardware_metadata: serde_json::from_str(&r.hardware_metadata).unwrap_or_default(),
        inventory: None,
    })
}

/// The organisation's devices matching `f`, by device id. Every filter
/// value is a bound parameter.
pub async fn list(state: &AppState, op: &Operator, f: &DeviceFilter) -> Result<Vec<Device>> {
    state.last_seen.flush(&state.store).await?;
    let offline_before = now_ms().saturating_sub(offline_after_ms(state));
    // The statement's shape is fixed; an absent filter binds NULL and the
    // `$n IS NULL OR ...` arm makes it a no-op.
    let sql = format!(
        "{SELECT} WHERE d.org_id = $1 \
         AND ($2 IS NULL OR EXISTS (SELECT 1 FROM device_tags t WHERE t.device_pk = d.id AND t.tag = $2)) \
         AND ($3 IS NULL OR d.hardware_class = $3) \
         AND ($4 IS NULL OR d.current_version = $4) \
         AND ($5 IS NULL \
              OR ($5 = 'offline' AND (d.last_seen_at IS NULL OR d.last_seen_at < $6)) \
              OR ($5 <> 'offline' AND d.status = $5 AND d.last_seen_at >= $6)) \
         ORDER BY d.device_id LIMIT $7"
    );
    let rows = sqlx::query(&sql)
        .bind(&op.org_id)
        .bind(&f.tag)
        .bind(&f.hardware_class)
        .bind(&f.version)
        .bind(&f.status)
        .bind(offline_before)
        .bind(f.limit.unwrap_or(500).clamp(1, 5000))
        .fetch_all(state.store.pool())
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(device(state, r).await?);
    }
    Ok(out)
}

/// A device in detail, with its latest inventory.
pub async fn detail(state: &AppState, op: &Operator, id: &str) -> Result<Device> {
    state.last_seen.flush(&state.store).await?;
    let row = sqlx::query(&format!("{SELECT} WHERE d.id = $1 AND d.org_id = $2"))
        .bind(id)
        .bind(&op.org_id)
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::NotFound("no such device"))?;
    let mut d = device(state, &row).await?;
    let inventory: Option<(String,)> = sqlx::query_as(
        "SELECT inventory FROM heartbeats WHERE device_pk = $1 ORDER BY at DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(state.store.pool())
    .await?;
    if let Some((text,)) = inventory {
        d.inventory = serde_json::from_str(&text).ok();
    }
    Ok(d)
}

/// Revokes a device's credential (ops): its requests fail from now on.
pub async fn revoke(state: &AppState, op: &Operator, id: &str) -> Result<()> {
    require(op, Role::Ops)?;
    let audit_target = &format!("device:{id}");
    let audit = Audited::new(state, op, "device.revoke", audit_target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let done = sqlx::query("UPDATE devices SET revoked = 1 WHERE id = $1 AND org_id = $2")
            .bind(id)
            .bind(&op.org_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("no such device"));
        }
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await?;
    // Committed: caches drop the device now (earlier, a request in
    // between could cache it unrevoked again).
    crate::poll_cache::forget_device(state, id).await;
    Ok(())
}

async fn exists(state: &AppState, op: &Operator, id: &str) -> Result<()> {
    let found: Option<(String,)> =
        sqlx::query_as("SELECT id FROM devices WHERE id = $1 AND org_id = $2")
            .bind(id)
            .bind(&op.org_id)
            .fetch_optional(state.store.pool())
            .await?;
    found.map(|_| ()).ok_or(Error::NotFound("no such device"))
}

/// Replaces a device's tags (ops): what rollout selectors and the device
/// list filter on.
pub async fn set_tags(state: &AppState, op: &Operator, id: &str, tags: Vec<String>) -> Result<()> {
    require(op, Role::Ops)?;
    check_tags(&tags)?;
    let mut tags = tags;
    tags.sort();
    tags.dedup();
    let audit_target = &format!("device:{id}");
    let audit = Audited::new(state, op, "device.tags", audit_target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let found: Option<(String,)> =
            sqlx::query_as("SELECT id FROM devices WHERE id = $1 AND org_id = $2")
                .bind(id)
                .bind(&op.org_id)
                .fetch_optional(&mut *tx)
                .await?;
        if found.is_none() {
            return Err(Error::NotFound("no such device"));
        }
        sqlx::query("DELETE FROM device_tags WHERE device_pk = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        for tag in &tags {
            sqlx::query("INSERT INTO device_tags (device_pk, org_id, tag) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(&op.org_id)
                .bind(tag)
                .execute(&mut *tx)
                .await?;
        }
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await
}

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
    exists(state, op, id).await?;
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

/// The values the device list can be filtered by.
#[derive(Debug, Default)]
pub struct FilterValues {
    /// Hardware classes.
    pub hardware_classes: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Versions devices run.
    pub versions: Vec<String>,
}

async fn distinct(state: &AppState, org: &str, sql: &str) -> Result<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(sql)
        .bind(org)
        .fetch_all(state.store.pool())
        .await?;
    Ok(rows.into_iter().map(|(v,)| v).collect())
}

/// The hardware classes, tags and versions in the organisation, sorted.
pub async fn filter_values(state: &AppState, op: &Operator) -> Result<FilterValues> {
    Ok(FilterValues {
        hardware_classes: distinct(
            state,
            &op.org_id,
            "SELECT DISTINCT hardware_class AS v FROM devices WHERE org_id = $1 ORDER BY v",
        )
        .await?,
        tags: distinct(
            state,
            &op.org_id,
            "SELECT DISTINCT tag AS v FROM device_tags WHERE org_id = $1 ORDER BY v",
        )
        .await?,
        versions: distinct(
            state,
            &op.org_id,
            "SELECT DISTINCT current_version AS v FROM devices WHERE org_id = $1 AND current_version IS NOT NULL ORDER BY v",
        )
        .await?,
    })
}
