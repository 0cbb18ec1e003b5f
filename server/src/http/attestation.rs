//! TPM-rooted identity and attestation, the server's half (the protocol is
//! attest/README.md's; the verifier is `kernex-attest`, pure Rust + openssl).
//!
//! - **Pre-authorisation** (operators, the factory line):
//!   `POST /api/v1/tpm/preauthorizations` records a device id, optionally
//!   with the EK of its TPM. An enrollment token can require it; a recorded
//!   EK binds the device id to that TPM.
//! - **Enrollment** (`POST /device/enroll` with `tpm`): the EK is checked
//!   against the pre-authorisation and its certificate, the AK is parsed,
//!   and a credential-activation challenge goes back to the device
//!   ([`check_enrollment`], [`store_activation`]). With `tpm-cert-store`
//!   set, the EK certificate must chain to a trusted TPM vendor CA unless
//!   the factory line pre-authorised that very EK ([`check_vendor_ca`]).
//! - **Binding later** (`POST /device/tpm`): a device enrolled without a
//!   TPM identity (its `[tpm]` configured afterwards) sends it with its
//!   device credential; the same checks, the same challenge.
//! - **Activation** (`POST /device/activate`): the credential the TPM
//!   released. Only now is the AK recorded as the device's.
//! - **Quotes**: a poll answers a fresh nonce in the `Kernex-Attestation-Nonce`
//!   header when the device's attestation is missing, old or for another
//!   version ([`poll_nonce`]); `POST /device/attestation` carries the quote
//!   and the version the device claims to run. The server verifies it with
//!   the enrolled AK and the nonce, and compares the slot PCR with the value
//!   that release's manifest gives. Verified results are stored (attested,
//!   mismatch naming the PCR); a rejected quote (bad signature, replayed
//!   nonce, malformed) changes nothing but the audit log.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use kernex_attest::{
    Activation, AkPublic, CredentialChallenge, EkPublic, QuoteError, TpmIdentity,
    expected_slot_pcr, fresh_nonce, slot_measurement, verify_quote,
};
use kernex_protocol::Manifest;
use kernex_protocol::api::{
    Activated, ActivationAnswer, AttestationState, BindingState, NewPreauthorization,
    Preauthorization, QuoteReport, QuoteResult, TpmBinding, TpmBindingAnswer,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use utoipa::ToSchema;

use crate::AppState;
use crate::audit;
use crate::auth::{Device, Operator, Role};
use crate::http::device_api::check_name;
use crate::http::{ApiJson, Error, Result, audited};
use crate::store::{new_id, now_ms};

/// A quote nonce is answerable this long after it was issued.
pub const NONCE_TTL_MS: i64 = 5 * 60 * 1000;
/// A credential-activation challenge is answerable this long.
pub const ACTIVATION_TTL_MS: i64 = 10 * 60 * 1000;
/// The slot PCR when the device names none (attest/README.md's PCR map).
pub const DEFAULT_SLOT_PCR: u8 = kernex_attest::DEFAULT_SLOT_PCR;
/// Longest accepted hex of a `TPMT_PUBLIC` (an RSA-4096 key is ~1.1 KB).
const MAX_PUBLIC_HEX: usize = 4096;
/// Longest accepted hex of an EK certificate.
const MAX_CERTIFICATE_HEX: usize = 16384;

/// Operator routes (under `/api/v1`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/tpm/preauthorizations",
            post(preauthorize).get(list_preauthorizations),
        )
        .route(
            "/tpm/preauthorizations/{device_id}",
            delete(remove_preauthorization),
        )
}

/// Device routes (under `/api/v1/device`).
pub fn device_router() -> Router<AppState> {
    Router::new()
        .route("/tpm", post(bind))
        .route("/activate", post(activate))
        .route("/attestation", post(attestation))
}

fn fingerprint(ek_public: &[u8]) -> String {
    hex::encode(Sha256::digest(ek_public))
}

