//! `kernex-updater daemon`: the device's side of the control plane.
//!
//! At every boot: finish what the last boot started (report that the new
//! slot came up, or that the bootloader fell back), run the health watchdog
//! if the booted slot is on trial, and report its verdict. Then, forever:
//! enroll once (credential stored 0600 in the data dir), deliver queued
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

pub mod agent;
pub mod client;
pub mod inventory;
pub mod logs;
pub mod outbox;
pub mod state;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use kernex_bootloader::Slot;

use self::client::{Client, ClientError, Desired, EnrollRequest};
use self::outbox::Outbox;
use self::state::{Action, Awaiting, Credential, DaemonState, GivenUp};
use crate::cli::Context;
use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::health::RunResult;
use crate::source::{HttpSource, Link};
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

/// A 403 answering a request the credential is not the question of
/// (enrollment, a TPM binding): the server refused it by policy and its
/// detail says why (e.g. "EK certificate not issued by a trusted TPM
/// vendor CA").
fn policy_refusal(e: ClientError) -> ClientError {
    match e {
        ClientError::Unauthorized { status: 403, body } => {
            ClientError::Rejected { status: 403, body }
        }
        other => other,
    }
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
    outbox: Outbox,
    sampler: inventory::Sampler,
    credential: Option<Credential>,
    failures: u32,
    /// The supervised agent services (stopped when dropped).
    agents: Option<agent::Agents>,
    /// This boot has checked that a configured TPM is bound to the
    /// credential (bound it, or was refused).
    #[cfg(feature = "tpm")]
    tpm_bind_done: bool,
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
        let outbox = Outbox::open(&ctx.config.data_dir).context("unable to open the outbox")?;
        let credential = state::credential(&data, &server.url)?;
        let tls = crate::source::tls_config(server.ca.as_deref())?;
        Ok(Self {
            client: Client::new(&server.url, tls.clone()),
            tls,
            server,
            options,
            data,
            outbox,
            sampler: inventory::Sampler::new(),
            credential,
            failures: 0,
            agents: None,
            #[cfg(feature = "tpm")]
            tpm_bind_done: false,
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
        self.measure_boot();
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
                self.ship_logs();
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
                self.ship_logs();
                let _ = self.deliver();
                return self.reboot();
            }
            if *cycles_left != Some(0) {
                std::thread::sleep(sleep);
            }
        }
    }

    /// After a boot: report how the last reboot went and run the health
    /// watchdog. `Ok(true)` when the watchdog reverted and rebooted.
    fn after_boot(&mut self) -> Result<bool> {
        let booted = self.ctx.flow.booted_slot()?;
        let boot_id = state::boot_id(&self.data, self.options.simulate_boot)?;
        let mut st = state::load(&self.data)?;
        if let Some(a) = st.awaiting.clone() {
            if a.boot_id == boot_id {
                tracing::info!(slot = %a.slot, "the reboot for {} has not happened yet", a.version);
            } else if booted == a.slot {
                if !a.reported_rebooted {
                    self.report(&a, "rebooted", None)?;
                    st.awaiting = Some(Awaiting {
                        reported_rebooted: true,
                        ..a
                    });
                    state::save(&self.data, &st)?;
                }
            } else {
                let health = crate::health::last_revert(&self.data)?
                    .filter(|h| h.slot == a.slot && h.at >= a.at);
                let reason = match health {
                    Some(h) => h.reason,
                    None => format!(
                        "slot {} did not come up: the bootloader fell back to slot {booted} (kernel or early boot failure)",
                        a.slot
                    ),
                };
                tracing::warn!(%reason, "{} reverted", a.version);
                self.report_outcome(&a, "reverted", Some(&reason), booted)?;
                st.awaiting = None;
                state::save(&self.data, &st)?;
            }
        }
        let result = crate::health::run(&self.ctx.config, self.ctx.flow.as_mut());
        let st = state::load(&self.data)?;
        let awaited = st
            .awaiting
            .clone()
            .filter(|a| a.slot == booted && a.boot_id != boot_id);
        match result {
            Ok(RunResult::NotOnTrial(_)) | Ok(RunResult::Committed(_)) => {
                if let Some(a) = awaited {
                    let state = match a.action {
                        Action::Install => "committed",
                        Action::Rollback => "rolled_back",
                    };
                    tracing::info!(version = %a.version, slot = %booted, "{state}");
                    self.report_outcome(&a, state, None, booted)?;
                    state::save(
                        &self.data,
                        &DaemonState {
                            awaiting: None,
                            ..st
                        },
                    )?;
                }
                Ok(false)
            }
            Ok(RunResult::Reverted(record)) => {
                tracing::warn!(reason = %record.reason, slot = %booted, "health watchdog reverted the slot");
                if let Some(a) = awaited {
                    self.report_outcome(&a, "reverted", Some(&record.reason), booted.other())?;
                    state::save(
                        &self.data,
                        &DaemonState {
                            awaiting: None,
                            ..st
                        },
                    )?;
                } else {
                    self.queue_report(serde_json::json!({
                        "state": "reverted",
                        "reason": record.reason,
                        "booted_slot": booted.name(),
                    }))?;
                }
                // health::run ran the reboot command already.
                Ok(record.rebooted)
            }
            Err(e) => {
                // The slot stays on trial: the bootloader's counter decides.
                tracing::error!(error = %e, "the health watchdog could not run");
                Ok(false)
            }
        }
    }

    fn queue_report(&mut self, body: serde_json::Value) -> Result<()> {
        self.outbox
            .push("/api/v1/device/report", body)
            .context("unable to queue a report")
    }

    fn report(&mut self, a: &Awaiting, state: &str, reason: Option<&str>) -> Result<()> {
        self.queue_report(serde_json::json!({
            "state": state,
            "release_id": a.release_id,
            "reason": reason,
        }))
    }

    fn report_outcome(
        &mut self,
        a: &Awaiting,
        state: &str,
        reason: Option<&str>,
        running: Slot,
    ) -> Result<()> {
        let version = self
            .data
            .slot_record(running)?
            .and_then(|r| r.manifest().ok())
            .map(|m| m.version.to_string());
        self.queue_report(serde_json::json!({
            "state": state,
            "release_id": a.release_id,
            "version": version,
            "booted_slot": running.name(),
            "reason": reason,
        }))
    }

    fn ship_logs(&mut self) {
        let (lines, dropped) = logs::drain();
        if lines.is_empty() && dropped == 0 {
            return;
        }
        let mut entries: Vec<serde_json::Value> = Vec::with_capacity(lines.len() + 1);
        if dropped > 0 {
            entries.push(serde_json::json!({
                "level": "warn",
                "message": format!("{dropped} log lines dropped (buffer full)"),
                "at": now_ms(),
            }));
        }
        entries.extend(
            lines
                .into_iter()
                .map(|l| serde_json::to_value(l).unwrap_or_default()),
        );
        for batch in entries.chunks(1000) {
            if let Err(e) = self.outbox.push(
                "/api/v1/device/logs",
                serde_json::json!({ "entries": batch }),
            ) {
                tracing::debug!(error = %e, "unable to queue log lines");
            }
        }
    }

    /// Enrolls if there is no credential yet.
    fn ensure_enrolled(&mut self) -> Result<String> {
        if let Some(c) = &self.credential {
            return Ok(c.credential.clone());
        }
        let token = self.server.token()?.ok_or_else(|| {
            anyhow!("not enrolled and no enrollment token configured ([server] enrollment-token or enrollment-token-file)")
        })?;
        let device_id = self.server.device_id();
        let mut metadata = serde_json::Map::new();
        metadata.insert("updater".into(), env!("CARGO_PKG_VERSION").into());
        if let Some(os) = sysinfo::System::long_os_version() {
            metadata.insert("os".into(), os.into());
        }
        metadata.insert("arch".into(), std::env::consts::ARCH.into());
        metadata.insert(
            "memory_bytes".into(),
            sysinfo::System::new_with_specifics(
                sysinfo::RefreshKind::nothing()
                    .with_memory(sysinfo::MemoryRefreshKind::everything()),
            )
            .total_memory()
            .into(),
        );
        // A TPM fault must not keep the device off the fleet: it enrolls
        // without a TPM identity (the server refuses it if its token needs
        // one, and the log says why).
        let tpm = self.tpm_identity().unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "unable to read the TPM identity: enrolling without it");
            None
        });
        let enrolled = self
            .client
            .enroll(&EnrollRequest {
                enrollment_token: &token,
                device_id: &device_id,
                hardware_class: &self.ctx.config.compatible,
                hardware_metadata: metadata,
                tags: &self.server.tags,
                tpm_slot_pcr: tpm
                    .as_ref()
                    .and(self.ctx.config.tpm.as_ref())
                    .map(|t| t.pcr),
                tpm,
            })
            // A 403 to an enrollment is a policy refusal (the detail says
            // which), not a refused credential: there is none yet.
            .map_err(policy_refusal)
            .context("enrollment failed")?;
        if let Some(challenge) = &enrolled.activation {
            // Not stored before the TPM proved itself: the next cycle
            // enrolls again (a new challenge).
            self.activate_tpm(&enrolled.credential, challenge)
                .context("TPM credential activation failed")?;
            self.record_tpm_binding(&enrolled.id);
        }
        let credential = Credential {
            server: self.server.url.clone(),
            device_id: device_id.clone(),
            id: enrolled.id,
            credential: enrolled.credential,
        };
        state::store_credential(&self.data, &credential)?;
        tracing::info!(device_id = %device_id, id = %credential.id, "enrolled");
        let c = credential.credential.clone();
        self.credential = Some(credential);
        Ok(c)
    }

    /// The TPM identity for enrollment, when a TPM is configured.
    #[cfg(feature = "tpm")]
    fn tpm_identity(&self) -> Result<Option<serde_json::Value>> {
        let Some(tpm) = &self.ctx.config.tpm else {
            return Ok(None);
        };
        let ak = crate::attest::ak_path(&self.ctx.config.data_dir);
        let identity = crate::attest::identity(tpm, &ak, false)?;
        Ok(Some(serde_json::to_value(identity)?))
    }

    #[cfg(not(feature = "tpm"))]
    fn tpm_identity(&self) -> Result<Option<serde_json::Value>> {
        if self.ctx.config.tpm.is_some() {
            tracing::warn!(
                "[tpm] is configured but this kernex-updater was built without TPM support (cargo feature `tpm`): enrolling without a TPM identity"
            );
        }
        Ok(None)
    }

    /// Opens the enrollment's credential-activation challenge with the TPM
    /// and gives the server the credential.
    #[cfg(feature = "tpm")]
    fn activate_tpm(&self, credential: &str, challenge: &serde_json::Value) -> Result<()> {
        let Some(tpm) = &self.ctx.config.tpm else {
            bail!("the server sent a TPM challenge, but no [tpm] is configured");
        };
        let challenge: kernex_attest::Activation = serde_json::from_value(challenge.clone())
            .context("unreadable credential-activation challenge")?;
        let ak = crate::attest::ak_path(&self.ctx.config.data_dir);
        let secret = crate::attest::activate(tpm, &ak, &challenge)?;
        self.client
            .post(
                Some(credential),
                "/api/v1/device/activate",
                &serde_json::json!({ "credential": hex::encode(secret) }),
                None,
            )
            .context("the server refused the activation")?;
        tracing::info!("TPM bound: credential activation succeeded");
        Ok(())
    }

    #[cfg(not(feature = "tpm"))]
    fn activate_tpm(&self, _credential: &str, _challenge: &serde_json::Value) -> Result<()> {
        bail!("the server sent a TPM challenge, but this kernex-updater has no TPM support")
    }

    /// Remembers that the server bound credential `id` to the stored AK, so
    /// later starts need not ask (best effort: without the record the next
    /// start asks the server, which answers "bound").
    #[cfg(feature = "tpm")]
    fn record_tpm_binding(&self, id: &str) {
        if let Err(e) =
            crate::attest::record_binding(&self.ctx.config.data_dir, &self.server.url, id)
        {
            tracing::warn!(error = %format!("{e:#}"), "unable to record the TPM binding");
        }
    }

    #[cfg(not(feature = "tpm"))]
    fn record_tpm_binding(&self, _id: &str) {}

    /// A device enrolled without a TPM identity that has a `[tpm]` now (its
    /// config gained one, or reading the TPM failed at enrollment) binds
    /// it: `POST /device/tpm` with its identity, then the credential
    /// activation. Once per boot; a network failure retries next cycle, a
    /// refusal (the reason is logged) waits for the next start. The device
    /// keeps being served meanwhile.
    #[cfg(feature = "tpm")]
    fn ensure_tpm_bound(&mut self, credential: &str) {
        if self.tpm_bind_done {
            return;
        }
        let (Some(tpm), Some(c)) = (self.ctx.config.tpm.clone(), self.credential.clone()) else {
            self.tpm_bind_done = true;
            return;
        };
        if crate::attest::is_bound(&self.ctx.config.data_dir, &c.server, &c.id) {
            self.tpm_bind_done = true;
            return;
        }
        tracing::info!(
            "a TPM is configured but this device's enrollment is not bound to it: binding"
        );
        match self.bind_tpm(&tpm, credential, &c.id) {
            Ok(()) => self.tpm_bind_done = true,
            Err(e) => {
                let offline = e
                    .downcast_ref::<ClientError>()
                    .is_some_and(|c| matches!(c, ClientError::Offline(_)));
                if offline {
                    tracing::warn!(error = %format!("{e:#}"), "unable to bind the TPM: retrying next cycle");
                } else {
                    tracing::warn!(error = %format!("{e:#}"), "unable to bind the TPM: the device stays unattested until the next start");
                    self.tpm_bind_done = true;
                }
            }
        }
    }

    #[cfg(not(feature = "tpm"))]
    fn ensure_tpm_bound(&mut self, _credential: &str) {}

    #[cfg(feature = "tpm")]
    fn bind_tpm(
        &mut self,
        tpm: &crate::cli::attest::TpmConfig,
        credential: &str,
        id: &str,
    ) -> Result<()> {
        let ak = crate::attest::ak_path(&self.ctx.config.data_dir);
        let identity =
            crate::attest::identity(tpm, &ak, false).context("unable to read the TPM identity")?;
        let answer = match self.client.post(
            Some(credential),
            "/api/v1/device/tpm",
            &serde_json::json!({ "tpm": identity, "tpm_slot_pcr": tpm.pcr }),
            None,
        ) {
            Ok(a) => a,
            // 403 here is the binding refused by policy, not the credential.
            Err(ClientError::Unauthorized { status: 401, body }) => {
                return Err(self.on_client_error(ClientError::Unauthorized { status: 401, body }));
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(policy_refusal(e)).context("POST /api/v1/device/tpm failed")
                );
            }
        };
        let answer: serde_json::Value =
            serde_json::from_slice(&answer).context("unreadable answer to the TPM binding")?;
        match answer["state"].as_str() {
            Some("bound") => {}
            Some("challenge") => self
                .activate_tpm(credential, &answer["activation"])
                .context("TPM credential activation failed")?,
            other => bail!("unexpected TPM binding state {other:?}"),
        }
        self.record_tpm_binding(id);
        tracing::info!(ek = %answer["ek_fingerprint"], "TPM bound to this device's enrollment");
        Ok(())
    }

    /// Answers the server's nonce with a quote of the slot PCR, naming the
    /// release the booted slot holds.
    #[cfg(feature = "tpm")]
    fn answer_quote(
        &mut self,
        credential: &str,
        nonce: &str,
        status: &crate::status::Status,
    ) -> Result<()> {
        let Some(tpm) = &self.ctx.config.tpm else {
            return Ok(());
        };
        let version = status
            .slots
            .iter()
            .find(|s| s.slot == status.booted_slot)
            .and_then(|s| s.version.clone())
            .ok_or_else(|| anyhow!("the booted slot has no recorded release to attest"))?;
        let nonce = hex::decode(nonce).context("the nonce is not hex")?;
        let ak = crate::attest::ak_path(&self.ctx.config.data_dir);
        let quote = crate::attest::quote(tpm, &ak, &nonce)?;
        let answer = self
            .client
            .post(
                Some(credential),
                "/api/v1/device/attestation",
                &serde_json::json!({ "version": version, "quote": quote }),
                None,
            )
            .map_err(|e| self.on_client_error(e))?;
        let verdict: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_default();
        tracing::info!(%version, attestation = %verdict["attestation"], reason = %verdict["reason"], "quote verified by the server");
        Ok(())
    }

    #[cfg(not(feature = "tpm"))]
    fn answer_quote(
        &mut self,
        _credential: &str,
        _nonce: &str,
        _status: &crate::status::Status,
    ) -> Result<()> {
        Ok(())
    }

    /// Extends the booted slot's measurement into the slot PCR, early in
    /// each boot. Failures are logged: the device keeps updating, and the
    /// server shows it unattested or mismatched.
    #[cfg(feature = "tpm")]
    fn measure_boot(&mut self) {
        let Some(tpm) = &self.ctx.config.tpm else {
            return;
        };
        let measured = self
            .ctx
            .flow
            .booted_slot()
            .map_err(anyhow::Error::from)
            .and_then(|slot| crate::attest::measure(tpm, &self.data, slot, None));
        match measured {
            Ok(Some(m)) => {
                tracing::info!(slot = %m.slot, version = %m.version, pcr = m.pcr, value = %m.value, already = m.already, "booted slot measured")
            }
            Ok(None) => {
                tracing::info!("the booted slot has no recorded release: nothing to measure")
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "unable to measure the booted slot")
            }
        }
    }

    #[cfg(not(feature = "tpm"))]
    fn measure_boot(&mut self) {}

    /// A refused credential is forgotten so the next cycle enrolls again.
    fn on_client_error(&mut self, e: ClientError) -> anyhow::Error {
        if let ClientError::Unauthorized { .. } = e {
            tracing::warn!("the server refused the credential; enrolling again next cycle");
            self.credential = None;
            if let Err(err) = state::forget_credential(&self.data) {
                tracing::warn!(error = %err, "unable to remove the credential");
            }
        }
        anyhow::Error::new(e)
    }

    fn deliver(&mut self) -> Result<()> {
        let Some(c) = self.credential.as_ref().map(|c| c.credential.clone()) else {
            return Ok(());
        };
        match self.outbox.deliver(&self.client, &c) {
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

    /// One poll cycle.
    fn cycle(&mut self) -> Result<Option<CycleEnd>> {
        let credential = self.ensure_enrolled()?;
        self.ensure_tpm_bound(&credential);
        self.ship_logs();
        self.deliver()?;
        let status = crate::status::status(&self.ctx.config, self.ctx.flow.as_mut())?;
        let hb = self.sampler.heartbeat(&status, &self.ctx.config.data_dir);
        if let Err(e) = self
            .client
            .post(Some(&credential), "/api/v1/device/heartbeat", &hb, None)
        {
            return Err(self.on_client_error(e).context("heartbeat failed"));
        }
        let answer = match self.client.poll(&credential) {
            Ok(d) => d,
            Err(e) => return Err(self.on_client_error(e).context("poll failed")),
        };
        if let Some(nonce) = &answer.nonce {
            // Best effort: a quote the server rejects is logged, and the
            // server asks again with a new nonce.
            if let Err(e) = self.answer_quote(&credential, nonce, &status) {
                tracing::warn!(error = %format!("{e:#}"), "attestation quote not accepted");
            }
        }
        // The server's hint only ever shortens the sleep (boot() takes the
        // smaller of it and the poll interval).
        let hinted = answer.poll_after.map(CycleEnd::SleepFor);
        let Some(desired) = answer.desired else {
            return Ok(hinted);
        };
        let end = self.act(&credential, &status, &desired)?;
        Ok(end
            .or(desired
                .poll_after_secs
                .map(|s| CycleEnd::SleepFor(Duration::from_secs(s.max(1)))))
            .or(hinted))
    }

    /// Does what the server asked for.
    fn act(
        &mut self,
        credential: &str,
        status: &crate::status::Status,
        desired: &Desired,
    ) -> Result<Option<CycleEnd>> {
        let booted = status.booted_slot;
        let version_in = |slot: Slot| {
            status
                .slots
                .iter()
                .find(|s| s.slot == slot && s.verified)
                .and_then(|s| s.version.clone())
        };
        let mut st = state::load(&self.data)?;
        if let Some(a) = &st.awaiting
            && a.release_id == desired.release_id
        {
            // Installed already, the reboot is pending or its outcome is
            // being decided.
            return Ok(None);
        }
        if version_in(booted).as_deref() == Some(desired.version.as_str()) {
            return Ok(None);
        }
        if st
            .given_up
            .as_ref()
            .is_some_and(|g| g.release_id == desired.release_id)
        {
            tracing::debug!(release = %desired.release_id, "given up on this release; waiting for another");
            return Ok(None);
        }
        let boot_id = state::boot_id(&self.data, self.options.simulate_boot)?;
        let awaiting = |action, slot| Awaiting {
            action,
            release_id: desired.release_id.clone(),
            version: desired.version.clone(),
            slot,
            rollout_id: desired.rollout_id.clone(),
            boot_id: boot_id.clone(),
            reported_rebooted: false,
            at: crate::store::now(),
        };
        match desired.action.as_str() {
            "rollback" => {
                let other = booted.other();
                if version_in(other).as_deref() != Some(desired.version.as_str()) {
                    let reason = format!(
                        "cannot roll back to {}: slot {other} holds {}",
                        desired.version,
                        version_in(other).unwrap_or_else(|| "no verified release".into())
                    );
                    return self.give_up(&mut st, desired, reason).map(|()| None);
                }
                tracing::info!(version = %desired.version, slot = %other, "rolling back: booting the other slot");
                match crate::boot::rollback(&self.ctx.config, self.ctx.flow.as_mut()) {
                    Ok(slot) => {
                        st.awaiting = Some(awaiting(Action::Rollback, slot));
                        state::save(&self.data, &st)?;
                        Ok(Some(CycleEnd::Reboot))
                    }
                    Err(e) => self
                        .give_up(&mut st, desired, format!("rollback refused: {e}"))
                        .map(|()| None),
                }
            }
            "install" => {
                if let Some(w) = desired.download_window {
                    let now = now_ms();
                    if now < w.not_before_ms {
                        let wait = Duration::from_millis((w.not_before_ms - now) as u64);
                        tracing::info!(version = %desired.version, in_s = wait.as_secs(), "download window not open yet");
                        return Ok(Some(CycleEnd::SleepFor(wait)));
                    }
                    if now >= w.not_after_ms {
                        tracing::info!(version = %desired.version, "download window closed; waiting for a new one");
                        return Ok(None);
                    }
                }
                self.install(
                    credential,
                    &mut st,
                    desired,
                    awaiting(Action::Install, booted.other()),
                )
            }
            other => {
                tracing::warn!(action = other, "unknown action from the server; ignored");
                Ok(None)
            }
        }
    }

    fn give_up(&mut self, st: &mut DaemonState, desired: &Desired, reason: String) -> Result<()> {
        tracing::error!(release = %desired.release_id, %reason, "{} failed", desired.version);
        self.queue_report(serde_json::json!({
            "state": "failed",
            "release_id": desired.release_id,
            "reason": reason,
        }))?;
        st.given_up = Some(GivenUp {
            release_id: desired.release_id.clone(),
            reason,
        });
        state::save(&self.data, st)?;
        Ok(())
    }

    fn install(
        &mut self,
        credential: &str,
        st: &mut DaemonState,
        desired: &Desired,
        mut awaiting: Awaiting,
    ) -> Result<Option<CycleEnd>> {
        let url = self.client.url(&desired.url);
        tracing::info!(version = %desired.version, %url, "installing");
        let link = Link::new(&self.ctx.config.link, &self.data)?;
        let mut source = HttpSource::with_tls(&url, link, self.tls.clone()).with_bearer(credential);
        let options = crate::install::InstallOptions {
            allow_downgrade: self.server.allow_downgrade,
            at_time: None,
        };
        let stop = AtomicBool::new(false);
        let config = &self.ctx.config;
        let flow = self.ctx.flow.as_mut();
        let client = &self.client;
        let data = &self.data;
        let release_id = desired.release_id.as_str();
        let result = std::thread::scope(|scope| {
            scope.spawn(|| progress(client, credential, data, release_id, &stop));
            let r = crate::install::install(config, flow, &mut source, &options);
            stop.store(true, Ordering::Relaxed);
            r
        });
        match result {
            Ok(report) => {
                tracing::info!(
                    version = %report.version,
                    slot = ?report.target,
                    bytes = report.bytes_fetched,
                    chunks_fetched = report.chunks_fetched,
                    chunks_from_seed = report.chunks_from_seed,
                    "installed; rebooting into it"
                );
                if let Some(t) = report.target {
                    awaiting.slot = t;
                }
                self.queue_report(serde_json::json!({
                    "state": "installed",
                    "release_id": desired.release_id,
                    "bytes_done": report.bytes_fetched,
                    "bytes_total": desired.size,
                }))?;
                st.awaiting = Some(awaiting);
                st.given_up = None;
                state::save(&self.data, st)?;
                Ok(Some(CycleEnd::Reboot))
            }
            Err(e) if transient(&e) => {
                // Resumable: the journal keeps every verified chunk.
                Err(anyhow::Error::new(e)
                    .context(format!("install of {} interrupted", desired.version)))
            }
            Err(e) => {
                self.give_up(st, desired, e.to_string())?;
                Ok(None)
            }
        }
    }

    /// Reboots: the reboot command, then (simulated) the boot script.
    fn reboot(&mut self) -> Result<Next> {
        let cmd = &self.ctx.config.reboot_command;
        let (program, rest) = cmd
            .split_first()
            .ok_or_else(|| anyhow!("reboot-command is empty"))?;
        let status = std::process::Command::new(program)
            .args(rest)
            .status()
            .with_context(|| format!("unable to run the reboot command {cmd:?}"))?;
        if !status.success() {
            bail!("the reboot command {cmd:?} failed: {status}");
        }
        self.await_reboot()
    }

    /// After the reboot command: a simulated device boots again now; a
    /// real one waits to be taken down.
    fn await_reboot(&mut self) -> Result<Next> {
        // A real reboot ends them; a simulated one must too.
        self.agents = None;
        let cmd = &self.ctx.config.reboot_command;
        if self.options.simulate_boot {
            simulate_power_on(&self.ctx.config)?;
            return Ok(Next::Booted);
        }
        tracing::info!("reboot command ran; waiting for the system to go down");
        std::thread::sleep(REBOOT_GRACE);
        bail!(
            "the reboot command {cmd:?} ran but the system did not reboot within {} s",
            REBOOT_GRACE.as_secs()
        )
    }
}

/// How a cycle wants the next one to start.
enum CycleEnd {
    /// Reboot now.
    Reboot,
    /// Poll again after this long (at most the poll interval).
    SleepFor(Duration),
}

/// Errors after which the same install is simply tried again later.
fn transient(e: &UpdateError) -> bool {
    matches!(
        e,
        UpdateError::Download { .. } | UpdateError::BudgetSpent { .. } | UpdateError::Io { .. }
    )
}

/// Reports download progress while an install runs (best effort: not
/// queued, a later report supersedes it).
fn progress(
    client: &Client,
    credential: &str,
    data: &DataDir,
    release_id: &str,
    stop: &AtomicBool,
) {
    let mut last = Instant::now();
    let mut last_bytes = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() < PROGRESS_EVERY {
            continue;
        }
        last = Instant::now();
        let Ok(Some(p)) = data.pending() else {
            continue;
        };
        if last_bytes == Some(p.done_bytes) {
            continue;
        }
        last_bytes = Some(p.done_bytes);
        let body = serde_json::json!({
            "state": "downloading",
            "release_id": release_id,
            "bytes_done": p.downloaded_bytes,
            "bytes_total": serde_json::Value::Null,
        });
        if let Err(e) = client.post(Some(credential), "/api/v1/device/report", &body, None) {
            tracing::debug!(error = %e, "progress report not delivered");
        }
    }
}

