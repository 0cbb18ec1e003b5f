//! Which release bundles a device may download: only what it is assigned.
//! That is the release of its current deployment (`desired_release_id`),
//! or the release of a rollout that selected it (a `rollout_devices` row)
//! while that rollout is scheduled, running, paused or completed. Any
//! other release, of its organisation or not, is [`Error::NotFound`], the
//! same answer as a release that does not exist, so a device learns
//! nothing about releases it was not given.

use crate::AppState;
use crate::auth::Device;
use crate::service::{Error, Result};

/// Ok when `device` may download release `release_id` (see the module).
pub async fn check(state: &AppState, device: &Device, release_id: &str) -> Result<()> {
    device.require_proven()?;
    let assigned = sqlx::query(
        "SELECT 1 AS one FROM devices d WHERE d.id = $1 AND d.org_id = $2 AND (d.desired_release_id = $3 \
         OR EXISTS (SELECT 1 FROM rollout_devices rd JOIN rollouts ro ON ro.id = rd.rollout_id \
              WHERE rd.device_pk = d.id AND ro.release_id = $3 AND ro.org_id = d.org_id \
              AND ro.status IN ('scheduled', 'running', 'paused', 'completed')))",
    )
    .bind(&device.pk)
    .bind(&device.org_id)
    .bind(release_id)
    .fetch_optional(state.store.pool())
    .await?;
    if assigned.is_none() {
        tracing::warn!(device = %device.device_id, release = %release_id, "download of a release not assigned to the device refused");
        return Err(Error::NotFound("no such release"));
    }
    Ok(())
}