fn decode_hex(what: &str, text: &str, max: usize) -> Result<Vec<u8>> {
    if text.len() > max {
        return Err(Error::BadRequest(format!(
            "{what}: {} hex characters, more than the limit of {max}",
            text.len()
        )));
    }
    hex::decode(text).map_err(|e| Error::BadRequest(format!("{what}: not hex: {e}")))
}

/// Parses an EK and checks its certificate (when given) certifies it.
fn check_ek(public: &[u8], certificate: Option<&[u8]>) -> Result<EkPublic> {
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
/// swtpm included). The error is a 403 whose detail says what failed.
pub fn check_vendor_ca(state: &AppState, ek: &EkPublic, certificate: Option<&[u8]>) -> Result<()> {
    let Some(cas) = &state.ek_cas else {
        return Ok(());
    };
    let now = Duration::from_millis(u64::try_from(state.clock.now_ms()).unwrap_or(0));
    cas.verify(certificate, ek, now)
        .map_err(|e| Error::Refused(e.to_string()))
}

// ---------------------------------------------------------------------------
// Pre-authorisation (operators)

fn preauthorization(r: &sqlx::any::AnyRow) -> Result<Preauthorization> {
    Ok(Preauthorization {
        id: r.try_get("id")?,
        device_id: r.try_get("device_id")?,
        ek_fingerprint: r.try_get("ek_fingerprint")?,
        ek_certificate: r.try_get::<Option<String>, _>("ek_certificate")?.is_some(),
        created_at: r.try_get("created_at")?,
    })
}

const PREAUTH_COLUMNS: &str = "id, device_id, ek_fingerprint, ek_certificate, created_at";

/// Pre-authorise a device (ops): 201 when recorded, 200 when the same
/// device id and EK were already recorded (the factory line may retry).
#[utoipa::path(post, path = "/api/v1/tpm/preauthorizations", request_body = NewPreauthorization,
    responses((status = 201, body = Preauthorization), (status = 200, body = Preauthorization),
        (status = 403), (status = 409, description = "the device id or the EK is pre-authorised otherwise"),
        (status = 422, description = "not an EK, or the certificate is for another key")))]
