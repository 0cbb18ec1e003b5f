//! Rollouts (`/api/v1/rollouts`): create (draft), preview, start, pause,
//! resume, abort, roll back, list and detail with per-wave and per-device
//! state; a device's link class, site and time zone
//! (`PUT /devices/{id}/link`); the egress the HTTP layer counted; and, only
//! with `test-clock = true`, the clock the simulator steps.

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::{Operator, Role};
use crate::http::{ApiJson, Error, Result, audited};
use crate::service::rollouts::plan::{Assumptions, Target, project};
use crate::service::rollouts::spec::{RolloutSpec, check_label};
use crate::service::rollouts::{self, ReleaseRef, scheduler, time::time_zone};
use crate::store::new_id;
use kernex_protocol::api::DownloadWindow;

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
        .route("/devices/{id}/link", put(set_link))
        .route("/test/clock", get(get_clock).post(set_clock))
}

/// Devices and bytes of one link class.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ClassPreview {
    /// Devices.
    pub devices: u64,
    /// Bytes they download in total.
    pub bytes: u64,
    /// Cost of those bytes (the class's cost per GB).
    pub cost: f64,
    /// The largest single device's bytes.
    pub max_device_bytes: u64,
}

/// One wave of a preview.
#[derive(Debug, Serialize, ToSchema)]
pub struct WavePreview {
    /// 1-based.
    pub wave: u64,
    /// Devices in it.
    pub devices: u64,
    /// Bytes they download.
    pub bytes: u64,
    /// Metered cost.
    pub cost: f64,
    /// Per link class.
    pub link_classes: BTreeMap<String, ClassPreview>,
    /// Projected first download (unix ms).
    pub projected_start_ms: i64,
    /// Projected last device installed (unix ms).
    pub projected_end_ms: i64,
    /// Projected promotion, after the soak (unix ms).
    pub projected_promote_ms: i64,
    /// The wave requires attestation (committed and attested).
    pub requires_attestation: bool,
    /// Devices without a TPM the diversity order put in this wave while it
    /// requires attestation: they cannot be attested, so they moved to a
    /// later wave without the gate or were left out (see `warnings`).
    pub cannot_attest: u64,
}

/// One device of a preview.
#[derive(Debug, Serialize, ToSchema)]
pub struct DevicePreview {
    /// Internal id.
    pub id: String,
    /// The device's own id.
    pub device_id: String,
    /// 1-based wave.
    pub wave: u64,
    /// Link class.
    pub link_class: String,
    /// Site tag.
    pub site: Option<String>,
    /// Time zone.
    pub time_zone: Option<String>,
    /// Version it runs.
    pub from_version: Option<String>,
    /// Exact bytes it downloads.
    pub bytes: u64,
    /// Cost of those bytes.
    pub cost: f64,
    /// Projected first window (unix ms); none if it never gets one.
    pub projected_start_ms: Option<i64>,
    /// Projected download end (unix ms).
    pub projected_end_ms: Option<i64>,
    /// Windows it needs (metered budgets split big downloads over days).
    pub windows: u32,
}

/// What a rollout will take, before it starts.
#[derive(Debug, Serialize, ToSchema)]
pub struct Preview {
    /// Release.
    pub release_id: String,
    /// Its version.
    pub version: String,
    /// Devices targeted.
    pub targets: u64,
    /// Devices the selector matched that already run the version.
    pub already_current: u64,
    /// Devices left out because another live rollout holds them.
    pub busy: u64,
    /// Devices left out because they were enrolled under a TPM policy and
    /// have not completed credential activation (served no release).
    pub unactivated: u64,
    /// Devices left out because they have no TPM and every wave they could
    /// go to requires attestation.
    pub no_tpm_left_out: u64,
    /// What the operator should know before starting, in words.
    pub warnings: Vec<String>,
    /// Bytes all targets download.
    pub total_bytes: u64,
    /// Cost of metered bytes.
    pub metered_cost: f64,
    /// Fleet egress cap.
    pub egress_cap_bytes_per_sec: u64,
    /// Highest projected reserved egress (never above the cap).
    pub peak_reserved_bytes_per_sec: u64,
    /// Most downloads at once.
    pub peak_concurrent: u64,
    /// Targets that never get a window (e.g. no maintenance window opens).
    pub unschedulable: u64,
    /// Projected start (unix ms).
    pub projected_start_ms: i64,
    /// Projected end of the last wave (unix ms).
    pub projected_end_ms: i64,
    /// Projected duration, seconds (downloads, installs and soaks).
    pub projected_duration_secs: u64,
    /// Per wave.
    pub waves: Vec<WavePreview>,
    /// Per link class.
    pub link_classes: BTreeMap<String, ClassPreview>,
    /// Per device (omitted with `?devices=false`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DevicePreview>>,
}

