//! Errors of the boot-state layer.

use std::io;
use std::path::PathBuf;

use crate::Slot;

/// What went wrong reading or changing the boot state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The U-Boot environment could not be read or written.
    #[error("U-Boot environment")]
    UBootEnv(#[from] u_boot_env::EnvError),
    /// The GRUB environment block is malformed.
    #[error("{path}: {reason}")]
    GrubEnv {
        /// The grubenv file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("unable to {action} {path}")]
    Io {
        /// "read", "write", ...
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file is larger than the limit for its kind.
    #[error("{path} is larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// The state file of the `File` backend is malformed.
    #[error("{path}: malformed state file")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: u_boot_env::EnvError,
    },
    /// `BOOT_ORDER` holds something other than slot names.
    #[error(
        "BOOT_ORDER is {value:?}: expected slot names A and B separated by spaces, e.g. \"A B\""
    )]
    InvalidOrder {
        /// The value found.
        value: String,
    },
    /// A `BOOT_x_LEFT` counter is not a number.
    #[error("{name} is {value:?}: expected a number of attempts (0-9)")]
    InvalidCounter {
        /// `BOOT_A_LEFT` or `BOOT_B_LEFT`.
        name: String,
        /// The value found.
        value: String,
    },
    /// An attempt count outside what the boot scripts can count down.
    #[error(
        "{attempts} attempts for slot {slot}: must be 1..={max} (the boot scripts count single digits)"
    )]
    InvalidAttempts {
        /// The slot.
        slot: Slot,
        /// The rejected count.
        attempts: u32,
        /// [`crate::MAX_ATTEMPTS`].
        max: u32,
    },
    /// A slot name other than A or B.
    #[error("{value:?} is not a slot name (expected A or B)")]
    InvalidSlot {
        /// The value found.
        value: String,
    },
    /// The kernel command line names no slot.
    #[error(
        "{path} has neither kernex.slot= nor rauc.slot=: the boot script did not say which slot it booted"
    )]
    NoSlotOnCmdline {
        /// The command line file.
        path: PathBuf,
    },
    /// The configuration lacks a setting the backend needs.
    #[error("bootloader backend {backend:?} needs the setting {setting:?}")]
    MissingSetting {
        /// The backend.
        backend: &'static str,
        /// The missing key.
        setting: &'static str,
    },
}
