//! The extractors that authenticate a request: an operator (bearer token
//! or, for the web UI, the session cookie) and a device (its credential).
//! The accounts, roles and credentials themselves are `crate::auth`'s.

use anyhow::anyhow;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sqlx::Row;

use crate::AppState;
use crate::auth::{Device, Operator, Role, SESSION_COOKIE};
use crate::http::error::Error;
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
        if !token.starts_with("kxo_") {
            return Err(Error::Unauthorized);
        }
        let row = sqlx::query(
            "SELECT u.id, u.org_id, u.email, u.role FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1 AND t.revoked = 0 AND t.expires_at > $2",
        )
        .bind(secret_hash(token))
        .bind(now_ms())
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::Unauthorized)?;
        let role: String = row.try_get("role")?;
        let user_id: String = row.try_get("id")?;
        state.limits.check(
            &format!("user:{user_id}"),
            state.config.user_requests_per_minute,
        )?;
        Ok(Operator {
            token_hash: secret_hash(token),
            user_id,
            org_id: row.try_get("org_id")?,
            email: row.try_get("email")?,
            role: Role::parse(&role)
                .ok_or_else(|| Error::Internal(anyhow!("unknown role {role:?} in the database")))?,
        })
    }
}

impl FromRequestParts<AppState> for Device {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        // Already authenticated by the idempotency layer.
        if let Some(device) = parts.extensions.get::<Device>() {
            return Ok(device.clone());
        }
        let token = bearer(parts).ok_or(Error::Unauthorized)?;
        if !token.starts_with("kxd_") {
            return Err(Error::Unauthorized);
        }
        let hash = secret_hash(token);
        let device = match state.credentials.get(&hash) {
            Some(device) => device,
            None => {
                let generation = state.credentials.generation();
                let device =
                    crate::service::devices::credential::authenticate(state, &hash).await?;
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
