//! Rollouts (`/api/v1/rollouts`): create (draft), preview, start, pause,
//! resume, abort, roll back, list and detail with per-wave and per-device
//! state; a device's link class, site and time zone
//! (`PUT /devices/{id}/link`); the egress the HTTP layer counted; and, only
//! with `test-clock = true`, the clock the simulator steps. The domain is
//! in `service::rollouts`.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::AppState;
use crate::auth::Operator;
use crate::http::{ApiJson, Result};
pub use crate::service::rollouts::link::{DeviceLink, LinkView, check_link};
pub use crate::service::rollouts::preview::Preview;
pub use crate::service::rollouts::progress::{Egress, Rollout, Sample};
use crate::service::rollouts::spec::RolloutSpec;
pub use crate::service::rollouts::test_clock::{ClockRequest, ClockState};
use crate::service::rollouts::transitions::{self, Action};
use crate::service::rollouts::{link, preview as previews, progress, test_clock};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/rollouts", get(list).post(create))
        .route("/rollouts/preview", post(preview_spec))
        .route("/rollouts/egress", get(egress))
        .route("/rollouts/{id}", get(detail))
        .route("/rollouts/{id}/preview", get(preview))
        .route("/rollouts/{id}/samples", get(samples))
        .route("/rollouts/{id}/start", post(start))
        .route("/rollouts/{id}/pause", post(pause))
        .route("/rollouts/{id}/resume", post(resume))
        .route("/rollouts/{id}/abort", post(abort))
        .route("/rollouts/{id}/rollback", post(rollback))
        .route("/devices/{id}/link", put(set_link).get(get_link))
        .route("/devices/{id}/link/accept", post(accept_link))
        .route("/test/clock", get(get_clock).post(set_clock))
}

/// `?devices=false` leaves the per-device list out.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DetailQuery {
    /// Include per-device rows (default true).
    pub devices: Option<bool>,
}

/// Preview a rollout spec without saving it.
#[utoipa::path(post, path = "/api/v1/rollouts/preview", request_body = RolloutSpec, params(DetailQuery),
    responses((status = 200, body = Preview), (status = 400), (status = 404), (status = 422)))]
pub async fn preview_spec(
    State(state): State<AppState>,
    op: Operator,
    query: std::result::Result<Query<DetailQuery>, QueryRejection>,
    ApiJson(spec): ApiJson<RolloutSpec>,
) -> Result<ApiJson<Preview>> {
    let Query(q) = query?;
    let with_devices = q.devices.unwrap_or(true);
    Ok(ApiJson(
        previews::preview(&state, &op, &spec, None, with_devices).await?,
    ))
}

/// Preview a saved rollout: per device the exact bytes from the two
/// releases' chunk indexes, per wave and link class, metered cost and the
/// projected duration under the caps and windows.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/preview", params(DetailQuery),
    responses((status = 200, body = Preview), (status = 404)))]
pub async fn preview(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    query: std::result::Result<Query<DetailQuery>, QueryRejection>,
) -> Result<ApiJson<Preview>> {
    let Query(q) = query?;
    let with_devices = q.devices.unwrap_or(true);
    Ok(ApiJson(
        previews::preview_saved(&state, &op, &id, with_devices).await?,
    ))
}

/// Create a rollout (ops): a draft until started.
#[utoipa::path(post, path = "/api/v1/rollouts", request_body = RolloutSpec,
    responses((status = 201, body = Rollout), (status = 400), (status = 403), (status = 404), (status = 422)))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(spec): ApiJson<RolloutSpec>,
) -> Result<(StatusCode, ApiJson<Rollout>)> {
    let r = transitions::create(&state, &op, spec).await?;
    Ok((StatusCode::CREATED, ApiJson(r)))
}

/// List rollouts, newest first.
#[utoipa::path(get, path = "/api/v1/rollouts", responses((status = 200, body = [Rollout])))]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Vec<Rollout>>> {
    Ok(ApiJson(progress::list(&state, &op).await?))
}

/// A rollout with per-wave and per-device state.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}", params(DetailQuery),
    responses((status = 200, body = Rollout), (status = 404)))]
pub async fn detail(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    query: std::result::Result<Query<DetailQuery>, QueryRejection>,
) -> Result<ApiJson<Rollout>> {
    let Query(q) = query?;
    let with_devices = q.devices.unwrap_or(true);
    Ok(ApiJson(
        progress::detail(&state, &op, &id, with_devices).await?,
    ))
}

/// The scheduler's samples of a rollout, oldest first.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/samples", responses((status = 200, body = [Sample]), (status = 404)))]
pub async fn samples(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Vec<Sample>>> {
    Ok(ApiJson(progress::samples(&state, &op, &id).await?))
}

/// `?since_ms=` for the egress counter.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EgressQuery {
    /// From this time (unix ms, server clock); default: everything kept.
    pub since_ms: Option<i64>,
}

