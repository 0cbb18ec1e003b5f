//! Attestation policy: what an enrollment token demands, the checks a TPM
//! identity passes at enrollment or binding, the credential-activation
//! challenge that follows, and the verdict operators see.

use std::time::Duration;

use kernex_attest::{Activation, AkPublic, CredentialChallenge, EkPublic, TpmIdentity};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::DEFAULT_SLOT_PCR;
use crate::AppState;
use crate::service::{Error, Result};

/// Longest accepted hex of a `TPMT_PUBLIC` (an RSA-4096 key is ~1.1 KB).
pub const MAX_PUBLIC_HEX: usize = 4096;
/// Longest accepted hex of an EK certificate.
pub const MAX_CERTIFICATE_HEX: usize = 16384;

/// The hex SHA-256 of an EK's `TPMT_PUBLIC`: how the server names a TPM.
pub fn fingerprint(ek_public: &[u8]) -> String {
    hex::encode(Sha256::digest(ek_public))
}

/// Decodes the hex of field `what`, at most `max` characters.
pub fn decode_hex(what: &str, text: &str, max: usize) -> Result<Vec<u8>> {
    if text.len() > max {
        return Err(Error::Invalid(format!(
            "{what}: {} hex characters, more than the limit of {max}",
            text.len()
        )));
    }
    hex::decode(text).map_err(|e| Error::Invalid(format!("{what}: not hex: {e}")))
}

/// Parses an EK and checks its certificate (when given) certifies it.
pub fn check_ek(public: &[u8], certificate: Option<&[u8]>) -> Result<EkPublic> {
    let ek = parse_ek(public)?;
    check_certificate_key(&ek, certificate)?;
    Ok(ek)
}

fn parse_ek(public: &[u8]) -> Result<EkPublic> {
    EkPublic::parse(public).map_err(|e| Error::Unprocessable(format!("ek_public: {e}")))
}

/// The certificate (when given) certifies this EK.
fn check_certificate_key(ek: &EkPublic, certificate: Option<&[u8]>) -> Result<()> {
    if let Some(der) = certificate {
        let matches = ek
            .matches_certificate(der)
            .map_err(|e| Error::Unprocessable(format!("ek_certificate: {e}")))?;
        if !matches {
            return Err(Error::Unprocessable(
                "ek_certificate certifies another key than ek_public".into(),
            ));
        }
    }
    Ok(())
}

/// With `tpm-cert-store` set: the EK certificate (`None`: the TPM has
/// none) must chain to a trusted TPM vendor CA, be valid now (the server's
/// clock) and certify `ek`. Without it: nothing to check (any TPM,
/// swtpm included). The error is a refusal that says what failed.
pub fn check_vendor_ca(state: &AppState, ek: &EkPublic, certificate: Option<&[u8]>) -> Result<()> {
    let Some(cas) = &state.ek_cas else {
        return Ok(());
    };
    let now = Duration::from_millis(u64::try_from(state.clock.now_ms()).unwrap_or(0));
    cas.verify(certificate, ek, now)
        .map_err(|e| Error::Refused(e.to_string()))
}

/// What an enrollment token demands.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenPolicy {
    /// Only devices the factory line pre-authorised.
    pub require_preauthorization: bool,
    /// Only devices with a TPM identity.
    pub require_tpm: bool,
}

/// What enrollment checked about the TPM; stored once the device row is.
#[derive(Debug)]
pub struct TpmEnrollment {
    /// The EK's fingerprint.
    pub ek_fingerprint: String,
    /// Hex of the AK's `TPMT_PUBLIC`.
    ak_public: String,
    /// The slot PCR the device extends.
    slot_pcr: u8,
    /// The challenge.
    challenge: CredentialChallenge,
}

/// The outcome of [`check_enrollment`].
#[derive(Debug)]
pub struct EnrollmentCheck {
    /// A challenge to send, when the device sent a TPM identity.
    pub tpm: Option<TpmEnrollment>,
    /// The device must complete credential activation before it is served
    /// releases.
    pub tpm_required: bool,
}

/// One column of a device or a pre-authorisation.
#[derive(Debug, sqlx::FromRow)]
struct DeviceIdRow {
    device_id: String,
}

/// The EK a device id is pre-authorised with.
#[derive(Debug, sqlx::FromRow)]
struct PreauthEkRow {
    ek_fingerprint: Option<String>,
}

