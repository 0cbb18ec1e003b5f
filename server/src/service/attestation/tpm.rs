//! The device's TPM: binding it to a device enrolled without one, and
//! credential activation (the credential the TPM released proves the AK
//! is in the EK's TPM; only then is the AK recorded as the device's).

use kernex_protocol::api::{
    Activated, ActivationAnswer, AttestationState, BindingState, TpmBinding, TpmBindingAnswer,
};
use sha2::{Digest, Sha256};

use super::policy::{TokenPolicy, check_enrollment, decode_hex, fingerprint, store_activation};
use super::{ACTIVATION_TTL_MS, DEFAULT_SLOT_PCR};
use crate::AppState;
use crate::auth::Device;
use crate::service::{Error, Result};

/// What binding compares with: the device's TPM and its token's policy.
#[derive(Debug, sqlx::FromRow)]
struct BindingRow {
    ek_fingerprint: Option<String>,
    ak_public: Option<String>,
    slot_pcr: i64,
    /// Null when the device's token is gone.
    require_preauthorization: Option<i64>,
    require_tpm: Option<i64>,
}

/// An outstanding credential-activation challenge.
#[derive(Debug, sqlx::FromRow)]
struct ActivationRow {
    ek_fingerprint: String,
    ak_public: String,
    slot_pcr: i64,
    credential_hash: String,
    pending_credential_hash: Option<String>,
    pending_public_key: Option<String>,
    created_at: i64,
}

/// Binds the TPM of an enrolled device (one that enrolled without a TPM
/// identity, e.g. `[tpm]` was configured later; or one bound to this EK
/// that lost its AK). The checks of a TPM enrollment apply: the device's
/// pre-authorisation and existing binding, its enrollment token's policy,
/// the trusted vendor CAs (`tpm-cert-store`), one device per TPM. The
/// answer is a credential-activation challenge; the binding is recorded
/// when [`activate`] answers it. A refused or failed binding leaves the
/// device as it was (served, unattested).
pub async fn bind(state: &AppState, device: &Device, req: &TpmBinding) -> Result<TpmBindingAnswer> {
    let row = sqlx::query_as::<_, BindingRow>(
        "SELECT d.ek_fingerprint, d.ak_public, d.slot_pcr, t.require_preauthorization, t.require_tpm FROM devices d LEFT JOIN enrollment_tokens t ON t.id = d.enrollment_token_id WHERE d.id = $1",
    )
    .bind(&device.pk)
    .fetch_one(state.store.pool())
    .await?;
    let policy = TokenPolicy {
        require_preauthorization: row.require_preauthorization.unwrap_or(0) != 0,
        require_tpm: row.require_tpm.unwrap_or(0) != 0,
    };
    let bound = row.ek_fingerprint;
    let fp = fingerprint(&req.tpm.ek_public);
    let same_ak = row.ak_public == Some(hex::encode(&req.tpm.ak_public))
        && row.slot_pcr == i64::from(req.tpm_slot_pcr.unwrap_or(DEFAULT_SLOT_PCR));
    if bound.as_deref() == Some(fp.as_str()) && same_ak {
        // Proven already, with this very AK: nothing changes.
        return Ok(TpmBindingAnswer {
            state: BindingState::Bound,
            ek_fingerprint: fp,
            activation: None,
        });
    }
    let mut check = check_enrollment(
        state,
        &device.org_id,
        &device.device_id,
        policy,
        Some(&req.tpm),
        req.tpm_slot_pcr,
        bound.as_deref(),
    )
    .await?;
    let tpm = check
        .tpm
        .as_ref()
        .ok_or_else(|| Error::Internal(anyhow::anyhow!("a TPM identity gave no challenge")))?;
    let ek_fingerprint = tpm.ek_fingerprint.clone();
    // The device was served without a TPM until now: a binding that fails
    // does not lock it out (an unproven device stays unproven).
    check.tpm_required = false;
    let activation = store_activation(state, &device.pk, &check, None).await?;
    Ok(TpmBindingAnswer {
        state: BindingState::Challenge,
        ek_fingerprint,
        activation,
    })
}

