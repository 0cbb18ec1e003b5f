//! The device API (`/api/v1/device/...`): enroll, poll, heartbeat, report,
//! logs, bundle download. Devices authenticate with the credential that
//! enrollment returned (`Authorization: Bearer kxd_...`). Each handler
//! extracts, calls its service (`crate::service::devices`) and maps the
//! answer.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kernex_protocol::api::{
    DesiredState, EnrollPending, EnrollRequest, EnrollResponse, Heartbeat, LogBatch, NONCE_HEADER,
    POLL_AFTER_HEADER, Report,
};

use crate::AppState;
use crate::audit;
use crate::auth::Device;
use crate::http::{ApiJson, Error, Result};
use crate::serve::ClientAddr;
use crate::service::attestation::quote::poll_nonce;
use crate::service::devices;
use crate::service::devices::enroll::Outcome;

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/enroll", post(enroll))
        .route("/poll", get(poll))
        .route("/heartbeat", post(heartbeat))
        .route("/report", post(report))
        .route("/logs", post(logs))
        .route("/releases/{id}/bundle", get(download))
        .route("/releases/{id}/patches/{patch}", get(download_patch))
        .merge(crate::http::attestation::device_router())
        .merge(crate::http::device_identity::device_router())
}

/// Enroll with an enrollment token, the device's public key and the proof
/// that it holds the private key. A device id enrolled already is renewed
/// (200) only with proof that the request comes from that device (its
/// current key, or TPM activation with its EK); otherwise the request
/// waits for an operator (202, no credential) and the device keeps its
/// identity.
#[utoipa::path(post, path = "/api/v1/device/enroll", request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse), (status = 201, body = EnrollResponse),
        (status = 202, body = EnrollPending, description = "enrolled already, no proof: an operator decides"),
        (status = 401),
        (status = 403, description = "the device was revoked, a tag is outside the token's allowed tags, or the token is used up"),
        (status = 409), (status = 413, description = "hardware_metadata over max-hardware-metadata-bytes"),
        (status = 429, description = "over the enrollment rate limit of the token or the source address")))]
pub async fn enroll(
    State(state): State<AppState>,
    ClientAddr(source): ClientAddr,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<Response> {
    match devices::enroll::enroll(&state, &req, source).await? {
        Outcome::Created(answer) => Ok((StatusCode::CREATED, ApiJson(answer)).into_response()),
        Outcome::Renewed(answer) => Ok((StatusCode::OK, ApiJson(answer)).into_response()),
        Outcome::Pending(waiting) => Ok((StatusCode::ACCEPTED, ApiJson(waiting)).into_response()),
        Outcome::Refused { org_id, error } => {
            Err(refused(&state, &org_id, &req.device_id, error.into()).await)
        }
    }
}

/// An enrollment its TPM checks refused (policy, pre-authorisation, the
/// vendor CAs): the reason goes to the device, the log and the audit log.
async fn refused(state: &AppState, org_id: &str, device_id: &str, e: Error) -> Error {
    let reason = e.summary();
    tracing::warn!(device = %device_id, %reason, "enrollment refused");
    let appended = audit::coalesce::append(
        &state.store,
        &state.audit_coalescer,
        audit::Entry {
            org_id,
            actor: &format!("device:{device_id}"),
            action: "device.enroll",
            target: &format!("device:{device_id}"),
            result: &format!("error: {reason}"),
            detail: serde_json::json!({}),
        },
    )
    .await;
    if let Err(a) = appended {
        tracing::error!(error = %format!("{a:#}"), "unable to record the refused enrollment in the audit log");
    }
    e
}

/// Poll for desired state: 200 with the release to install, 204 when there
/// is nothing to do. A device bound to a TPM whose attestation is missing,
/// old or for another version also gets a fresh quote nonce in the
/// `Kernex-Attestation-Nonce` header, to answer at `POST /device/attestation`.
/// A device a rollout acts on (waiting in a reached wave, holding a
/// download window, committed: a rollback may come) gets
/// `Kernex-Poll-After` (`rollout-poll-secs`) on 200 and 204.
#[utoipa::path(get, path = "/api/v1/device/poll", responses(
    (status = 200, body = DesiredState, headers(("kernex-attestation-nonce" = String, description = "hex nonce to quote"),
        ("kernex-poll-after" = u64, description = "poll again after this many seconds"))),
    (status = 204, headers(("kernex-attestation-nonce" = String, description = "hex nonce to quote"),
        ("kernex-poll-after" = u64, description = "poll again after this many seconds"))),
    (status = 401),
    (status = 403, description = "the device must complete TPM credential activation first")))]
