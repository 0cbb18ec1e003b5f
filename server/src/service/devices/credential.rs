//! Which device a device secret authenticates. Two kinds, by prefix:
//! an access token (`kxa_...`, minutes, from a signed nonce: the
//! device key scheme of `super::identity`) and a long-lived bearer
//! credential (`kxd_...`, devices enrolled before device keys, until
//! they register one). Both are stored as their SHA-256. The extractors
//! (`crate::auth::Device`, the poll's `PollAuth`) read the bearer header,
//! cache and rate-limit; the lookups are here.

use crate::AppState;
use crate::auth::Device;
use crate::service::attestation::is_unproven;
use crate::service::{Error, Result};
use crate::store::now_ms;

/// The kind of a device secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An access token (`kxa_`), valid until its expiry.
    Access,
    /// A long-lived bearer credential (`kxd_`).
    Legacy,
}

/// Devices of a disabled organisation authenticate as no device.
const LIVE_ORG: &str = "AND d.org_id NOT IN (SELECT id FROM organizations WHERE disabled = 1)";

impl Kind {
    /// The kind of `token`, by its prefix; `None`: not a device secret.
    pub fn of(token: &str) -> Option<Kind> {
        if token.starts_with("kxa_") {
            Some(Kind::Access)
        } else if token.starts_with("kxd_") {
            Some(Kind::Legacy)
        } else {
            None
        }
    }

    /// The `FROM ... WHERE` of a device looked up by a secret of this
    /// kind: `$1` is the secret's hash, `now` the placeholder of the time
    /// (bound for [`Kind::Access`] only); `d` is the device, and the third
    /// part selects the token's expiry.
    pub fn from_where(self, now: &str) -> (String, String, &'static str) {
        match self {
            Kind::Access => (
                "device_access_tokens t JOIN devices d ON d.id = t.device_pk".into(),
                format!("t.token_hash = $1 AND t.expires_at > {now} AND d.revoked = 0 {LIVE_ORG}"),
                "t.expires_at",
            ),
            Kind::Legacy => (
                "devices d".into(),
                format!("d.credential_hash = $1 AND d.revoked = 0 {LIVE_ORG}"),
                "CAST(NULL AS BIGINT)",
            ),
        }
    }
}

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
    /// The access token's expiry (none: a bearer credential).
    pub expires_at: Option<i64>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        Device {
            unproven: is_unproven(r.tpm_required, r.ek_fingerprint.as_deref()),
            pk: r.id,
            org_id: r.org_id,
            device_id: r.device_id,
            expires_at: r.expires_at,
        }
    }
}

/// The non-revoked device whose secret of `kind` hashes to `hash` (an
/// access token only before it expires); [`Error::Unauthorized`] when
/// there is none.
pub async fn authenticate(state: &AppState, kind: Kind, hash: &str) -> Result<Device> {
    let (from, filter, expires) = kind.from_where("$2");
    let sql = format!(
        "SELECT d.id, d.org_id, d.device_id, d.tpm_required, d.ek_fingerprint, {expires} AS expires_at FROM {from} WHERE {filter}"
    );
    let row = sqlx::query_as::<_, DeviceRow>(&sql).bind(hash);
    // Only the access token's filter has the time in it.
    let row = if kind == Kind::Access {
        row.bind(now_ms())
    } else {
        row
    }
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    Ok(row.into())
}

/// The device answering a credential-activation challenge: by its
/// secret, or by the new secret of a re-enrollment that waits for this
/// answer (`tpm_activations.pending_credential_hash`).
pub async fn authenticate_activating(state: &AppState, kind: Kind, hash: &str) -> Result<Device> {
    if let Ok(device) = authenticate(state, kind, hash).await {
        return Ok(device);
    }
    let row = sqlx::query_as::<_, DeviceRow>(
        "SELECT d.id, d.org_id, d.device_id, d.tpm_required, d.ek_fingerprint, CAST(NULL AS BIGINT) AS expires_at FROM devices d WHERE d.revoked = 0 AND d.org_id NOT IN (SELECT id FROM organizations WHERE disabled = 1) AND d.id = (SELECT a.device_pk FROM tpm_activations a WHERE a.pending_credential_hash = $1)",
    )
    .bind(hash)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    Ok(row.into())
}
