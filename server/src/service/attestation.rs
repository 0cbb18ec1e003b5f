//! Device attestation: whether a device has proven its TPM.

use sqlx::Row;

use super::{Error, Result};

/// Enrolled under a TPM policy, credential activation not done (a row
/// with `tpm_required` and `ek_fingerprint`).
pub fn is_unproven(row: &sqlx::any::AnyRow) -> Result<bool> {
    Ok(row.try_get::<i64, _>("tpm_required")? != 0
        && row
            .try_get::<Option<String>, _>("ek_fingerprint")?
            .is_none())
}

/// The refusal for a device that must prove its TPM first.
pub fn unproven() -> Error {
    Error::Refused(
        "this device must prove its TPM (credential activation) before it is served releases: enroll again with its TPM identity".into(),
    )
}
