//! Scenarios written once for any board: a QEMU board
//! ([`Machine::start`]) or a lab board ([`Machine::start_lab`]: a real one,
//! or QEMU run as one). `tests/scenarios.rs` runs them on both kinds;
//! `kernex-hw-run` runs them on a real board.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::disk;
use crate::machine::{Lab, Machine, boot_timeout};

/// What U-Boot prints once it has started, before it runs the boot script.
pub const UBOOT_STARTED: &str = "Hit any key to stop autoboot";
/// How long U-Boot may take to get there (seconds under TCG when healthy).
pub const FIRMWARE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one `kernex-updater install` may take.
pub const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// A board a scenario runs on.
pub trait Rig {
    /// Powers the board on (a lab board: cut first, so it is a cold boot).
    fn power_on(&self) -> Result<Machine>;
    /// The board's disk image, readable on the host after a power cut
    /// (QEMU boards; `None` for a lab board).
    fn disk_image(&self) -> Option<&Path>;
    /// A scratch directory on the host.
    fn work_dir(&self) -> &Path;
}

/// Waits for U-Boot's choice (`uboot_says`) and the guest's shell (QEMU)
/// or ssh (lab board); returns `kernex-updater status --json`.
///
/// A firmware start that fails before U-Boot even offers to stop
/// autoboot — QEMU dying by a signal (seen once: a SIGSEGV under TCG
/// during U-Boot's start on a loaded machine) or U-Boot hanging right
/// after "Loading Environment" (seen once, with two boards emulated and
/// load 7) — is a power-on that did not happen: the board is powered on
/// once more, and the runner says so on stderr and in the console log.
/// No Kernex code has run by then (the boot script runs after the
/// autoboot prompt), and a second failure fails. A QEMU crash later in
/// U-Boot is treated the same; this cannot hide a wrong boot either: had
/// the boot script already counted an attempt before the crash, the
/// counters `uboot_says` names would not match on the second power-on.
pub fn boots(rig: &dyn Rig, m: &mut Machine, uboot_says: &str) -> Result<Value> {
    if let Err(e) = m.wait_for(UBOOT_STARTED, FIRMWARE_TIMEOUT) {
        let e = format!("{e:#}");
        if !(e.contains("QEMU exited (signal:") || e.contains("did not print")) {
            bail!("{e}");
        }
        eprintln!("U-Boot did not start; powering the board on again: {e}");
        *m = rig.power_on()?;
        m.wait_for(UBOOT_STARTED, FIRMWARE_TIMEOUT)?;
    }
    match m.wait_for(uboot_says, boot_timeout()) {
        Ok(_) => {}
        Err(e) if format!("{e:#}").contains("QEMU exited (signal:") => {
            eprintln!("QEMU crashed; powering the board on again: {e:#}");
            *m = rig.power_on()?;
            m.wait_for(uboot_says, boot_timeout())?;
        }
        Err(e) => return Err(e),
    }
    m.wait_for_shell()?;
    m.status()
}

/// Syncs, cuts the power and returns the boot env U-Boot will read at the
/// next power-on. QEMU: read from the disk image after the cut. A lab
/// board's disk cannot be read from the host: the env file is read over
/// ssh after the sync, right before the cut (the next power-on's U-Boot
/// line then shows what U-Boot itself read).
pub fn sync_cut_and_read_env(rig: &dyn Rig, m: &mut Machine) -> Result<BTreeMap<String, String>> {
    let (out, code) = m.sh("sync", Duration::from_secs(60))?;
    ensure!(code == 0, "sync exited {code}: {out}");
    let env = if m.is_lab() {
        let data = m.read_file(&format!("/boot/{}", disk::ENV_FILE))?;
        m.power_off()?;
        disk::parse_env(&data, &rig.work_dir().join("work"))?
    } else {
        m.power_off()?;
        let image = rig
            .disk_image()
            .context("a QEMU board without a disk image")?;
        disk::read_env(image, rig.work_dir())?
    };
    Ok(env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// The entry of slot `name` in `status --json`.
pub fn slot<'a>(status: &'a Value, name: &str) -> Result<&'a Value> {
    status["slots"]
        .as_array()
        .and_then(|slots| slots.iter().find(|s| s["slot"] == name))
        .with_context(|| format!("no slot {name} in {status}"))
}

