//! Request guards that run before anything reads a body: the body size
//! from `Content-Length`, the per-address limit of the unauthenticated
//! routes, and the request timeout (`[limits]`, `max-*-bytes`).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::http::Error;
use crate::serve::ClientAddr;

/// The routes that take a bundle (and the bundle size limit).
fn is_upload(method: &Method, path: &str) -> bool {
    method == Method::POST && matches!(path, "/api/v1/releases" | "/ui/releases/upload")
}

/// The routes anyone may call without a credential, limited per address.
fn is_unauthenticated(method: &Method, path: &str) -> bool {
    method == Method::POST
        && matches!(
            path,
            "/api/v1/login"
                | "/ui/login"
                | "/api/v1/device/enroll"
                | "/api/v1/device/activate"
                | "/api/v1/device/challenge"
                | "/api/v1/device/auth"
        )
}

/// Middleware: 413 at once for a `Content-Length` over the route's limit
/// (the bundle limit for uploads, the JSON limit elsewhere), before a byte
/// of the body is read; 429 for an address over its unauthenticated-route
/// budget; 503 for a handler slower than `request-timeout-secs` (uploads
/// exempt).
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let upload = is_upload(req.method(), req.uri().path());
    let limit = if upload {
        state.config.max_bundle_bytes
    } else {
        state.config.max_json_bytes as u64
    };
    let claimed = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = claimed
        && n > limit
    {
        tracing::info!(
            path = req.uri().path(),
            content_length = n,
            limit,
            "request body over the limit: refused before reading it"
        );
        let mut r = Error::TooLarge(limit).into_response();
        // The body is not read: the connection cannot be reused.
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return r;
    }
    let per_minute = state.config.limits.unauthenticated_per_address_per_minute;
    if is_unauthenticated(req.method(), req.uri().path())
        && let ClientAddr(Some(ip)) = ClientAddr::of(
            req.extensions(),
            req.headers(),
            &state.config.limits.trusted_proxies,
        )
        && let Err(e) = state.limits.check(&format!("addr:{ip}"), per_minute)
    {
        tracing::info!(%ip, path = req.uri().path(), "unauthenticated route: address over its limit");
        state.metrics.refusals.unauthenticated.inc();
        return Error::from(e).into_response();
    }
    let secs = state.config.limits.request_timeout_secs;
    if upload || secs == 0 {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    match tokio::time::timeout(Duration::from_secs(secs), next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(path, secs, "request timed out");
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({
                    "error": "service unavailable",
                    "detail": format!("the request took longer than {secs} s"),
                })),
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(1u64));
            r
        }
    }
}