pub async fn poll(
    State(state): State<AppState>,
    polled: crate::http::device_poll::PollAuth,
) -> Result<Response> {
    crate::last_seen::touch(&state, &polled.device.pk).await?;
    let nonce = if polled.tpm {
        poll_nonce(&state, &polled.device).await?
    } else {
        None
    };
    let answer = devices::poll::answer(&state, &polled).await?;
    let mut response = match answer.desired {
        Some(desired) => ApiJson(desired).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    };
    if let Some(nonce) = nonce
        && let Ok(value) = axum::http::HeaderValue::from_str(&nonce)
    {
        response.headers_mut().insert(NONCE_HEADER, value);
    }
    if let Some(secs) = answer.poll_after_secs {
        response
            .headers_mut()
            .insert(POLL_AFTER_HEADER, axum::http::HeaderValue::from(secs));
    }
    Ok(response)
}

/// Heartbeat with inventory.
#[utoipa::path(post, path = "/api/v1/device/heartbeat", request_body = Heartbeat,
    responses((status = 204), (status = 400), (status = 401),
        (status = 403, description = "the device must complete TPM credential activation first")))]
pub async fn heartbeat(
    State(state): State<AppState>,
    device: Device,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<StatusCode> {
    devices::telemetry::heartbeat(&state, &device, &hb).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Report progress or outcome of an install.
#[utoipa::path(post, path = "/api/v1/device/report", request_body = Report,
    responses((status = 204), (status = 400), (status = 401),
        (status = 403, description = "the device must complete TPM credential activation first")))]
pub async fn report(
    State(state): State<AppState>,
    device: Device,
    ApiJson(r): ApiJson<Report>,
) -> Result<StatusCode> {
    devices::report::record(&state, &device, &r).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Upload a batch of log lines.
#[utoipa::path(post, path = "/api/v1/device/logs", request_body = LogBatch,
    responses((status = 204), (status = 400), (status = 401),
        (status = 403, description = "the device must complete TPM credential activation first"),
        (status = 413, description = "the batch alone is over device-log-max-lines or device-log-max-bytes; a full log drops its oldest lines instead")))]
pub async fn logs(
    State(state): State<AppState>,
    device: Device,
    ApiJson(batch): ApiJson<LogBatch>,
) -> Result<StatusCode> {
    devices::telemetry::logs(&state, &device, &batch).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download the bundle of a release assigned to the device (its current
/// deployment, or a rollout that selected it), with `Range`; any other
/// release is 404, as one that does not exist.
#[utoipa::path(get, path = "/api/v1/device/releases/{id}/bundle",
    responses((status = 200), (status = 206), (status = 401),
        (status = 403, description = "the device must complete TPM credential activation first"),
        (status = 404), (status = 416)))]
pub async fn download(
    State(state): State<AppState>,
    device: Device,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    devices::download::check(&state, &device, &id).await?;
    let response =
        crate::http::releases::serve_bundle(&state, &device.org_id, &id, &headers).await?;
    if response.status().is_success()
        && let Some(n) = response
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    {
        state.egress.add(&device.org_id, state.clock.now_ms(), n);
    }
    Ok(response)
}

/// Download a patch the server made for installing a release assigned to
/// the device (the delta planner's `patches` in a poll answer), with
/// `Range`.
#[utoipa::path(get, path = "/api/v1/device/releases/{id}/patches/{patch}",
    responses((status = 200), (status = 206), (status = 401), (status = 404), (status = 416)))]
pub async fn download_patch(
    State(state): State<AppState>,
    device: Device,
    Path((id, patch)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    devices::download::check(&state, &device, &id).await?;
    let (key, size, sha256) =
        crate::service::patches::blob(&state, &device.org_id, &id, &patch).await?;
    let response = crate::http::releases::serve_blob(&state, &key, size, &sha256, &headers).await?;
    if response.status().is_success()
        && let Some(n) = response
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    {
        state.egress.add(&device.org_id, state.clock.now_ms(), n);
    }
    Ok(response)
}
