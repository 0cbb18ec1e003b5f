//! The audit log: append-only, one hash chain per organisation. Each entry
//! holds the SHA-256 of the previous entry (`prev_hash`) and its own
//! (`hash`, over `prev_hash` and every field), so editing or removing an
//! entry breaks every later hash.

use anyhow::{Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::store::{Backend, Store, now_ms};

/// The `prev_hash` of an organisation's first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry to append.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    /// Organisation.
    pub org_id: &'a str,
    /// Who: `user:<email>`, `device:<id>` or `system`.
    pub actor: &'a str,
    /// What, e.g. `release.upload`.
    pub action: &'a str,
    /// On what, e.g. `release:<id>`.
    pub target: &'a str,
    /// `ok` or `error: <status> <reason>`.
    pub result: &'a str,
    /// Extra JSON.
    pub detail: serde_json::Value,
}

/// A stored entry.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Record {
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
    /// Extra JSON.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// SHA-256 of the previous entry.
    pub prev_hash: String,
    /// SHA-256 of this entry.
    pub hash: String,
}

/// SHA-256 over the previous hash and every field of an entry, each
/// length-prefixed so field boundaries cannot be shifted. The fields, in
/// order: prev_hash, seq, at, org, actor, action, target, result, detail.
fn entry_hash(fields: [&str; 9]) -> String {
    let mut h = Sha256::new();
    for field in fields {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The PostgreSQL advisory lock key of an organisation's chain.
fn chain_lock_key(org_id: &str) -> i64 {
    let d = Sha256::digest(format!("kernex-audit-chain:{org_id}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

/// Appends an entry. Appends to one chain are serialised: on SQLite by the
/// write lock the transaction takes up front (`BEGIN IMMEDIATE`), on
/// PostgreSQL by a transaction-scoped advisory lock per organisation, held
/// from reading the chain head to the commit (so concurrent appends, from
/// this server or another replica, queue instead of colliding). A
/// collision on the (org, seq) primary key can then only come from a
/// writer that does not take the lock; it is retried on the new head.
pub async fn append(store: &Store, entry: Entry<'_>) -> Result<()> {
    let detail = entry.detail.to_string();
    let mut last_err = None;
    for _ in 0..10 {
        let mut tx = store.begin_write().await?;
        if store.backend() == Backend::Postgres {
            // Selected through a subquery: the Any driver cannot decode
            // the function's `void` result.
            sqlx::query("SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock($1)) AS l")
                .bind(chain_lock_key(entry.org_id))
                .fetch_one(&mut *tx)
                .await
                .context("unable to lock the audit chain")?;
        }
        let head = sqlx::query(
            "SELECT seq, hash FROM audit_log WHERE org_id = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(entry.org_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (seq, prev) = match head {
            Some(row) => (
                row.try_get::<i64, _>("seq")? + 1,
                row.try_get::<String, _>("hash")?,
            ),
            None => (1, GENESIS.to_string()),
        };
        let at = now_ms();
        let hash = entry_hash([
            &prev,
            &seq.to_string(),
            &at.to_string(),
            entry.org_id,
            entry.actor,
            entry.action,
            entry.target,
            entry.result,
            &detail,
        ]);
        let inserted = sqlx::query(
            "INSERT INTO audit_log (org_id, seq, at, actor, action, target, result, detail, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(entry.org_id)
        .bind(seq)
        .bind(at)
        .bind(entry.actor)
        .bind(entry.action)
        .bind(entry.target)
        .bind(entry.result)
        .bind(&detail)
        .bind(&prev)
        .bind(&hash)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {
                tx.commit().await?;
                return Ok(());
            }
            Err(e) if crate::store::is_unique_violation(&e) => {
                last_err = Some(e);
                tx.rollback().await.ok();
            }
            Err(e) => return Err(e).context("unable to append to the audit log"),
        }
    }
    Err(anyhow::anyhow!(
        "audit log append kept colliding: {last_err:?}"
    ))
}

/// Lists entries, newest first.
pub async fn list(
    store: &Store,
    org_id: &str,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<Record>> {
    let rows = sqlx::query(
        "SELECT seq, at, actor, action, target, result, detail, prev_hash, hash FROM audit_log WHERE org_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
    )
    .bind(org_id)
    .bind(before.unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    rows.iter().map(record).collect()
}

fn record(row: &sqlx::any::AnyRow) -> Result<Record> {
    let detail: String = row.try_get("detail")?;
    Ok(Record {
        seq: row.try_get("seq")?,
        at: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        result: row.try_get("result")?,
        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

/// Recomputes an organisation's chain; returns the first broken `seq`.
pub async fn verify_chain(store: &Store, org_id: &str) -> Result<Option<i64>> {
    let rows = sqlx::query(
        "SELECT seq, at, actor, action, target, result, detail, prev_hash, hash FROM audit_log WHERE org_id = $1 ORDER BY seq ASC",
    )
    .bind(org_id)
    .fetch_all(store.pool())
    .await?;
    let mut prev = GENESIS.to_string();
    for (expected_seq, row) in (1i64..).zip(rows.iter()) {
        let seq: i64 = row.try_get("seq")?;
        let detail: String = row.try_get("detail")?;
        let stored_prev: String = row.try_get("prev_hash")?;
        let at: i64 = row.try_get("at")?;
        let hash = entry_hash([
            &prev,
            &seq.to_string(),
            &at.to_string(),
            org_id,
            &row.try_get::<String, _>("actor")?,
            &row.try_get::<String, _>("action")?,
            &row.try_get::<String, _>("target")?,
            &row.try_get::<String, _>("result")?,
            &detail,
        ]);
        if seq != expected_seq || stored_prev != prev || hash != row.try_get::<String, _>("hash")? {
            return Ok(Some(seq));
        }
        prev = hash;
    }
    Ok(None)
}
