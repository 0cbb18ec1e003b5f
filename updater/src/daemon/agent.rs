//! The agent runtime without systemd: after the watchdog's verdict, the
//! daemon keeps running every `service` check of the booted slot's health
//! spec that is in `supervise` mode — starting it, restarting it with
//! backoff when it exits — for as long as the system is up. During the
//! trial a crash loop reverts the slot (the watchdog); after the commit a
//! crash loop is logged (and shipped to the server) while the restarts go
//! on: the slot is the last good one, there is nothing to revert to.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kernex_bootloader::Slot;
use kernex_protocol::manifest::{HealthCheck, ServiceMode};

use crate::config::SystemConfig;
use crate::health::{HealthConfig, Probe, Verdict, effective_spec};
use crate::store::DataDir;

/// After a crash loop, the supervisor waits this long, then starts the
/// service again with fresh counters.
pub const CRASH_LOOP_PAUSE: Duration = Duration::from_secs(30);

/// The supervised services of one boot; stopped (their process groups
/// killed) when dropped.
#[derive(Debug)]
pub struct Agents {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The supervise-mode services of `booted`'s effective health spec.
pub fn services(config: &SystemConfig, booted: Slot) -> Vec<HealthCheck> {
    let data = DataDir::new(&config.data_dir);
    let manifest = data
        .slot_record(booted)
        .ok()
        .flatten()
        .and_then(|r| r.manifest().ok());
    let device = config.health.as_ref().map(HealthConfig::spec);
    effective_spec(
        manifest.as_ref().and_then(|m| m.health.as_ref()),
        device.as_ref(),
    )
    .checks
    .into_iter()
    .filter(|c| {
        matches!(
            c,
            HealthCheck::Service {
                mode: ServiceMode::Supervise,
                ..
            }
        )
    })
    .collect()
}

impl Agents {
    /// Starts supervising `checks` on a thread of their own.
    pub fn start(checks: Vec<HealthCheck>) -> Option<Agents> {
        if checks.is_empty() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || supervise(&checks, &flag));
        Some(Agents {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn supervise(checks: &[HealthCheck], stop: &AtomicBool) {
    let mut probes: Vec<(Probe, Option<Instant>)> =
        checks.iter().map(|c| (Probe::new(c), None)).collect();
    // Restarts are bounded by the probes' own backoff; no deadline applies.
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    while !stop.load(Ordering::SeqCst) {
        for (i, (probe, paused_until)) in probes.iter_mut().enumerate() {
            if let Some(until) = *paused_until {
                if Instant::now() < until {
                    continue;
                }
                *probe = Probe::new(&checks[i]);
                *paused_until = None;
            }
            if let Verdict::Terminal(reason) = probe.poll(far) {
                tracing::error!(%reason, pause_s = CRASH_LOOP_PAUSE.as_secs(), "agent crash loop on the committed slot; starting it again after a pause");
                probe.stop();
                *paused_until = Some(Instant::now() + CRASH_LOOP_PAUSE);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for (probe, _) in &mut probes {
        probe.stop();
    }
}
