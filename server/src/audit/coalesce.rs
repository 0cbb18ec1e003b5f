//! Device-triggered audit entries (enrollment, attestation, activation) are
//! coalesced: per device, action and result, at most one entry is written
//! every `audit-device-coalesce-secs`; repeats in between are counted and
//! the count goes into the next entry's `detail.repeats` (or into a
//! summary entry `flush` writes once the window has passed). And a device
//! gets at most [`PER_DEVICE_PER_WINDOW`] entries per window however it
//! varies its requests; the rest are counted into one `audit.suppressed`
//! entry. A device hammering an endpoint costs the chain a few entries per
//! window, not one per call.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Result;

use super::Entry;
use crate::store::{Store, now_ms};

/// Keys kept at most; past it, slots with nothing pending are dropped
/// first, then the whole table (repeats then go uncounted, never
/// unwritten: the next call writes an entry).
const MAX_SLOTS: usize = 100_000;

/// Distinct entries (action and result) one device may have written per
/// window; past it, its entries are only counted, and the count is
/// written once as `audit.suppressed` (a device cannot flood the chain
/// by varying its requests).
pub const PER_DEVICE_PER_WINDOW: u32 = 10;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    org_id: String,
    actor: String,
    action: String,
    result: String,
}

#[derive(Debug, Clone)]
struct Slot {
    written_at: i64,
    repeats: u64,
    /// The latest repeat's target, written with the summary.
    target: String,
}

#[derive(Debug, Clone)]
struct Budget {
    window_start: i64,
    written: u32,
    suppressed: u64,
}

#[derive(Debug, Default)]
struct Table {
    slots: HashMap<Key, Slot>,
    /// By (org, actor).
    budgets: HashMap<(String, String), Budget>,
}

/// A summary to write: repeats not carried by a later entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    org_id: String,
    actor: String,
    action: String,
    target: String,
    result: String,
    repeats: u64,
}

/// The coalescing table.
#[derive(Debug)]
pub struct Coalescer {
    window_ms: i64,
    table: Mutex<Table>,
}

impl Coalescer {
    /// One entry per device, action and result every `window_secs` (0: no
    /// coalescing).
    pub fn new(window_secs: u64) -> Self {
        Coalescer {
            window_ms: i64::try_from(window_secs)
                .unwrap_or(i64::MAX / 1000)
                .saturating_mul(1000),
            table: Mutex::new(Table::default()),
        }
    }

    /// Whether to write `entry` now (with how many repeats it stands for
    /// since the last one written), or only count it.
    fn decide(&self, entry: &Entry<'_>, now: i64) -> Option<u64> {
        if self.window_ms == 0 {
            return Some(0);
        }
        let window = self.window_ms;
        let key = Key {
            org_id: entry.org_id.to_string(),
            actor: entry.actor.to_string(),
            action: entry.action.to_string(),
            result: entry.result.to_string(),
        };
        let Ok(mut table) = self.table.lock() else {
            return Some(0);
        };
        if let Some(slot) = table.slots.get_mut(&key)
            && now - slot.written_at < window
        {
            slot.repeats += 1;
            slot.target = entry.target.to_string();
            return None;
        }
        if table.slots.len() >= MAX_SLOTS || table.budgets.len() >= MAX_SLOTS {
            table
                .slots
                .retain(|_, s| s.repeats > 0 && now - s.written_at < window);
            table.budgets.retain(|_, b| b.suppressed > 0);
            if table.slots.len() >= MAX_SLOTS || table.budgets.len() >= MAX_SLOTS {
                *table = Table::default();
            }
        }
        let budget = table
            .budgets
            .entry((key.org_id.clone(), key.actor.clone()))
            .or_insert(Budget {
                window_start: now,
                written: 0,
                suppressed: 0,
            });
        if now - budget.window_start >= window {
            budget.window_start = now;
            budget.written = 0;
        }
        if budget.written >= PER_DEVICE_PER_WINDOW {
            budget.suppressed += 1;
            return None;
        }
        budget.written += 1;
        let repeats = table.slots.get(&key).map_or(0, |s| s.repeats);
        table.slots.insert(
            key,
            Slot {
                written_at: now,
                repeats: 0,
                target: entry.target.to_string(),
            },
        );
        Some(repeats)
    }

    /// Repeats and suppressed entries whose window has passed with nothing
    /// written since: taken out of the table, to be written as summaries.
    fn due(&self, now: i64) -> Vec<Summary> {
        let Ok(mut table) = self.table.lock() else {
            return Vec::new();
        };
        let window = self.window_ms;
        let mut out = Vec::new();
        table.slots.retain(|k, s| {
            if now - s.written_at < window {
                return true;
            }
            if s.repeats > 0 {
                out.push(Summary {
                    org_id: k.org_id.clone(),
                    actor: k.actor.clone(),
                    action: k.action.clone(),
                    target: s.target.clone(),
                    result: k.result.clone(),
                    repeats: s.repeats,
                });
            }
            false
        });
        table.budgets.retain(|(org_id, actor), b| {
            if now - b.window_start < window {
                return true;
            }
            if b.suppressed > 0 {
                out.push(Summary {
                    org_id: org_id.clone(),
                    actor: actor.clone(),
                    action: "audit.suppressed".into(),
                    target: actor.clone(),
                    result: "ok".into(),
                    repeats: b.suppressed,
                });
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
    for d in &due {
        super::append(
            store,
            Entry {
                org_id: &d.org_id,
                actor: &d.actor,
                action: &d.action,
                target: &d.target,
                result: &d.result,
                detail: with_repeats(serde_json::json!({}), d.repeats),
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
        // Another result has its own slot.
        assert_eq!(c.decide(&entry("error: 400 x"), 2_000), Some(0));
        assert_eq!(c.decide(&entry("error: 400 x"), 3_000), None);
        assert_eq!(c.decide(&entry("ok"), 61_000), Some(2));
        let due = c.due(200_000);
        assert_eq!(due.len(), 1, "only the error slot has uncarried repeats");
        assert_eq!(due[0].repeats, 1);
    }

    #[test]
    fn a_device_varying_its_requests_is_capped() {
        let c = Coalescer::new(60);
        let results: Vec<String> = (0..25).map(|i| format!("error: 422 offset {i}")).collect();
        let written = results
            .iter()
            .filter(|r| c.decide(&entry(r), 1_000).is_some())
            .count();
        assert_eq!(written, PER_DEVICE_PER_WINDOW as usize);
        let due = c.due(100_000);
        let suppressed: Vec<_> = due
            .iter()
            .filter(|d| d.action == "audit.suppressed")
            .collect();
        assert_eq!(suppressed.len(), 1);
        assert_eq!(suppressed[0].repeats, 15);
    }
}
