//! Retention: raw heartbeats older than a day are folded into daily rows
//! (`heartbeats_daily`: count, CPU and memory averages, memory peak,
//! degraded count) and deleted; daily rows are kept `heartbeat_days` (7)
//! and device logs `log_days` (30); expired device access tokens and
//! nonces go. The server runs `prune` every hour.

use anyhow::Result;

use crate::store::{Store, now_ms};

/// What `prune` removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Raw heartbeat rows folded into daily rows and removed.
    pub heartbeats: u64,
    /// Daily heartbeat rows removed.
    pub daily: u64,
    /// Log lines removed.
    pub logs: u64,
}

const DAY_MS: i64 = 86_400_000;

/// How long an `Idempotency-Key` and its stored answer are remembered, ms.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

/// Deletes heartbeats older than `heartbeat_days` and logs older than
/// `log_days`, measured from `now` (unix ms).
pub async fn prune(store: &Store, now: i64, heartbeat_days: u32, log_days: u32) -> Result<Pruned> {
    // Fold whole days that ended more than 24 hours ago.
    let cutoff = (now - DAY_MS).div_euclid(DAY_MS) * DAY_MS;
    let mut tx = store.begin_write().await?;
    sqlx::query(
        "INSERT INTO heartbeats_daily (device_pk, org_id, day, samples, cpu_percent_sum, cpu_samples, memory_percent_sum, memory_percent_max, memory_samples, degraded_samples) \
         SELECT device_pk, org_id, at - (at % 86400000), COUNT(*), COALESCE(SUM(cpu_percent), 0), COUNT(cpu_percent), COALESCE(SUM(memory_percent), 0), MAX(memory_percent), COUNT(memory_percent), SUM(CASE WHEN status = 'degraded' THEN 1 ELSE 0 END) \
         FROM heartbeats WHERE at < $1 GROUP BY device_pk, org_id, at - (at % 86400000) \
         ON CONFLICT (device_pk, day) DO UPDATE SET \
           samples = heartbeats_daily.samples + excluded.samples, \
           cpu_percent_sum = heartbeats_daily.cpu_percent_sum + excluded.cpu_percent_sum, \
           cpu_samples = heartbeats_daily.cpu_samples + excluded.cpu_samples, \
           memory_percent_sum = heartbeats_daily.memory_percent_sum + excluded.memory_percent_sum, \
           memory_percent_max = CASE WHEN excluded.memory_percent_max IS NULL OR heartbeats_daily.memory_percent_max > excluded.memory_percent_max THEN heartbeats_daily.memory_percent_max ELSE excluded.memory_percent_max END, \
           memory_samples = heartbeats_daily.memory_samples + excluded.memory_samples, \
           degraded_samples = heartbeats_daily.degraded_samples + excluded.degraded_samples",
    )
    .bind(cutoff)
    .execute(&mut *tx)
    .await?;
    let heartbeats = sqlx::query("DELETE FROM heartbeats WHERE at < $1")
        .bind(cutoff)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let daily = sqlx::query("DELETE FROM heartbeats_daily WHERE day < $1")
        .bind(now.saturating_sub(i64::from(heartbeat_days) * DAY_MS))
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    let logs = sqlx::query("DELETE FROM device_logs WHERE at < $1")
        .bind(now.saturating_sub(i64::from(log_days) * DAY_MS))
        .execute(store.pool())
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1")
        .bind(now.saturating_sub(IDEMPOTENCY_TTL_MS))
        .execute(store.pool())
        .await?;
    // Expired device access tokens and nonces (by the wall clock, as
    // they expire): dead weight, kept out of the token index.
    for table in ["device_access_tokens", "device_challenges"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE expires_at <= $1"))
            .bind(now_ms())
            .execute(store.pool())
            .await?;
    }
    Ok(Pruned {
        heartbeats,
        daily,
        logs,
    })
}

/// Prunes every hour, forever (spawned by the binary).
pub async fn run(store: Store, heartbeat_days: u32, log_days: u32) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        match prune(&store, now_ms(), heartbeat_days, log_days).await {
            Ok(p) => tracing::info!(
                heartbeats = p.heartbeats,
                daily = p.daily,
                logs = p.logs,
                "pruned old rows"
            ),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "pruning failed"),
        }
    }
}
