//! Retention: heartbeats are kept 7 days and device logs 30 days (the
//! defaults; configurable). `prune` deletes what is older; the server runs
//! it every hour.

use anyhow::Result;

use crate::store::{Store, now_ms};

/// What `prune` removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Heartbeat rows removed.
    pub heartbeats: u64,
    /// Log lines removed.
    pub logs: u64,
}

const DAY_MS: i64 = 86_400_000;

/// Deletes heartbeats older than `heartbeat_days` and logs older than
/// `log_days`, measured from `now` (unix ms).
pub async fn prune(store: &Store, now: i64, heartbeat_days: u32, log_days: u32) -> Result<Pruned> {
    let heartbeats = sqlx::query("DELETE FROM heartbeats WHERE at < $1")
        .bind(now.saturating_sub(i64::from(heartbeat_days) * DAY_MS))
        .execute(store.pool())
        .await?
        .rows_affected();
    let logs = sqlx::query("DELETE FROM device_logs WHERE at < $1")
        .bind(now.saturating_sub(i64::from(log_days) * DAY_MS))
        .execute(store.pool())
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
        .bind(now.saturating_sub(crate::http::idempotency::TTL_MS))
        .execute(store.pool())
        .await?;
    Ok(Pruned { heartbeats, logs })
}

/// Prunes every hour, forever (spawned by the binary).
pub async fn run(store: Store, heartbeat_days: u32, log_days: u32) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        match prune(&store, now_ms(), heartbeat_days, log_days).await {
            Ok(p) => tracing::info!(heartbeats = p.heartbeats, logs = p.logs, "pruned old rows"),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "pruning failed"),
        }
    }
}