fn add(c: &mut ClassPreview, bytes: u64, cost: f64) {
    c.devices += 1;
    c.bytes += bytes;
    c.cost += cost;
    c.max_device_bytes = c.max_device_bytes.max(bytes);
}

/// Computes a preview of `spec` for `targets` (in wave order) from `now`.
pub fn build_preview(
    spec: &RolloutSpec,
    release: &ReleaseRef,
    t: &rollouts::Targets,
    now: i64,
    with_devices: bool,
) -> Preview {
    let targets: &[Target] = &t.targets;
    let sizes = t.sizes.clone();
    let start = spec.start_at_ms.unwrap_or(now).max(now);
    let plan = project(spec, targets, &sizes, start, Assumptions::default());
    let mut waves = Vec::new();
    let mut classes: BTreeMap<String, ClassPreview> = BTreeMap::new();
    let mut devices = Vec::new();
    let mut lo = 0usize;
    let mut total = 0u64;
    let mut metered = 0.0;
    // Per link class, looked up once (the policy merges defaults).
    let mut cost_per_gb: HashMap<&str, f64> = HashMap::new();
    for (w, &size) in sizes.iter().enumerate() {
        let mut wp = WavePreview {
            wave: w as u64 + 1,
            devices: size as u64,
            bytes: 0,
            cost: 0.0,
            link_classes: BTreeMap::new(),
            projected_start_ms: plan.waves.get(w).map_or(start, |p| p.start_ms),
            projected_end_ms: plan.waves.get(w).map_or(start, |p| p.end_ms),
            projected_promote_ms: plan.waves.get(w).map_or(start, |p| p.promote_ms),
            requires_attestation: spec
                .waves
                .get(w)
                .is_some_and(|wave| wave.gates.require_attestation),
            cannot_attest: t.cannot_attest.get(w).copied().unwrap_or(0),
        };
        for (i, d) in targets.iter().enumerate().skip(lo).take(size) {
            let per_gb = match cost_per_gb.get(d.link_class.as_str()) {
                Some(c) => *c,
                None => {
                    let c = spec.bandwidth.class(&d.link_class).cost_per_gb;
                    cost_per_gb.insert(&d.link_class, c);
                    c
                }
            };
            let cost = d.bytes as f64 / 1e9 * per_gb;
            wp.bytes += d.bytes;
            wp.cost += cost;
            for per_class in [&mut wp.link_classes, &mut classes] {
                match per_class.get_mut(d.link_class.as_str()) {
                    Some(c) => add(c, d.bytes, cost),
                    None => add(
                        per_class.entry(d.link_class.clone()).or_default(),
                        d.bytes,
                        cost,
                    ),
                }
            }
            if with_devices {
                let p = plan.devices.get(i).copied().unwrap_or_default();
                devices.push(DevicePreview {
                    id: d.pk.clone(),
                    device_id: d.device_id.clone(),
                    wave: w as u64 + 1,
                    link_class: d.link_class.clone(),
                    site: d.site.clone(),
                    time_zone: d.time_zone.clone(),
                    from_version: d.from_version.clone(),
                    bytes: d.bytes,
                    cost,
                    projected_start_ms: p.start_ms,
                    projected_end_ms: p.end_ms,
                    windows: p.windows,
                });
            }
        }
        total += wp.bytes;
        metered += wp.cost;
        waves.push(wp);
        lo += size;
    }
    Preview {
        release_id: release.id.clone(),
        version: release.version.clone(),
        targets: targets.len() as u64,
        already_current: t.already_current,
        busy: t.busy,
        unactivated: t.unactivated,
        no_tpm_left_out: t.no_tpm_left_out,
        warnings: warnings(t),
        total_bytes: total,
        metered_cost: metered,
        egress_cap_bytes_per_sec: spec.bandwidth.egress_cap_bytes_per_sec,
        peak_reserved_bytes_per_sec: plan.peak_reserved_bytes_per_sec,
        peak_concurrent: plan.peak_concurrent,
        unschedulable: plan.unschedulable,
        projected_start_ms: start,
        projected_end_ms: plan.end_ms.max(start),
        projected_duration_secs: u64::try_from((plan.end_ms - start).max(0) / 1000).unwrap_or(0),
        waves,
        link_classes: classes,
        devices: with_devices.then_some(devices),
    }
}

