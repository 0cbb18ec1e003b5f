//! The audit trail of operator actions: every mutating service call is
//! recorded with its outcome, success or not; and the log as operators
//! read it (pages of the hash chain, or filtered by who, what and when).

use serde::Serialize;
use utoipa::ToSchema;

use super::{Error, Result};
use crate::AppState;
use crate::audit::{self, Record};
use crate::auth::Operator;

/// The status an error is answered with, for the audit log's outcome.
fn status(e: &Error) -> u16 {
    match e {
        Error::Invalid(_) => 400,
        Error::Unauthorized => 401,
        Error::Forbidden | Error::Refused(_) => 403,
        Error::NotFound(_) => 404,
        Error::Conflict(_) => 409,
        Error::TooLarge(_) | Error::OverLimit(_) => 413,
        Error::Unprocessable(_) => 422,
        Error::TooManyRequests(_) => 429,
        Error::Internal(_) => 500,
    }
}

/// Status and a one-line reason, for the audit log (never internals).
pub fn summary(e: &Error) -> String {
    let code = status(e);
    match e {
        Error::Invalid(d)
        | Error::Conflict(d)
        | Error::Unprocessable(d)
        | Error::Refused(d)
        | Error::OverLimit(d) => {
            format!("{code} {d}")
        }
        Error::NotFound(what) => format!("{code} {what}"),
        _ => code.to_string(),
    }
}

/// A write transaction (`Store::begin_write`) that an audited change and
/// its audit entry share.
pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// A mutating operation and its audit entry, in one transaction: the
/// change and its record commit together or not at all.
///
/// ```ignore
/// let audit = Audited::new(state, op, "device.revoke", &target);
/// let mut tx = audit.begin().await?;
/// let outcome: Result<_> = async { /* writes through &mut *tx */ }.await;
/// audit.finish(tx, outcome).await
/// ```
///
/// The work writes through the transaction (on SQLite another
/// connection's write would wait for it) and does nothing slow in it:
/// heavy preparation (hashing, streaming a bundle) runs before `begin`,
/// and its failure goes to [`Audited::fail`]. A failure is recorded too,
/// after the rollback, in a transaction of its own.
#[derive(Debug)]
pub struct Audited<'a> {
    state: &'a AppState,
    op: &'a Operator,
    action: &'a str,
    target: &'a str,
}

impl<'a> Audited<'a> {
    /// `action` by `op` on `target` (the default target to record).
    pub fn new(state: &'a AppState, op: &'a Operator, action: &'a str, target: &'a str) -> Self {
        Audited {
            state,
            op,
            action,
            target,
        }
    }

    /// Begins the write transaction.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(self.state.store.begin_write().await?)
    }

    /// Ends the work: on success appends the entry (with the work's target,
    /// or the default when empty) in `tx` and commits; on failure (of the
    /// work, or of the entry or the commit) rolls back and records the
    /// failure.
    pub async fn finish<T>(&self, mut tx: Tx, outcome: Result<(T, String)>) -> Result<T> {
        match outcome {
            Ok((value, t)) => {
                let actor = self.op.actor();
                let entry = audit::Entry {
                    org_id: &self.op.org_id,
                    actor: &actor,
                    action: self.action,
                    target: if t.is_empty() { self.target } else { &t },
                    result: "ok",
                    detail: serde_json::json!({}),
                };
                // When the entry or the commit fails, the change goes with
                // it, and is recorded as failed.
                if let Err(e) = audit::append_in(&self.state.store, &mut tx, &entry).await {
                    tx.rollback().await.ok();
                    return self.fail(e.into()).await;
                }
                match tx.commit().await {
                    Ok(()) => Ok(value),
                    Err(e) => self.fail(e.into()).await,
                }
            }
            Err(e) => {
                tx.rollback().await.ok();
                self.fail(e).await
            }
        }
    }

    /// Records a failure (before or without a transaction) and answers it.
    pub async fn fail<T>(&self, e: Error) -> Result<T> {
        let result = format!("error: {}", summary(&e));
        record(self.state, self.op, self.action, self.target, &result).await?;
        Err(e)
    }
}

/// Records an outcome in a transaction of its own.
async fn record(
    state: &AppState,
    op: &Operator,
    action: &str,
    target: &str,
    result: &str,
) -> Result<()> {
    let actor = op.actor();
    audit::append(
        &state.store,
        audit::Entry {
            org_id: &op.org_id,
            actor: &actor,
            action,
            target,
            result,
            detail: serde_json::json!({}),
        },
    )
    .await?;
    Ok(())
}

