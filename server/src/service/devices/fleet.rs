//! Devices as operators see them: the list with filters, the detail with
//! the latest inventory, revoke, tags, logs, heartbeat history, and the
//! rollouts and deployments a device was in.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};
use utoipa::{IntoParams, ToSchema};

use super::selection::{Matching, cursor, read_cursor};
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::attestation as verdict;
use crate::service::audit::Audited;
use crate::service::names::check_tags;
use crate::service::users::require;
use crate::service::{Error, Result};
use crate::store::now_ms;

pub use super::history::{
    DeploymentEntry, DeviceLogEntry, Load, LogFilter, RolloutEntry, deployments, load_history,
    logs, rollouts,
};

/// A device's attestation as operators see it.
pub type AttestationView = verdict::AttestationView;

/// The statuses a device can have, in display order.
pub const STATUSES: [&str; 6] = [
    "online", "updating", "degraded", "reverted", "error", "offline",
];

/// Filters and paging for the device list; all optional, combined with
/// AND. The list is in device id order, paged by keyset: `after` is the
/// cursor of the `Link: rel="next"` header.
#[derive(Debug, Default, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeviceFilter {
    /// Has this tag.
    pub tag: Option<String>,
    /// Hardware class.
    pub hardware_class: Option<String>,
    /// Current version.
    pub version: Option<String>,
    /// Status: online, offline, degraded, updating, reverted, error, or
    /// `attention` (offline, degraded, reverted or error, not revoked).
    pub status: Option<String>,
    /// Link class (e.g. ethernet, wifi, metered-4g; ethernet matches
    /// devices with none set).
    pub link_class: Option<String>,
    /// Site.
    pub site: Option<String>,
    /// Not seen since this time, unix ms (never-seen devices included).
    pub seen_before: Option<i64>,
    /// Search: a case-insensitive substring of the device id, the internal
    /// id, the hostname or name in its hardware metadata, or a tag
    /// (at most 128 characters).
    pub q: Option<String>,
    /// Opaque cursor: the page after the one that returned it.
    pub after: Option<String>,
    /// At most this many (default 500, max 5000).
    pub limit: Option<i64>,
}

