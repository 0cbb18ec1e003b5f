//! Write-behind for `devices.last_seen_at`: a device's poll records when it
//! was seen in memory, and a background task writes the pending times to
//! the store in batches every [`FLUSH_EVERY`] (and once more on shutdown),
//! so a poll does not write to the database.
//!
//! `last_seen_at` has a resolution ([`LastSeen::resolution_ms`]: 15 s, or a
//! quarter of `offline-after-secs` when that is shorter): a poll less than
//! that after the time last written for the device is not written at all
//! (a fleet polling every 60 s is written at every poll; a device polling
//! in a tight loop, once per resolution).
//!
//! Every reader of `last_seen_at` (device list and detail, the web UI
//! through them, rollout detail, the scheduler's offline detection) calls
//! [`LastSeen::flush`] first, so within one server it sees every poll to
//! within the resolution. Other replicas sharing the database see a poll
//! at most the resolution + `FLUSH_EVERY` late (against an offline
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

/// The resolution of `last_seen_at` unless `offline-after-secs` asks for
/// a finer one (milliseconds).
pub const MAX_RESOLUTION_MS: i64 = 15_000;

/// Devices with a pending time before a poll writes its own directly (the
/// map's bound: about 100 bytes a device).
pub const MAX_PENDING: usize = 500_000;

/// Rows per `UPDATE` statement of a flush.
const BATCH: usize = 500;

/// Pending `last_seen_at` times, by device primary key.
#[derive(Debug)]
pub struct LastSeen {
    /// A poll this close after the time last written for its device is not
    /// written (milliseconds).
    resolution_ms: i64,
    times: Mutex<Times>,
    /// Held for a whole flush, so a reader's flush waits for one under way
    /// (whose rows would otherwise be neither in the map nor in the store).
    flushing: tokio::sync::Mutex<()>,
    wake: tokio::sync::Notify,
}

/// The maps behind one lock.
#[derive(Debug, Default)]
struct Times {
    /// Times not yet written.
    pending: HashMap<String, i64>,
    /// The time last written by a flush, for devices written within the
    /// last resolution (pruned at every flush).
    written: HashMap<String, i64>,
}

impl Default for LastSeen {
    fn default() -> Self {
        LastSeen::new(MAX_RESOLUTION_MS)
    }
}

impl LastSeen {
    /// With a resolution of `resolution_ms` (0: every poll is written).
    pub fn new(resolution_ms: i64) -> Self {
        LastSeen {
            resolution_ms: resolution_ms.max(0),
            times: Mutex::default(),
            flushing: tokio::sync::Mutex::default(),
            wake: tokio::sync::Notify::default(),
        }
    }

    /// The resolution for a server that shows a device offline after
    /// `offline_after_secs` without contact: a quarter of that, at most
    /// [`MAX_RESOLUTION_MS`].
    pub fn for_offline_after(offline_after_secs: u64) -> Self {
        let quarter = i64::try_from(offline_after_secs.saturating_mul(250)).unwrap_or(i64::MAX);
        LastSeen::new(quarter.min(MAX_RESOLUTION_MS))
    }

    /// See [`LastSeen::new`].
    pub fn resolution_ms(&self) -> i64 {
        self.resolution_ms
    }

    /// Records that device `pk` was seen at `at_ms`: pending, or nothing to
    /// do when the time last written for it is less than the resolution
    /// older. `false` when the map is full: the caller writes the time
    /// itself.
    pub fn record(&self, pk: &str, at_ms: i64) -> bool {
        let Ok(mut times) = self.times.lock() else {
            return false;
        };
        let Times { pending, written } = &mut *times;
        if let Some(t) = pending.get_mut(pk) {
            *t = (*t).max(at_ms);
            return true;
        }
        if written
            .get(pk)
            .is_some_and(|w| at_ms < w.saturating_add(self.resolution_ms))
        {
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
        self.times.lock().map(|t| t.pending.len()).unwrap_or(0)
    }

    /// Writes every pending time to the store; returns how many. On error
    /// the times not written are kept for the next flush.
    pub async fn flush(&self, store: &Store) -> Result<usize> {
        let _guard = self.flushing.lock().await;
        let batch: Vec<(String, i64)> = {
            let mut times = self
                .times
                .lock()
                .map_err(|_| anyhow!("last-seen map lock poisoned"))?;
            if times.pending.is_empty() {
                return Ok(0);
            }
            std::mem::take(&mut times.pending).into_iter().collect()
        };
        let n = batch.len();
        if let Err(e) = write(store, &batch).await {
            // Keep them (newer times recorded meanwhile win).
            if let Ok(mut times) = self.times.lock() {
                for (pk, at) in batch {
                    let t = times.pending.entry(pk).or_insert(at);
                    *t = (*t).max(at);
                }
            }
            return Err(e);
        }
        if let Ok(mut times) = self.times.lock() {
            // The newest time written stands for "now" (the times come from
            // the server's clock, which may be a test clock); what is older
            // than the resolution before it no longer holds a poll back.
            let newest = batch.iter().map(|(_, at)| *at).max().unwrap_or(i64::MIN);
            let horizon = newest.saturating_sub(self.resolution_ms);
            times.written.retain(|_, w| *w > horizon);
            for (pk, at) in batch {
                if at > horizon && times.written.len() < MAX_PENDING {
                    let w = times.written.entry(pk).or_insert(at);
                    *w = (*w).max(at);
                }
            }
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
pub async fn touch(state: &AppState, pk: &str) -> crate::service::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_is_a_quarter_of_the_offline_threshold_at_most_15_s() {
        assert_eq!(LastSeen::for_offline_after(1).resolution_ms(), 250);
        assert_eq!(LastSeen::for_offline_after(40).resolution_ms(), 10_000);
        assert_eq!(
            LastSeen::for_offline_after(30 * 60).resolution_ms(),
            MAX_RESOLUTION_MS
        );
        assert_eq!(
            LastSeen::for_offline_after(u64::MAX).resolution_ms(),
            MAX_RESOLUTION_MS
        );
        assert_eq!(LastSeen::new(-5).resolution_ms(), 0);
    }
}
