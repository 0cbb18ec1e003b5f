//! The audit trail of operator actions: every mutating service call is
//! recorded with its outcome, success or not; and the log as operators
//! read it (pages of the hash chain, or filtered by who, what and when).

use serde::Serialize;
use utoipa::ToSchema;

use super::{Error, Result};
use crate::AppState;
use crate::audit::{self, StoredEntry};
use crate::auth::Operator;
use crate::store::Store;

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
/// after the rollback, in a transaction of its own (unless
/// [`Audited::failures_unrecorded`]).
#[derive(Debug)]
pub struct Audited<'a> {
    store: &'a Store,
    org_id: &'a str,
    actor: String,
    action: &'a str,
    target: &'a str,
    record_failures: bool,
}

impl<'a> Audited<'a> {
    /// `action` by `op` on `target` (the default target to record), in
    /// the operator's organisation's log.
    pub fn new(state: &'a AppState, op: &'a Operator, action: &'a str, target: &'a str) -> Self {
        Audited {
            store: &state.store,
            org_id: &op.org_id,
            actor: op.actor(),
            action,
            target,
            record_failures: true,
        }
    }

    /// `action` by `actor` on `target`, in organisation `org_id`'s log:
    /// for changes made on the host (`kernex-server admin`), with no
    /// operator session.
    pub fn by(
        store: &'a Store,
        org_id: &'a str,
        actor: &str,
        action: &'a str,
        target: &'a str,
    ) -> Self {
        Audited {
            store,
            org_id,
            actor: actor.to_string(),
            action,
            target,
            record_failures: true,
        }
    }

    /// Failures are answered but not recorded: for a change whose log
    /// does not exist unless it succeeds (a new organisation's).
    pub fn failures_unrecorded(mut self) -> Self {
        self.record_failures = false;
        self
    }

    /// Begins the write transaction.
    pub async fn begin(&self) -> Result<Tx> {
        Ok(self.store.begin_write().await?)
    }

    /// Appends a further successful entry, `action` on `target` by the
    /// same actor, in `tx` (a change that is recorded as two actions).
    pub async fn also(&self, tx: &mut Tx, action: &str, target: &str) -> Result<()> {
        let entry = self.entry(action, target, "ok");
        Ok(audit::append_in(self.store, tx, &entry).await?)
    }

    fn entry<'e>(&'e self, action: &'e str, target: &'e str, result: &'e str) -> audit::Entry<'e> {
        audit::Entry {
            org_id: self.org_id,
            actor: &self.actor,
            action,
            target,
            result,
            detail: serde_json::json!({}),
        }
    }

    /// Ends the work: on success appends the entry (with the work's target,
    /// or the default when empty) in `tx` and commits; on failure (of the
    /// work, or of the entry or the commit) rolls back and records the
    /// failure.
    pub async fn finish<T>(&self, mut tx: Tx, outcome: Result<(T, String)>) -> Result<T> {
        match outcome {
            Ok((value, t)) => {
                let entry = self.entry(
                    self.action,
                    if t.is_empty() { self.target } else { &t },
                    "ok",
                );
                // When the entry or the commit fails, the change goes with
                // it, and is recorded as failed.
                if let Err(e) = audit::append_in(self.store, &mut tx, &entry).await {
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

    /// Records a failure (before or without a transaction), in a
    /// transaction of its own, and answers it.
    pub async fn fail<T>(&self, e: Error) -> Result<T> {
        if self.record_failures {
            let result = format!("error: {}", summary(&e));
            audit::append(self.store, self.entry(self.action, self.target, &result)).await?;
        }
        Err(e)
    }
}

/// A page of the audit log and whether the chain verifies.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Entries, newest first, as stored (each verifies as an export line
    /// does).
    pub entries: Vec<StoredEntry>,
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

/// The entries about `target` exactly (e.g. `device:<id>`), newest first,
/// at most `limit` (an index range: `audit_log_org_target`).
pub async fn for_target(
    state: &AppState,
    op: &Operator,
    target: &str,
    limit: i64,
) -> Result<Vec<StoredEntry>> {
    let rows = sqlx::query(&format!(
        "SELECT {} FROM audit_log WHERE org_id = $1 AND target = $2 ORDER BY seq DESC LIMIT $3",
        audit::chain::COLUMNS
    ))
    .bind(&op.org_id)
    .bind(target)
    .bind(limit)
    .fetch_all(state.store.pool())
    .await?;
    Ok(rows
        .iter()
        .map(StoredEntry::from_row)
        .collect::<sqlx::Result<_>>()?)
}

/// Entries matching `q`, newest first, at most `limit`.
pub async fn search(
    state: &AppState,
    op: &Operator,
    q: &Search,
    limit: i64,
) -> Result<Vec<StoredEntry>> {
    let rows = sqlx::query(&format!(
        "SELECT {} FROM audit_log WHERE org_id = $1 \
         AND ($2 IS NULL OR actor LIKE $2 ESCAPE '\\') \
         AND ($3 IS NULL OR action LIKE $3 ESCAPE '\\') \
         AND ($4 IS NULL OR target LIKE $4 ESCAPE '\\') \
         AND ($5 IS NULL OR at >= $5) AND ($6 IS NULL OR at < $6) AND ($7 IS NULL OR seq < $7) \
         ORDER BY seq DESC LIMIT $8",
        audit::chain::COLUMNS
    ))
    .bind(&op.org_id)
    .bind(like(&q.actor))
    .bind(like(&q.action))
    .bind(like(&q.target))
    .bind(q.since)
    .bind(q.until)
    .bind(q.before)
    .bind(limit)
    .fetch_all(state.store.pool())
    .await?;
    Ok(rows
        .iter()
        .map(StoredEntry::from_row)
        .collect::<sqlx::Result<_>>()?)
}
