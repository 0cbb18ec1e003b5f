//! The audit log, read-only over HTTP (`service::audit`).

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::AppState;
use crate::auth::Operator;
use crate::http::{ApiJson, Result};
use crate::service::audit;
pub use crate::service::audit::{AuditPage, SigningKey};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/audit", get(list))
        .route("/audit/key", get(key))
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

/// List audit entries, newest first.
#[utoipa::path(get, path = "/api/v1/audit", params(AuditQuery), responses((status = 200, body = AuditPage)))]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<AuditPage>> {
    let Query(q) = query?;
    Ok(ApiJson(audit::page(&state, &op, q.before, q.limit).await?))
}

/// The instance's audit signing key (public half): checkpoints of the
/// chain are signed with it; `kernex-server audit verify --public-key`
/// checks them offline.
#[utoipa::path(get, path = "/api/v1/audit/key", responses((status = 200, body = SigningKey)))]
pub async fn key(State(state): State<AppState>, _op: Operator) -> Result<ApiJson<SigningKey>> {
    Ok(ApiJson(audit::signing_key(&state)?))
}
