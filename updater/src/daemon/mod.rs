//! `kernex-updater daemon`: the device's side of the control plane.
//!
//! At every boot: finish what the last boot started (report that the new
//! slot came up, or that the bootloader fell back), run the health watchdog
//! if the booted slot is on trial, and report its verdict. Then, forever:
//! enroll once (a key made on the device, stored 0600 in the data dir and
//! never sent; short-lived access tokens signed for with it), deliver queued
//! reports and log batches in order, heartbeat with inventory, poll for the
//! desired release, and install it (or roll back to the other slot) when
//! the server says so and its download window is open, reporting every
//! step. Offline, everything the device has to say waits on disk
//! ([`outbox`]) and the daemon retries with backoff 1, 2, 4 … 60 s; the
//! running slot is never touched.
//!
//! Simulated devices (`--simulate-boot`: slots are files, the boot state a
//! file) "reboot" without a kernel: the daemon does to the boot state what
//! the boot script does at power-on ([`kernex_bootloader::BootState::select_boot`]),
//! writes the chosen slot to the kernel command line file the bootloader
//! config names, and starts over as the freshly booted system.
//!
//! One module per job: [`boot`] settles the last reboot (trial boot,
//! watchdog, outcome) and reboots; [`cycle`] is one poll cycle (heartbeat,
//! poll, install or roll back); [`enroll`] gets the credential;
//! [`reports`] queues what the device has to say; [`tpm`] is the daemon's
//! TPM session (identity, binding, credential activation, boot
//! measurement, quotes). The wire types are [`kernex_protocol::api`]'s,
//! sent by [`client`].

pub mod agent;
mod boot;
pub mod client;
mod cycle;
mod enroll;
mod identity;
pub mod inventory;
pub mod logs;
pub mod outbox;
mod reports;
pub mod state;
mod tpm;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

pub use self::boot::simulate_power_on;
use self::client::{Client, ClientError};
use self::cycle::CycleEnd;
use self::reports::Reports;
use self::state::Credential;
use self::tpm::TpmSession;
use crate::cli::Context;
use crate::store::DataDir;

/// Default poll interval, seconds (the seed's 60 s).
pub use kernex_device::DEFAULT_POLL_INTERVAL;
/// Longest retry delay while the server is unreachable, seconds.
pub const MAX_BACKOFF_SECS: u64 = 60;
/// Progress reports while downloading, at most this often.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long to wait for the system to go down after the reboot command.
pub const REBOOT_GRACE: Duration = Duration::from_secs(300);

/// The `[server]` table of system.toml (`kernex-device`'s).
pub use kernex_device::ServerConfig;

/// What the daemon reads from the `[server]` table beyond its keys.
trait ServerConfigExt {
    fn token(&self) -> Result<Option<String>>;
    fn device_id(&self) -> String;
}

impl ServerConfigExt for ServerConfig {
    fn token(&self) -> Result<Option<String>> {
        if let Some(t) = &self.enrollment_token {
            return Ok(Some(t.trim().to_owned()));
        }
        match &self.enrollment_token_file {
            Some(path) => {
                let bytes = crate::store::read_limited(path, 4096).with_context(|| {
                    format!("unable to read the enrollment token {}", path.display())
                })?;
                Ok(Some(String::from_utf8_lossy(&bytes).trim().to_owned()))
            }
            None => Ok(None),
        }
    }

    fn device_id(&self) -> String {
        self.device_id
            .clone()
            .or_else(sysinfo::System::host_name)
            .unwrap_or_else(|| "unnamed-device".into())
    }
}

/// `daemon` settings from the command line.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Simulated device: reboots are simulated (see the module docs).
    pub simulate_boot: bool,
    /// Overrides `[server] poll-interval`.
    pub poll_interval: Option<u64>,
    /// Stop after this many poll cycles (tests, cron-style use).
    pub cycles: Option<u64>,
}

/// How a boot's work ended.
enum Next {
    /// A (simulated) reboot happened: start over as the new boot.
    Booted,
    /// Done (`--cycles` reached).
    Stop,
}

/// Runs the daemon until stopped.
pub fn run(config_path: &Path, options: &DaemonOptions) -> Result<()> {
    logs::enable();
    let mut cycles_left = options.cycles;
    if options.simulate_boot {
        let ctx = Context::load(config_path.to_owned())?;
        simulate_power_on(&ctx.config).context("simulated power-on failed")?;
    }
    loop {
        let ctx = Context::load(config_path.to_owned())?;
        let mut daemon = Daemon::new(ctx, options)?;
        match daemon.boot(&mut cycles_left)? {
            Next::Booted => continue,
            Next::Stop => return Ok(()),
        }
    }
}