/// The preview's warnings: devices the attestation gate moves or leaves
/// out, devices left out because they have not activated their TPM.
fn warnings(t: &rollouts::Targets) -> Vec<String> {
    let mut out = Vec::new();
    for (w, &n) in t.cannot_attest.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let whither = match t.moved_to.get(w).copied().flatten() {
            Some(to) => format!("they move to wave {}, the next without the gate", to + 1),
            None => "no wave without the gate follows: they are left out of the rollout".into(),
        };
        out.push(format!(
            "wave {} requires attestation: {n} selected device(s) have no TPM and cannot be attested; {whither}",
            w + 1
        ));
    }
    if t.unactivated > 0 {
        out.push(format!(
            "{} device(s) enrolled under a TPM policy have not completed credential activation: left out (they are served no release until they activate)",
            t.unactivated
        ));
    }
    out
}

/// `?devices=false` leaves the per-device list out.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DetailQuery {
    /// Include per-device rows (default true).
    pub devices: Option<bool>,
}

async fn preview_of(
    state: &AppState,
    op: &Operator,
    spec: &RolloutSpec,
    id: Option<&str>,
    with_devices: bool,
) -> Result<Preview> {
    spec.validate()?;
    let release = rollouts::release(state, &op.org_id, &spec.release_id).await?;
    let t = rollouts::targets(state, &op.org_id, spec, &release, id).await?;
    Ok(build_preview(
        spec,
        &release,
        &t,
        state.clock.now_ms(),
        with_devices,
    ))
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
    Ok(ApiJson(
        preview_of(&state, &op, &spec, None, q.devices.unwrap_or(true)).await?,
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
    let (spec, _) = load(&state, &op.org_id, &id).await?;
    Ok(ApiJson(
        preview_of(&state, &op, &spec, Some(&id), q.devices.unwrap_or(true)).await?,
    ))
}

/// A device in a rollout.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolloutDevice {
    /// Internal id.
    pub id: String,
    /// The device's own id.
    pub device_id: String,
    /// 1-based wave.
    pub wave: i64,
    /// pending, scheduled, downloading, installed, rebooting, committed,
    /// reverted, failed, rolling_back, rolled_back, cancelled — or offline
    /// (not seen for offline-after-secs while not done).
    pub state: String,
    /// The stored state behind `offline`.
    pub stored_state: String,
    /// Link class.
    pub link_class: String,
    /// Site.
    pub site: Option<String>,
    /// Version it ran when the rollout started.
    pub from_version: Option<String>,
    /// Exact bytes planned.
    pub delta_bytes: i64,
    /// Bytes downloaded (reported).
    pub bytes_done: i64,
    /// Bytes to download (reported).
    pub bytes_total: Option<i64>,
    /// Current or last download window.
    pub download_window: Option<DownloadWindow>,
    /// Windows granted so far.
    pub windows_given: i64,
    /// Why (reverted, failed).
    pub reason: Option<String>,
    /// Last change (unix ms).
    pub updated_at: i64,
}

/// One wave's progress.
#[derive(Debug, Serialize, ToSchema)]
pub struct WaveState {
    /// 1-based.
    pub wave: i64,
    /// done, current or waiting.
    pub status: String,
    /// Devices.
    pub devices: i64,
    /// Devices per state.
    pub states: BTreeMap<String, i64>,
    /// (failed + reverted) / devices.
    pub error_rate: f64,
    /// committed / devices.
    pub committed_ratio: f64,
}

/// A rollout.
#[derive(Debug, Serialize, ToSchema)]
pub struct Rollout {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Release.
    pub release_id: String,
    /// draft, scheduled, running, paused, completed, aborted, rolled_back.
    pub status: String,
    /// Why it paused, waits or was rolled back.
    pub status_reason: Option<String>,
    /// 1-based current wave (0 before start).
    pub current_wave: i64,
    /// Devices.
    pub devices_total: i64,
    /// Devices per state.
    pub states: BTreeMap<String, i64>,
    /// The spec.
    pub spec: RolloutSpec,
    /// Created (unix ms).
    pub created_at: i64,
    /// Last change (unix ms).
    pub updated_at: i64,
    /// Completed, aborted or rolled back (unix ms).
    pub completed_at: Option<i64>,
    /// Devices the selector matched that the start left out, by reason:
    /// `no_tpm` (no TPM, and every wave they could join requires
    /// attestation), `unactivated` (enrolled under a TPM policy, credential
    /// activation not done). Empty before the start.
    pub left_out: BTreeMap<String, i64>,
    /// Per wave (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<WaveState>>,
    /// Per device (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<RolloutDevice>>,
}

async fn load(
    state: &AppState,
    org_id: &str,
    id: &str,
) -> Result<(RolloutSpec, sqlx::any::AnyRow)> {
    let row = sqlx::query(
        "SELECT id, name, release_id, spec, status, status_reason, current_wave, created_at, updated_at, completed_at, left_out FROM rollouts WHERE id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound("no such rollout"))?;
    let spec: RolloutSpec = serde_json::from_str(&row.try_get::<String, _>("spec")?)
        .map_err(|e| Error::Internal(e.into()))?;
    Ok((spec, row))
}

async fn summary(state: &AppState, spec: RolloutSpec, row: &sqlx::any::AnyRow) -> Result<Rollout> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let mut states = BTreeMap::new();
    let mut total = 0;
    for r in sqlx::query(
        "SELECT state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 GROUP BY state",
    )
    .bind(&id)
    .fetch_all(state.store.pool())
    .await?
    {
        let n: i64 = r.try_get("n")?;
        total += n;
        states.insert(r.try_get("state")?, n);
    }
    let wave: i64 = row.try_get("current_wave")?;
    Ok(Rollout {
        name: row.try_get("name")?,
        release_id: row.try_get("release_id")?,
        current_wave: if status == "draft" {
            0
        } else {
            (wave + 1).min(spec.waves.len() as i64)
        },
        status,
        status_reason: row.try_get("status_reason")?,
        devices_total: total,
        states,
        spec,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        completed_at: row.try_get("completed_at")?,
        left_out: match row.try_get::<Option<String>, _>("left_out")? {
            Some(text) => serde_json::from_str(&text).map_err(|e| Error::Internal(e.into()))?,
            None => BTreeMap::new(),
        },
        waves: None,
        devices: None,
        id,
    })
}

/// Create a rollout (ops): a draft until started.
#[utoipa::path(post, path = "/api/v1/rollouts", request_body = RolloutSpec,
    responses((status = 201, body = Rollout), (status = 400), (status = 403), (status = 404), (status = 422)))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(spec): ApiJson<RolloutSpec>,
) -> Result<(StatusCode, ApiJson<Rollout>)> {
    op.require(Role::Ops)?;
    audited(&state, &op, "rollout.create", &format!("release:{}", spec.release_id), async {
        spec.validate()?;
        let release = rollouts::release(&state, &op.org_id, &spec.release_id).await?;
        if let Some(c) = &spec.selector.hardware_class
            && c != &release.compatible
        {
            return Err(Error::Unprocessable(format!(
                "selector.hardware_class {c} does not match the release's {}",
                release.compatible
            )));
        }
        let id = new_id()?;
        let now = state.clock.now_ms();
        let text = serde_json::to_string(&spec).map_err(|e| Error::Internal(e.into()))?;
        sqlx::query(
            "INSERT INTO rollouts (id, org_id, name, release_id, spec, status, start_at, created_by, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'draft', $6, $7, $8, $8)",
        )
        .bind(&id)
        .bind(&op.org_id)
        .bind(&spec.name)
        .bind(&spec.release_id)
        .bind(&text)
        .bind(spec.start_at_ms)
        .bind(&op.user_id)
        .bind(now)
        .execute(state.store.pool())
        .await?;
        let (spec, row) = load(&state, &op.org_id, &id).await?;
        let r = summary(&state, spec, &row).await?;
        Ok(((StatusCode::CREATED, ApiJson(r)), format!("rollout:{id}")))
    })
    .await
}

