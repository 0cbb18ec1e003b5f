//! The extractors that authenticate a request: an operator (bearer token
//! or, for the web UI, the session cookie) and a device (its credential).
//! The accounts, roles and credentials themselves are `crate::auth`'s.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::AppState;
use crate::auth::{Device, Operator, SESSION_COOKIE};
use crate::http::error::Error;
use crate::service::devices::credential::Kind;
use crate::store::{now_ms, secret_hash};

/// The operator token from the session cookie. Only honoured for safe
/// methods or JSON requests: a cross-site form cannot send
/// `application/json` without a CORS preflight, which is never granted, and
/// the cookie is `SameSite=Strict` besides.
fn session_cookie(parts: &Parts) -> Option<&str> {
    let safe = matches!(parts.method.as_str(), "GET" | "HEAD");
    let json = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !safe && !json {
        return None;
    }
    parts
        .headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
}

/// The `Authorization: Bearer` token.
pub(crate) fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        // Already authenticated by the idempotency layer.
        if let Some(op) = parts.extensions.get::<Operator>() {
            return Ok(op.clone());
        }
        let token = bearer(parts)
            .or_else(|| session_cookie(parts))
            .ok_or(Error::Unauthorized)?;
        let op = operator(state, token).await?;
        if op.must_change_password {
            // Inside `/api/v1` the path arrives without the prefix.
            let path = parts.uri.path();
            let path = path.strip_prefix("/api/v1").unwrap_or(path);
            if !PASSWORD_GATE_OPEN.contains(&path) {
                return Err(crate::auth::must_change_password().into());
            }
        }
        Ok(op)
    }
}

/// The operator a token authenticates (read from the store on every
/// request), rate-limited per user; the password gate is the caller's.
pub async fn operator(state: &AppState, token: &str) -> Result<Operator, Error> {
    let op = crate::auth::authenticate(&state.store, token).await?;
    state.limits.check(
        &format!("user:{}", op.user_id),
        state.config.user_requests_per_minute,
    )?;
    Ok(op)
}

/// What an operator who must change the password may still call.
/// (under `/api/v1`).
pub const PASSWORD_GATE_OPEN: &[&str] = &["/account/password", "/logout"];

impl FromRequestParts<AppState> for Device {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        // Already authenticated by the idempotency layer.
        if let Some(device) = parts.extensions.get::<Device>() {
            return Ok(device.clone());
        }
        let token = bearer(parts).ok_or(Error::Unauthorized)?;
        let kind = Kind::of(token).ok_or(Error::Unauthorized)?;
        let hash = secret_hash(token);
        let device = match state.credentials.get(&hash) {
            // A cached access token is good only until it expires.
            Some(device) if device.expired(now_ms()) => return Err(Error::Unauthorized),
            Some(device) => device,
            None => {
                let generation = state.credentials.generation();
                let device =
                    crate::service::devices::credential::authenticate(state, kind, &hash).await?;
                state.credentials.insert(hash, device.clone(), generation);
                device
            }
        };
        state.limits.check(
            &format!("device:{}", device.pk),
            state.config.device_requests_per_minute,
        )?;
        Ok(device)
    }
}
