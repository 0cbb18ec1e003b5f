//! The extractor of `GET /api/v1/device/poll`: the bearer credential, the
//! poll cache (`crate::poll_cache`) and its metrics, the per-device rate
//! limit. What a poll reads is `crate::service::devices::poll::authenticate`,
//! one query, and none while the poll cache holds the device.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use std::sync::Arc;

use crate::AppState;
use crate::http::{Error, Result};
use crate::service::devices::credential::Kind;
use crate::service::devices::poll::{self, Polled};
use crate::store::{now_ms, secret_hash};

/// The `GET /poll` extractor: the authenticated device's [`Polled`], shared
/// with the poll cache.
#[derive(Debug, Clone)]
pub struct PollAuth(pub Arc<Polled>);

impl std::ops::Deref for PollAuth {
    type Target = Polled;

    fn deref(&self) -> &Polled {
        &self.0
    }
}

impl FromRequestParts<AppState> for PollAuth {
    type Rejection = Error;

    /// Same answers as the `Device` extractor (401 for a missing, unknown
    /// or revoked credential; the per-device rate limit). What it read is
    /// kept in the poll cache (`crate::poll_cache`) until a write drops it.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let token = crate::http::extract::bearer(parts).ok_or(Error::Unauthorized)?;
        let kind = Kind::of(token).ok_or(Error::Unauthorized)?;
        let hash = secret_hash(token);
        if let Some(polled) = state.poll_cache.get(&hash) {
            // A cached access token is good only until it expires.
            if polled.device.expired(now_ms()) {
                return Err(Error::Unauthorized);
            }
            state.metrics.poll_cache_hits.inc();
            state.limits.check(
                &format!("device:{}", polled.device.pk),
                state.config.device_requests_per_minute,
            )?;
            return Ok(PollAuth(polled));
        }
        state.metrics.poll_cache_misses.inc();
        let ticket = state.poll_cache.ticket();
        let generation = state.credentials.generation();
        let polled = Arc::new(poll::authenticate(state, kind, &hash).await?);
        // The device's next requests (heartbeat, download) skip the lookup.
        state
            .credentials
            .insert(hash.clone(), polled.device.clone(), generation);
        state.limits.check(
            &format!("device:{}", polled.device.pk),
            state.config.device_requests_per_minute,
        )?;
        state.poll_cache.insert(&hash, &polled, ticket);
        Ok(PollAuth(polled))
    }
}