/// The daemon during one boot.
struct Daemon<'a> {
    ctx: Context,
    server: ServerConfig,
    options: &'a DaemonOptions,
    data: DataDir,
    client: Client,
    /// TLS settings for the server (its pinned CA, if any).
    tls: ureq::tls::TlsConfig,
    reports: Reports,
    sampler: inventory::Sampler,
    credential: Option<Credential>,
    failures: u32,
    /// The supervised agent services (stopped when dropped).
    agents: Option<agent::Agents>,
    tpm: TpmSession,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A pseudo-random factor in 0.9..1.1 from the clock and the pid.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = (u64::from(nanos) ^ (u64::from(std::process::id()) << 7))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    0.9 + ((mixed >> 11) % 2001) as f64 / 10_000.0
}

/// The retry delay after `failures` failed cycles in a row: 1, 2, 4 … 60 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs((1u64 << failures.saturating_sub(1).min(6)).min(MAX_BACKOFF_SECS))
}

impl<'a> Daemon<'a> {
    fn new(ctx: Context, options: &'a DaemonOptions) -> Result<Self> {
        let server = ctx.config.server.clone().ok_or_else(|| {
            anyhow!(
                "{} has no [server] table: the daemon needs the control plane's url",
                ctx.config_path.display()
            )
        })?;
        let data = DataDir::new(&ctx.config.data_dir);
        let reports = Reports::open(&ctx.config.data_dir)?;
        let credential = state::credential(&data, &server.url)?;
        let tls = crate::source::tls_config(server.ca.as_deref())?;
        let tpm = TpmSession::new(ctx.config.tpm.clone(), &ctx.config.data_dir, &server.url);
        Ok(Self {
            client: Client::new(&server.url, tls.clone()),
            tls,
            server,
            options,
            data,
            reports,
            sampler: inventory::Sampler::new(),
            credential,
            failures: 0,
            agents: None,
            tpm,
            ctx,
        })
    }

    fn poll_interval(&self) -> Duration {
        let secs = self
            .options
            .poll_interval
            .unwrap_or(self.server.poll_interval)
            .max(1);
        Duration::from_secs_f64(secs as f64 * jitter())
    }

    /// One boot: settle the last reboot, then poll until the next.
    fn boot(&mut self, cycles_left: &mut Option<u64>) -> Result<Next> {
        self.tpm.measure_boot(&self.data, self.ctx.flow.as_ref());
        if self.after_boot()? {
            // The watchdog ran the reboot command itself.
            return self.await_reboot();
        }
        // The slot is the one to run: keep its agent services up.
        let booted = self.ctx.flow.booted_slot()?;
        self.agents = agent::Agents::start(agent::services(&self.ctx.config, booted));
        loop {
            if *cycles_left == Some(0) {
                // Last chance to deliver what the final cycle queued.
                self.reports.ship_logs();
                let _ = self.deliver();
                return Ok(Next::Stop);
            }
            let (sleep, rebooting) = match self.cycle() {
                Ok(Some(CycleEnd::Reboot)) => (Duration::ZERO, true),
                Ok(Some(CycleEnd::SleepFor(d))) => {
                    self.failures = 0;
                    (d.min(self.poll_interval()), false)
                }
                Ok(None) => {
                    self.failures = 0;
                    (self.poll_interval(), false)
                }
                Err(e) => {
                    self.failures += 1;
                    let delay = backoff(self.failures);
                    tracing::warn!(error = %format!("{e:#}"), retry_in_s = delay.as_secs(), "cycle failed");
                    (delay, false)
                }
            };
            if let Some(n) = cycles_left.as_mut() {
                *n = n.saturating_sub(1);
            }
            if rebooting {
                self.reports.ship_logs();
                let _ = self.deliver();
                return self.reboot();
            }
            if *cycles_left != Some(0) {
                std::thread::sleep(sleep);
            }
        }
    }

    /// A refused access token is dropped so the next cycle signs for a
    /// new one; a refused bearer credential is forgotten so the next cycle
    /// enrolls again.
    fn on_client_error(&mut self, e: ClientError) -> anyhow::Error {
        if let ClientError::Unauthorized { .. } = e {
            if let Some(c) = self.credential.as_mut().filter(|c| c.keyed) {
                tracing::info!(
                    "the server refused the access token; authenticating again next cycle"
                );
                c.expires_at = None;
            } else {
                tracing::warn!("the server refused the credential; enrolling again next cycle");
                self.forget_credential();
            }
        }
        anyhow::Error::new(e)
    }

    /// Delivers the queued reports and log batches, oldest first.
    fn deliver(&mut self) -> Result<()> {
        let Some(c) = self.credential.as_ref().map(|c| c.credential.clone()) else {
            return Ok(());
        };
        match self.reports.deliver(&self.client, &c) {
            Ok(d) => {
                if d.sent + d.rejected > 0 {
                    tracing::debug!(sent = d.sent, rejected = d.rejected, "outbox delivered");
                }
                Ok(())
            }
            Err(e) => Err(self
                .on_client_error(e)
                .context("unable to deliver queued reports")),
        }
    }
}
