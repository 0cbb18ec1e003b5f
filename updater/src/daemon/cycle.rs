//! One poll cycle: enroll if needed, deliver what is queued, heartbeat,
//! poll, answer the server's quote nonce, then do what the server asks: an
//! install into the inactive slot (inside its download window) or a
//! rollback to the other slot. Either ends in a reboot.

use std::cell::Cell;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::Result;
use kernex_bootloader::Slot;
use kernex_protocol::api::{self, DesiredAction};

use super::client::Client;
use super::state::{self, Action, Awaiting, DaemonState, GivenUp};
use super::tpm::TpmError;
use super::{Daemon, PROGRESS_EVERY, now_ms, reports};
use crate::error::UpdateError;
use crate::install::InstallProgress;
use crate::source::{HttpSource, Link};
use crate::status::Status;

/// How a cycle wants the next one to start.
pub(super) enum CycleEnd {
    /// Reboot now.
    Reboot,
    /// Poll again after this long (at most the poll interval).
    SleepFor(Duration),
}

impl Daemon<'_> {
    /// One poll cycle.
    pub(super) fn cycle(&mut self) -> Result<Option<CycleEnd>> {
        let credential = self.ensure_enrolled()?;
        self.ensure_tpm_bound();
        self.reports.ship_logs();
        self.deliver()?;
        let status = crate::status::status(&self.ctx.config, self.ctx.flow.as_mut())?;
        let hb = self
            .sampler
            .heartbeat(&status, &self.ctx.config.data_dir, &self.server);
        if let Err(e) = self.client.heartbeat(&credential, &hb) {
            return Err(self.on_client_error(e).context("heartbeat failed"));
        }
        let answer = match self.client.poll(&credential) {
            Ok(d) => d,
            Err(e) => return Err(self.on_client_error(e).context("poll failed")),
        };
        if let Some(nonce) = &answer.nonce {
            // Best effort: a quote the server rejects is logged, and the
            // server asks again with a new nonce.
            if let Err(e) = self
                .tpm
                .answer_quote(&self.client, &credential, nonce, &status)
            {
                let e = match e {
                    TpmError::Server(e) => self.on_client_error(e),
                    TpmError::Other(e) => e,
                };
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
        status: &Status,
        desired: &api::DesiredState,
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
        match desired.action() {
            DesiredAction::Rollback => {
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
                match crate::boot::rollback(
                    &self.ctx.config,
                    self.ctx.flow.as_mut(),
                    self.server.allow_downgrade,
                ) {
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
            DesiredAction::Install => {
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
            DesiredAction::Unknown => {
                tracing::warn!("unknown action from the server; ignored");
                Ok(None)
            }
        }
    }

    /// Reports `desired` failed and remembers not to try it again.
    fn give_up(
        &mut self,
        st: &mut DaemonState,
        desired: &api::DesiredState,
        reason: String,
    ) -> Result<()> {
        tracing::error!(release = %desired.release_id, %reason, "{} failed", desired.version);
        self.reports.failed(&desired.release_id, &reason)?;
        st.given_up = Some(GivenUp {
            release_id: desired.release_id.clone(),
            reason,
        });
        state::save(&self.data, st)?;
        Ok(())
    }

    /// Installs `desired` into the inactive slot, reporting progress.
    fn install(
        &mut self,
        credential: &str,
        st: &mut DaemonState,
        desired: &api::DesiredState,
        mut awaiting: Awaiting,
    ) -> Result<Option<CycleEnd>> {
        let url = self.client.url(&desired.url);
        tracing::info!(version = %desired.version, %url, "installing");
        let link = Link::new(&self.ctx.config.link, &self.data)?;
        let mut source = HttpSource::with_tls(&url, link, self.tls.clone()).with_bearer(credential);
        // Patches the server made from the booted release, read from
        // their own URLs ([`crate::install::server_patch`]) over the
        // bundle's connections and link (one rate limit, one budget).
        let mut offers: Vec<(api::ServerPatch, Box<dyn crate::source::Source>)> = Vec::new();
        for p in &desired.patches {
            let src = source.sibling(&self.client.url(&p.url));
            offers.push((p.clone(), Box::new(src)));
        }
        let options = crate::install::InstallOptions {
            allow_downgrade: self.server.allow_downgrade,
            at_time: None,
        };
        let config = &self.ctx.config;
        let flow = self.ctx.flow.as_mut();
        let client = &self.client;
        let release_id = desired.release_id.as_str();
        // The install calls back after every saved batch; at most one
        // report per PROGRESS_EVERY goes to a thread that sends it, so a
        // slow server never holds up the download.
        let (tx, rx) = std::sync::mpsc::sync_channel::<InstallProgress>(1);
        let result = std::thread::scope(|scope| {
            scope.spawn(move || send_progress(client, credential, release_id, &rx));
            let gate = ProgressGate::new();
            let on_progress = move |p: InstallProgress| {
                if gate.admit(&p) {
                    // Full: the last report is still being sent; skip this one.
                    let _ = tx.try_send(p);
                }
            };
            let r = crate::install::server_patch::install_offered(
                config,
                flow,
                &mut source,
                offers,
                &options,
                &on_progress,
            );
            // Ends the sender thread.
            drop(on_progress);
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
                self.reports
                    .installed(&desired.release_id, report.bytes_fetched, desired.size)?;
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
}

/// Errors after which the same install is simply tried again later.
fn transient(e: &UpdateError) -> bool {
    matches!(
        e,
        UpdateError::Download { .. } | UpdateError::BudgetSpent { .. } | UpdateError::Io { .. }
    )
}

/// Lets through at most one progress per [`PROGRESS_EVERY`], and only
/// when the install moved since the last one.
struct ProgressGate {
    last: Cell<Instant>,
    last_bytes: Cell<Option<u64>>,
}

impl ProgressGate {
    fn new() -> Self {
        Self {
            last: Cell::new(Instant::now()),
            last_bytes: Cell::new(None),
        }
    }

    fn admit(&self, p: &InstallProgress) -> bool {
        if self.last.get().elapsed() < PROGRESS_EVERY {
            return false;
        }
        self.last.set(Instant::now());
        if self.last_bytes.get() == Some(p.done_bytes) {
            return false;
        }
        self.last_bytes.set(Some(p.done_bytes));
        true
    }
}

/// Reports the download progress it receives until the install ends (best
/// effort: not queued, a later report supersedes it).
fn send_progress(
    client: &Client,
    credential: &str,
    release_id: &str,
    progress: &Receiver<InstallProgress>,
) {
    for p in progress {
        let report = reports::downloading(release_id, p.downloaded_bytes);
        if let Err(e) = client.report(credential, &report, None) {
            tracing::debug!(error = %e, "progress report not delivered");
        }
    }
}
