//! `Idempotency-Key` on POST: the first response to a (caller, key) pair is
//! stored; a retry of the same request gets it again (with
//! `Idempotent-Replayed: true`) instead of running twice, so a device that
//! lost the answer to a report can send it again safely. The same key with a
//! different request is 422; while the first is still running, 409.
//!
//! Not applied where a response carries a secret (login, enrollment,
//! enrollment-token creation: those secrets are never stored) nor to bundle
//! uploads (streamed, not buffered). Keys expire after 24 hours.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::AppState;
use crate::http::Error;
use crate::http::error::is_unique_violation;
use crate::store::now_ms;

/// The request header.
pub const HEADER: &str = kernex_protocol::api::IDEMPOTENCY_KEY_HEADER;

/// How long a key is remembered, ms.
pub const TTL_MS: i64 = crate::retention::IDEMPOTENCY_TTL_MS;

const EXCLUDED: &[&str] = &[
    "/api/v1/login",
    "/api/v1/device/enroll",
    "/api/v1/enrollment-tokens",
    "/api/v1/releases",
];

/// Largest response stored for replay.
const MAX_STORED_RESPONSE: usize = 1 << 20;

/// The middleware.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match handle(state, req, next).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(state: AppState, req: Request, next: Next) -> Result<Response, Error> {
    let Some(key) = req.headers().get(HEADER) else {
        return Ok(next.run(req).await);
    };
    if req.method() != Method::POST || EXCLUDED.contains(&req.uri().path()) {
        return Ok(next.run(req).await);
    }
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| Error::BadRequest("Idempotency-Key: 1-255 visible ASCII characters".into()))?
        .to_string();
    let scope = match req.headers().get(AUTHORIZATION) {
        Some(v) => hex::encode(Sha256::digest(v.as_bytes())),
        None => "anonymous".to_string(),
    };
    let (parts, body) = req.into_parts();
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

    let store = &state.store;
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (scope, idem_key, fingerprint, status, body, created_at) VALUES ($1, $2, $3, 0, '', $4)",
    )
    .bind(&scope)
    .bind(&key)
    .bind(&fingerprint)
    .bind(now_ms())
    .execute(store.pool())
    .await;
    match claimed {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => {
            let row = sqlx::query(
                "SELECT fingerprint, status, body FROM idempotency_keys WHERE scope = $1 AND idem_key = $2",
            )
            .bind(&scope)
            .bind(&key)
            .fetch_one(store.pool())
            .await?;
            let stored: String = row.try_get("fingerprint")?;
            if stored != fingerprint {
                return Err(Error::Unprocessable(
                    "this Idempotency-Key was used for a different request".into(),
                ));
            }
            let status: i64 = row.try_get("status")?;
            if status == 0 {
                return Err(Error::Conflict(
                    "a request with this Idempotency-Key is still in progress".into(),
                ));
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
            return Ok(response);
        }
        Err(e) => return Err(e.into()),
    }

    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let (parts, body) = response.into_parts();
    let bytes = match to_bytes(body, MAX_STORED_RESPONSE).await {
        Ok(b) => b,
        Err(e) => {
            forget(&state, &scope, &key).await;
            return Err(Error::Internal(anyhow::anyhow!("response body: {e}")));
        }
    };
    let text = String::from_utf8(bytes.to_vec()).ok();
    match (&text, parts.status.is_server_error()) {
        (Some(text), false) => {
            sqlx::query(
                "UPDATE idempotency_keys SET status = $1, body = $2 WHERE scope = $3 AND idem_key = $4",
            )
            .bind(i64::from(parts.status.as_u16()))
            .bind(text)
            .bind(&scope)
            .bind(&key)
            .execute(store.pool())
            .await?;
        }
        // A fault is not an answer: let the retry run again.
        _ => forget(&state, &scope, &key).await,
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

async fn forget(state: &AppState, scope: &str, key: &str) {
    let deleted = sqlx::query("DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2")
        .bind(scope)
        .bind(key)
        .execute(state.store.pool())
        .await;
    if let Err(e) = deleted {
        tracing::warn!(error = %e, "unable to release an idempotency key");
    }
}
