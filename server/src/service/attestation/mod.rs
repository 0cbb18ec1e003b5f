//! TPM-rooted identity and attestation, the server's half (the protocol is
//! attest/README.md's; the verifier is `kernex-attest`, pure Rust + openssl).
//!
//! - **Pre-authorisation** ([`preauth`], operators and the factory line):
//!   records a device id, optionally with the EK of its TPM. An enrollment
//!   token can require it; a recorded EK binds the device id to that TPM.
//! - **Policy** ([`policy`]): what an enrollment token demands, the checks
//!   of a TPM identity at enrollment or binding (the EK against the
//!   pre-authorisation and its certificate, the AK, the trusted vendor CAs
//!   of `tpm-cert-store`), the credential-activation challenge it gets, and
//!   the verdict operators see ([`AttestationView`]).
//! - **The device's TPM** ([`tpm`]): binding a TPM to a device enrolled
//!   without one, and activation (the credential the TPM released; only
//!   then is the AK recorded as the device's).
//! - **Quotes** ([`quote`]): a poll gets a fresh nonce when the device's
//!   attestation is missing, old or for another version; the quote that
//!   answers it is verified with the enrolled AK and compared with the slot
//!   PCR the release's manifest gives. Verified results are stored
//!   (attested, mismatch naming the PCR); a rejected quote (bad signature,
//!   replayed nonce, malformed) changes nothing.

pub mod policy;
pub mod preauth;
pub mod quote;
pub mod tpm;

pub use policy::{AttestationView, ViewRow, view};

use super::Error;

/// A quote nonce is answerable this long after it was issued.
pub const NONCE_TTL_MS: i64 = 5 * 60 * 1000;
/// A credential-activation challenge is answerable this long.
pub const ACTIVATION_TTL_MS: i64 = 10 * 60 * 1000;
/// The slot PCR when the device names none (attest/README.md's PCR map).
pub const DEFAULT_SLOT_PCR: u8 = kernex_attest::DEFAULT_SLOT_PCR;

/// Enrolled under a TPM policy, credential activation not done: the
/// device's `tpm_required` flag is set and it has no `ek_fingerprint`.
pub fn is_unproven(tpm_required: i64, ek_fingerprint: Option<&str>) -> bool {
    tpm_required != 0 && ek_fingerprint.is_none()
}

/// The refusal for a device that must prove its TPM first.
pub fn unproven() -> Error {
    Error::Refused(
        "this device must prove its TPM (credential activation) before it is served releases: enroll again with its TPM identity".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_tpm_policy_without_a_bound_tpm_is_unproven() {
        assert!(is_unproven(1, None));
        assert!(!is_unproven(1, Some("ek")));
        assert!(!is_unproven(0, None));
        assert!(!is_unproven(0, Some("ek")));
    }
}
