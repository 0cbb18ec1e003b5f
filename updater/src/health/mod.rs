//! The health watchdog: after booting a slot on trial, run the release's
//! health checks until they all pass and keep passing for the stability
//! window → commit (`mark_good`); a terminal failure or the deadline →
//! `mark_bad`, record why, and reboot into the other slot (at most
//! `max-revert-reboots` times in a row).
//!
//! The spec comes from the booted slot's manifest (`health`), overridden
//! field by field by the device's `[health]` table in system.toml.

mod checks;
#[cfg(feature = "llm")]
pub mod llm;
pub mod notify;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kernex_bootloader::{BootFlow, DEFAULT_ATTEMPTS, Slot};
use kernex_device::layout;
use kernex_protocol::manifest::{HealthCheck, HealthSpec};
use serde::{Deserialize, Serialize};

use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::store::{DataDir, now};

pub use checks::{Probe, Verdict};

/// Default deadline, seconds.
pub const DEFAULT_DEADLINE: u64 = 300;
/// Default stability window, seconds.
pub const DEFAULT_STABILITY_WINDOW: u64 = 60;
/// Default most revert reboots in a row.
pub const DEFAULT_MAX_REVERT_REBOOTS: u32 = 3;
/// Default hardware watchdog / sd_notify feed interval, milliseconds.
pub const DEFAULT_FEED_INTERVAL_MS: u64 = 1000;
/// The program systemd-mode `service` checks ask (`systemctl show`).
pub use kernex_device::DEFAULT_SYSTEMCTL;
/// Grace after the deadline during which the hardware watchdog is still fed
/// (a run hung past it lets the watchdog reset the device).
pub const FEED_GRACE: Duration = Duration::from_secs(60);

/// The device-local `[health]` table of system.toml (`kernex-device`'s).
pub use kernex_device::HealthConfig;

/// The spec in force: defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveSpec {
    /// Deadline.
    pub deadline: Duration,
    /// Stability window.
    pub stability_window: Duration,
    /// Most revert reboots in a row.
    pub max_revert_reboots: u32,
    /// The checks.
    pub checks: Vec<HealthCheck>,
}

/// Merges the manifest's spec with the device override (override wins).
pub fn effective_spec(manifest: Option<&HealthSpec>, device: Option<&HealthSpec>) -> EffectiveSpec {
    let pick =
        |f: fn(&HealthSpec) -> Option<u64>| device.and_then(f).or_else(|| manifest.and_then(f));
    EffectiveSpec {
        deadline: Duration::from_secs(pick(|s| s.deadline).unwrap_or(DEFAULT_DEADLINE)),
        stability_window: Duration::from_secs(
            pick(|s| s.stability_window).unwrap_or(DEFAULT_STABILITY_WINDOW),
        ),
        max_revert_reboots: device
            .and_then(|s| s.max_revert_reboots)
            .or_else(|| manifest.and_then(|s| s.max_revert_reboots))
            .unwrap_or(DEFAULT_MAX_REVERT_REBOOTS),
        checks: device
            .and_then(|s| s.checks.clone())
            .or_else(|| manifest.and_then(|s| s.checks.clone()))
            .unwrap_or_default(),
    }
}

/// How the last watchdog run decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthOutcome {
    /// The checks held for the stability window; the slot was committed.
    Committed,
    /// A check failed or the deadline passed; the slot was marked bad.
    Reverted,
}

/// The last watchdog decision, persisted in the data dir (`health.json`)
/// and shown by `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthRecord {
    /// Outcome.
    pub outcome: HealthOutcome,
    /// Why (the failing check for `reverted`).
    pub reason: String,
    /// The slot that was on trial.
    pub slot: Slot,
    /// Its release version, if recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Whether the reboot command ran (reverted only).
    #[serde(default)]
    pub rebooted: bool,
    /// Unix time.
    pub at: u64,
}

/// Revert reboots in a row, persisted (`health-reverts.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RevertCounter {
    /// Revert reboots since the device last ran a committed slot.
    pub consecutive: u32,
}

fn record_path(data: &DataDir) -> PathBuf {
    data.root().join(layout::HEALTH)
}

fn revert_path(data: &DataDir) -> PathBuf {
    data.root().join(layout::HEALTH_LAST_REVERT)
}

fn counter_path(data: &DataDir) -> PathBuf {
    data.root().join(layout::HEALTH_REVERTS)
}

/// The last watchdog decision.
pub fn last_record(data: &DataDir) -> Result<Option<HealthRecord>, UpdateError> {
    data.read(&record_path(data))
}

/// The watchdog's last revert, kept apart from [`last_record`]: after a
/// revert the old slot boots with one attempt counted, its own watchdog run
/// commits it, and that decision replaces the revert in `health.json`.
pub fn last_revert(data: &DataDir) -> Result<Option<HealthRecord>, UpdateError> {
    data.read(&revert_path(data))
}