/// List rollouts, newest first.
#[utoipa::path(get, path = "/api/v1/rollouts", responses((status = 200, body = [Rollout])))]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Vec<Rollout>>> {
    let rows = sqlx::query(
        "SELECT id, name, release_id, spec, status, status_reason, current_wave, created_at, updated_at, completed_at, left_out FROM rollouts WHERE org_id = $1 ORDER BY created_at DESC LIMIT 500",
    )
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let spec: RolloutSpec = serde_json::from_str(&row.try_get::<String, _>("spec")?)
            .map_err(|e| Error::Internal(e.into()))?;
        out.push(summary(&state, spec, &row).await?);
    }
    Ok(ApiJson(out))
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
    let (spec, row) = load(&state, &op.org_id, &id).await?;
    let n_waves = spec.waves.len();
    let mut r = summary(&state, spec, &row).await?;
    state.last_seen.flush(&state.store).await?;
    let now = state.clock.now_ms();
    let offline_before = now
        - i64::try_from(state.config.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let rows = sqlx::query(
        "SELECT rd.device_pk, d.device_id, d.last_seen_at, rd.wave, rd.state, rd.link_class, rd.site, rd.from_version, rd.delta_bytes, rd.bytes_done, rd.bytes_total, rd.window_start, rd.window_end, rd.windows_given, rd.reason, rd.updated_at \
         FROM rollout_devices rd JOIN devices d ON d.id = rd.device_pk WHERE rd.rollout_id = $1 ORDER BY rd.wave, rd.position",
    )
    .bind(&id)
    .fetch_all(state.store.pool())
    .await?;
    let mut waves: Vec<WaveState> = (0..n_waves)
        .map(|w| WaveState {
            wave: w as i64 + 1,
            status: if r.status == "draft" || (w as i64 + 1) > r.current_wave {
                "waiting".into()
            } else if (w as i64 + 1) < r.current_wave || r.status == "completed" {
                "done".into()
            } else {
                "current".into()
            },
            devices: 0,
            states: BTreeMap::new(),
            error_rate: 0.0,
            committed_ratio: 0.0,
        })
        .collect();
    let mut devices = Vec::new();
    for d in rows {
        let stored: String = d.try_get("state")?;
        let seen: Option<i64> = d.try_get("last_seen_at")?;
        let done = matches!(
            stored.as_str(),
            "committed" | "reverted" | "failed" | "rolled_back" | "cancelled"
        );
        let shown = if !done && seen.is_none_or(|t| t < offline_before) {
            "offline".to_string()
        } else {
            stored.clone()
        };
        let wave: i64 = d.try_get("wave")?;
        if let Some(w) = usize::try_from(wave).ok().and_then(|w| waves.get_mut(w)) {
            w.devices += 1;
            *w.states.entry(shown.clone()).or_default() += 1;
        }
        if q.devices.unwrap_or(true) {
            let window = match (
                d.try_get::<Option<i64>, _>("window_start")?,
                d.try_get::<Option<i64>, _>("window_end")?,
            ) {
                (Some(not_before_ms), Some(not_after_ms)) => Some(DownloadWindow {
                    not_before_ms,
                    not_after_ms,
                }),
                _ => None,
            };
            devices.push(RolloutDevice {
                id: d.try_get("device_pk")?,
                device_id: d.try_get("device_id")?,
                wave: wave + 1,
                state: shown,
                stored_state: stored,
                link_class: d.try_get("link_class")?,
                site: d.try_get("site")?,
                from_version: d.try_get("from_version")?,
                delta_bytes: d.try_get("delta_bytes")?,
                bytes_done: d.try_get("bytes_done")?,
                bytes_total: d.try_get("bytes_total")?,
                download_window: window,
                windows_given: d.try_get("windows_given")?,
                reason: d.try_get("reason")?,
                updated_at: d.try_get("updated_at")?,
            });
        }
    }
    for w in &mut waves {
        if w.devices > 0 {
            let errors = w.states.get("failed").copied().unwrap_or(0)
                + w.states.get("reverted").copied().unwrap_or(0);
            w.error_rate = errors as f64 / w.devices as f64;
            w.committed_ratio =
                w.states.get("committed").copied().unwrap_or(0) as f64 / w.devices as f64;
        }
    }
    r.waves = Some(waves);
    r.devices = q.devices.unwrap_or(true).then_some(devices);
    Ok(ApiJson(r))
}

