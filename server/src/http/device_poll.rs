//! What `GET /api/v1/device/poll` reads, in one query: the device the
//! credential authenticates (not revoked), its current version, the
//! release assigned to it, and whether a live rollout governs it. A fleet
//! polls all the time and mostly has nothing to do, so the common answers
//! (204, or the assigned release) cost one indexed read, and none while
//! the poll cache (`crate::poll_cache`) holds the device; only a device in
//! a rollout goes on to `rollouts::device::poll`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use std::sync::Arc;

use sqlx::Row;

use crate::AppState;
use crate::auth::Device;
use crate::http::{Error, Result};
use crate::service::devices::poll::{Assigned, Polled};
use crate::store::secret_hash;

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
        let token = crate::auth::bearer(parts).ok_or(Error::Unauthorized)?;
        if !token.starts_with("kxd_") {
            return Err(Error::Unauthorized);
        }
        let hash = secret_hash(token);
        if let Some(polled) = state.poll_cache.get(&hash) {
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
        let row = sqlx::query(
            "SELECT d.id, d.org_id, d.device_id, d.current_version, d.tpm_required, d.ek_fingerprint, r.id AS release_id, r.version, r.size, r.sha256, \
             CAST(CASE WHEN EXISTS (SELECT 1 FROM rollout_devices rd JOIN rollouts ro ON ro.id = rd.rollout_id \
                  WHERE rd.device_pk = d.id AND (ro.status IN ('scheduled', 'running', 'paused', 'rolled_back') \
                  OR (ro.status = 'completed' AND (ro.completed_at >= $2 OR rd.state IN ('pending', 'scheduled', 'downloading', 'installed', 'rebooting'))))) \
             THEN 1 ELSE 0 END AS BIGINT) AS in_rollout \
             FROM devices d LEFT JOIN releases r ON r.id = d.desired_release_id \
             WHERE d.credential_hash = $1 AND d.revoked = 0",
        )
        .bind(&hash)
        .bind(crate::service::rollouts::device::watch_since(state))
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::Unauthorized)?;
        let device = Device {
            pk: row.try_get("id")?,
            org_id: row.try_get("org_id")?,
            device_id: row.try_get("device_id")?,
            unproven: crate::service::attestation::is_unproven(&row)?,
        };
        // The device's next requests (heartbeat, download) skip the lookup.
        state
            .credentials
            .insert(hash.clone(), device.clone(), generation);
        state.limits.check(
            &format!("device:{}", device.pk),
            state.config.device_requests_per_minute,
        )?;
        let assigned = match row.try_get::<Option<String>, _>("release_id")? {
            Some(id) => Some(Assigned {
                id,
                version: row.try_get("version")?,
                size: row.try_get("size")?,
                sha256: row.try_get("sha256")?,
            }),
            None => None,
        };
        let polled = Arc::new(Polled {
            device,
            current_version: row.try_get("current_version")?,
            assigned,
            in_rollout: row.try_get::<i64, _>("in_rollout")? != 0,
            tpm: row.try_get::<i64, _>("tpm_required")? != 0
                || row
                    .try_get::<Option<String>, _>("ek_fingerprint")?
                    .is_some(),
        });
        state.poll_cache.insert(&hash, &polled, ticket);
        Ok(PollAuth(polled))
    }
}
