//! Quotes: a poll answers a fresh nonce when the device's attestation is
//! missing, old or for another version ([`poll_nonce`]); the quote that
//! answers it carries the version the device claims to run, and
//! [`verify`] checks it with the enrolled AK and the nonce, and compares
//! the slot PCR with the value that release's manifest gives.

use std::collections::BTreeMap;

use kernex_attest::{
    AkPublic, QuoteError, expected_slot_pcr, fresh_nonce, slot_measurement, verify_quote,
};
use kernex_protocol::Manifest;
use kernex_protocol::api::{AttestationState, QuoteReport, QuoteResult};

use super::policy::max_age_ms;
use super::{NONCE_TTL_MS, is_unproven, unproven};
use crate::AppState;
use crate::auth::Device;
use crate::service::names::check_name;
use crate::service::{Error, Result};

/// What decides whether a poll carries a nonce.
#[derive(Debug, sqlx::FromRow)]
struct NonceRow {
    tpm_required: i64,
    ek_fingerprint: Option<String>,
    attestation: String,
    attested_version: Option<String>,
    attested_at: Option<i64>,
    current_version: Option<String>,
    quote_nonce: Option<String>,
    quote_nonce_at: Option<i64>,
}

/// What a quote is verified with.
#[derive(Debug, sqlx::FromRow)]
struct QuoteRow {
    ak_public: Option<String>,
    slot_pcr: i64,
    quote_nonce: Option<String>,
    quote_nonce_at: Option<i64>,
}

#[derive(Debug, sqlx::FromRow)]
struct ManifestRow {
    manifest: String,
}

/// Whether the poll answer carries a quote nonce, and which. Also refuses a
/// device that must prove its TPM and has not (a device enrolled under a
/// TPM policy is served releases only once its credential activation
/// succeeded).
pub async fn poll_nonce(state: &AppState, device: &Device) -> Result<Option<String>> {
    let row = sqlx::query_as::<_, NonceRow>(
        "SELECT tpm_required, ek_fingerprint, attestation, attested_version, attested_at, current_version, quote_nonce, quote_nonce_at FROM devices WHERE id = $1",
    )
    .bind(&device.pk)
    .fetch_one(state.store.pool())
    .await?;
    if is_unproven(row.tpm_required, row.ek_fingerprint.as_deref()) {
        return Err(unproven());
    }
    if row.ek_fingerprint.is_none() {
        return Ok(None);
    }
    let now = state.clock.now_ms();
    let refresh_ms = max_age_ms(state) / 2;
    let fresh = row.attestation == "attested"
        && row.attested_version.is_some()
        && row.attested_version == row.current_version
        && row
            .attested_at
            .is_some_and(|t| now.saturating_sub(t) < refresh_ms);
    if fresh {
        return Ok(None);
    }
    if let (Some(nonce), Some(issued)) = (row.quote_nonce, row.quote_nonce_at)
        && now.saturating_sub(issued) < NONCE_TTL_MS
    {
        return Ok(Some(nonce));
    }
    let nonce = hex::encode(fresh_nonce().map_err(|e| Error::Internal(e.into()))?);
    sqlx::query("UPDATE devices SET quote_nonce = $1, quote_nonce_at = $2 WHERE id = $3")
        .bind(&nonce)
        .bind(now)
        .bind(&device.pk)
        .execute(state.store.pool())
        .await?;
    Ok(Some(nonce))
}

/// Answers the outstanding nonce with a quote. A verified quote stores the
/// device's attestation: `attested`, or `mismatch` naming the PCR. A quote
/// that does not verify (another TPM's AK, an old nonce, altered or
/// malformed bytes) is rejected with the reason and changes nothing but
/// the nonce, which is spent.
pub async fn verify(
    state: &AppState,
    device: &Device,
    report: &QuoteReport,
) -> Result<QuoteResult> {
    check_name("version", &report.version)?;
    let row = sqlx::query_as::<_, QuoteRow>(
        "SELECT ak_public, slot_pcr, quote_nonce, quote_nonce_at FROM devices WHERE id = $1",
    )
    .bind(&device.pk)
    .fetch_one(state.store.pool())
    .await?;
    let Some(ak_public) = row.ak_public else {
        return Err(Error::Conflict(
            "this device has no activated TPM: enroll with its TPM identity".into(),
        ));
    };
    let Some(nonce) = row.quote_nonce else {
        return Err(Error::Unprocessable(
            "no attestation nonce is outstanding (a stale or replayed quote): poll for a fresh nonce".into(),
        ));
    };
    // One answer per nonce, whatever the outcome: a replay meets no nonce.
    let taken = sqlx::query(
        "UPDATE devices SET quote_nonce = NULL, quote_nonce_at = NULL WHERE id = $1 AND quote_nonce = $2",
    )
    .bind(&device.pk)
    .bind(&nonce)
    .execute(state.store.pool())
    .await?;
    if taken.rows_affected() == 0 {
        return Err(Error::Unprocessable(
            "the attestation nonce was answered concurrently: poll for a fresh nonce".into(),
        ));
    }
    if row
        .quote_nonce_at
        .is_none_or(|t| state.clock.now_ms().saturating_sub(t) >= NONCE_TTL_MS)
    {
        return Err(Error::Unprocessable(
            "the attestation nonce expired: poll for a fresh nonce".into(),
        ));
    }
    let pcr = u8::try_from(row.slot_pcr).map_err(|e| Error::Internal(e.into()))?;
    let manifest = sqlx::query_as::<_, ManifestRow>(
        "SELECT manifest FROM releases WHERE org_id = $1 AND version = $2",
    )
    .bind(&device.org_id)
    .bind(&report.version)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or_else(|| {
        Error::Unprocessable(format!(
            "version {} is not a release of this organisation: nothing to compare PCR {pcr} with",
            report.version
        ))
    })?
    .manifest;
    let manifest =
        Manifest::from_slice(manifest.as_bytes()).map_err(|e| Error::Internal(e.into()))?;
    let measurement =
        slot_measurement(&manifest).map_err(|e| Error::Unprocessable(e.to_string()))?;
    let expected = BTreeMap::from([(pcr, expected_slot_pcr(&measurement))]);
    let ak = AkPublic::parse(&hex::decode(&ak_public).map_err(|e| Error::Internal(e.into()))?)
        .map_err(|e| Error::Internal(e.into()))?;
    let nonce = hex::decode(&nonce).map_err(|e| Error::Internal(e.into()))?;
    let (verdict, reason) = match verify_quote(&ak, &report.quote, &nonce, &expected) {
        Ok(_) => (AttestationState::Attested, None),
        Err(QuoteError::PcrMismatch {
            pcr,
            expected,
            found,
        }) => (
            AttestationState::Mismatch,
            Some(format!(
                "PCR {pcr} is {found}, release {} expects {expected}",
                report.version
            )),
        ),
        Err(e) => return Err(Error::Unprocessable(format!("quote rejected: {e}"))),
    };
    sqlx::query(
        "UPDATE devices SET attestation = $1, attestation_reason = $2, attested_version = $3, attested_at = $4 WHERE id = $5",
    )
    .bind(verdict.as_str())
    .bind(&reason)
    .bind(&report.version)
    .bind(state.clock.now_ms())
    .bind(&device.pk)
    .execute(state.store.pool())
    .await?;
    Ok(QuoteResult {
        attestation: verdict,
        reason,
        version: report.version.clone(),
    })
}
