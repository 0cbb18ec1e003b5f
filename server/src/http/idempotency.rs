//! `Idempotency-Key` on POST: the first answer to a (principal, key) pair
//! is stored; a retry of the same request gets it again (with
//! `Idempotent-Replayed: true`) instead of running twice, so a device that
//! lost the answer to a report can send it again safely. The same key with
//! a different request is 422; while the first is still running, 409 with
//! `Retry-After`. The semantics for clients are in server/README.md
//! ("Idempotent requests").
//!
//! - The caller is authenticated first (operator session or API token,
//!   device credential), from the headers alone; the body is read only
//!   after that. An anonymous caller, or one whose credential fails, gets
//!   no idempotency at all: the request runs as if without the header.
//! - Keys are scoped by organisation and principal: the session or API
//!   token (by its hash) or the device. A stored answer never goes to
//!   another principal.
//! - Stored: 2xx and 4xx answers, except 401, 403, 408 and 429 (those say
//!   nothing about the request, only about the caller or the moment), and
//!   except any answer that carries a secret (`Cache-Control: no-store`,
//!   or a Kernex secret in the body). 5xx, a dropped request (the client
//!   went away mid-handler) and an unstored answer release the key, so the
//!   retry runs again.
//! - A key still "in progress" after `idempotency-in-progress-secs` (a
//!   crash, a restart) is taken over by the next request with it.
//! - Keys expire after 24 hours.

