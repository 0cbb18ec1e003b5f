//! What a run reports: a timeline row per simulated minute, printed as
//! the run goes, and the summary at the end (printed, or as JSON with
//! `--json`), from the devices' own counts and the server's records.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use anyhow::Result;
use serde::Serialize;
use serde_json::Value;

use crate::fleet::Fleet;

/// One line of the timeline (one simulated minute).
#[derive(Debug, Clone, Serialize)]
pub struct TimelineRow {
    /// Simulated seconds since the rollout started.
    pub t_secs: i64,
    /// Rollout status.
    pub status: String,
    /// 1-based current wave.
    pub wave: i64,
    /// Devices per state (server's view).
    pub states: BTreeMap<String, i64>,
    /// Busiest second of the minute, bytes (counted by the devices).
    pub peak_egress_bytes_per_sec: u64,
    /// Average over the minute, bytes/s.
    pub avg_egress_bytes_per_sec: u64,
    /// The cap.
    pub egress_cap_bytes_per_sec: u64,
    /// Most bytes any metered device downloaded today.
    pub metered_max_device_day_bytes: u64,
    /// Metered budget per device and day.
    pub metered_budget_per_day: Option<u64>,
}

/// Per device, at the end.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSummary {
    /// Device id.
    pub device_id: String,
    /// Internal id.
    pub id: String,
    /// Link class.
    pub link_class: String,
    /// Version it runs.
    pub version: String,
    /// Bytes the server planned for it (preview / rollout record).
    pub planned_bytes: i64,
    /// Bytes it downloaded (counted at the HTTP layer by the device).
    pub downloaded_bytes: u64,
    /// Most bytes downloaded in one UTC day.
    pub max_day_bytes: u64,
    /// Server-side state.
    pub state: String,
    /// Site.
    pub site: String,
    /// Time zone.
    pub time_zone: String,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Rollout id.
    pub rollout_id: String,
    /// Final status.
    pub status: String,
    /// Why (pause, rollback).
    pub status_reason: Option<String>,
    /// Devices.
    pub devices: usize,
    /// Wall-clock seconds the run took.
    pub wall_secs: f64,
    /// Simulated seconds from start to the end.
    pub sim_secs: i64,
    /// Simulated seconds from start until each wave was promoted.
    pub waves_promoted_at_secs: Vec<Option<i64>>,
    /// Bytes the preview announced.
    pub preview_total_bytes: u64,
    /// Metered cost the preview announced.
    pub preview_metered_cost: f64,
    /// Projected duration the preview announced, seconds.
    pub preview_duration_secs: u64,
    /// Bytes devices downloaded.
    pub downloaded_total_bytes: u64,
    /// The largest compressed chunk (tolerance per device).
    pub max_chunk_bytes: u64,
    /// Egress cap.
    pub egress_cap_bytes_per_sec: u64,
    /// Busiest second, bytes (device-side count).
    pub peak_egress_bytes_per_sec: u64,
    /// Busiest second / cap.
    pub peak_egress_over_cap: f64,
    /// Busiest second, bytes, as the server's HTTP layer counted it
    /// (`GET /rollouts/egress`).
    pub server_peak_egress_bytes_per_sec: u64,
    /// The server's busiest second / cap.
    pub server_peak_egress_over_cap: f64,
    /// Ran on the wall clock (no test clock): simulated = real seconds.
    pub real_time: bool,
    /// Most bytes a metered device downloaded in one day.
    pub metered_max_device_day_bytes: u64,
    /// Metered budget.
    pub metered_budget_per_day: Option<u64>,
    /// Simulated seconds until every device of the rollout committed.
    pub all_committed_after_secs: Option<i64>,
    /// Simulated seconds from the rollback until every committed device
    /// reported its previous version.
    pub rollback_secs: Option<i64>,
    /// Devices per version at the end.
    pub versions: BTreeMap<String, usize>,
    /// Link drops simulated.
    pub link_drops: u64,
    /// Per device.
    pub per_device: Vec<DeviceSummary>,
    /// Per minute.
    pub timeline: Vec<TimelineRow>,
    /// Bytes per simulated second (device-side count), seconds with traffic.
    pub egress_per_second: Vec<(i64, u64)>,
}

