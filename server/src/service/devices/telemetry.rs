//! Heartbeats (inventory, load, link fields) and log batches: what a
//! device tells the control plane between installs.

use kernex_protocol::api::{Heartbeat, LogBatch, MAX_LOG_LINES, MAX_LOG_MESSAGE};

use super::link::{self, Link, check_link};
use super::log_store;
use crate::AppState;
use crate::auth::Device;
use crate::service::names::{check_metadata, check_name};
use crate::service::{Error, Result};
use crate::store::new_id;

/// Memory use above which a device is degraded, percent.
pub const DEGRADED_MEMORY_PERCENT: f64 = 90.0;

/// Records a heartbeat: a `heartbeats` row, the device's status (degraded
/// above [`DEGRADED_MEMORY_PERCENT`] of memory, else an install's status
/// until its report, else online), its slots, its version when it changed
/// (a reflashed device), its anti-rollback floor and the link fields it
/// claims (a hint only, `service::devices::link`).
pub async fn heartbeat(state: &AppState, device: &Device, hb: &Heartbeat) -> Result<()> {
    device.require_proven()?;
    for (what, v) in [
        ("booted_slot", &hb.booted_slot),
        ("primary_slot", &hb.primary_slot),
        ("version", &hb.version),
    ] {
        if let Some(v) = v {
            check_name(what, v)?;
        }
    }
    let memory_percent = match (hb.memory_used_bytes, hb.memory_total_bytes) {
        (Some(used), Some(total)) if total > 0 => Some(used as f64 * 100.0 / total as f64),
        _ => None,
    };
    let degraded = memory_percent.is_some_and(|m| m > DEGRADED_MEMORY_PERCENT);
    let link = Link {
        link_class: hb.link_class.clone(),
        site: hb.site.clone(),
        time_zone: hb.time_zone.clone(),
    };
    check_link(&link)?;
    let security_floor = match hb.security_floor {
        Some(f) if f > kernex_protocol::limits::MAX_SECURITY_VERSION => {
            return Err(Error::Invalid(format!(
                "security_floor: {f} is more than the limit of {}",
                kernex_protocol::limits::MAX_SECURITY_VERSION
            )));
        }
        Some(f) => i64::try_from(f).ok(),
        None => None,
    };
    check_metadata(
        "extra",
        &hb.extra,
        state.config.limits.max_heartbeat_extra_bytes,
        "max-heartbeat-extra-bytes",
    )?;
    let now = state.clock.now_ms();
    let inventory = serde_json::to_string(hb).map_err(|e| Error::Internal(e.into()))?;
    let mut tx = state.store.begin_write().await?;
    sqlx::query(
        "INSERT INTO heartbeats (id, device_pk, org_id, at, cpu_percent, memory_percent, status, inventory) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(new_id()?)
    .bind(&device.pk)
    .bind(&device.org_id)
    .bind(now)
    .bind(hb.cpu_percent)
    .bind(memory_percent)
    .bind(if degraded { "degraded" } else { "healthy" })
    .bind(&inventory)
    .execute(&mut *tx)
    .await?;
    // Degraded, else an install's status (updating, reverted, error)
    // stays until its report, else online.
    sqlx::query(
        "UPDATE devices SET last_seen_at = $1, status = CASE WHEN $2 = 1 THEN 'degraded' WHEN status IN ('updating', 'reverted', 'error') THEN status ELSE 'online' END, booted_slot = COALESCE($3, booted_slot), primary_slot = COALESCE($4, primary_slot), security_floor = COALESCE($5, security_floor) WHERE id = $6",
    )
    .bind(now)
    .bind(i64::from(degraded))
    .bind(&hb.booted_slot)
    .bind(&hb.primary_slot)
    .bind(security_floor)
    .bind(&device.pk)
    .execute(&mut *tx)
    .await?;
    // The version only when it changed (a reflashed device): what the
    // device's poll answers depends on it.
    let new_version = match &hb.version {
        Some(v) => {
            sqlx::query(
                "UPDATE devices SET current_version = $1 WHERE id = $2 AND (current_version IS NULL OR current_version <> $1)",
            )
            .bind(v)
            .bind(&device.pk)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                > 0
        }
        None => false,
    };
    tx.commit().await?;
    link::store_hint(state, &device.pk, &link).await?;
    if new_version {
        crate::poll_cache::forget_device(state, &device.pk).await;
    }
    Ok(())
}

/// Stores a batch of at most [`MAX_LOG_LINES`] log lines, each message cut
/// to [`MAX_LOG_MESSAGE`] bytes (at a character boundary). A line's time
/// is clamped to `[limits] log-clock-skew-secs` around the server's clock
/// (a line without one gets the server's), so that retention prunes every
/// line in time. The device's stored lines are capped
/// (`device-log-max-lines`, `device-log-max-bytes`): the batch makes room
/// by deleting the device's oldest lines (`service::devices::log_store`);
/// a batch alone over a cap is [`Error::OverLimit`] (413).
pub async fn logs(state: &AppState, device: &Device, batch: &LogBatch) -> Result<()> {
    device.require_proven()?;
    if batch.entries.len() > MAX_LOG_LINES {
        return Err(Error::Invalid(format!(
            "at most {MAX_LOG_LINES} log lines per batch"
        )));
    }
    let now = state.clock.now_ms();
    let skew = state.config.limits.log_clock_skew_ms();
    let lines: Vec<(i64, &str, String)> = batch
        .entries
        .iter()
        .map(|line| {
            let mut message = line.message.clone();
            if message.len() > MAX_LOG_MESSAGE {
                let mut cut = MAX_LOG_MESSAGE;
                while !message.is_char_boundary(cut) {
                    cut -= 1;
                }
                message.truncate(cut);
            }
            let at = line
                .at
                .unwrap_or(now)
                .clamp(now.saturating_sub(skew), now.saturating_add(skew));
            (at, line.level.as_str(), message)
        })
        .collect();
    let bytes: u64 = lines.iter().map(|(_, _, m)| m.len() as u64).sum();
    let mut tx = state.store.begin_write().await?;
    log_store::make_room(&mut tx, state, &device.pk, lines.len() as u64, bytes).await?;
    for (at, level, message) in &lines {
        sqlx::query(
            "INSERT INTO device_logs (id, device_pk, org_id, at, level, message, bytes) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(new_id()?)
        .bind(&device.pk)
        .bind(&device.org_id)
        .bind(*at)
        .bind(*level)
        .bind(message)
        .bind(message.len() as i64)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE devices SET last_seen_at = $1 WHERE id = $2")
        .bind(now)
        .bind(&device.pk)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}