use axum::body::{Body, to_bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::AppState;
use crate::auth::{Device, Operator};
use crate::http::Error;
use crate::http::error::is_unique_violation;
use crate::service::refusals::IdempotencyConflict as Conflict;
use crate::store::now_ms;

/// The request header.
pub const HEADER: &str = kernex_protocol::api::IDEMPOTENCY_KEY_HEADER;

/// How long a key is remembered, ms.
pub const TTL_MS: i64 = crate::retention::IDEMPOTENCY_TTL_MS;

/// Never stored: their answers carry a secret (login, enrollment, device
/// access tokens and keys, enrollment-token and API-token creation), or the body is streamed, not
/// buffered (bundle uploads). Matched as path prefixes.
const EXCLUDED: &[&str] = &[
    "/api/v1/login",
    "/api/v1/device/enroll",
    "/api/v1/enrollment-tokens",
    "/api/v1/releases",
    "/api/v1/tokens",
    "/api/v1/api-tokens",
    "/api/v1/account/tokens",
    "/api/v1/device/auth",
    "/api/v1/device/key",
    "/ui/",
];

/// The prefixes of Kernex secrets (operator tokens, enrollment tokens,
/// device credentials, UI login tokens): an answer that contains one is
/// never stored.
const SECRET_PREFIXES: &[&str] = &["kxo_", "kxe_", "kxd_", "kxl_", "kxa_", "kxk_"];

/// Largest response stored for replay.
const MAX_STORED_RESPONSE: usize = 1 << 20;

/// The middleware.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match handle(state, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Whether the key applies to this request at all.
fn applies(req: &Request) -> bool {
    req.method() == Method::POST
        && req.headers().contains_key(HEADER)
        && !EXCLUDED.iter().any(|p| req.uri().path().starts_with(p))
}

/// Who is calling: `org:<org>/token:<hash>` for an operator (the session or
/// API token), `org:<org>/device:<pk>` for a device. The authenticated
/// caller goes into the request's extensions, so the handler's extractor
/// takes it from there (no second lookup, no second rate-limit charge).
/// `Ok(None)`: anonymous, or the credential did not authenticate.
async fn principal(parts: &mut Parts, state: &AppState) -> Result<Option<String>, Error> {
    let device = crate::http::extract::bearer(parts)
        .is_some_and(|t| crate::service::devices::credential::Kind::of(t).is_some());
    let outcome = if device {
        Device::from_request_parts(parts, state).await.map(|d| {
            let scope = format!("org:{}/device:{}", d.org_id, d.pk);
            parts.extensions.insert(d);
            scope
        })
    } else {
        Operator::from_request_parts(parts, state).await.map(|op| {
            let scope = format!("org:{}/token:{}", op.org_id, op.token_hash);
            parts.extensions.insert(op);
            scope
        })
    };
    match outcome {
        Ok(scope) => Ok(Some(scope)),
        // A rate-limited caller is answered now (and nothing is stored);
        // charging the limit again in the handler would be wrong.
        Err(e @ Error::TooManyRequests(_)) => Err(e),
        // Anonymous or a bad credential: the handler answers as it would.
        Err(_) => Ok(None),
    }
}

async fn handle(state: AppState, req: Request, next: Next) -> Result<Response, Error> {
    if !applies(&req) {
        return Ok(next.run(req).await);
    }
    let (mut parts, body) = req.into_parts();
    let key = parts
        .headers
        .get(HEADER)
        .and_then(|k| k.to_str().ok())
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| Error::BadRequest("Idempotency-Key: 1-255 visible ASCII characters".into()))?
        .to_string();
    let Some(scope) = principal(&mut parts, &state).await? else {
        return Ok(next.run(Request::from_parts(parts, body)).await);
    };
    // Authenticated: now the body may be read (bounded).
    let bytes = to_bytes(body, state.config.max_json_bytes)
        .await
        .map_err(|_| Error::TooLarge(0))?;
    let mut h = Sha256::new();
    h.update(parts.method.as_str().as_bytes());
    h.update(b" ");
    h.update(parts.uri.to_string().as_bytes());
    h.update(b"\n");
    h.update(&bytes);
    let fingerprint = hex::encode(h.finalize());

    let claim = match claim(&state, &scope, &key, &fingerprint).await? {
        Claimed::Ours(claim) => claim,
        Claimed::Replay(response) => return Ok(response),
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let (parts, body) = response.into_parts();
    let bytes = match to_bytes(body, MAX_STORED_RESPONSE).await {
        Ok(b) => b,
        Err(e) => {
            claim.release().await;
            return Err(Error::Internal(anyhow::anyhow!("response body: {e}")));
        }
    };
    let text = std::str::from_utf8(&bytes).ok();
    match text.filter(|t| storable(&parts, t)) {
        Some(text) => claim.complete(parts.status, text).await?,
        None => claim.release().await,
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// Whether an answer may be stored and replayed.
fn storable(parts: &axum::http::response::Parts, body: &str) -> bool {
    let status = parts.status;
    let status_ok = status.is_success()
        || (status.is_client_error()
            && !matches!(
                status,
                StatusCode::UNAUTHORIZED
                    | StatusCode::FORBIDDEN
                    | StatusCode::REQUEST_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
            ));
    let no_store = parts
        .headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("no-store"));
    status_ok && !no_store && !carries_secret(body)
}

/// A Kernex secret (a prefix then 64 hex digits) anywhere in `body`.
fn carries_secret(body: &str) -> bool {
    SECRET_PREFIXES.iter().any(|prefix| {
        body.match_indices(prefix).any(|(at, _)| {
            let rest = &body.as_bytes()[at + prefix.len()..];
            rest.len() >= 64 && rest[..64].iter().all(u8::is_ascii_hexdigit)
        })
    })
}

enum Claimed {
    Ours(Claim),
    Replay(Response),
}

/// Claims `key` for `scope`: a new row in progress, or a stale one taken
/// over. Otherwise the stored answer, 409 (in progress) or 422 (another
/// request).
async fn claim(
    state: &AppState,
    scope: &str,
    key: &str,
    fingerprint: &str,
) -> Result<Claimed, Error> {
    let store = &state.store;
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (scope, idem_key, fingerprint, status, body, created_at) VALUES ($1, $2, $3, 0, '', $4)",
    )
    .bind(scope)
    .bind(key)
    .bind(fingerprint)
    .bind(now)
    .execute(store.pool())
    .await;
    match inserted {
        Ok(_) => return Ok(Claimed::Ours(Claim::new(state, scope, key, now))),
        Err(e) if is_unique_violation(&e) => {}
        Err(e) => return Err(e.into()),
    }
    // Taken over when abandoned in progress, or expired.
    let stale = now
        - i64::try_from(state.config.idempotency_in_progress_secs)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000);
    let taken = sqlx::query(
        "UPDATE idempotency_keys SET fingerprint = $1, status = 0, body = '', created_at = $2 \
         WHERE scope = $3 AND idem_key = $4 AND ((status = 0 AND created_at < $5) OR created_at < $6)",
    )
    .bind(fingerprint)
    .bind(now)
    .bind(scope)
    .bind(key)
    .bind(stale)
    .bind(now - TTL_MS)
    .execute(store.pool())
    .await?;
    if taken.rows_affected() == 1 {
        tracing::info!(%key, "took over an abandoned or expired idempotency key");
        return Ok(Claimed::Ours(Claim::new(state, scope, key, now)));
    }
    let row = sqlx::query(
        "SELECT fingerprint, status, body FROM idempotency_keys WHERE scope = $1 AND idem_key = $2",
    )
    .bind(scope)
    .bind(key)
    .fetch_optional(store.pool())
    .await?;
    let Some(row) = row else {
        state.metrics.refusals.idempotency(Conflict::InProgress);
        return Err(Error::Conflict(
            "this Idempotency-Key was just released; retry".into(),
        ));
    };
    let stored: String = row.try_get("fingerprint")?;
    if stored != fingerprint {
        state.metrics.refusals.idempotency(Conflict::Mismatch);
        return Err(Error::Unprocessable(
            "this Idempotency-Key was used for a different request".into(),
        ));
    }
    let status: i64 = row.try_get("status")?;
    if status == 0 {
        state.metrics.refusals.idempotency(Conflict::InProgress);
        let mut response = Error::Conflict(
            "a request with this Idempotency-Key is still in progress; retry later".into(),
        )
        .into_response();
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(Claimed::Replay(response));
    }
    let body: String = row.try_get("body")?;
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("stored status {status}")))?;
    let empty = body.is_empty();
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    if !empty {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    Ok(Claimed::Replay(response))
}