impl Fleet {
    pub(crate) fn timeline_row(&self, r: &Value) -> TimelineRow {
        let end = self.now_ms.div_euclid(1000);
        let minute: Vec<u64> = self.egress.range(end - 59..=end).map(|(_, b)| *b).collect();
        let states = r["states"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let day = self.now_ms.div_euclid(86_400_000);
        let metered_max = self
            .devices
            .iter()
            .filter(|d| self.opts.profiles[d.profile].0.budget_per_day.is_some() && d.day == day)
            .map(|d| d.day_bytes)
            .max()
            .unwrap_or(0);
        TimelineRow {
            t_secs: (self.now_ms - self.start_ms) / 1000,
            status: r["status"].as_str().unwrap_or("").to_string(),
            wave: r["current_wave"].as_i64().unwrap_or(0),
            states,
            peak_egress_bytes_per_sec: minute.iter().copied().max().unwrap_or(0),
            avg_egress_bytes_per_sec: minute.iter().sum::<u64>() / 60,
            egress_cap_bytes_per_sec: self.cap,
            metered_max_device_day_bytes: metered_max,
            metered_budget_per_day: self.budget,
        }
    }

    /// The summary, with per-device state from the server.
    pub async fn summary(&self) -> Result<Summary> {
        let id = self.rollout_id.clone().unwrap_or_default();
        let detail = self.operator.rollout(&id, true).await?;
        let mut server: HashMap<String, (i64, String)> = HashMap::new();
        for d in detail["devices"].as_array().into_iter().flatten() {
            server.insert(
                d["id"].as_str().unwrap_or("").to_string(),
                (
                    d["delta_bytes"].as_i64().unwrap_or(0),
                    d["state"].as_str().unwrap_or("").to_string(),
                ),
            );
        }
        let per_device: Vec<DeviceSummary> = self
            .devices
            .iter()
            .map(|d| {
                let (planned, state) = server
                    .get(&d.pk)
                    .cloned()
                    .unwrap_or((0, "not targeted".into()));
                DeviceSummary {
                    device_id: d.device_id.clone(),
                    id: d.pk.clone(),
                    link_class: self.opts.profiles[d.profile].0.class.clone(),
                    version: d.version.clone(),
                    planned_bytes: planned,
                    downloaded_bytes: d.downloaded,
                    max_day_bytes: d.max_day_bytes,
                    state,
                    site: d.site.clone(),
                    time_zone: d.tz.clone(),
                }
            })
            .collect();
        let peak = self.egress.values().copied().max().unwrap_or(0);
        let server_egress = self.operator.egress(self.start_ms).await?;
        let server_peak = server_egress["peak_bytes_per_sec"].as_u64().unwrap_or(0);
        let over_cap = |b: u64| {
            if self.cap > 0 {
                b as f64 / self.cap as f64
            } else {
                0.0
            }
        };
        Ok(Summary {
            rollout_id: id,
            status: detail["status"].as_str().unwrap_or("").to_string(),
            status_reason: detail["status_reason"].as_str().map(str::to_string),
            devices: self.devices.len(),
            wall_secs: self.wall.elapsed().as_secs_f64(),
            sim_secs: (self.now_ms - self.start_ms) / 1000,
            waves_promoted_at_secs: self.waves_promoted.clone(),
            preview_total_bytes: self.preview["total_bytes"].as_u64().unwrap_or(0),
            preview_metered_cost: self.preview["metered_cost"].as_f64().unwrap_or(0.0),
            preview_duration_secs: self.preview["projected_duration_secs"]
                .as_u64()
                .unwrap_or(0),
            downloaded_total_bytes: self.devices.iter().map(|d| d.downloaded).sum(),
            max_chunk_bytes: self.to.max_chunk(),
            egress_cap_bytes_per_sec: self.cap,
            peak_egress_bytes_per_sec: peak,
            peak_egress_over_cap: over_cap(peak),
            server_peak_egress_bytes_per_sec: server_peak,
            server_peak_egress_over_cap: over_cap(server_peak),
            real_time: self.real_origin.is_some(),
            metered_max_device_day_bytes: self
                .devices
                .iter()
                .filter(|d| self.opts.profiles[d.profile].0.budget_per_day.is_some())
                .map(|d| d.max_day_bytes)
                .max()
                .unwrap_or(0),
            metered_budget_per_day: self.budget,
            all_committed_after_secs: self.all_committed_at,
            rollback_secs: self.rollback_done.map(|ms| ms / 1000),
            versions: self.versions(),
            link_drops: self.drops.load(Ordering::Relaxed),
            per_device,
            timeline: self.timeline.clone(),
            egress_per_second: self.egress.iter().map(|(k, v)| (*k, *v)).collect(),
        })
    }
}

/// Prints one timeline row.
pub fn print_row(r: &TimelineRow) {
    let states: Vec<String> = r.states.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let mb = |b: u64| b as f64 / 1e6;
    let metered = match r.metered_budget_per_day {
        Some(b) => format!(
            "metered max {:.2}/{:.2} MB/day",
            mb(r.metered_max_device_day_bytes),
            mb(b)
        ),
        None => String::new(),
    };
    println!(
        "t+{:02}:{:02}:{:02} {:<9} wave {} | {} | egress peak {:.2} avg {:.2} cap {:.2} MB/s | {}",
        r.t_secs / 3600,
        (r.t_secs / 60) % 60,
        r.t_secs % 60,
        r.status,
        r.wave,
        states.join(", "),
        mb(r.peak_egress_bytes_per_sec),
        mb(r.avg_egress_bytes_per_sec),
        mb(r.egress_cap_bytes_per_sec),
        metered
    );
}

/// Prints a rollout's preview (the operator API's answer) in one line.
pub fn print_preview(preview: &Value) {
    println!(
        "preview: {} devices, {} bytes, metered cost {:.2}, projected {} s, peak reserved {} / cap {} B/s",
        preview["targets"],
        preview["total_bytes"],
        preview["metered_cost"].as_f64().unwrap_or(0.0),
        preview["projected_duration_secs"],
        preview["peak_reserved_bytes_per_sec"],
        preview["egress_cap_bytes_per_sec"]
    );
}

/// Prints the summary for people (`--json` prints [`Summary`] instead).
pub fn print_summary(summary: &Summary) {
    println!("--- summary ---");
    println!(
        "rollout {}: {} {}",
        summary.rollout_id,
        summary.status,
        summary.status_reason.clone().unwrap_or_default()
    );
    println!(
        "devices {}, wall {:.1} s, simulated {} s",
        summary.devices, summary.wall_secs, summary.sim_secs
    );
    println!(
        "waves promoted at (simulated s): {:?}",
        summary.waves_promoted_at_secs
    );
    if let Some(s) = summary.all_committed_after_secs {
        println!("every device committed after {s} s (simulated)");
    }
    if let Some(s) = summary.rollback_secs {
        println!("rollback: every device back on its previous version after {s} s (simulated)");
    }
    println!(
        "bytes: preview {} / downloaded {}; metered cost (preview) {:.2}",
        summary.preview_total_bytes, summary.downloaded_total_bytes, summary.preview_metered_cost
    );
    println!(
        "egress: peak {} B/s / cap {} B/s = {:.3} (devices' count); server's count: peak {} B/s = {:.3}",
        summary.peak_egress_bytes_per_sec,
        summary.egress_cap_bytes_per_sec,
        summary.peak_egress_over_cap,
        summary.server_peak_egress_bytes_per_sec,
        summary.server_peak_egress_over_cap
    );
    if let Some(b) = summary.metered_budget_per_day {
        println!(
            "metered: max {} bytes per device-day / budget {}",
            summary.metered_max_device_day_bytes, b
        );
    }
    println!(
        "versions: {:?}; link drops {}",
        summary.versions, summary.link_drops
    );
}
