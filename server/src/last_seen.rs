//! Write-behind for `devices.last_seen_at`: a device's poll records when it
//! was seen in memory, and a background task writes the pending times to
//! the store in batches every [`FLUSH_EVERY`] (and once more on shutdown),
//! so a poll does not write to the database.
//!
//! Every reader of `last_seen_at` (device list and detail, the web UI
//! through them, rollout detail, the scheduler's offline detection) calls
//! [`LastSeen::flush`] first, so within one server it sees exactly what it
//! would have seen with a write per poll. Other replicas sharing the
//! database see a poll at most `FLUSH_EVERY` late (against an offline
//! threshold of minutes).
//!
//! A flush never moves `last_seen_at` backwards: the other writers (heartbeat,
//! report, logs) write it directly, and a pending poll time older than
//! what they wrote is dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::AppState;
use crate::store::Store;

/// How often pending times are written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

/// Devices with a pending time before a poll writes its own directly (the
/// map's bound: about 100 bytes a device).
pub const MAX_PENDING: usize = 500_000;

/// Rows per `UPDATE` statement of a flush.
const BATCH: usize = 500;

/// Pending `last_seen_at` times, by device primary key.
#[derive(Debug, Default)]
pub struct LastSeen {
    pending: Mutex<HashMap<String, i64>>,
    /// Held for a whole flush, so a reader's flush waits for one under way
    /// (whose rows would otherwise be neither in the map nor in the store).
    flushing: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
}

impl LastSeen {
    /// Records that device `pk` was seen at `at_ms`. `false` when the map
    /// is full: the caller writes the time itself.
    pub fn record(&self, pk: &str, at_ms: i64) -> bool {
        let Ok(mut pending) = self.pending.lock() else {
            return false;
        };
        if let Some(t) = pending.get_mut(pk) {
            *t = (*t).max(at_ms);
            return true;
        }
        if pending.len() >= MAX_PENDING {
            self.wake.notify_one();
            return false;
        }
        pending.insert(pk.to_string(), at_ms);
        if pending.len() >= MAX_PENDING / 2 {
            self.wake.notify_one();
        }
        true
    }

    /// Devices with a time not yet written.
    pub fn pending(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Writes every pending time to the store; returns how many. On error
    /// the times not written are kept for the next flush.
    pub async fn flush(&self, store: &Store) -> Result<usize> {
        let _guard = self.flushing.lock().await;
        let batch: Vec<(String, i64)> = {
            let mut pending = self
                .pending
                .lock()
                .map_err(|_| anyhow!("last-seen map lock poisoned"))?;
            if pending.is_empty() {
                return Ok(0);
            }
            std::mem::take(&mut *pending).into_iter().collect()
        };
        let n = batch.len();
        if let Err(e) = write(store, &batch).await {
            // Keep them (newer times recorded meanwhile win).
            if let Ok(mut pending) = self.pending.lock() {
                for (pk, at) in batch {
                    let t = pending.entry(pk).or_insert(at);
                    *t = (*t).max(at);
                }
            }
            return Err(e);
        }
        Ok(n)
    }

    /// The flush task: every [`FLUSH_EVERY`], or sooner when the map fills
    /// up. Runs until the process ends; `main` flushes once more after the
    /// server has stopped.
    pub async fn run(state: AppState) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(FLUSH_EVERY) => {}
                () = state.last_seen.wake.notified() => {}
            }
            if let Err(e) = state.last_seen.flush(&state.store).await {
                tracing::warn!("unable to write last-seen times: {e:#}");
            }
        }
    }
}

/// Records a device's contact now (a poll): in the map, or straight to the
/// store when the map is full.
pub async fn touch(state: &AppState, pk: &str) -> crate::http::Result<()> {
    let now = state.clock.now_ms();
    if state.last_seen.record(pk, now) {
        return Ok(());
    }
    sqlx::query("UPDATE devices SET last_seen_at = $1 WHERE id = $2")
        .bind(now)
        .bind(pk)
        .execute(state.store.pool())
        .await?;
    Ok(())
}

/// One transaction, [`BATCH`] rows per statement; a row only moves
/// `last_seen_at` forward. Same SQL on SQLite (3.33+: `UPDATE ... FROM`)
/// and PostgreSQL.
async fn write(store: &Store, rows: &[(String, i64)]) -> Result<()> {
    let mut tx = store
        .begin_write()
        .await
        .context("unable to start the last-seen transaction")?;
    for chunk in rows.chunks(BATCH) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, CAST(${} AS BIGINT))", 2 * i + 1, 2 * i + 2))
            .collect();
        let sql = format!(
            "WITH seen (id, at) AS (VALUES {}) \
             UPDATE devices SET last_seen_at = seen.at FROM seen \
             WHERE devices.id = seen.id AND (devices.last_seen_at IS NULL OR devices.last_seen_at < seen.at)",
            values.join(", ")
        );
        let mut q = sqlx::query(&sql).persistent(chunk.len() == BATCH);
        for (pk, at) in chunk {
            q = q.bind(pk).bind(*at);
        }
        q.execute(&mut *tx)
            .await
            .context("unable to write last-seen times")?;
    }
    tx.commit()
        .await
        .context("unable to commit last-seen times")?;
    Ok(())
}
