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

/// Runs a mutating operation and records it in the audit log with its
/// outcome. `work` answers its value and the target to record (empty:
/// `target`).
pub async fn audited<T>(
    state: &AppState,
    op: &Operator,
    action: &str,
    target: &str,
    work: impl Future<Output = Result<(T, String)>>,
) -> Result<T> {
    let outcome = work.await;
    let (result, target) = match &outcome {
        Ok((_, t)) => ("ok".to_string(), if t.is_empty() { target } else { t }),
        Err(e) => (format!("error: {}", summary(e)), target),
    };
    audit::append(
        &state.store,
        audit::Entry {
            org_id: &op.org_id,
            actor: &op.actor(),
            action,
            target,
            result: &result,
            detail: serde_json::json!({}),
        },
    )
    .await?;
    outcome.map(|(v, _)| v)
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
/// (default 100, at most 1000), and whether the chain verifies.
pub async fn page(
    state: &AppState,
    op: &Operator,
    before: Option<i64>,
    limit: Option<i64>,
) -> Result<AuditPage> {
    let entries = audit::list(
        &state.store,
        &op.org_id,
        limit.unwrap_or(100).clamp(1, 1000),
        before,
    )
    .await?;
    let chain_broken_at = chain_broken_at(state, op).await?;
    Ok(AuditPage {
        entries,
        chain_broken_at,
    })
}

/// The first entry of the organisation's chain whose hash does not match.
pub async fn chain_broken_at(state: &AppState, op: &Operator) -> Result<Option<i64>> {
    Ok(audit::verify_chain(&state.store, &op.org_id).await?)
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