pub async fn preauthorize(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewPreauthorization>,
) -> Result<(StatusCode, ApiJson<Preauthorization>)> {
    op.require(Role::Ops)?;
    let target = format!("device:{}", req.device_id);
    audited(&state, &op, "tpm.preauthorize", &target, async {
        check_name("device_id", &req.device_id)?;
        let public = req
            .ek_public
            .as_deref()
            .map(|t| decode_hex("ek_public", t, MAX_PUBLIC_HEX))
            .transpose()?;
        let certificate = req
            .ek_certificate
            .as_deref()
            .map(|t| decode_hex("ek_certificate", t, MAX_CERTIFICATE_HEX))
            .transpose()?;
        let fp = match &public {
            Some(public) => {
                let ek = check_ek(public, certificate.as_deref())?;
                // The factory line's word stands for an EK without a
                // certificate; a certificate it sends must be a vendor's.
                if certificate.is_some() {
                    check_vendor_ca(&state, &ek, certificate.as_deref()).map_err(|e| match e {
                        Error::Refused(why) => Error::Unprocessable(why),
                        other => other,
                    })?;
                }
                Some(fingerprint(public))
            }
            None if certificate.is_some() => {
                return Err(Error::BadRequest(
                    "ek_certificate without ek_public: send the EK's TPMT_PUBLIC too".into(),
                ));
            }
            None => None,
        };
        if let Some(fp) = &fp {
            let other = sqlx::query(
                "SELECT device_id FROM tpm_preauthorizations WHERE org_id = $1 AND ek_fingerprint = $2 AND device_id <> $3",
            )
            .bind(&op.org_id)
            .bind(fp)
            .bind(&req.device_id)
            .fetch_optional(state.store.pool())
            .await?;
            if let Some(other) = other {
                let other: String = other.try_get("device_id")?;
                return Err(Error::Conflict(format!(
                    "this EK is already pre-authorised for device {other}"
                )));
            }
        }
        let select = format!(
            "SELECT {PREAUTH_COLUMNS} FROM tpm_preauthorizations WHERE org_id = $1 AND device_id = $2"
        );
        let existing = || {
            sqlx::query(&select)
                .bind(op.org_id.clone())
                .bind(req.device_id.clone())
                .fetch_optional(state.store.pool())
        };
        if let Some(row) = existing().await? {
            let found = preauthorization(&row)?;
            if found.ek_fingerprint != fp {
                return Err(Error::Conflict(format!(
                    "device {} is already pre-authorised with {}; remove that first",
                    req.device_id,
                    found
                        .ek_fingerprint
                        .map_or("no EK".to_string(), |f| format!("the EK {f}"))
                )));
            }
            return Ok(((StatusCode::OK, ApiJson(found)), target.clone()));
        }
        let id = new_id()?;
        let now = now_ms();
        let inserted = sqlx::query(
            "INSERT INTO tpm_preauthorizations (id, org_id, device_id, ek_public, ek_certificate, ek_fingerprint, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&id)
        .bind(&op.org_id)
        .bind(&req.device_id)
        .bind(public.as_deref().map(hex::encode))
        .bind(certificate.as_deref().map(hex::encode))
        .bind(&fp)
        .bind(&op.user_id)
        .bind(now)
        .execute(state.store.pool())
        .await;
        match inserted {
            Ok(_) => {}
            // Recorded concurrently: answer as a retry would.
            Err(e) if crate::http::error::is_unique_violation(&e) => {
                let row = existing().await?.ok_or(Error::Conflict(
                    "pre-authorisation raced with a removal; retry".into(),
                ))?;
                let found = preauthorization(&row)?;
                if found.ek_fingerprint != fp {
                    return Err(Error::Conflict(format!(
                        "device {} was pre-authorised with another EK meanwhile",
                        req.device_id
                    )));
                }
                return Ok(((StatusCode::OK, ApiJson(found)), target.clone()));
            }
            Err(e) => return Err(e.into()),
        }
        Ok((
            (
                StatusCode::CREATED,
                ApiJson(Preauthorization {
                    id,
                    device_id: req.device_id.clone(),
                    ek_fingerprint: fp,
                    ek_certificate: certificate.is_some(),
                    created_at: now,
                }),
            ),
            target.clone(),
        ))
    })
    .await
}

/// List pre-authorised devices.
#[utoipa::path(get, path = "/api/v1/tpm/preauthorizations",
    responses((status = 200, body = [Preauthorization])))]
pub async fn list_preauthorizations(
    State(state): State<AppState>,
    op: Operator,
) -> Result<ApiJson<Vec<Preauthorization>>> {
    let rows = sqlx::query(&format!(
        "SELECT {PREAUTH_COLUMNS} FROM tpm_preauthorizations WHERE org_id = $1 ORDER BY created_at DESC, device_id"
    ))
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    Ok(ApiJson(
        rows.iter().map(preauthorization).collect::<Result<_>>()?,
    ))
}

/// Remove a pre-authorisation (ops). A device already enrolled stays bound
/// to its TPM.
#[utoipa::path(delete, path = "/api/v1/tpm/preauthorizations/{device_id}",
    responses((status = 204), (status = 403), (status = 404)))]
pub async fn remove_preauthorization(
    State(state): State<AppState>,
    op: Operator,
    Path(device_id): Path<String>,
) -> Result<StatusCode> {
    op.require(Role::Ops)?;
    let target = format!("device:{device_id}");
    audited(&state, &op, "tpm.preauthorization.remove", &target, async {
        let done =
            sqlx::query("DELETE FROM tpm_preauthorizations WHERE org_id = $1 AND device_id = $2")
                .bind(&op.org_id)
                .bind(&device_id)
                .execute(state.store.pool())
                .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("no such pre-authorisation"));
        }
        Ok((StatusCode::NO_CONTENT, String::new()))
    })
    .await
}