/// Bundle bytes the HTTP layer served to the organisation's devices, per
/// second of the server clock.
#[utoipa::path(get, path = "/api/v1/rollouts/egress", params(EgressQuery), responses((status = 200, body = Egress)))]
pub async fn egress(
    State(state): State<AppState>,
    op: Operator,
    query: std::result::Result<Query<EgressQuery>, QueryRejection>,
) -> Result<ApiJson<Egress>> {
    let Query(q) = query?;
    Ok(ApiJson(progress::egress(&state, &op, q.since_ms)))
}

async fn act(
    state: &AppState,
    op: &Operator,
    id: &str,
    action: Action,
) -> Result<ApiJson<Rollout>> {
    Ok(ApiJson(transitions::act(state, op, id, action).await?))
}

/// Start a draft (ops): selects the devices now, splits them into waves
/// (diversity first) and hands them to the scheduler; `scheduled` until
/// `start_at_ms`.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/start",
    responses((status = 200, body = Rollout), (status = 403), (status = 404), (status = 409), (status = 422)))]
pub async fn start(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Rollout>> {
    act(&state, &op, &id, Action::Start).await
}

/// Pause (ops): no new download windows, granted ones not yet started are
/// taken back; devices already downloading or installing finish.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/pause",
    responses((status = 200, body = Rollout), (status = 403), (status = 404), (status = 409)))]
pub async fn pause(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Rollout>> {
    act(&state, &op, &id, Action::Pause).await
}

/// Resume (ops). Resuming a rollout that a gate paused accepts the current
/// wave's error rate: it promotes after its soak.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/resume",
    responses((status = 200, body = Rollout), (status = 403), (status = 404), (status = 409)))]
pub async fn resume(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Rollout>> {
    act(&state, &op, &id, Action::Resume).await
}

/// Abort (ops): devices that have not installed are cancelled; devices
/// already on the release stay on it (roll back for that).
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/abort",
    responses((status = 200, body = Rollout), (status = 403), (status = 404), (status = 409)))]
pub async fn abort(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Rollout>> {
    act(&state, &op, &id, Action::Abort).await
}

/// Roll back (ops): devices that committed the release get
/// `action: rollback` on their next poll (a boot-order flip to their other
/// slot, no download); devices not yet installing are cancelled.
#[utoipa::path(post, path = "/api/v1/rollouts/{id}/rollback",
    responses((status = 200, body = Rollout), (status = 403), (status = 404), (status = 409)))]
pub async fn rollback(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Rollout>> {
    act(&state, &op, &id, Action::Rollback).await
}

/// Set a device's link class, site and time zone (ops).
#[utoipa::path(put, path = "/api/v1/devices/{id}/link", request_body = DeviceLink,
    responses((status = 200, body = DeviceLink), (status = 400), (status = 403), (status = 404)))]
pub async fn set_link(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<DeviceLink>,
) -> Result<ApiJson<DeviceLink>> {
    Ok(ApiJson(link::set_link(&state, &op, &id, req).await?))
}

/// A device's link class, site and time zone, and what the device itself
/// claims (a hint, until an operator accepts it).
#[utoipa::path(get, path = "/api/v1/devices/{id}/link",
    responses((status = 200, body = LinkView), (status = 404)))]
pub async fn get_link(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<LinkView>> {
    Ok(ApiJson(link::link_view(&state, &op, &id).await?))
}

/// Accept what the device claims as its link class, site and time zone
/// (ops); 409 when it claimed nothing.
#[utoipa::path(post, path = "/api/v1/devices/{id}/link/accept",
    responses((status = 200, body = DeviceLink), (status = 403), (status = 404), (status = 409)))]
pub async fn accept_link(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<DeviceLink>> {
    Ok(ApiJson(link::accept_hint(&state, &op, &id).await?))
}

/// The server clock (only with `test-clock = true`).
#[utoipa::path(get, path = "/api/v1/test/clock", responses((status = 200, body = ClockState), (status = 404)))]
pub async fn get_clock(State(state): State<AppState>, op: Operator) -> Result<ApiJson<ClockState>> {
    Ok(ApiJson(test_clock::get(&state, &op)?))
}

/// Step the server clock and run a scheduler pass (admin, only with
/// `test-clock = true`; never enabled by default). The clock only moves
/// forward.
#[utoipa::path(post, path = "/api/v1/test/clock", request_body = ClockRequest,
    responses((status = 200, body = ClockState), (status = 400), (status = 404)))]
pub async fn set_clock(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<ClockRequest>,
) -> Result<ApiJson<ClockState>> {
    Ok(ApiJson(test_clock::set(&state, &op, req).await?))
}