/// A page of the audit log and whether the chain verifies.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Entries, newest first.
    pub entries: Vec<Record>,
    /// The first entry whose hash does not match, if any.
    pub chain_broken_at: Option<i64>,
}

/// Entries before `before` (a `seq`), newest first, at most `limit`
/// (default 100, at most 1000), and whether the chain verifies: the
/// entries shown, and the chain from the last verified mark to the head
/// (never the whole chain on a page view; `kernex-server audit verify`
/// does that offline).
pub async fn page(
    state: &AppState,
    op: &Operator,
    before: Option<i64>,
    limit: Option<i64>,
) -> Result<AuditPage> {
    let (entries, unfit) = audit::list(
        &state.store,
        &op.org_id,
        limit.unwrap_or(100).clamp(1, 1000),
        before,
    )
    .await?;
    let chain_broken_at = match (chain_broken_at(state, op).await?, unfit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(AuditPage {
        entries,
        chain_broken_at,
    })
}

/// The first entry of the organisation's chain whose hash does not match,
/// checked from the last entry verified (`audit::verify_incremental`).
pub async fn chain_broken_at(state: &AppState, op: &Operator) -> Result<Option<i64>> {
    Ok(audit::verify_incremental(&state.store, &op.org_id).await?)
}

/// The instance's audit signing key, public half.
#[derive(Debug, Serialize, ToSchema)]
pub struct SigningKey {
    /// Raw Ed25519 public key, hex (what checkpoints name).
    pub public_key: String,
    /// The same as PEM (SubjectPublicKeyInfo): save it and pass it to
    /// `kernex-server audit verify --public-key`.
    pub public_key_pem: String,
    /// A checkpoint is signed every this many entries (0: not by count).
    pub checkpoint_entries: u64,
    /// ... or this many minutes after the last (0: not by time).
    pub checkpoint_minutes: u64,
}

/// The key that signs this instance's audit checkpoints.
pub fn signing_key(state: &AppState) -> Result<SigningKey> {
    let signer = state
        .store
        .audit_signer()
        .ok_or_else(|| super::Error::Internal(anyhow::anyhow!("no audit signing key loaded")))?;
    Ok(SigningKey {
        public_key: signer.public_hex().to_string(),
        public_key_pem: signer.public_pem()?,
        checkpoint_entries: state.config.audit_checkpoint_entries,
        checkpoint_minutes: state.config.audit_checkpoint_minutes,
    })
}

/// What to search the log for; all optional, combined with AND.
#[derive(Debug, Default)]
pub struct Search {
    /// The actor contains this.
    pub actor: Option<String>,
    /// The action contains this.
    pub action: Option<String>,
    /// The target contains this.
    pub target: Option<String>,
    /// At or after (unix ms).
    pub since: Option<i64>,
    /// Before (unix ms).
    pub until: Option<i64>,
    /// With a smaller `seq`.
    pub before: Option<i64>,
}

/// One entry as a search shows it.
#[derive(Debug, sqlx::FromRow)]
pub struct Line {
    /// Position in the chain.
    pub seq: i64,
    /// Unix ms.
    pub at: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Outcome.
    pub result: String,
}

/// `%value%` for LIKE, with the wildcards in the value escaped.
fn like(v: &Option<String>) -> Option<String> {
    v.as_ref().map(|s| {
        let escaped = s
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    })
}

/// Entries matching `q`, newest first, at most `limit`.
pub async fn search(state: &AppState, op: &Operator, q: &Search, limit: i64) -> Result<Vec<Line>> {
    Ok(sqlx::query_as::<_, Line>(
        "SELECT seq, at, actor, action, target, result FROM audit_log WHERE org_id = $1 \
         AND ($2 IS NULL OR actor LIKE $2 ESCAPE '\\') \
         AND ($3 IS NULL OR action LIKE $3 ESCAPE '\\') \
         AND ($4 IS NULL OR target LIKE $4 ESCAPE '\\') \
         AND ($5 IS NULL OR at >= $5) AND ($6 IS NULL OR at < $6) AND ($7 IS NULL OR seq < $7) \
         ORDER BY seq DESC LIMIT $8",
    )
    .bind(&op.org_id)
    .bind(like(&q.actor))
    .bind(like(&q.action))
    .bind(like(&q.target))
    .bind(q.since)
    .bind(q.until)
    .bind(q.before)
    .bind(limit)
    .fetch_all(state.store.pool())
    .await?)
}