// ---------------------------------------------------------------------------
// Enrollment and credential activation (devices)

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
    ek_fingerprint: String,
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
    let preauth = sqlx::query(
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
    let preauth_ek: Option<String> = match &preauth {
        Some(row) => row.try_get("ek_fingerprint")?,
        None => None,
    };
    let slot_pcr = slot_pcr.unwrap_or(DEFAULT_SLOT_PCR);
    if slot_pcr > kernex_attest::measure::MAX_SLOT_PCR {
        return Err(Error::BadRequest(format!(
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
    let other = sqlx::query(
        "SELECT device_id FROM devices WHERE org_id = $1 AND ek_fingerprint = $2 AND device_id <> $3",
    )
    .bind(org_id)
    .bind(&fp)
    .bind(device_id)
    .fetch_optional(state.store.pool())
    .await?;
    if let Some(other) = other {
        let other: String = other.try_get("device_id")?;
        return Err(Error::Conflict(format!(
            "this TPM (EK {fp}) is already enrolled as device {other}"
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
        Err(e) if crate::http::error::is_unique_violation(&e) => {
            return Err(Error::Conflict(
                "another enrollment of this device is under way; retry".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    tx.commit().await?;
    Ok(Some(Activation::from(&tpm.challenge)))
}

async fn record(state: &AppState, device: &Device, action: &str, result: &str) -> Result<()> {
    audit::append(
        &state.store,
        audit::Entry {
            org_id: &device.org_id,
            actor: &format!("device:{}", device.device_id),
            action,
            target: &format!("device:{}", device.pk),
            result,
            detail: serde_json::json!({}),
        },
    )
    .await?;
    Ok(())
}

/// Answer the credential-activation challenge of enrollment. Right: the AK
/// is recorded as the device's. Wrong or expired: the challenge is gone;
/// enroll again.
#[utoipa::path(post, path = "/api/v1/device/activate", request_body = ActivationAnswer,
    responses((status = 200, body = Activated), (status = 401),
        (status = 403, description = "wrong answer: the AK is not proven to be in the EK's TPM"),
        (status = 409, description = "no challenge outstanding, or it expired")))]
pub async fn activate(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    ApiJson(answer): ApiJson<ActivationAnswer>,
) -> Result<ApiJson<Activated>> {
    let device = activating_device(&state, &headers).await?;
    let outcome = activate_inner(&state, &device, &answer).await;
    let result = match &outcome {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error: {}", e.summary()),
    };
    record(&state, &device, "device.tpm-activate", &result).await?;
    outcome.map(ApiJson)
}

/// The device answering a challenge: by its credential, or by the new
/// credential of a re-enrollment that waits for this answer.
async fn activating_device(state: &AppState, headers: &axum::http::HeaderMap) -> Result<Device> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| t.starts_with("kxd_"))
        .ok_or(Error::Unauthorized)?;
    let hash = crate::store::secret_hash(token);
    let row = sqlx::query(
        "SELECT d.id, d.org_id, d.device_id, d.tpm_required, d.ek_fingerprint FROM devices d WHERE d.revoked = 0 AND (d.credential_hash = $1 OR d.id = (SELECT a.device_pk FROM tpm_activations a WHERE a.pending_credential_hash = $1))",
    )
    .bind(&hash)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    let pk: String = row.try_get("id")?;
    state.limits.check(
        &format!("device:{pk}"),
        state.config.device_requests_per_minute,
    )?;
    Ok(Device {
        pk,
        org_id: row.try_get("org_id")?,
        device_id: row.try_get("device_id")?,
        unproven: is_unproven(&row)?,
    })
}

async fn activate_inner(
    state: &AppState,
    device: &Device,
    answer: &ActivationAnswer,
) -> Result<Activated> {
    let credential = decode_hex("credential", &answer.credential, 256)?;
    let row = sqlx::query(
        "SELECT ek_fingerprint, ak_public, slot_pcr, credential_hash, pending_credential_hash, created_at FROM tpm_activations WHERE device_pk = $1",
    )
    .bind(&device.pk)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or_else(|| {
        Error::Conflict(
            "no credential activation is outstanding: enroll with a TPM identity first".into(),
        )
    })?;
    let want: String = row.try_get("credential_hash")?;
    // One answer per challenge, right or wrong; and this very challenge,
    // not one a concurrent re-enrollment put in its place.
    let taken =
        sqlx::query("DELETE FROM tpm_activations WHERE device_pk = $1 AND credential_hash = $2")
            .bind(&device.pk)
            .bind(&want)
            .execute(state.store.pool())
            .await?;
    if taken.rows_affected() == 0 {
        return Err(Error::Conflict(
            "the challenge was answered concurrently: enroll again".into(),
        ));
    }
    let created_at: i64 = row.try_get("created_at")?;
    if state.clock.now_ms().saturating_sub(created_at) > ACTIVATION_TTL_MS {
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
    let ek_fingerprint: String = row.try_get("ek_fingerprint")?;
    let pending: Option<String> = row.try_get("pending_credential_hash")?;
    let bound = sqlx::query(
        "UPDATE devices SET ek_fingerprint = $1, ak_public = $2, slot_pcr = $3, credential_hash = COALESCE($4, credential_hash), attestation = 'pending', attestation_reason = NULL, attested_version = NULL, attested_at = NULL, quote_nonce = NULL, quote_nonce_at = NULL WHERE id = $5",
    )
    .bind(&ek_fingerprint)
    .bind(row.try_get::<String, _>("ak_public")?)
    .bind(row.try_get::<i64, _>("slot_pcr")?)
    .bind(&pending)
    .bind(&device.pk)
    .execute(state.store.pool())
    .await;
    match bound {
        // A swapped credential: the old one stops working now; and cached
        // entries that still say "unproven" go.
        Ok(_) => crate::poll_cache::forget_device(state, &device.pk).await,
        // The unique (org, EK) index: another device id got this TPM first.
        Err(e) if crate::http::error::is_unique_violation(&e) => {
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

// ---------------------------------------------------------------------------
// Binding the TPM of a device already enrolled

/// Bind the TPM of an enrolled device (one that enrolled without a TPM
/// identity, e.g. `[tpm]` was configured later; or one bound to this EK
/// that lost its AK). The checks of a TPM enrollment apply: the device's
/// pre-authorisation and existing binding, its enrollment token's policy,
/// the trusted vendor CAs (`tpm-cert-store`), one device per TPM. The
/// answer is a credential-activation challenge; the binding is recorded
/// when `POST /device/activate` answers it. A refused or failed binding
/// leaves the device as it was (served, unattested).
#[utoipa::path(post, path = "/api/v1/device/tpm", request_body = TpmBinding,
    responses((status = 200, body = TpmBindingAnswer), (status = 401),
        (status = 403, description = "refused by policy: the reason says why (e.g. the EK certificate is not from a trusted TPM vendor CA, or another TPM is pre-authorised)"),
        (status = 409, description = "this TPM is bound to another device"),
        (status = 422, description = "the EK or AK is unusable")))]
pub async fn bind(
    State(state): State<AppState>,
    device: Device,
    ApiJson(req): ApiJson<TpmBinding>,
) -> Result<ApiJson<TpmBindingAnswer>> {
    let outcome = bind_inner(&state, &device, &req).await;
    let result = match &outcome {
        Ok(_) => "ok".to_string(),
        Err(e) => {
            tracing::warn!(device = %device.device_id, reason = %e.summary(), "TPM binding refused");
            format!("error: {}", e.summary())
        }
    };
    record(&state, &device, "device.tpm-bind", &result).await?;
    outcome.map(ApiJson)
}

async fn bind_inner(
    state: &AppState,
    device: &Device,
    req: &TpmBinding,
) -> Result<TpmBindingAnswer> {
    let row = sqlx::query(
        "SELECT d.ek_fingerprint, d.ak_public, d.slot_pcr, t.require_preauthorization, t.require_tpm FROM devices d LEFT JOIN enrollment_tokens t ON t.id = d.enrollment_token_id WHERE d.id = $1",
    )
    .bind(&device.pk)
    .fetch_one(state.store.pool())
    .await?;
    let flag = |column: &str| -> Result<bool> {
        Ok(row.try_get::<Option<i64>, _>(column)?.unwrap_or(0) != 0)
    };
    let policy = TokenPolicy {
        require_preauthorization: flag("require_preauthorization")?,
        require_tpm: flag("require_tpm")?,
    };
    let bound: Option<String> = row.try_get("ek_fingerprint")?;
    let fp = fingerprint(&req.tpm.ek_public);
    let same_ak = row.try_get::<Option<String>, _>("ak_public")?
        == Some(hex::encode(&req.tpm.ak_public))
        && row.try_get::<i64, _>("slot_pcr")?
            == i64::from(req.tpm_slot_pcr.unwrap_or(DEFAULT_SLOT_PCR));
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

// ---------------------------------------------------------------------------
// Quotes

/// Whether the poll answer carries a quote nonce, and which. Also refuses a
/// device that must prove its TPM and has not.
pub async fn poll_nonce(state: &AppState, device: &Device) -> Result<Option<String>> {
    let row = sqlx::query(
        "SELECT tpm_required, ek_fingerprint, attestation, attested_version, attested_at, current_version, quote_nonce, quote_nonce_at FROM devices WHERE id = $1",
    )
    .bind(&device.pk)
    .fetch_one(state.store.pool())
    .await?;
    if !served(&row)? {
        return Err(unproven().into());
    }
    if row
        .try_get::<Option<String>, _>("ek_fingerprint")?
        .is_none()
    {
        return Ok(None);
    }
    let now = state.clock.now_ms();
    let refresh_ms = max_age_ms(state) / 2;
    let attested = row.try_get::<String, _>("attestation")? == "attested";
    let attested_version: Option<String> = row.try_get("attested_version")?;
    let current: Option<String> = row.try_get("current_version")?;
    let attested_at: Option<i64> = row.try_get("attested_at")?;
    let fresh = attested
        && attested_version.is_some()
        && attested_version == current
        && attested_at.is_some_and(|t| now.saturating_sub(t) < refresh_ms);
    if fresh {
        return Ok(None);
    }
    let outstanding: Option<String> = row.try_get("quote_nonce")?;
    let issued: Option<i64> = row.try_get("quote_nonce_at")?;
    if let (Some(nonce), Some(issued)) = (outstanding, issued)
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

/// A device enrolled under a TPM policy is served releases only once its
/// credential activation succeeded.
fn served(row: &sqlx::any::AnyRow) -> Result<bool> {
    Ok(!is_unproven(row)?)
}

pub use crate::service::attestation::{is_unproven, unproven};

fn max_age_ms(state: &AppState) -> i64 {
    i64::try_from(state.config.attestation_max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// Answer the outstanding nonce with a quote. A verified quote stores the
/// device's attestation: `attested`, or `mismatch` naming the PCR. A quote
/// that does not verify (another TPM's AK, an old nonce, altered or
/// malformed bytes) is rejected with the reason and changes nothing.
#[utoipa::path(post, path = "/api/v1/device/attestation", request_body = QuoteReport,
    responses((status = 200, body = QuoteResult), (status = 401),
        (status = 409, description = "the device has no activated TPM"),
        (status = 422, description = "the quote is rejected: the reason says why")))]
pub async fn attestation(
    State(state): State<AppState>,
    device: Device,
    ApiJson(report): ApiJson<QuoteReport>,
) -> Result<ApiJson<QuoteResult>> {
    let outcome = attestation_inner(&state, &device, &report).await;
    let result = match &outcome {
        Ok(r) if r.attestation == AttestationState::Attested => "ok".to_string(),
        Ok(r) => format!("mismatch: {}", r.reason.as_deref().unwrap_or_default()),
        Err(e) => format!("error: {}", e.summary()),
    };
    record(&state, &device, "device.attestation", &result).await?;
    outcome.map(ApiJson)
}

async fn attestation_inner(
    state: &AppState,
    device: &Device,
    report: &QuoteReport,
) -> Result<QuoteResult> {
    check_name("version", &report.version)?;
    let row = sqlx::query(
        "SELECT ak_public, slot_pcr, quote_nonce, quote_nonce_at FROM devices WHERE id = $1",
    )
    .bind(&device.pk)
    .fetch_one(state.store.pool())
    .await?;
    let Some(ak_public) = row.try_get::<Option<String>, _>("ak_public")? else {
        return Err(Error::Conflict(
            "this device has no activated TPM: enroll with its TPM identity".into(),
        ));
    };
    let Some(nonce) = row.try_get::<Option<String>, _>("quote_nonce")? else {
        return Err(Error::Unprocessable(
            "no attestation nonce is outstanding (a stale or replayed quote): poll for a fresh nonce".into(),
        ));
    };
    let issued: Option<i64> = row.try_get("quote_nonce_at")?;
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
    if issued.is_none_or(|t| state.clock.now_ms().saturating_sub(t) >= NONCE_TTL_MS) {
        return Err(Error::Unprocessable(
            "the attestation nonce expired: poll for a fresh nonce".into(),
        ));
    }
    let pcr =
        u8::try_from(row.try_get::<i64, _>("slot_pcr")?).map_err(|e| Error::Internal(e.into()))?;
    let manifest: String = sqlx::query(
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
    .try_get("manifest")?;
    let manifest =
        Manifest::from_slice(manifest.as_bytes()).map_err(|e| Error::Internal(e.into()))?;
    let measurement =
        slot_measurement(&manifest).map_err(|e| Error::Unprocessable(e.to_string()))?;
    let expected = BTreeMap::from([(pcr, expected_slot_pcr(&measurement))]);
    let ak = AkPublic::parse(&hex::decode(&ak_public).map_err(|e| Error::Internal(e.into()))?)
        .map_err(|e| Error::Internal(e.into()))?;
    let nonce = hex::decode(&nonce).map_err(|e| Error::Internal(e.into()))?;
    let (state_name, reason) = match verify_quote(&ak, &report.quote, &nonce, &expected) {
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
    .bind(state_name.as_str())
    .bind(&reason)
    .bind(&report.version)
    .bind(state.clock.now_ms())
    .bind(&device.pk)
    .execute(state.store.pool())
    .await?;
    Ok(QuoteResult {
        attestation: state_name,
        reason,
        version: report.version.clone(),
    })
}

// ---------------------------------------------------------------------------
// What operators see

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

/// Builds the view from a device row with the columns `attestation`,
/// `attestation_reason`, `attested_version`, `attested_at`, `ek_fingerprint`
/// and `current_version`.
pub fn view(state: &AppState, r: &sqlx::any::AnyRow) -> Result<AttestationView> {
    let stored: String = r.try_get("attestation")?;
    let version: Option<String> = r.try_get("attested_version")?;
    let at: Option<i64> = r.try_get("attested_at")?;
    let current: Option<String> = r.try_get("current_version")?;
    let mut view = AttestationView {
        state: stored,
        reason: r.try_get("attestation_reason")?,
        version,
        at,
        ek_fingerprint: r.try_get("ek_fingerprint")?,
    };
    if view.state == "attested" || view.state == "mismatch" {
        if view.version != current {
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
    Ok(view)
}
