//! The boot follow-up: what the daemon does first in every boot. It
//! settles the reboot the last boot asked for (the new slot came up, or
//! the bootloader fell back), runs the health watchdog while the booted
//! slot is on trial and queues its verdict; and it reboots when a cycle
//! asks for it (on a simulated device, by doing what the boot script does
//! at power-on).

use anyhow::{Context as _, Result, anyhow, bail};
use kernex_bootloader::Slot;
use kernex_protocol::api::ReportState;

use super::state::{self, Action, Awaiting, DaemonState};
use super::{Daemon, Next, REBOOT_GRACE};
use crate::config::SystemConfig;
use crate::health::RunResult;
use crate::store::DataDir;

impl Daemon<'_> {
    /// After a boot: report how the last reboot went and run the health
    /// watchdog. `Ok(true)` when the watchdog reverted and rebooted.
    pub(super) fn after_boot(&mut self) -> Result<bool> {
        let booted = self.ctx.flow.booted_slot()?;
        let boot_id = state::boot_id(&self.data, self.options.simulate_boot)?;
        let mut st = state::load(&self.data)?;
        if let Some(a) = st.awaiting.clone() {
            if a.boot_id == boot_id {
                tracing::info!(slot = %a.slot, "the reboot for {} has not happened yet", a.version);
            } else if booted == a.slot {
                if !a.reported_rebooted {
                    self.reports.rebooted(&a)?;
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
                self.reports
                    .outcome(&a, ReportState::Reverted, Some(&reason), booted)?;
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
                        Action::Install => ReportState::Committed,
                        Action::Rollback => ReportState::RolledBack,
                    };
                    tracing::info!(version = %a.version, slot = %booted, "{state}");
                    self.reports.outcome(&a, state, None, booted)?;
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
                    self.reports.outcome(
                        &a,
                        ReportState::Reverted,
                        Some(&record.reason),
                        booted.other(),
                    )?;
                    state::save(
                        &self.data,
                        &DaemonState {
                            awaiting: None,
                            ..st
                        },
                    )?;
                } else {
                    self.reports.reverted(&record.reason, booted)?;
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

    /// Reboots: the reboot command, then (simulated) the boot script.
    pub(super) fn reboot(&mut self) -> Result<Next> {
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
    pub(super) fn await_reboot(&mut self) -> Result<Next> {
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
