//! The hash chain itself: how an entry's hash is computed, an entry exactly
//! as stored (what export writes and verify reads), and the walk that
//! checks a run of entries links up. Used by the live server (incremental
//! checks on page views) and by `kernex-server audit verify` alike.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;

/// The `prev_hash` of an organisation's first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The columns of an audit row, in [`StoredEntry`] order.
pub const COLUMNS: &str = "org_id, seq, at, actor, action, target, result, detail, prev_hash, hash";

/// SHA-256 over the previous hash and every field of an entry, each
/// length-prefixed so field boundaries cannot be shifted. The fields, in
/// order: prev_hash, seq, at, org, actor, action, target, result, detail.
pub fn entry_hash(fields: [&str; 9]) -> String {
    let mut h = Sha256::new();
    for field in fields {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// An audit row as stored, and the one type of it: what the API's
/// `GET /audit` answers, the UI's search lists, export writes and verify
/// reads. `detail` is the exact JSON text that was hashed, so an entry
/// verifies byte for byte wherever it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StoredEntry {
    /// Organisation.
    pub org_id: String,
    /// Position in the organisation's chain, from 1.
    pub seq: i64,
    /// Unix milliseconds.
    pub at: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Outcome.
    pub result: String,
    /// Extra JSON, as stored: the exact text hashed (a JSON object).
    pub detail: String,
    /// SHA-256 of the previous entry.
    pub prev_hash: String,
    /// SHA-256 of this entry.
    pub hash: String,
}

impl StoredEntry {
    /// Reads a row selected with [`COLUMNS`].
    pub fn from_row(row: &sqlx::any::AnyRow) -> sqlx::Result<Self> {
        Ok(StoredEntry {
            org_id: row.try_get("org_id")?,
            seq: row.try_get("seq")?,
            at: row.try_get("at")?,
            actor: row.try_get("actor")?,
            action: row.try_get("action")?,
            target: row.try_get("target")?,
            result: row.try_get("result")?,
            detail: row.try_get("detail")?,
            prev_hash: row.try_get("prev_hash")?,
            hash: row.try_get("hash")?,
        })
    }

    /// The hash this entry should have after `prev`.
    pub fn computed_hash(&self, prev: &str) -> String {
        entry_hash([
            prev,
            &self.seq.to_string(),
            &self.at.to_string(),
            &self.org_id,
            &self.actor,
            &self.action,
            &self.target,
            &self.result,
            &self.detail,
        ])
    }
}

/// Where and why a chain stops verifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// The first entry that does not fit.
    pub seq: i64,
    /// What is wrong with it.
    pub reason: String,
}

/// Walks one organisation's entries in order from a trusted point (the
/// genesis, or a verified checkpoint).
#[derive(Debug, Clone)]
pub struct Walk {
    /// The next `seq` expected.
    pub next_seq: i64,
    /// The hash the next entry must link to.
    pub prev: String,
}

impl Walk {
    /// From the start of a chain.
    pub fn genesis() -> Self {
        Walk::after(0, GENESIS)
    }

    /// From just after entry `seq` whose hash is `hash`.
    pub fn after(seq: i64, hash: &str) -> Self {
        Walk {
            next_seq: seq + 1,
            prev: hash.to_string(),
        }
    }

    /// Checks the next entry and moves past it.
    pub fn step(&mut self, e: &StoredEntry) -> Result<(), Break> {
        let fail = |reason: String| Err(Break { seq: e.seq, reason });
        if e.seq != self.next_seq {
            return fail(format!(
                "expected entry {} next, found {} (entries missing or reordered)",
                self.next_seq, e.seq
            ));
        }
        if e.prev_hash != self.prev {
            return fail("prev_hash does not match the previous entry's hash".into());
        }
        let hash = e.computed_hash(&self.prev);
        if hash != e.hash {
            return fail("the stored hash does not match the entry's contents".into());
        }
        self.next_seq += 1;
        self.prev = hash;
        Ok(())
    }

    /// The last entry walked (0 when none).
    pub fn last_seq(&self) -> i64 {
        self.next_seq - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64, prev: &str) -> StoredEntry {
        let mut e = StoredEntry {
            org_id: "o".into(),
            seq,
            at: 1000 + seq,
            actor: "user:a".into(),
            action: "x.y".into(),
            target: "t".into(),
            result: "ok".into(),
            detail: "{}".into(),
            prev_hash: prev.into(),
            hash: String::new(),
        };
        e.hash = e.computed_hash(prev);
        e
    }

    #[test]
    fn walks_a_good_chain_and_stops_at_an_edit() {
        let a = entry(1, GENESIS);
        let b = entry(2, &a.hash);
        let mut walk = Walk::genesis();
        assert!(walk.step(&a).is_ok());
        assert!(walk.step(&b).is_ok());
        assert_eq!(walk.last_seq(), 2);

        let mut edited = b.clone();
        edited.result = "error".into();
        let mut walk = Walk::after(1, &a.hash);
        assert_eq!(walk.step(&edited).map_err(|b| b.seq), Err(2));

        let mut walk = Walk::genesis();
        assert!(walk.step(&b).is_err(), "a gap is a break");
    }
}
