//! The updater library's error type.

use std::io;
use std::path::PathBuf;

use kernex_bootloader::{BootError, Slot};
use kernex_protocol::SlotClass;

/// Why an updater operation failed. Each variant names what was wrong with
/// which value; the binary adds context on top.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// A file or device could not be read or written.
    #[error("unable to {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "sync", ...).
        action: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The configuration is invalid.
    #[error("config {}: {reason}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The boot environment could not be read or written.
    #[error("boot environment: {0}")]
    Boot(#[from] BootError),
    /// The bundle is malformed or does not verify.
    #[error("bundle rejected: {0}")]
    Bundle(String),
    /// The bundle is fine but may not be installed on this device.
    #[error("bundle refused: {0}")]
    Refused(String),
    /// Downloading failed after every retry.
    #[error("download of {url} failed: {reason}")]
    Download {
        /// What was fetched.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The metered link's daily byte budget is spent.
    #[error(
        "the daily download budget of {budget} bytes for this metered link is spent ({used} bytes used today, UTC); the install resumes where it stopped when run again tomorrow or with a larger budget"
    )]
    BudgetSpent {
        /// Daily budget.
        budget: u64,
        /// Bytes used today.
        used: u64,
    },
    /// A chunk that should be the same in a seed or the target is not, and
    /// no source is left for it.
    #[error("{class} chunk at image offset {offset} is corrupt: {reason}")]
    Chunk {
        /// Image.
        class: SlotClass,
        /// Image offset of the chunk.
        offset: u64,
        /// What failed.
        reason: String,
    },
    /// The written slot does not hold the image the manifest describes.
    #[error(
        "slot {slot} ({class}) does not verify after writing: expected sha256 {expected} over {size} bytes, read {found}"
    )]
    SlotVerify {
        /// The slot.
        slot: Slot,
        /// Image class.
        class: SlotClass,
        /// Manifest digest.
        expected: String,
        /// Digest read back.
        found: String,
        /// Image size.
        size: u64,
    },
    /// A state record in the data directory is unreadable.
    #[error("state file {}: {reason}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An operation was refused because of the A/B state.
    #[error("{0}")]
    SlotState(String),
    /// A release below the anti-rollback floor ([`crate::floor`]).
    #[error(
        "refusing to {what}: its security version {security_version} is below this device's anti-rollback floor {floor}"
    )]
    BelowFloor {
        /// What was asked, e.g. "install 2.0.1".
        what: String,
        /// The release's security version.
        security_version: u64,
        /// The device's floor.
        floor: u64,
    },
}

impl From<kernex_device::ConfigError> for UpdateError {
    fn from(e: kernex_device::ConfigError) -> Self {
        match e {
            kernex_device::ConfigError::Io {
                action,
                path,
                source,
            } => UpdateError::Io {
                action,
                path,
                source,
            },
            kernex_device::ConfigError::Invalid { path, reason } => {
                UpdateError::Config { path, reason }
            }
        }
    }
}

impl From<kernex_device::RecordError> for UpdateError {
    fn from(e: kernex_device::RecordError) -> Self {
        UpdateError::Bundle(e.to_string())
    }
}

/// `map_err` helper for I/O on a path.
pub(crate) fn io_err(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(io::Error) -> UpdateError {
    let path = path.to_owned();
    move |source| UpdateError::Io {
        action,
        path,
        source,
    }
}