/// Fails unless `status[key]` is `want`.
fn expect(status: &Value, key: &str, want: impl Into<Value>) -> Result<()> {
    let want = want.into();
    ensure!(
        status[key] == want,
        "{key} is {}, expected {want}: {status}",
        status[key]
    );
    Ok(())
}

/// Installs the bundle `bundle` in the guest (from the bundles disk on
/// QEMU; a lab board gets it copied over ssh first).
pub fn install_file(m: &mut Machine, bundle: &Path) -> Result<()> {
    let path = m.bundle(bundle)?;
    let (out, code) = m.sh(&format!("kernex-updater install {path}"), INSTALL_TIMEOUT)?;
    ensure!(code == 0, "install {path} exited {code}:\n{out}");
    Ok(())
}

/// A factory board boots A and commits it.
pub fn factory_booted(rig: &dyn Rig, m: &mut Machine) -> Result<()> {
    let st = boots(rig, m, "Kernex: booting slot A (A left 2, B left 0)")?;
    expect(&st, "booted-slot", "A")?;
    expect(&st, "committed", true)
}

/// Scenario 1: the factory image boots A and commits it; the commit
/// reaches the env file U-Boot reads at the next power-on. Ends with the
/// power cut.
pub fn scenario_1(rig: &dyn Rig) -> Result<()> {
    let mut m = rig.power_on()?;
    let st = boots(rig, &mut m, "Kernex: booting slot A (A left 2, B left 0)")?;
    expect(&st, "booted-slot", "A")?;
    expect(&st, "primary-slot", "A")?;
    expect(&st, "committed", true)?;
    expect(slot(&st, "A")?, "attempts-left", 3)?;
    expect(&st["health"], "outcome", "committed")?;
    // The commit reached the env file U-Boot reads at the next power-on.
    let env = sync_cut_and_read_env(rig, &mut m)?;
    env_is(&env, "BOOT_A_LEFT", "3")?;
    env_is(&env, "BOOT_ORDER", "A B")
}

/// Scenario 2: `bundle` (release `version`) is installed into B, B boots
/// on trial and commits, and stays primary. Ends with the power cut.
pub fn scenario_2(rig: &dyn Rig, bundle: &Path, version: &str) -> Result<()> {
    let mut m = rig.power_on()?;
    factory_booted(rig, &mut m)?;
    install_file(&mut m, bundle)?;
    let st = m.status()?;
    expect(&st, "primary-slot", "B")?;
    let b = slot(&st, "B")?;
    expect(b, "version", version)?;
    expect(b, "verified", true)?;
    expect(b, "attempts-left", 3)?;

    // U-Boot tries B first and counts the attempt; the watchdog commits it.
    m.reboot()?;
    let st = boots(rig, &mut m, "Kernex: booting slot B (A left 3, B left 2)")?;
    expect(&st, "booted-slot", "B")?;
    expect(&st, "committed", true)?;
    expect(&st["health"], "outcome", "committed")?;
    expect(&st["health"], "slot", "B")?;
    expect(slot(&st, "B")?, "attempts-left", 3)?;

    // B stays primary across the next reboot.
    m.reboot()?;
    let st = boots(rig, &mut m, "Kernex: booting slot B (A left 3, B left 2)")?;
    expect(&st, "booted-slot", "B")?;
    expect(&st, "primary-slot", "B")?;
    expect(&st, "committed", true)?;
    let env = sync_cut_and_read_env(rig, &mut m)?;
    env_is(&env, "BOOT_ORDER", "B A")
}

fn env_is(env: &BTreeMap<String, String>, name: &str, want: &str) -> Result<()> {
    ensure!(
        env.get(name).map(String::as_str) == Some(want),
        "{name} in the boot env is {:?}, expected {want:?}",
        env.get(name)
    );
    Ok(())
}

/// A lab board run by `kernex-hw-run`: its console log and ssh log in
/// `dir`; its power is cut when it is dropped.
#[derive(Debug)]
pub struct LabRig {
    pub lab: Lab,
    pub dir: PathBuf,
}

impl LabRig {
    pub fn log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

impl Rig for LabRig {
    fn power_on(&self) -> Result<Machine> {
        Machine::start_lab(&self.lab, &self.log())
    }
    fn disk_image(&self) -> Option<&Path> {
        None
    }
    fn work_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for LabRig {
    fn drop(&mut self) {
        if let Err(e) = self.lab.power_off(&self.log()) {
            eprintln!("kernex-hw: cutting the board's power failed: {e:#}");
        }
    }
}
