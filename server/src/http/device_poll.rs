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
use crate::http::device_api::DesiredState;
use crate::http::{Error, Result};
use crate::store::secret_hash;

/// The release assigned to a device outside rollouts.
#[derive(Debug, Clone)]
pub struct Assigned {
    /// Release id.
    pub id: String,
    /// Its version.
    pub version: String,
    /// Bundle size.
    pub size: i64,
    /// SHA-256 of the bundle.
    pub sha256: String,
}

/// An authenticated device and what its poll needs to know.
#[derive(Debug, Clone)]
pub struct Polled {
    /// The device.
    pub device: Device,
    /// The version it runs.
    pub current_version: Option<String>,
    /// The release assigned to it (deployments), if any.
    pub assigned: Option<Assigned>,
    /// A scheduled, running, paused or rolled-back rollout holds it.
    pub in_rollout: bool,
    /// Enrolled under a TPM policy, or bound to a TPM: the attestation
    /// side of the poll has work to do (most devices skip it).
    pub tpm: bool,
}

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
        .bind(crate::rollouts::device::watch_since(state))
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::Unauthorized)?;
        let device = Device {
            pk: row.try_get("id")?,
            org_id: row.try_get("org_id")?,
            device_id: row.try_get("device_id")?,
            unproven: crate::http::attestation::is_unproven(&row)?,
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

/// The poll's answer: `desired` is 200 with what to run, `None` is 204;
/// `poll_after_secs` is the hint sent as `Kernex-Poll-After`.
#[derive(Debug, Default)]
pub struct Answer {
    /// What to run.
    pub desired: Option<DesiredState>,
    /// Poll again after this many seconds (a rollout acts on the device).
    pub poll_after_secs: Option<u64>,
    /// A live (or rolled-back) rollout decides for the device, even "do
    /// nothing"; false for a completed rollout whose rollback watch only
    /// adds the hint: deployments still apply.
    pub governs: bool,
}

/// A rollout that governs the device decides; otherwise the assigned
/// release, unless the device already runs its version.
pub async fn answer(state: &AppState, polled: &Polled) -> Result<Answer> {
    let mut hint = None;
    if polled.in_rollout
        && let Some(answer) = crate::rollouts::device::poll(state, &polled.device).await?
    {
        if answer.governs || answer.desired.is_some() {
            return Ok(answer);
        }
        hint = answer.poll_after_secs;
    }
    let nothing = Answer {
        desired: None,
        poll_after_secs: hint,
        governs: false,
    };
    let Some(r) = &polled.assigned else {
        return Ok(nothing);
    };
    if polled.current_version.as_deref() == Some(r.version.as_str()) {
        return Ok(nothing);
    }
    let desired = Some(DesiredState {
        url: format!("/api/v1/device/releases/{}/bundle", r.id),
        release_id: r.id.clone(),
        version: r.version.clone(),
        size: r.size,
        sha256: r.sha256.clone(),
        action: None,
        rollout_id: None,
        download_window: None,
        poll_after_secs: None,
    });
    Ok(Answer {
        desired,
        poll_after_secs: hint,
        governs: false,
    })
}