/// A key this request holds in progress. Dropped without `complete` or
/// `release` (the client went away and the handler's future was dropped),
/// it releases the key in the background.
struct Claim {
    state: AppState,
    scope: String,
    key: String,
    /// When it was claimed: a request that outlived its claim (taken over
    /// as stale) cannot complete or release the new holder's.
    claimed_at: i64,
    armed: bool,
}

impl Claim {
    fn new(state: &AppState, scope: &str, key: &str, claimed_at: i64) -> Self {
        Claim {
            state: state.clone(),
            scope: scope.to_string(),
            key: key.to_string(),
            claimed_at,
            armed: true,
        }
    }

    /// Stores the answer. The guard stays armed until the write is done:
    /// a request dropped during it still releases its key.
    async fn complete(mut self, status: StatusCode, body: &str) -> Result<(), Error> {
        sqlx::query(
            "UPDATE idempotency_keys SET status = $1, body = $2 WHERE scope = $3 AND idem_key = $4 AND status = 0 AND created_at = $5",
        )
        .bind(i64::from(status.as_u16()))
        .bind(body)
        .bind(&self.scope)
        .bind(&self.key)
        .bind(self.claimed_at)
        .execute(self.state.store.pool())
        .await?;
        self.armed = false;
        Ok(())
    }

    /// Releases the key; dropped during it, the guard releases it again.
    async fn release(mut self) {
        forget(&self.state, &self.scope, &self.key, self.claimed_at).await;
        self.armed = false;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = %self.key, "request dropped outside a runtime: its idempotency key stays until it goes stale");
            return;
        };
        tracing::info!(key = %self.key, "request dropped mid-handler: releasing its idempotency key");
        let (state, scope, key, at) = (
            self.state.clone(),
            std::mem::take(&mut self.scope),
            std::mem::take(&mut self.key),
            self.claimed_at,
        );
        runtime.spawn(async move { forget(&state, &scope, &key, at).await });
    }
}

/// Releases a key still in progress under the claim made at `claimed_at`.
async fn forget(state: &AppState, scope: &str, key: &str, claimed_at: i64) {
    let deleted = sqlx::query(
        "DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2 AND status = 0 AND created_at = $3",
    )
    .bind(scope)
    .bind(key)
    .bind(claimed_at)
    .execute(state.store.pool())
    .await;
    if let Err(e) = deleted {
        tracing::warn!(error = %e, "unable to release an idempotency key");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_secrets_in_answers() {
        let secret = format!("kxe_{}", "ab".repeat(32));
        assert!(carries_secret(&format!("{{\"token\":\"{secret}\"}}")));
        assert!(!carries_secret("{\"token\":\"kxe_short\"}"));
        assert!(!carries_secret("{\"id\":\"1234\"}"));
    }
}
