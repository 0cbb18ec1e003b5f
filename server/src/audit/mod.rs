//! The audit log: append-only, one hash chain per organisation. Each entry
//! holds the SHA-256 of the previous entry (`prev_hash`) and its own
//! (`hash`, over `prev_hash` and every field), so editing or removing an
//! entry breaks every later hash (`chain`). The instance's Ed25519 key signs
//! the head now and then (`checkpoint`), so a chain re-hashed by someone
//! without the key no longer fits its signatures. The server verifies
//! incrementally (from the last entry it verified); `kernex-server audit
//! verify` checks a whole database or export offline (`offline`). Devices'
//! repeated entries are coalesced (`coalesce`).

pub mod chain;
pub mod checkpoint;
pub mod cli;
pub mod coalesce;
pub mod offline;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::store::{Backend, Store, now_ms};
pub use chain::{GENESIS, StoredEntry, Walk, entry_hash};

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

/// The PostgreSQL advisory lock key of an organisation's chain.
fn chain_lock_key(org_id: &str) -> i64 {
    let d = Sha256::digest(format!("kernex-audit-chain:{org_id}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

/// Appends an entry in its own transaction (see [`append_in`]). A
/// collision on the (org, seq) primary key can only come from a writer
/// that does not take the chain lock; it is retried on the new head.
pub async fn append(store: &Store, entry: Entry<'_>) -> Result<()> {
    let mut last_err = None;
    for _ in 0..10 {
        let mut tx = store.begin_write().await?;
        match append_in(store, &mut tx, &entry).await {
            Ok(()) => {
                tx.commit().await?;
                return Ok(());
            }
            Err(e)
                if e.downcast_ref::<sqlx::Error>()
                    .is_some_and(crate::store::is_unique_violation) =>
            {
                last_err = Some(e);
                tx.rollback().await.ok();
            }
            Err(e) => return Err(e),
        }
    }
    Err(anyhow::anyhow!(
        "audit log append kept colliding: {last_err:?}"
    ))
}

/// Appends an entry inside `tx` (which must have been begun with
/// `Store::begin_write`), so it commits or rolls back with the change it
/// records. Appends to one chain are serialised: on SQLite by the write
/// lock the transaction took up front (`BEGIN IMMEDIATE`), on PostgreSQL by
/// a transaction-scoped advisory lock per organisation, held from reading
/// the chain head to the commit (so concurrent appends, from this server
/// or another replica, queue instead of colliding). When a checkpoint is
/// due, the new head is signed in the same transaction.
pub async fn append_in(
    store: &Store,
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    entry: &Entry<'_>,
) -> Result<()> {
    let detail = entry.detail.to_string();
    if store.backend() == Backend::Postgres {
        // Selected through a subquery: the Any driver cannot decode
        // the function's `void` result.
        sqlx::query("SELECT 1 AS locked FROM (SELECT pg_advisory_xact_lock($1)) AS l")
            .bind(chain_lock_key(entry.org_id))
            .fetch_one(&mut **tx)
            .await
            .context("unable to lock the audit chain")?;
    }
    let head =
        sqlx::query("SELECT seq, hash FROM audit_log WHERE org_id = $1 ORDER BY seq DESC LIMIT 1")
            .bind(entry.org_id)
            .fetch_optional(&mut **tx)
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
    sqlx::query(
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
    .execute(&mut **tx)
    .await?;
    if let Some(signer) = store.audit_signer() {
        let last = sqlx::query(
            "SELECT seq, at FROM audit_checkpoints WHERE org_id = $1 ORDER BY seq DESC LIMIT 1",
        )
        .bind(entry.org_id)
        .fetch_optional(&mut **tx)
        .await?
        .map(|row| {
            Ok::<_, sqlx::Error>((row.try_get::<i64, _>("seq")?, row.try_get::<i64, _>("at")?))
        })
        .transpose()?;
        if signer.due(seq, at, last) {
            let cp = signer.sign(entry.org_id, seq, &hash, at)?;
            sqlx::query(&format!(
                "INSERT INTO audit_checkpoints ({}) VALUES ($1, $2, $3, $4, $5, $6)",
                checkpoint::COLUMNS
            ))
            .bind(&cp.org_id)
            .bind(cp.seq)
            .bind(&cp.hash)
            .bind(cp.at)
            .bind(&cp.public_key)
            .bind(&cp.signature)
            .execute(&mut **tx)
            .await?;
            tracing::info!(org = %cp.org_id, seq, hash = %cp.hash, signature = %cp.signature, "signed an audit checkpoint");
        }
    }
    Ok(())
}

/// Lists entries, newest first, and the lowest `seq` among them that does
/// not fit (its hash is not that of its contents, or it does not link to
/// the entry below it): the entries shown are always checked, whatever
/// the incremental mark says.
pub async fn list(
    store: &Store,
    org_id: &str,
    limit: i64,
    before: Option<i64>,
) -> Result<(Vec<StoredEntry>, Option<i64>)> {
    let rows = sqlx::query(&format!(
        "SELECT {} FROM audit_log WHERE org_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
        chain::COLUMNS
    ))
    .bind(org_id)
    .bind(before.unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(store.pool())
    .await?;
    let entries = rows
        .iter()
        .map(StoredEntry::from_row)
        .collect::<sqlx::Result<Vec<_>>>()?;
    let mut unfit = None;
    for (i, e) in entries.iter().enumerate() {
        let below = entries.get(i + 1);
        let links = below.is_none_or(|b| b.seq + 1 == e.seq && b.hash == e.prev_hash);
        if e.computed_hash(&e.prev_hash) != e.hash || !links {
            unfit = Some(below.filter(|_| !links).map_or(e.seq, |b| b.seq.min(e.seq)));
        }
    }
    Ok((entries, unfit))
}

/// Verifies an organisation's chain from where it was last verified (the
/// `audit_verified` mark) to the head, and records the new mark: a page
/// view costs the entries appended since the last one, never the whole
/// chain. Also checks that the marked entry still has the hash it had, and
/// that the latest signed checkpoint still fits its entry and its
/// signature. Returns the first broken `seq`. `kernex-server audit verify`
/// checks everything from the genesis, offline.
pub async fn verify_incremental(store: &Store, org_id: &str) -> Result<Option<i64>> {
    use futures_util::TryStreamExt;

    let mark = sqlx::query("SELECT seq, hash FROM audit_verified WHERE org_id = $1")
        .bind(org_id)
        .fetch_optional(store.pool())
        .await?
        .map(|r| {
            Ok::<_, sqlx::Error>((r.try_get::<i64, _>("seq")?, r.try_get::<String, _>("hash")?))
        })
        .transpose()?;
    let mut walk = match &mark {
        Some((seq, hash)) => {
            let still: Option<String> =
                sqlx::query("SELECT hash FROM audit_log WHERE org_id = $1 AND seq = $2")
                    .bind(org_id)
                    .bind(seq)
                    .fetch_optional(store.pool())
                    .await?
                    .map(|r| r.try_get("hash"))
                    .transpose()?;
            if still.as_deref() != Some(hash.as_str()) {
                return Ok(Some(*seq));
            }
            Walk::after(*seq, hash)
        }
        None => Walk::genesis(),
    };
    let sql = format!(
        "SELECT {} FROM audit_log WHERE org_id = $1 AND seq > $2 ORDER BY seq ASC",
        chain::COLUMNS
    );
    let mut rows = sqlx::query(&sql)
        .bind(org_id)
        .bind(walk.last_seq())
        .fetch(store.pool());
    while let Some(row) = rows.try_next().await? {
        let e = StoredEntry::from_row(&row)?;
        if let Err(b) = walk.step(&e) {
            return Ok(Some(b.seq));
        }
    }
    drop(rows);
    if let Some(broken) = latest_checkpoint_broken(store, org_id).await? {
        return Ok(Some(broken));
    }
    if walk.last_seq() > mark.as_ref().map_or(0, |m| m.0) {
        sqlx::query(
            "INSERT INTO audit_verified (org_id, seq, hash, at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (org_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, at = excluded.at \
             WHERE audit_verified.seq < excluded.seq",
        )
        .bind(org_id)
        .bind(walk.last_seq())
        .bind(&walk.prev)
        .bind(now_ms())
        .execute(store.pool())
        .await?;
    }
    Ok(None)
}

/// The latest signed checkpoint's `seq` if it no longer fits: its entry is
/// gone or has another hash, or the signature is not this instance's valid
/// one (checkpoints by other replicas' keys are checked by `audit verify`).
async fn latest_checkpoint_broken(store: &Store, org_id: &str) -> Result<Option<i64>> {
    let Some(cp) = sqlx::query(&format!(
        "SELECT {} FROM audit_checkpoints WHERE org_id = $1 ORDER BY seq DESC LIMIT 1",
        checkpoint::COLUMNS
    ))
    .bind(org_id)
    .fetch_optional(store.pool())
    .await?
    .map(|r| checkpoint::Checkpoint::from_row(&r))
    .transpose()?
    else {
        return Ok(None);
    };
    let hash: Option<String> =
        sqlx::query("SELECT hash FROM audit_log WHERE org_id = $1 AND seq = $2")
            .bind(org_id)
            .bind(cp.seq)
            .fetch_optional(store.pool())
            .await?
            .map(|r| r.try_get("hash"))
            .transpose()?;
    let ours = store
        .audit_signer()
        .is_none_or(|s| s.public_hex() == cp.public_key);
    if hash.as_deref() != Some(cp.hash.as_str()) || (ours && !cp.signature_valid()) {
        return Ok(Some(cp.seq));
    }
    Ok(None)
}