/// The most devices one page holds.
pub const MAX_PAGE: i64 = 5000;
/// Devices per page when the caller does not say.
pub const DEFAULT_PAGE: i64 = 500;
/// One page of the device list.
#[derive(Debug)]
pub struct DevicePage {
    /// The devices, in device id order.
    pub devices: Vec<Device>,
    /// How many devices match the filter (all pages).
    pub total: i64,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
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

pub(crate) fn offline_after_ms(state: &AppState) -> i64 {
    i64::try_from(state.config.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn attestation(state: &AppState, row: &AnyRow) -> Result<AttestationView> {
    Ok(verdict::view(state, &verdict::ViewRow::from_row(row)?))
}

fn device(state: &AppState, row: &AnyRow, tags: Vec<String>) -> Result<Device> {
    let r = DeviceRow::from_row(row)?;
    let offline = r
        .last_seen_at
        .is_none_or(|t| now_ms().saturating_sub(t) > offline_after_ms(state));
    Ok(Device {
        attestation: attestation(state, row)?,
        id: r.id,
        device_id: r.device_id,
        hardware_class: r.hardware_class,
        tags,
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

/// The tags of devices `pks`, each sorted, in one query per 500 devices.
async fn tags_of(state: &AppState, pks: &[String]) -> Result<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for chunk in pks.chunks(500) {
        let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT device_pk, tag FROM device_tags WHERE device_pk IN ({}) ORDER BY tag",
            marks.join(", ")
        );
        let mut q = sqlx::query_as::<_, (String, String)>(&sql);
        for pk in chunk {
            q = q.bind(pk);
        }
        for (pk, tag) in q.fetch_all(state.store.pool()).await? {
            out.entry(pk).or_default().push(tag);
        }
    }
    Ok(out)
}

async fn devices_of(state: &AppState, rows: &[AnyRow]) -> Result<Vec<Device>> {
    let pks: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<std::result::Result<_, _>>()?;
    let mut tags = tags_of(state, &pks).await?;
    rows.iter()
        .zip(&pks)
        .map(|(row, pk)| device(state, row, tags.remove(pk).unwrap_or_default()))
        .collect()
}

/// One page of the organisation's devices matching `f`, in device id
/// order, with the number of all that match. Paged by keyset (the
/// `(org_id, device_id)` index), so page 500 costs what page 1 does. Every
/// filter value is a bound parameter.
pub async fn page(state: &AppState, op: &Operator, f: &DeviceFilter) -> Result<DevicePage> {
    let m = Matching::new(state, op, f)?;
    // No cursor: after "" (every device id is longer), so the statement
    // is always an index range from the cursor on.
    let after = f
        .after
        .as_deref()
        .map(read_cursor)
        .transpose()?
        .unwrap_or_default();
    let limit = f.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    state.last_seen.flush(&state.store).await?;
    let clause = Matching::clause(state);
    let sql =
        format!("{SELECT} WHERE {clause} AND d.device_id > $11 ORDER BY d.device_id LIMIT $12");
    let mut rows = m
        .bind(sqlx::query(&sql))
        .bind(&after)
        .bind(limit + 1)
        .fetch_all(state.store.pool())
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let total: i64 = m
        .bind(sqlx::query(&format!(
            "SELECT COUNT(*) AS n FROM devices d WHERE {clause}"
        )))
        .fetch_one(state.store.pool())
        .await?
        .try_get("n")?;
    let devices = devices_of(state, &rows).await?;
    let next = if more {
        devices.last().map(|d| cursor(&d.device_id))
    } else {
        None
    };
    Ok(DevicePage {
        devices,
        total,
        next,
    })
}

/// The organisation's devices matching `f`, by device id: [`page`]
/// without the count and cursor.
pub async fn list(state: &AppState, op: &Operator, f: &DeviceFilter) -> Result<Vec<Device>> {
    Ok(page(state, op, f).await?.devices)
}

/// The organisation's devices among `ids` (internal ids), in device id
/// order; ids of other organisations or of no device are left out.
pub async fn named(state: &AppState, op: &Operator, ids: &[String]) -> Result<Vec<Device>> {
    state.last_seen.flush(&state.store).await?;
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "{SELECT} WHERE d.org_id = $1 AND d.id IN ({}) ORDER BY d.device_id",
            marks.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(&op.org_id);
        for id in chunk {
            q = q.bind(id);
        }
        let rows = q.fetch_all(state.store.pool()).await?;
        out.extend(devices_of(state, &rows).await?);
    }
    out.sort_by(|a, b| a.device_id.cmp(&b.device_id));
    Ok(out)
}

/// Counts over the whole fleet, from the database.
#[derive(Debug, Default)]
pub struct FleetSummary {
    /// Every device.
    pub total: i64,
    /// Per status of [`STATUSES`] (revoked devices included), in that order.
    pub by_status: Vec<(String, i64)>,
    /// Per running version ("unknown" when not reported), largest first.
    pub by_version: Vec<(String, i64)>,
    /// Per hardware class, largest first.
    pub by_class: Vec<(String, i64)>,
    /// Devices that need attention (`status=attention`).
    pub attention: i64,
}

fn largest_first(mut v: Vec<(String, i64)>) -> Vec<(String, i64)> {
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// The fleet's counts by status, version and hardware class.
pub async fn summary(state: &AppState, op: &Operator) -> Result<FleetSummary> {
    state.last_seen.flush(&state.store).await?;
    let pool = state.store.pool();
    let offline_before = now_ms().saturating_sub(offline_after_ms(state));
    let statuses: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT CASE WHEN d.last_seen_at IS NULL OR d.last_seen_at < $2 THEN 'offline' ELSE d.status END AS s, \
         d.revoked, COUNT(*) FROM devices d WHERE d.org_id = $1 GROUP BY 1, 2",
    )
    .bind(&op.org_id)
    .bind(offline_before)
    .fetch_all(pool)
    .await?;
    let mut out = FleetSummary::default();
    for st in STATUSES {
        let n = statuses
            .iter()
            .filter(|(s, _, _)| s == st)
            .map(|r| r.2)
            .sum();
        out.by_status.push((st.to_string(), n));
    }
    out.total = statuses.iter().map(|r| r.2).sum();
    out.attention = statuses
        .iter()
        .filter(|(s, revoked, _)| {
            *revoked == 0 && matches!(s.as_str(), "offline" | "degraded" | "reverted" | "error")
        })
        .map(|r| r.2)
        .sum();
    out.by_version = largest_first(
        sqlx::query_as(
            "SELECT COALESCE(current_version, 'unknown') AS v, COUNT(*) FROM devices WHERE org_id = $1 GROUP BY 1",
        )
        .bind(&op.org_id)
        .fetch_all(pool)
        .await?,
    );
    out.by_class = largest_first(
        sqlx::query_as("SELECT hardware_class, COUNT(*) FROM devices WHERE org_id = $1 GROUP BY 1")
            .bind(&op.org_id)
            .fetch_all(pool)
            .await?,
    );
    Ok(out)
}

fn d_id(row: &AnyRow) -> Result<String> {
    Ok(row.try_get("id")?)
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
    let tags = tags_of(state, std::slice::from_ref(&d_id(&row)?)).await?;
    let mut d = device(state, &row, tags.into_values().next().unwrap_or_default())?;
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

pub(crate) async fn exists(state: &AppState, op: &Operator, id: &str) -> Result<()> {
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