/// One scheduler sample: the server's own egress accounting.
#[derive(Debug, Serialize, ToSchema)]
pub struct Sample {
    /// When (unix ms, server clock).
    pub at: i64,
    /// Sum of the rates reserved by devices holding windows.
    pub reserved_bytes_per_sec: i64,
    /// Devices holding windows.
    pub active: i64,
    /// Devices per state.
    pub states: BTreeMap<String, i64>,
}

/// The scheduler's samples of a rollout, oldest first.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/samples", responses((status = 200, body = [Sample]), (status = 404)))]
pub async fn samples(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Vec<Sample>>> {
    load(&state, &op.org_id, &id).await?;
    let rows = sqlx::query(
        "SELECT at, reserved_bytes_per_sec, active, states FROM rollout_samples WHERE rollout_id = $1 ORDER BY at",
    )
    .bind(&id)
    .fetch_all(state.store.pool())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(Sample {
            at: r.try_get("at")?,
            reserved_bytes_per_sec: r.try_get("reserved_bytes_per_sec")?,
            active: r.try_get("active")?,
            states: serde_json::from_str(&r.try_get::<String, _>("states")?)
                .map_err(|e| Error::Internal(e.into()))?,
        });
    }
    Ok(ApiJson(out))
}

/// `?since_ms=` for the egress counter.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EgressQuery {
    /// From this time (unix ms, server clock); default: everything kept.
    pub since_ms: Option<i64>,
}