/// A simulated power-on: what the boot script does to the boot state, then
/// the chosen slot written to the kernel command line file.
pub fn simulate_power_on(config: &SystemConfig) -> Result<Slot> {
    let cmdline = config.bootloader.cmdline.clone().ok_or_else(|| {
        anyhow!("--simulate-boot needs [bootloader] cmdline = \"<file>\" (and no booted-slot): the simulated kernel command line")
    })?;
    if config.bootloader.booted_slot.is_some() {
        bail!(
            "--simulate-boot cannot change a fixed [bootloader] booted-slot; use cmdline instead"
        );
    }
    let mut flow = config
        .bootloader
        .open()
        .context("unable to open the boot state")?;
    let mut chosen = None;
    flow.modify(&mut |s| {
        chosen = Some(s.select_boot());
        Ok(())
    })
    .context("unable to update the boot state")?;
    let pick = chosen.ok_or_else(|| anyhow!("the boot state was not read"))?;
    crate::store::write_atomically(&cmdline, format!("kernex.slot={}\n", pick.slot).as_bytes())?;
    let data = DataDir::new(&config.data_dir);
    let n = state::next_sim_boot(&data)?;
    tracing::info!(slot = %pick.slot, fallback = pick.fallback, boot = n, "simulated boot");
    Ok(pick.slot)
}
