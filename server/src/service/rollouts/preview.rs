//! What a rollout will take before it starts: per device the exact bytes
//! from the two releases' chunk indexes, per wave and link class, metered
//! cost and the projected duration under the caps and windows.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use utoipa::ToSchema;

use super::plan::{Assumptions, Target, project};
use super::spec::RolloutSpec;
use super::{ReleaseRef, Targets};
use crate::AppState;
use crate::auth::Operator;
use crate::service::Result;

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
    /// How (the delta planner's choice: `full`, `chunk-delta`,
    /// `bundle-patch`, `server-patch`).
    pub method: crate::service::patches::Method,
    /// The server is still building a patch for it: `bytes` is the chunk
    /// delta until then, and the device does not start before.
    pub patch_building: bool,
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
    /// Targets whose server-made patch is still being built: their bytes
    /// are the chunk delta until it is (preview again), and they do not
    /// start before.
    pub patches_building: u64,
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
    t: &Targets,
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
    let plan_of = |d: &Target| {
        t.plans
            .get(&d.from_release_id)
            .copied()
            .unwrap_or(crate::service::patches::Plan {
                method: if d.from_release_id.is_some() {
                    crate::service::patches::Method::ChunkDelta
                } else {
                    crate::service::patches::Method::Full
                },
                bytes: d.bytes,
                building: false,
            })
    };
    let patches_building = targets.iter().filter(|d| plan_of(d).building).count() as u64;
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
                    method: plan_of(d).method,
                    patch_building: plan_of(d).building,
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
        warnings: {
            let mut w = warnings(t);
            w.extend(budget_warnings(spec, targets));
            w
        },
        patches_building,
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
fn warnings(t: &Targets) -> Vec<String> {
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
    if !t.above_floor.is_empty() {
        out.push(
            crate::service::anti_rollback::refusal(
                "start this rollout",
                &t.above_floor,
                t.above_floor.len(),
            )
            .to_string(),
        );
    }
    out
}

/// Devices whose download is larger than their link class's daily
/// budget: they take more than one UTC day, waiting between days with
/// nothing to show for it, which the operator should know before starting.
fn budget_warnings(spec: &RolloutSpec, targets: &[Target]) -> Vec<String> {
    // class -> (devices over budget, largest number of days, budget)
    let mut over: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    let mut budgets: HashMap<&str, Option<u64>> = HashMap::new();
    for d in targets {
        let budget = *budgets.entry(d.link_class.as_str()).or_insert_with(|| {
            spec.bandwidth
                .class(&d.link_class)
                .budget_bytes_per_day
                .filter(|b| *b > 0)
        });
        let Some(budget) = budget else {
            continue;
        };
        if d.bytes > budget {
            let days = d.bytes.div_ceil(budget);
            let e = over.entry(d.link_class.as_str()).or_insert((0, 0, budget));
            e.0 += 1;
            e.1 = e.1.max(days);
        }
    }
    over.into_iter()
        .map(|(class, (n, days, budget))| {
            format!(
                "{n} {class} device(s) need more than one day of their daily budget ({budget} bytes per device and day): up to {days} UTC days each, downloading part of the release per day"
            )
        })
        .collect()
}

/// Previews `spec` (of the saved rollout `id`, whose devices do not count
/// as busy) for the organisation's fleet now.
pub async fn preview(
    state: &AppState,
    op: &Operator,
    spec: &RolloutSpec,
    id: Option<&str>,
    with_devices: bool,
) -> Result<Preview> {
    // Previewing an unsaved spec reads every target's chunk indexes: work
    // for those who may roll out (ops), as in the web UI.
    if id.is_none() {
        op.require(crate::auth::Role::Ops)?;
    }
    spec.validate()?;
    let release = super::release(state, &op.org_id, &spec.release_id).await?;
    let t = super::targets(state, &op.org_id, spec, &release, id, true).await?;
    Ok(build_preview(
        spec,
        &release,
        &t,
        state.clock.now_ms(),
        with_devices,
    ))
}

/// Previews the saved rollout `id`.
pub async fn preview_saved(
    state: &AppState,
    op: &Operator,
    id: &str,
    with_devices: bool,
) -> Result<Preview> {
    let (spec, _) = super::progress::load(state, &op.org_id, id).await?;
    preview(state, op, &spec, Some(id), with_devices).await
}