/// Answers the credential-activation challenge of enrollment or binding.
/// Right: the AK is recorded as the device's (and a re-enrollment's new
/// credential takes effect). Wrong or expired: the challenge is gone;
/// enroll again.
pub async fn activate(
    state: &AppState,
    device: &Device,
    answer: &ActivationAnswer,
) -> Result<Activated> {
    let credential = decode_hex("credential", &answer.credential, 256)?;
    let row = sqlx::query_as::<_, ActivationRow>(
        "SELECT ek_fingerprint, ak_public, slot_pcr, credential_hash, pending_credential_hash, pending_public_key, created_at FROM tpm_activations WHERE device_pk = $1",
    )
    .bind(&device.pk)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or_else(|| {
        Error::Conflict(
            "no credential activation is outstanding: enroll with a TPM identity first".into(),
        )
    })?;
    let want = &row.credential_hash;
    // One answer per challenge, right or wrong; and this very challenge,
    // not one a concurrent re-enrollment put in its place.
    let taken =
        sqlx::query("DELETE FROM tpm_activations WHERE device_pk = $1 AND credential_hash = $2")
            .bind(&device.pk)
            .bind(want)
            .execute(state.store.pool())
            .await?;
    if taken.rows_affected() == 0 {
        return Err(Error::Conflict(
            "the challenge was answered concurrently: enroll again".into(),
        ));
    }
    if state.clock.now_ms().saturating_sub(row.created_at) > ACTIVATION_TTL_MS {
        return Err(Error::Conflict(
            "the credential-activation challenge expired: enroll again".into(),
        ));
    }
    let got = hex::encode(Sha256::digest(&credential));
    if !openssl::memcmp::eq(want.as_bytes(), got.as_bytes()) {
        return Err(Error::Refused(
            kernex_attest::ActivationError::WrongAnswer.to_string(),
        ));
    }
    let ek_fingerprint = row.ek_fingerprint;
    // A re-enrollment that brought a key: the key becomes the device's and
    // the pending secret is its first access token.
    let (pending_credential, pending_token) =
        match (&row.pending_public_key, &row.pending_credential_hash) {
            (Some(_), Some(token)) => (
                Some(crate::service::devices::identity::retired_credential()?),
                Some(token.clone()),
            ),
            _ => (row.pending_credential_hash.clone(), None),
        };
    let bound = sqlx::query(
        "UPDATE devices SET ek_fingerprint = $1, ak_public = $2, slot_pcr = $3, credential_hash = COALESCE($4, credential_hash), public_key = COALESCE($5, public_key), attestation = 'pending', attestation_reason = NULL, attested_version = NULL, attested_at = NULL, quote_nonce = NULL, quote_nonce_at = NULL WHERE id = $6",
    )
    .bind(&ek_fingerprint)
    .bind(&row.ak_public)
    .bind(row.slot_pcr)
    .bind(&pending_credential)
    .bind(&row.pending_public_key)
    .bind(&device.pk)
    .execute(state.store.pool())
    .await;
    match bound {
        // A swapped credential: the old one stops working now; and cached
        // entries that still say "unproven" go.
        Ok(_) => {
            if let Some(token_hash) = &pending_token {
                // The old key's tokens go; the new key's first one starts.
                sqlx::query("DELETE FROM device_access_tokens WHERE device_pk = $1")
                    .bind(&device.pk)
                    .execute(state.store.pool())
                    .await?;
                sqlx::query(
                    "INSERT INTO device_access_tokens (token_hash, device_pk, expires_at) VALUES ($1, $2, $3)",
                )
                .bind(token_hash)
                .bind(&device.pk)
                .bind(crate::store::now_ms().saturating_add(
                    i64::try_from(state.config.device_token_secs.saturating_mul(1000))
                        .unwrap_or(i64::MAX),
                ))
                .execute(state.store.pool())
                .await?;
            }
            crate::poll_cache::forget_device(state, &device.pk).await
        }
        // The unique (org, EK) index: another device id got this TPM first.
        Err(e) if crate::store::is_unique_violation(&e) => {
            return Err(Error::Conflict(format!(
                "this TPM (EK {ek_fingerprint}) is already bound to another device"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Activated {
        ek_fingerprint,
        attestation: AttestationState::Pending,
    })
}
