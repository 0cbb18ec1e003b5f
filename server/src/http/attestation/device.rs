//! The device's TPM endpoints: `POST /device/tpm` (bind a TPM to an
//! enrolled device), `POST /device/activate` (answer the
//! credential-activation challenge), `POST /device/attestation` (a quote).
//! Each outcome, success or not, goes to the audit log.

use axum::extract::State;
use axum::http::HeaderMap;
use kernex_protocol::api::{
    Activated, ActivationAnswer, AttestationState, QuoteReport, QuoteResult, TpmBinding,
    TpmBindingAnswer,
};

use crate::AppState;
use crate::audit;
use crate::auth::Device;
use crate::http::{ApiJson, Error, Result};
use crate::service::attestation::{quote, tpm};
use crate::service::devices::credential;

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
    let outcome = tpm::bind(&state, &device, &req).await.map_err(Error::from);
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

/// Answer the credential-activation challenge of enrollment. Right: the AK
/// is recorded as the device's. Wrong or expired: the challenge is gone;
/// enroll again.
#[utoipa::path(post, path = "/api/v1/device/activate", request_body = ActivationAnswer,
    responses((status = 200, body = Activated), (status = 401),
        (status = 403, description = "wrong answer: the AK is not proven to be in the EK's TPM"),
        (status = 409, description = "no challenge outstanding, or it expired")))]
pub async fn activate(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(answer): ApiJson<ActivationAnswer>,
) -> Result<ApiJson<Activated>> {
    let device = activating_device(&state, &headers).await?;
    let outcome = tpm::activate(&state, &device, &answer)
        .await
        .map_err(Error::from);
    let result = match &outcome {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("error: {}", e.summary()),
    };
    record(&state, &device, "device.tpm-activate", &result).await?;
    outcome.map(ApiJson)
}

/// The device answering a challenge: by its credential, or by the new
/// credential of a re-enrollment that waits for this answer.
async fn activating_device(state: &AppState, headers: &HeaderMap) -> Result<Device> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(Error::Unauthorized)?;
    let kind = credential::Kind::of(token).ok_or(Error::Unauthorized)?;
    let hash = crate::store::secret_hash(token);
    let device = credential::authenticate_activating(state, kind, &hash).await?;
    state.limits.check(
        &format!("device:{}", device.pk),
        state.config.device_requests_per_minute,
    )?;
    Ok(device)
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
    let outcome = quote::verify(&state, &device, &report)
        .await
        .map_err(Error::from);
    let result = match &outcome {
        Ok(r) if r.attestation == AttestationState::Attested => "ok".to_string(),
        Ok(r) => format!("mismatch: {}", r.reason.as_deref().unwrap_or_default()),
        Err(e) => format!("error: {}", e.summary()),
    };
    record(&state, &device, "device.attestation", &result).await?;
    outcome.map(ApiJson)
}

/// Records a device's TPM request and its outcome in the audit log.
async fn record(state: &AppState, device: &Device, action: &str, result: &str) -> Result<()> {
    audit::coalesce::append(
        &state.store,
        &state.audit_coalescer,
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