/// Bundle bytes served per second.
#[derive(Debug, Serialize, ToSchema)]
pub struct Egress {
    /// `[second (unix), bytes]`, seconds with traffic only.
    pub seconds: Vec<(i64, u64)>,
    /// The busiest second's bytes.
    pub peak_bytes_per_sec: u64,
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
    let seconds = state
        .egress
        .since(&op.org_id, q.since_ms.unwrap_or(i64::MIN).div_euclid(1000));
    let peak = seconds.iter().map(|(_, b)| *b).max().unwrap_or(0);
    Ok(ApiJson(Egress {
        seconds,
        peak_bytes_per_sec: peak,
    }))
}

/// A state change an operator asks for.
enum Change {
    Start(Option<crate::service::Result<rollouts::Targets>>),
    Pause,
    Resume,
    Abort,
    Rollback,
}

fn refuse(action: &str, status: &str) -> Error {
    Error::Conflict(format!("cannot {action} a rollout that is {status}"))
}

async fn apply(
    tx: &mut scheduler::Tx,
    op: &Operator,
    id: &str,
    spec: &RolloutSpec,
    status: &str,
    now: i64,
    change: Change,
) -> Result<()> {
    match change {
        Change::Start(prepared) => {
            if status != "draft" {
                return Err(refuse("start", status));
            }
            let t = prepared.ok_or_else(|| refuse("start", status))??;
            if t.targets.is_empty() {
                return Err(Error::Unprocessable(format!(
                    "the selector matches no device that needs this release ({} already run it, {} are in another rollout, {} have not activated their TPM, {} have no TPM and every wave requires attestation)",
                    t.already_current, t.busy, t.unactivated, t.no_tpm_left_out
                )));
            }
            let sizes = t.sizes.clone();
            let mut left_out = BTreeMap::new();
            if t.no_tpm_left_out > 0 {
                left_out.insert("no_tpm", t.no_tpm_left_out);
            }
            if t.unactivated > 0 {
                left_out.insert("unactivated", t.unactivated);
            }
            if !left_out.is_empty() {
                sqlx::query("UPDATE rollouts SET left_out = $1 WHERE id = $2")
                    .bind(serde_json::to_string(&left_out).map_err(|e| Error::Internal(e.into()))?)
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
            }
            let mut position = 0usize;
            for (wave, size) in sizes.iter().enumerate() {
                for d in t.targets.iter().skip(position).take(*size) {
                    sqlx::query(
                        "INSERT INTO rollout_devices (rollout_id, device_pk, org_id, wave, position, state, from_release_id, from_version, link_class, site, delta_bytes, rate, active, bytes_done, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9, $10, $11, 0, 0, $12)",
                    )
                    .bind(id)
                    .bind(&d.pk)
                    .bind(&op.org_id)
                    .bind(wave as i64)
                    .bind(position as i64)
                    .bind(&d.from_release_id)
                    .bind(&d.from_version)
                    .bind(&d.link_class)
                    .bind(&d.site)
                    .bind(i64::try_from(d.bytes).map_err(|e| Error::Internal(e.into()))?)
                    .bind(
                        i64::try_from(spec.bandwidth.rate(&d.link_class))
                            .map_err(|e| Error::Internal(e.into()))?,
                    )
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                    position += 1;
                }
            }
            let future = spec.start_at_ms.is_some_and(|t| t > now);
            sqlx::query(
                "UPDATE rollouts SET status = $1, current_wave = 0, wave_started_at = $2, updated_at = $2 WHERE id = $3",
            )
            .bind(if future { "scheduled" } else { "running" })
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        }
        Change::Pause => {
            if status != "running" && status != "scheduled" {
                return Err(refuse("pause", status));
            }
            scheduler::set_status(tx, id, "paused", Some("paused by the operator"), now).await?;
            scheduler::unschedule(tx, id, now).await?;
        }
        Change::Resume => {
            if status != "paused" {
                return Err(refuse("resume", status));
            }
            sqlx::query(
                "UPDATE rollouts SET status = 'running', status_reason = NULL, gate_accepted = 1, updated_at = $1 WHERE id = $2",
            )
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        }
        Change::Abort => {
            if !matches!(status, "draft" | "scheduled" | "running" | "paused") {
                return Err(refuse("abort", status));
            }
            scheduler::set_status(tx, id, "aborted", Some("aborted by the operator"), now).await?;
            scheduler::cancel_unstarted(tx, id, now).await?;
        }
        Change::Rollback => {
            if !matches!(
                status,
                "scheduled" | "running" | "paused" | "completed" | "aborted"
            ) {
                return Err(refuse("roll back", status));
            }
            scheduler::roll_back(tx, id, now, "rolled back by the operator").await?;
        }
    }
    Ok(())
}