/// The TPM part of an enrollment: policy (token, pre-authorisation, an
/// existing binding) and the device's identity. `bound_ek` is the EK an
/// already enrolled device with this id is bound to.
pub async fn check_enrollment(
    state: &AppState,
    org_id: &str,
    device_id: &str,
    policy: TokenPolicy,
    identity: Option<&TpmIdentity>,
    slot_pcr: Option<u8>,
    bound_ek: Option<&str>,
) -> Result<EnrollmentCheck> {
    let preauth = sqlx::query_as::<_, PreauthEkRow>(
        "SELECT ek_fingerprint FROM tpm_preauthorizations WHERE org_id = $1 AND device_id = $2",
    )
    .bind(org_id)
    .bind(device_id)
    .fetch_optional(state.store.pool())
    .await?;
    if policy.require_preauthorization && preauth.is_none() {
        return Err(Error::Refused(format!(
            "device {device_id} is not pre-authorised, and this enrollment token accepts only pre-authorised devices"
        )));
    }
    let preauth_ek: Option<String> = preauth.and_then(|p| p.ek_fingerprint);
    let slot_pcr = slot_pcr.unwrap_or(DEFAULT_SLOT_PCR);
    if slot_pcr > kernex_attest::measure::MAX_SLOT_PCR {
        return Err(Error::Invalid(format!(
            "tpm_slot_pcr {slot_pcr}: the slot PCR must be 0-{}",
            kernex_attest::measure::MAX_SLOT_PCR
        )));
    }
    let Some(identity) = identity else {
        if let Some(fp) = preauth_ek.as_deref().or(bound_ek) {
            return Err(Error::Refused(format!(
                "device {device_id} is bound to the TPM whose EK fingerprint is {fp}; this enrollment carries no TPM identity"
            )));
        }
        if policy.require_tpm {
            return Err(Error::Refused(
                "this enrollment token accepts only devices with a TPM identity".into(),
            ));
        }
        return Ok(EnrollmentCheck {
            tpm: None,
            tpm_required: false,
        });
    };
    let ek = parse_ek(&identity.ek_public)?;
    let ak = AkPublic::parse(&identity.ak_public)
        .map_err(|e| Error::Unprocessable(format!("ak_public: {e}")))?;
    let fp = fingerprint(&identity.ek_public);
    for (why, required) in [
        ("was pre-authorised with", preauth_ek.as_deref()),
        ("is bound to", bound_ek),
    ] {
        if let Some(required) = required
            && required != fp
        {
            return Err(Error::Refused(format!(
                "EK not pre-authorised: device {device_id} {why} the TPM whose EK fingerprint is {required}, and this request carries EK {fp}"
            )));
        }
    }
    // An EK the factory line pre-authorised for this device is trusted on
    // its word (it read the EK from the board); any other needs a vendor's
    // certificate when the server has a tpm-cert-store.
    if preauth_ek.is_none() {
        check_vendor_ca(state, &ek, identity.ek_certificate.as_deref())?;
    }
    check_certificate_key(&ek, identity.ek_certificate.as_deref())?;
    let other = sqlx::query_as::<_, DeviceIdRow>(
        "SELECT device_id FROM devices WHERE org_id = $1 AND ek_fingerprint = $2 AND device_id <> $3",
    )
    .bind(org_id)
    .bind(&fp)
    .bind(device_id)
    .fetch_optional(state.store.pool())
    .await?;
    if let Some(other) = other {
        return Err(Error::Conflict(format!(
            "this TPM (EK {fp}) is already enrolled as device {}",
            other.device_id
        )));
    }
    // openssl refuses to encrypt to an EK it cannot use (e.g. a tiny
    // modulus): the device's input, not a server fault.
    let challenge = CredentialChallenge::new(&ek, &ak).map_err(|e| {
        Error::Unprocessable(format!("ek_public: unable to encrypt to this EK: {e}"))
    })?;
    Ok(EnrollmentCheck {
        tpm: Some(TpmEnrollment {
            ek_fingerprint: fp,
            ak_public: hex::encode(&identity.ak_public),
            slot_pcr,
            challenge,
        }),
        tpm_required: policy.require_tpm || preauth_ek.is_some() || bound_ek.is_some(),
    })
}

