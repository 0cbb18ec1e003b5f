//! The audit log, read-only over HTTP.

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::audit::{self, Record};
use crate::auth::Operator;
use crate::http::{ApiJson, Result};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/audit", get(list))
}

/// Paging.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Entries with a smaller `seq` only.
    pub before: Option<i64>,
    /// At most this many (default 100, max 1000).
    pub limit: Option<i64>,
}

/// A page of the audit log and whether the chain verifies.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Entries, newest first.
    pub entries: Vec<Record>,
    /// The first entry whose hash does not match, if any.
    pub chain_broken_at: Option<i64>,
}

/// List audit entries, newest first.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery), responses((status = 200, body = AuditPage)))]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<AuditPage>> {
    let Query(q) = query?;
    let entries = audit::list(
        &state.store,
        &op.org_id,
        q.limit.unwrap_or(100).clamp(1, 1000),
        q.before,
    )
    .await?;
    let chain_broken_at = audit::verify_chain(&state.store, &op.org_id).await?;
    Ok(ApiJson(AuditPage {
        entries,
        chain_broken_at,
    }))
}
