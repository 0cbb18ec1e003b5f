//! The data directory's layout: every file the updater keeps under
//! `data-dir`, as paths relative to it.
//!
//! ```text
//! slot-A/record.json        what slot A holds (manifest, signature, verified)
//! slot-A/rootfs.kxi         that release's chunk index (agent.kxi likewise)
//! install/state.json        the install in progress: target, bundle, progress
//! install/journal           verified chunks written to the target
//! last-install.json         the last install's outcome and reason
//! budget.json               bytes downloaded today (UTC), for metered links
//! health.json               the health watchdog's last run
//! health-last-revert.json   why the watchdog last reverted
//! health-reverts.json       revert reboots in a row
//! daemon.json               the daemon's state (what it awaits, gave up on)
//! credential.json           the device's credential (0600)
//! device-key.pem            the device's private key (0600, never sent)
//! simulated-boot-id         a simulated device's boot id
//! outbox/                   reports and log batches waiting for the server
//! security-floor.a          the anti-rollback floor (highest security version committed)
//! security-floor.b          its redundant copy
//! attest/ak.json            the TPM attestation key (wrapped by the TPM)
//! attest/binding.json       the server's binding of that key
//! ```
//!
//! The image builder writes the slot records of a factory disk here too, so
//! a device's first update is already a delta.

use std::path::PathBuf;

use kernex_bootloader::Slot;
use kernex_protocol::SlotClass;

/// The install in progress.
pub const INSTALL_DIR: &str = "install";
/// The install in progress: target, bundle, progress.
pub const INSTALL_STATE: &str = "install/state.json";
/// Verified chunks written to the target.
pub const JOURNAL: &str = "install/journal";
/// The last install's outcome and reason.
pub const LAST_INSTALL: &str = "last-install.json";
/// Bytes downloaded today (UTC), for metered links.
pub const BUDGET: &str = "budget.json";
/// The health watchdog's last run.
pub const HEALTH: &str = "health.json";
/// Why the watchdog last reverted.
pub const HEALTH_LAST_REVERT: &str = "health-last-revert.json";
/// Revert reboots in a row.
pub const HEALTH_REVERTS: &str = "health-reverts.json";
/// The daemon's state.
pub const DAEMON_STATE: &str = "daemon.json";
/// The device's credential.
pub const CREDENTIAL: &str = "credential.json";
/// The device's private key (PKCS#8 PEM, mode 0600): its identity.
pub const DEVICE_KEY: &str = "device-key.pem";
/// A simulated device's boot id.
pub const SIMULATED_BOOT_ID: &str = "simulated-boot-id";
/// Reports and log batches waiting for the server.
pub const OUTBOX: &str = "outbox";
/// The anti-rollback floor, first copy (see the updater's `floor` module).
pub const SECURITY_FLOOR_A: &str = "security-floor.a";
/// The anti-rollback floor, second copy.
pub const SECURITY_FLOOR_B: &str = "security-floor.b";
/// The TPM attestation key.
pub const ATTEST_AK: &str = "attest/ak.json";
/// The server's binding of the attestation key.
pub const ATTEST_BINDING: &str = "attest/binding.json";
/// The device key when it lives in the TPM (`[tpm]` configured): its
/// public part and its TPM-wrapped private part; no `DEVICE_KEY` file.
pub const ATTEST_DEVICE_KEY: &str = "attest/device-key.json";

/// What `slot` holds: its record and chunk indexes (`slot-A`).
pub fn slot_dir(slot: Slot) -> PathBuf {
    PathBuf::from(format!("slot-{slot}"))
}

/// The record of what `slot` holds (`slot-A/record.json`).
pub fn slot_record(slot: Slot) -> PathBuf {
    slot_dir(slot).join("record.json")
}

/// The chunk index of `class` in `slot` (`slot-A/rootfs.kxi`).
pub fn slot_index(slot: Slot, class: SlotClass) -> PathBuf {
    slot_dir(slot).join(format!("{class}.kxi"))
}
