//! Devices as operators see them: list with filters, detail, tags, revoke.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::{Operator, Role};
use crate::http::{ApiJson, Error, Result, audited};
use crate::store::now_ms;

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/devices", get(list))
        .route("/devices/{id}", get(detail))
        .route("/devices/{id}/revoke", post(revoke))
        .route("/devices/{id}/tags", put(set_tags))
        .route("/devices/{id}/logs", get(logs))
}

/// Filters for the device list; all optional, combined with AND.
#[derive(Debug, Deserialize, IntoParams)]
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
    pub attestation: crate::http::attestation::AttestationView,
    /// The latest heartbeat's inventory (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub inventory: Option<serde_json::Value>,
}

const SELECT: &str = "SELECT d.id, d.device_id, d.hardware_class, d.hardware_metadata, d.current_version, d.desired_release_id, r.version AS desired_version, d.booted_slot, d.primary_slot, d.status, d.status_reason, d.revoked, d.last_seen_at, d.registered_at, d.attestation, d.attestation_reason, d.attested_version, d.attested_at, d.ek_fingerprint FROM devices d LEFT JOIN releases r ON r.id = d.desired_release_id";

async fn device(state: &AppState, r: &sqlx::any::AnyRow) -> Result<Device> {
    let id: String = r.try_get("id")?;
    let tags = sqlx::query("SELECT tag FROM device_tags WHERE device_pk = $1 ORDER BY tag")
        .bind(&id)
        .fetch_all(state.store.pool())
        .await?
        .iter()
        .map(|t| t.try_get::<String, _>("tag"))
        .collect::<Result<Vec<_>, _>>()?;
    let last_seen_at: Option<i64> = r.try_get("last_seen_at")?;
    let mut status: String = r.try_get("status")?;
    let offline_ms =
        i64::try_from(state.config.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    if last_seen_at.is_none_or(|t| now_ms().saturating_sub(t) > offline_ms) {
        status = "offline".into();
    }
    let meta: String = r.try_get("hardware_metadata")?;
    Ok(Device {
        id,
        device_id: r.try_get("device_id")?,
        hardware_class: r.try_get("hardware_class")?,
        tags,
        current_version: r.try_get("current_version")?,
        desired_version: r.try_get("desired_version")?,
        desired_release_id: r.try_get("desired_release_id")?,
        booted_slot: r.try_get("booted_slot")?,
        primary_slot: r.try_get("primary_slot")?,
        status,
        status_reason: r.try_get("status_reason")?,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
        last_seen_at,
        registered_at: r.try_get("registered_at")?,
        hardware_metadata: serde_json::from_str(&meta).unwrap_or_default(),
        attestation: crate::http::attestation::view(state, r)?,
        inventory: None,
    })
}

/// List devices, filtered. Every filter value is a bound parameter.
#[utoipa::path(get, path = "/api/v1/devices", params(DeviceFilter), responses((status = 200, body = [Device])))]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
    filter: Result<Query<DeviceFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<Vec<Device>>> {
    let Query(f) = filter?;
    state.last_seen.flush(&state.store).await?;
    let offline_before = now_ms().saturating_sub(
        i64::try_from(state.config.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
    );
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
        out.push(device(&state, r).await?);
    }
    Ok(ApiJson(out))
}

/// A device in detail, with its latest inventory.
#[utoipa::path(get, path = "/api/v1/devices/{id}", responses((status = 200, body = Device), (status = 404)))]
pub async fn detail(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Device>> {
    state.last_seen.flush(&state.store).await?;
    let row = sqlx::query(&format!("{SELECT} WHERE d.id = $1 AND d.org_id = $2"))
        .bind(&id)
        .bind(&op.org_id)
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::NotFound("no such device"))?;
    let mut d = device(&state, &row).await?;
    let inv = sqlx::query(
        "SELECT inventory FROM heartbeats WHERE device_pk = $1 ORDER BY at DESC LIMIT 1",
    )
    .bind(&id)
    .fetch_optional(state.store.pool())
    .await?;
    if let Some(inv) = inv {
        let text: String = inv.try_get("inventory")?;
        d.inventory = serde_json::from_str(&text).ok();
    }
    Ok(ApiJson(d))
}

/// Revoke a device's credential (ops): its requests get 401 from now on.
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", responses((status = 204), (status = 403), (status = 404)))]
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    op.require(Role::Ops)?;
    audited(
        &state,
        &op,
        "device.revoke",
        &format!("device:{id}"),
        async {
            let done = sqlx::query("UPDATE devices SET revoked = 1 WHERE id = $1 AND org_id = $2")
                .bind(&id)
                .bind(&op.org_id)
                .execute(state.store.pool())
                .await?;
            if done.rows_affected() == 0 {
                return Err(Error::NotFound("no such device"));
            }
            crate::poll_cache::forget_device(&state, &id).await;
            Ok((StatusCode::NO_CONTENT, String::new()))
        },
    )
    .await
}