async fn transition(
    state: &AppState,
    op: &Operator,
    id: &str,
    action: &str,
    change: Change,
) -> Result<ApiJson<Rollout>> {
    op.require(Role::Ops)?;
    audited(state, op, action, &format!("rollout:{id}"), async {
        let (spec, row) = load(state, &op.org_id, id).await?;
        let status: String = row.try_get("status")?;
        let now = state.clock.now_ms();
        let mut tx = state.store.begin_write().await?;
        // Re-read under the write lock.
        let current: String = sqlx::query("SELECT status FROM rollouts WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("status")?;
        if current != status {
            return Err(Error::Conflict(
                "the rollout changed meanwhile; retry".into(),
            ));
        }
        apply(&mut tx, op, id, &spec, &status, now, change).await?;
        tx.commit().await?;
        let (spec, row) = load(state, &op.org_id, id).await?;
        Ok((ApiJson(summary(state, spec, &row).await?), String::new()))
    })
    .await
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
    op.require(Role::Ops)?;
    // Targets and deltas are read before the write transaction.
    let (spec, row) = load(&state, &op.org_id, &id).await?;
    let status: String = row.try_get("status")?;
    let prepared = if status == "draft" {
        let release = rollouts::release(&state, &op.org_id, &spec.release_id).await?;
        Some(rollouts::targets(&state, &op.org_id, &spec, &release, Some(&id)).await)
    } else {
        None
    };
    transition(&state, &op, &id, "rollout.start", Change::Start(prepared)).await
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
    transition(&state, &op, &id, "rollout.pause", Change::Pause).await
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
    transition(&state, &op, &id, "rollout.resume", Change::Resume).await
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
    transition(&state, &op, &id, "rollout.abort", Change::Abort).await
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
    transition(&state, &op, &id, "rollout.rollback", Change::Rollback).await
}

/// A device's link class, site and time zone.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceLink {
    /// e.g. ethernet, wifi, metered-4g (null: ethernet).
    pub link_class: Option<String>,
    /// Site or cell tag: devices sharing one are spread over time.
    pub site: Option<String>,
    /// IANA time zone, e.g. Europe/Berlin (null: UTC).
    pub time_zone: Option<String>,
}