/// Revert reboots in a row so far.
pub fn revert_counter(data: &DataDir) -> Result<RevertCounter, UpdateError> {
    Ok(data.read(&counter_path(data))?.unwrap_or_default())
}

fn set_counter(data: &DataDir, consecutive: u32) -> Result<(), UpdateError> {
    data.write(&counter_path(data), &RevertCounter { consecutive })
}

/// What a `health run` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    /// The booted slot is committed: nothing to decide.
    NotOnTrial(Slot),
    /// Committed.
    Committed(HealthRecord),
    /// Reverted.
    Reverted(HealthRecord),
}

impl RunResult {
    /// The JSON form (`health run --json`).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            RunResult::NotOnTrial(slot) => serde_json::json!({
                "outcome": "not-on-trial",
                "reason": format!("slot {slot} is committed; nothing to do"),
            }),
            RunResult::Committed(r) | RunResult::Reverted(r) => {
                serde_json::to_value(r).unwrap_or_default()
            }
        }
    }
}

impl std::fmt::Display for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunResult::NotOnTrial(slot) => {
                write!(f, "slot {slot} is committed (not on trial); nothing to do")
            }
            RunResult::Committed(r) => write!(f, "slot {} committed: {}", r.slot, r.reason),
            RunResult::Reverted(r) => write!(
                f,
                "slot {} reverted: {}{}",
                r.slot,
                r.reason,
                if r.rebooted { " (rebooting)" } else { "" }
            ),
        }
    }
}

/// Raises the anti-rollback floor to the committed slot's security version.
/// A failure (both copies corrupt) is logged, not fatal: the commit stands,
/// and installs stay refused until the floor reads again.
fn raise_floor(config: &SystemConfig, booted: Slot) {
    match crate::boot::raise_floor_to_booted(config, booted) {
        Ok(floor) => tracing::debug!(floor, "security floor"),
        Err(e) => tracing::error!(error = %e, "unable to raise the security floor"),
    }
}

/// Runs the watchdog once: see the module docs.
pub fn run(config: &SystemConfig, flow: &mut dyn BootFlow) -> Result<RunResult, UpdateError> {
    let data = DataDir::new(&config.data_dir);
    let booted = flow.booted_slot()?;
    let state = flow.state()?;
    if state.attempts_left(booted) >= DEFAULT_ATTEMPTS {
        // Committed: a power cut between the commit and raising the floor
        // is caught up here, at the next boot.
        raise_floor(config, booted);
        if revert_counter(&data)?.consecutive != 0 {
            set_counter(&data, 0)?;
        }
        return Ok(RunResult::NotOnTrial(booted));
    }
    let manifest = match data.slot_record(booted)? {
        Some(record) => Some(record.manifest()?),
        None => None,
    };
    let version = manifest.as_ref().map(|m| m.version.to_string());
    let device = config.health.as_ref().map(HealthConfig::spec);
    if let Some(d) = &device {
        d.validate().map_err(|e| UpdateError::Config {
            path: PathBuf::from("[health]"),
            reason: e.to_string(),
        })?;
    }
    let spec = effective_spec(
        manifest.as_ref().and_then(|m| m.health.as_ref()),
        device.as_ref(),
    );
    let feed_interval = Duration::from_millis(
        config
            .health
            .as_ref()
            .and_then(|h| h.feed_interval_ms)
            .unwrap_or(DEFAULT_FEED_INTERVAL_MS)
            .max(10),
    );
    let started = Instant::now();
    let feeder = notify::Feeder::start(
        config
            .health
            .as_ref()
            .and_then(|h| h.watchdog_device.clone()),
        feed_interval,
        started + spec.deadline + FEED_GRACE,
    )?;
    tracing::info!(
        slot = %booted,
        checks = spec.checks.len(),
        deadline_s = spec.deadline.as_secs(),
        window_s = spec.stability_window.as_secs(),
        "slot on trial: running health checks"
    );
    let systemctl = config
        .health
        .as_ref()
        .map(HealthConfig::systemctl)
        .unwrap_or_else(|| vec![DEFAULT_SYSTEMCTL.to_owned()]);
    let verdict = watch(&spec, &systemctl, started);
    feeder.stop();
    match verdict {
        Ok(reason) => {
            flow.mark_good(booted)?;
            raise_floor(config, booted);
            // Test builds only: a power cut between the commit and its
            // record (`KERNEX_HEALTH_CRASH_AFTER=mark-good`).
            crate::failpoints::failpoint!(crash "mark-good");
            let record = HealthRecord {
                outcome: HealthOutcome::Committed,
                reason,
                slot: booted,
                version,
                rebooted: false,
                at: now(),
            };
            data.write(&record_path(&data), &record)?;
            set_counter(&data, 0)?;
            notify::sd_notify("STATUS=committed");
            Ok(RunResult::Committed(record))
        }
        Err(reason) => {
            // Falling back to a release below the anti-rollback floor is
            // refused before anything is recorded: the slot stays on
            // trial, and the error says why (updater/README.md,
            // "Anti-rollback").
            crate::boot::check_fallback(config, booted.other()).map_err(|e| {
                UpdateError::SlotState(format!(
                    "health check failed ({reason}), but not reverting: {e}"
                ))
            })?;
            let done = revert_counter(&data)?.consecutive;
            let reboot = done < spec.max_revert_reboots;
            let mut record = HealthRecord {
                outcome: HealthOutcome::Reverted,
                reason: reason.clone(),
                slot: booted,
                version,
                rebooted: reboot,
                at: now(),
            };
            if reboot {
                set_counter(&data, done + 1)?;
            } else {
                record.reason = format!(
                    "{reason}; not rebooting: already {done} revert reboots in a row (max-revert-reboots {})",
                    spec.max_revert_reboots
                );
            }
            // The record first: a cut before `mark_bad` leaves the slot on
            // trial, and the next run decides again.
            data.write(&revert_path(&data), &record)?;
            data.write(&record_path(&data), &record)?;
            crate::boot::mark_bad(config, flow)?;
            notify::sd_notify(&format!("STATUS=reverted: {}", record.reason));
            if reboot {
                run_reboot(&config.reboot_command)?;
            }
            Ok(RunResult::Reverted(record))
        }
    }
}

