//! Which device a device credential authenticates (`kxd_...`, stored as
//! its SHA-256). The extractors (`crate::auth::Device`, the poll's
//! `PollAuth`) read the bearer header, cache and rate-limit; the lookups
//! are here.

use crate::AppState;
use crate::auth::Device;
use crate::service::attestation::is_unproven;
use crate::service::{Error, Result};

/// The columns of a device that make a [`Device`].
#[derive(Debug, sqlx::FromRow)]
pub struct DeviceRow {
    /// Primary key.
    pub id: String,
    /// Organisation.
    pub org_id: String,
    /// The device's own id.
    pub device_id: String,
    /// Enrolled under a TPM policy (0 or 1).
    pub tpm_required: i64,
    /// The bound TPM, once activation succeeded.
    pub ek_fingerprint: Option<String>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        Device {
            unproven: is_unproven(r.tpm_required, r.ek_fingerprint.as_deref()),
            pk: r.id,
            org_id: r.org_id,
            device_id: r.device_id,
        }
    }
}

/// The non-revoked device whose credential hashes to `hash`;
/// [`Error::Unauthorized`] when there is none.
pub async fn authenticate(state: &AppState, hash: &str) -> Result<Device> {
    let row = sqlx::query_as::<_, DeviceRow>(
        "SELECT id, org_id, device_id, tpm_required, ek_fingerprint FROM devices WHERE credential_hash = $1 AND revoked = 0 AND org_id NOT IN (SELECT id FROM organizations WHERE disabled = 1)",
    )
    .bind(hash)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    Ok(row.into())
}

/// The device answering a credential-activation challenge: by its
/// credential, or by the new credential of a re-enrollment that waits for
/// this answer (`tpm_activations.pending_credential_hash`).
pub async fn authenticate_activating(state: &AppState, hash: &str) -> Result<Device> {
    let row = sqlx::query_as::<_, DeviceRow>(
        "SELECT d.id, d.org_id, d.device_id, d.tpm_required, d.ek_fingerprint FROM devices d WHERE d.revoked = 0 AND d.org_id NOT IN (SELECT id FROM organizations WHERE disabled = 1) AND (d.credential_hash = $1 OR d.id = (SELECT a.device_pk FROM tpm_activations a WHERE a.pending_credential_hash = $1))",
    )
    .bind(hash)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    Ok(row.into())
}