/// Checks link fields; the error names the field.
pub fn check_link(link: &DeviceLink) -> Result<()> {
    if let Some(c) = &link.link_class {
        check_label("link_class", c)?;
    }
    if let Some(s) = &link.site {
        check_label("site", s)?;
    }
    if let Some(tz) = &link.time_zone
        && time_zone(tz).is_none()
    {
        return Err(Error::BadRequest(format!(
            "time_zone {tz:?}: not an IANA time zone (e.g. Europe/Berlin)"
        )));
    }
    Ok(())
}

/// Set a device's link class, site and time zone (ops).
#[utoipa::path(put, path = "/api/v1/devices/{id}/link", request_body = DeviceLink,
    responses((status = 200, body = DeviceLink), (status = 400), (status = 403), (status = 404)))]
pub async fn set_link(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    ApiJson(link): ApiJson<DeviceLink>,
) -> Result<ApiJson<DeviceLink>> {
    op.require(Role::Ops)?;
    audited(&state, &op, "device.link", &format!("device:{id}"), async {
        check_link(&link)?;
        let done = sqlx::query(
            "UPDATE devices SET link_class = $1, site = $2, time_zone = $3 WHERE id = $4 AND org_id = $5",
        )
        .bind(&link.link_class)
        .bind(&link.site)
        .bind(&link.time_zone)
        .bind(&id)
        .bind(&op.org_id)
        .execute(state.store.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("no such device"));
        }
        Ok((ApiJson(link), String::new()))
    })
    .await
}

/// Set or advance the test clock.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClockRequest {
    /// Set the clock to this (unix ms).
    pub set_ms: Option<i64>,
    /// Or move it forward by this many ms.
    pub advance_ms: Option<i64>,
    /// Then run one scheduler pass (default true).
    pub tick: Option<bool>,
}

/// The test clock.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClockState {
    /// Now (unix ms).
    pub now_ms: i64,
    /// Whether this call ran a scheduler pass that held the lease.
    pub scheduler_ran: bool,
}

fn test_clock(state: &AppState, op: &Operator) -> Result<()> {
    if !state.config.test_clock {
        return Err(Error::NotFound("no such endpoint"));
    }
    op.require(Role::Admin)
}

/// The server clock (only with `test-clock = true`).
#[utoipa::path(get, path = "/api/v1/test/clock", responses((status = 200, body = ClockState), (status = 404)))]
pub async fn get_clock(State(state): State<AppState>, op: Operator) -> Result<ApiJson<ClockState>> {
    test_clock(&state, &op)?;
    Ok(ApiJson(ClockState {
        now_ms: state.clock.now_ms(),
        scheduler_ran: false,
    }))
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
    test_clock(&state, &op)?;
    let now = state.clock.now_ms();
    let target = match (req.set_ms, req.advance_ms) {
        (Some(t), None) => t,
        (None, Some(d)) if d >= 0 => now.saturating_add(d),
        (None, None) => now,
        _ => {
            return Err(Error::BadRequest(
                "give set_ms or a non-negative advance_ms, not both".into(),
            ));
        }
    };
    if target < now {
        return Err(Error::BadRequest(format!(
            "the clock only moves forward (now {now}, asked {target})"
        )));
    }
    if !state.clock.set_ms(target) {
        return Err(Error::Conflict("this server's clock cannot be set".into()));
    }
    let ran = if req.tick.unwrap_or(true) {
        scheduler::tick(&state).await?
    } else {
        false
    };
    Ok(ApiJson(ClockState {
        now_ms: target,
        scheduler_ran: ran,
    }))
}