/// A device's tags, replaced as a whole.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceTags {
    /// The tags (at most 64; 1-64 characters of letters, digits and ._:=-).
    pub tags: Vec<String>,
}

/// Replace a device's tags (ops): what rollout selectors and the device
/// list filter on.
#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", request_body = DeviceTags,
    responses((status = 204), (status = 400), (status = 403), (status = 404)))]
pub async fn set_tags(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<DeviceTags>,
) -> Result<StatusCode> {
    op.require(Role::Ops)?;
    crate::http::enrollment::check_tags(&req.tags)?;
    let mut tags = req.tags;
    tags.sort();
    tags.dedup();
    audited(&state, &op, "device.tags", &format!("device:{id}"), async {
        let mut tx = state.store.begin_write().await?;
        let found = sqlx::query("SELECT id FROM devices WHERE id = $1 AND org_id = $2")
            .bind(&id)
            .bind(&op.org_id)
            .fetch_optional(&mut *tx)
            .await?;
        if found.is_none() {
            return Err(Error::NotFound("no such device"));
        }
        sqlx::query("DELETE FROM device_tags WHERE device_pk = $1")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        for tag in &tags {
            sqlx::query("INSERT INTO device_tags (device_pk, org_id, tag) VALUES ($1, $2, $3)")
                .bind(&id)
                .bind(&op.org_id)
                .bind(tag)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok((StatusCode::NO_CONTENT, String::new()))
    })
    .await
}

/// Log filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogFilter {
    /// Only this level: debug, info, warn, error.
    pub level: Option<String>,
    /// Only lines before this time, unix ms (paging).
    pub before: Option<i64>,
    /// At most this many (default 200, max 2000).
    pub limit: Option<i64>,
}

/// One log line.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogLine {
    /// When, unix ms.
    pub at: i64,
    /// Level.
    pub level: String,
    /// Message.
    pub message: String,
}

/// A device's log lines, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/logs", params(LogFilter),
    responses((status = 200, body = [LogLine]), (status = 404)))]
pub async fn logs(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    filter: Result<Query<LogFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<Vec<LogLine>>> {
    let Query(f) = filter?;
    let exists = sqlx::query("SELECT id FROM devices WHERE id = $1 AND org_id = $2")
        .bind(&id)
        .bind(&op.org_id)
        .fetch_optional(state.store.pool())
        .await?;
    if exists.is_none() {
        return Err(Error::NotFound("no such device"));
    }
    let rows = sqlx::query(
        "SELECT at, level, message FROM device_logs WHERE device_pk = $1 AND org_id = $2 AND ($3 IS NULL OR level = $3) AND at < $4 ORDER BY at DESC LIMIT $5",
    )
    .bind(&id)
    .bind(&op.org_id)
    .bind(&f.level)
    .bind(f.before.unwrap_or(i64::MAX))
    .bind(f.limit.unwrap_or(200).clamp(1, 2000))
    .fetch_all(state.store.pool())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(LogLine {
            at: r.try_get("at")?,
            level: r.try_get("level")?,
            message: r.try_get("message")?,
        });
    }
    Ok(ApiJson(out))
}