fn run_reboot(argv: &[String]) -> Result<(), UpdateError> {
    let Some((program, args)) = argv.split_first() else {
        return Err(UpdateError::SlotState("reboot-command is empty".into()));
    };
    let status = Command::new(program).args(args).status().map_err(|e| {
        UpdateError::SlotState(format!("unable to run reboot command {program}: {e}"))
    })?;
    if !status.success() {
        return Err(UpdateError::SlotState(format!(
            "reboot command {program} failed: {status}"
        )));
    }
    Ok(())
}

/// Polls every check until all pass for the window (`Ok(summary)`) or one
/// fails terminally or the deadline passes (`Err(reason)`).
fn watch(spec: &EffectiveSpec, systemctl: &[String], started: Instant) -> Result<String, String> {
    let mut probes: Vec<checks::Probe> = spec
        .checks
        .iter()
        .map(|c| checks::Probe::new(c).with_systemctl(systemctl))
        .collect();
    let result = watch_probes(&mut probes, spec, started);
    for p in &mut probes {
        p.stop();
    }
    result
}

fn watch_probes(
    probes: &mut [checks::Probe],
    spec: &EffectiveSpec,
    started: Instant,
) -> Result<String, String> {
    let deadline = started + spec.deadline;
    let mut passing_since: Option<Instant> = None;
    let mut last_failure = String::from("no check result yet");
    loop {
        let mut all_pass = true;
        for probe in probes.iter_mut() {
            match probe.poll(deadline) {
                Verdict::Pass => {}
                Verdict::Fail(reason) => {
                    all_pass = false;
                    last_failure = reason;
                }
                Verdict::Terminal(reason) => return Err(reason),
            }
        }
        let now = Instant::now();
        if all_pass {
            let since = *passing_since.get_or_insert(now);
            if now.duration_since(since) >= spec.stability_window {
                return Ok(format!(
                    "{} checks passed and held for {} s (after {:.1} s)",
                    probes.len(),
                    spec.stability_window.as_secs(),
                    now.duration_since(started).as_secs_f64()
                ));
            }
        } else {
            if passing_since.take().is_some() {
                tracing::warn!(%last_failure, "a check failed during the stability window");
            }
        }
        if now >= deadline {
            return Err(if all_pass {
                format!(
                    "deadline {} s passed before the checks held for the {} s stability window",
                    spec.deadline.as_secs(),
                    spec.stability_window.as_secs()
                )
            } else {
                format!(
                    "deadline {} s passed: {last_failure}",
                    spec.deadline.as_secs()
                )
            });
        }
        let tick = Duration::from_millis(100).min(deadline.saturating_duration_since(now));
        std::thread::sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_override_wins_field_by_field() {
        let manifest = HealthSpec {
            deadline: Some(100),
            stability_window: Some(10),
            max_revert_reboots: None,
            checks: Some(vec![HealthCheck::Memory { min_available: 1 }]),
        };
        let device = HealthSpec {
            deadline: Some(5),
            ..HealthSpec::default()
        };
        let s = effective_spec(Some(&manifest), Some(&device));
        assert_eq!(s.deadline, Duration::from_secs(5));
        assert_eq!(s.stability_window, Duration::from_secs(10));
        assert_eq!(s.max_revert_reboots, DEFAULT_MAX_REVERT_REBOOTS);
        assert_eq!(s.checks.len(), 1);
        let s = effective_spec(None, None);
        assert_eq!(s.deadline, Duration::from_secs(DEFAULT_DEADLINE));
        assert!(s.checks.is_empty());
    }
}