/// Records the outstanding challenge of a device (replacing any earlier
/// one) and whether it must complete it; returns what the device gets.
/// `pending_credential`: the SHA-256 of a new device credential that takes
/// effect only when the challenge is answered (a device bound to its TPM).
pub async fn store_activation(
    state: &AppState,
    device_pk: &str,
    check: &EnrollmentCheck,
    pending_credential: Option<&str>,
) -> Result<Option<Activation>> {
    let mut tx = state.store.begin_write().await?;
    if check.tpm_required {
        sqlx::query("UPDATE devices SET tpm_required = 1 WHERE id = $1")
            .bind(device_pk)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("DELETE FROM tpm_activations WHERE device_pk = $1")
        .bind(device_pk)
        .execute(&mut *tx)
        .await?;
    let Some(tpm) = &check.tpm else {
        tx.commit().await?;
        return Ok(None);
    };
    let inserted = sqlx::query(
        "INSERT INTO tpm_activations (device_pk, ek_fingerprint, ak_public, slot_pcr, credential_hash, pending_credential_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(device_pk)
    .bind(&tpm.ek_fingerprint)
    .bind(&tpm.ak_public)
    .bind(i64::from(tpm.slot_pcr))
    .bind(hex::encode(Sha256::digest(tpm.challenge.expected())))
    .bind(pending_credential)
    .bind(state.clock.now_ms())
    .execute(&mut *tx)
    .await;
    match inserted {
        Ok(_) => {}
        // Two enrollments of the same device at once: the other one's
        // challenge stands; this one retries.
        Err(e) if crate::store::is_unique_violation(&e) => {
            return Err(Error::Conflict(
                "another enrollment of this device is under way; retry".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    tx.commit().await?;
    Ok(Some(Activation::from(&tpm.challenge)))
}

// ---------------------------------------------------------------------------
// The verdict operators see

/// A device's attestation as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct AttestationView {
    /// `unattested` (no TPM), `pending` (TPM bound, no quote yet),
    /// `attested`, `mismatch`, or `stale` (the last quote is for another
    /// version than the device runs now, or too old).
    pub state: String,
    /// Why (mismatch: the PCR, found and expected; stale: what changed).
    pub reason: Option<String>,
    /// The version the last verified quote was checked against.
    pub version: Option<String>,
    /// When that quote was verified, unix ms.
    pub at: Option<i64>,
    /// Hex SHA-256 of the EK's `TPMT_PUBLIC`, when bound to a TPM.
    pub ek_fingerprint: Option<String>,
}

/// The device columns [`view`] reads: `attestation`, `attestation_reason`,
/// `attested_version`, `attested_at`, `ek_fingerprint`, `current_version`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ViewRow {
    /// The stored verdict.
    pub attestation: String,
    /// Its reason.
    pub attestation_reason: Option<String>,
    /// The version the last verified quote was checked against.
    pub attested_version: Option<String>,
    /// When that quote was verified, unix ms.
    pub attested_at: Option<i64>,
    /// The bound TPM.
    pub ek_fingerprint: Option<String>,
    /// The version the device runs.
    pub current_version: Option<String>,
}

/// How old a verified quote may be before it is stale (ms).
pub fn max_age_ms(state: &AppState) -> i64 {
    i64::try_from(state.config.attestation_max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// The verdict operators see for a device: what is stored, except that an
/// `attested` or `mismatch` for another version than the device runs now,
/// or older than `attestation-max-age-secs`, is `stale`.
pub fn view(state: &AppState, row: &ViewRow) -> AttestationView {
    let current = &row.current_version;
    let mut view = AttestationView {
        state: row.attestation.clone(),
        reason: row.attestation_reason.clone(),
        version: row.attested_version.clone(),
        at: row.attested_at,
        ek_fingerprint: row.ek_fingerprint.clone(),
    };
    if view.state == "attested" || view.state == "mismatch" {
        if view.version != *current {
            view.reason = Some(format!(
                "the last quote is for version {}; the device now runs {}",
                view.version.as_deref().unwrap_or("?"),
                current.as_deref().unwrap_or("an unknown version")
            ));
            view.state = "stale".into();
        } else if view
            .at
            .is_some_and(|t| state.clock.now_ms().saturating_sub(t) > max_age_ms(state))
        {
            view.reason = Some(format!(
                "the last quote is older than {} s",
                state.config.attestation_max_age_secs
            ));
            view.state = "stale".into();
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_input_is_bounded_before_it_is_decoded() {
        assert_eq!(decode_hex("credential", "00ff", 8).ok(), Some(vec![0, 255]));
        match decode_hex("ek_public", &"a".repeat(10), 8) {
            Err(Error::Invalid(why)) => assert_eq!(
                why,
                "ek_public: 10 hex characters, more than the limit of 8"
            ),
            other => panic!("not refused: {other:?}"),
        }
        match decode_hex("credential", "zz", 8) {
            Err(Error::Invalid(why)) => assert!(why.starts_with("credential: not hex"), "{why}"),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_tpm_is_named_by_the_sha256_of_its_ek() {
        assert_eq!(
            fingerprint(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
