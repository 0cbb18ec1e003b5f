//! Device-triggered audit entries (enrollment, attestation, activation) are
//! coalesced: per device, action and outcome, at most one entry is written
//! every `audit-device-coalesce-secs`; repeats in between are counted and
//! the count goes into the next entry's `detail.repeats` (or into a
//! summary entry `flush` writes once the window has passed). A device
//! hammering an endpoint costs the chain one entry per window, not one
//! per call.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Result;

use super::Entry;
use crate::store::{Store, now_ms};

/// Keys kept at most; past it, slots with nothing pending are dropped
/// first, then the whole table (repeats then go uncounted, never
/// unwritten: the next call writes an entry).
const MAX_SLOTS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    org_id: String,
    actor: String,
    action: String,
    /// The outcome's kind: the result up to its first `:` (`ok`,
    /// `error`, `mismatch`), so varying reasons share one slot.
    outcome: String,
}

#[derive(Debug, Clone)]
struct Slot {
    written_at: i64,
    repeats: u64,
    /// The latest repeat, written as the summary.
    target: String,
    result: String,
}

/// The coalescing table.
#[derive(Debug)]
pub struct Coalescer {
    window_ms: i64,
    slots: Mutex<HashMap<Key, Slot>>,
}

impl Coalescer {
    /// One entry per key every `window_secs` (0: no coalescing).
    pub fn new(window_secs: u64) -> Self {
        Coalescer {
            window_ms: i64::try_from(window_secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Whether to write `entry` now (with how many repeats it stands for
    /// since the last one written), or only count it.
    fn decide(&self, entry: &Entry<'_>, now: i64) -> Option<u64> {
        if self.window_ms == 0 {
            return Some(0);
        }
        let key = Key {
            org_id: entry.org_id.to_string(),
            actor: entry.actor.to_string(),
            action: entry.action.to_string(),
            outcome: entry
                .result
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        let Ok(mut slots) = self.slots.lock() else {
            return Some(0);
        };
        if let Some(slot) = slots.get_mut(&key) {
            if now - slot.written_at < self.window_ms {
                slot.repeats += 1;
                slot.target = entry.target.to_string();
                slot.result = entry.result.to_string();
                return None;
            }
            let repeats = slot.repeats;
            slot.written_at = now;
            slot.repeats = 0;
            return Some(repeats);
        }
        if slots.len() >= MAX_SLOTS {
            let window = self.window_ms;
            slots.retain(|_, s| s.repeats > 0 && now - s.written_at < window);
            if slots.len() >= MAX_SLOTS {
                slots.clear();
            }
        }
        slots.insert(
            key,
            Slot {
                written_at: now,
                repeats: 0,
                target: entry.target.to_string(),
                result: entry.result.to_string(),
            },
        );
        Some(0)
    }

    /// Repeats whose window has passed with nothing written since: taken
    /// out of the table, to be written as summaries.
    fn due(&self, now: i64) -> Vec<(Key, Slot)> {
        let Ok(mut slots) = self.slots.lock() else {
            return Vec::new();
        };
        let window = self.window_ms;
        let mut out = Vec::new();
        slots.retain(|k, s| {
            if now - s.written_at < window {
                return true;
            }
            if s.repeats > 0 {
                out.push((k.clone(), s.clone()));
            }
            false
        });
        out
    }
}

/// Appends a device-triggered entry, or counts it as a repeat.
pub async fn append(store: &Store, coalescer: &Coalescer, entry: Entry<'_>) -> Result<()> {
    let Some(repeats) = coalescer.decide(&entry, now_ms()) else {
        return Ok(());
    };
    let mut entry = entry;
    if repeats > 0 {
        entry.detail = with_repeats(entry.detail, repeats);
    }
    super::append(store, entry).await
}

fn with_repeats(detail: serde_json::Value, repeats: u64) -> serde_json::Value {
    let mut detail = match detail {
        serde_json::Value::Object(m) => m,
        other => {
            let mut m = serde_json::Map::new();
            if !other.is_null() {
                m.insert("detail".into(), other);
            }
            m
        }
    };
    detail.insert("repeats".into(), repeats.into());
    serde_json::Value::Object(detail)
}

/// Writes a summary entry for every key whose repeats were not carried by
/// a later entry within the window. Returns how many were written.
pub async fn flush(store: &Store, coalescer: &Coalescer) -> Result<usize> {
    let due = coalescer.due(now_ms());
    for (key, slot) in &due {
        super::append(
            store,
            Entry {
                org_id: &key.org_id,
                actor: &key.actor,
                action: &key.action,
                target: &slot.target,
                result: &slot.result,
                detail: with_repeats(serde_json::json!({}), slot.repeats),
            },
        )
        .await?;
    }
    Ok(due.len())
}

/// Flushes every window, for as long as the server runs.
pub async fn run(store: Store, coalescer: std::sync::Arc<Coalescer>) {
    if coalescer.window_ms == 0 {
        return;
    }
    let period = std::time::Duration::from_millis(coalescer.window_ms.unsigned_abs());
    loop {
        tokio::time::sleep(period).await;
        if let Err(e) = flush(&store, &coalescer).await {
            tracing::warn!(error = %format!("{e:#}"), "unable to write coalesced device audit entries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(result: &'a str) -> Entry<'a> {
        Entry {
            org_id: "o",
            actor: "device:d1",
            action: "device.attestation",
            target: "device:1",
            result,
            detail: serde_json::json!({}),
        }
    }

    #[test]
    fn one_entry_per_window_and_the_count_carried() {
        let c = Coalescer::new(60);
        assert_eq!(c.decide(&entry("ok"), 0), Some(0));
        assert_eq!(c.decide(&entry("ok"), 1_000), None);
        assert_eq!(c.decide(&entry("ok"), 2_000), None);
        // Another outcome has its own slot.
        assert_eq!(c.decide(&entry("error: 400 x"), 2_000), Some(0));
        assert_eq!(c.decide(&entry("error: 400 y"), 3_000), None);
        assert_eq!(c.decide(&entry("ok"), 61_000), Some(2));
        let due = c.due(200_000);
        assert_eq!(due.len(), 1, "only the error slot has uncarried repeats");
        assert_eq!(due[0].1.repeats, 1);
    }
}
