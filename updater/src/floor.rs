//! The anti-rollback floor: the highest manifest `security-version` this
//! device has committed. An install or a rollback to a release below it is
//! refused, whoever asks (the CLI, the daemon, the server's `rollback`
//! action); the health watchdog raises it when it commits a slot.
//!
//! Kept twice in the data dir ([`layout::SECURITY_FLOOR_A`],
//! [`layout::SECURITY_FLOOR_B`]), each one line
//!
//! ```text
//! kernex-security-floor 1 <floor> <sha256 of "kernex-security-floor 1 <floor>">
//! ```
//!
//! written atomically (temp file, fsync, rename, fsync of the directory),
//! copy A first, then copy B. The floor is the larger of the valid copies:
//! a copy that is torn, bit-rotten or missing is ignored, so a power cut at
//! any moment leaves the old floor or the new one, never less. Both copies
//! present and both corrupt is an error (an install is then refused rather
//! than the floor dropping to 0).
//!
//! With a `[tpm]` (and the `tpm` feature), the floor is also kept in a TPM
//! NV counter ([`kernex_attest::Tpm::raise_floor_counter`]): the floor in
//! force is the larger of the files and the counter, so deleting the files
//! or putting older copies back does not lower it. Raising the floor
//! writes the files first, then counts the TPM up to the new value (at
//! most [`MAX_COUNTER_STEPS`] increments per raise, each an NV write; the
//! files hold the rest, and the next raise catches up). A configured TPM
//! that cannot be read is an error, as two corrupt copies are.

use std::path::{Path, PathBuf};

use kernex_device::layout;
use kernex_protocol::Sha256Digest;
use kernex_protocol::limits::MAX_SECURITY_VERSION;

use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::failpoints::failpoint;
use crate::store::{DataDir, read_limited, write_atomically};

/// The first words of a floor file.
const MAGIC: &str = "kernex-security-floor 1";
/// Largest floor file read.
const MAX_FLOOR_FILE: u64 = 256;

/// Most TPM counter increments one raise makes.
pub const MAX_COUNTER_STEPS: u64 = 1024;

/// The device's floor in its data dir (and its TPM).
#[derive(Debug, Clone)]
pub struct Floor {
    copies: [PathBuf; 2],
    /// The TPM holding the floor counter, when configured.
    tpm: Option<kernex_device::TpmConfig>,
}

/// What one copy holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    /// No file.
    Missing,
    /// A file that is not a valid floor (torn, corrupt).
    Corrupt,
    /// A valid floor.
    Valid(u64),
}

fn body(floor: u64) -> String {
    format!("{MAGIC} {floor}")
}

/// The bytes of a floor file holding `floor`.
pub fn encode(floor: u64) -> Vec<u8> {
    let body = body(floor);
    format!("{body} {}\n", Sha256Digest::of(body.as_bytes()).to_hex()).into_bytes()
}

/// The floor a file's bytes hold, if they are a valid floor file.
pub fn decode(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?.strip_suffix('\n')?;
    let (body, digest) = text.rsplit_once(' ')?;
    let floor: u64 = body.strip_prefix(MAGIC)?.strip_prefix(' ')?.parse().ok()?;
    if floor > MAX_SECURITY_VERSION || body != self::body(floor) {
        return None;
    }
    (Sha256Digest::of(body.as_bytes()).to_hex() == digest).then_some(floor)
}

impl Floor {
    /// The floor kept in `data` alone (no TPM).
    pub fn new(data: &DataDir) -> Self {
        Self {
            copies: [
                data.root().join(layout::SECURITY_FLOOR_A),
                data.root().join(layout::SECURITY_FLOOR_B),
            ],
            tpm: None,
        }
    }

    /// The floor of the device `config` describes: its data dir, and its
    /// TPM when `[tpm]` is configured.
    pub fn for_device(config: &SystemConfig) -> Self {
        Self {
            tpm: config.tpm.clone(),
            ..Self::new(&DataDir::new(&config.data_dir))
        }
    }

    /// The floor the TPM's counter holds (0 without a TPM, or before the
    /// first raise).
    pub fn tpm_floor(&self) -> Result<u64, UpdateError> {
        #[cfg(feature = "tpm")]
        if let Some(tpm) = &self.tpm {
            return crate::attest::open(tpm)
                .and_then(|mut t| Ok(t.floor_counter()?))
                .map(Option::unwrap_or_default)
                .map_err(|e| tpm_error(tpm, &e));
        }
        Ok(0)
    }

    /// Counts the TPM up towards `floor`; the TPM's floor now.
    fn raise_tpm(&self, floor: u64) -> Result<u64, UpdateError> {
        #[cfg(feature = "tpm")]
        if let Some(tpm) = &self.tpm {
            // Test builds only: a power cut with the files raised and the
            // TPM not yet.
            failpoint!(pause "floor-tpm");
            return crate::attest::open(tpm)
                .and_then(|mut t| Ok(t.raise_floor_counter(floor, MAX_COUNTER_STEPS)?))
                .map_err(|e| tpm_error(tpm, &e));
        }
        let _ = floor;
        Ok(0)
    }

    fn read_copy(path: &Path) -> Result<Copy, UpdateError> {
        if !path.exists() {
            return Ok(Copy::Missing);
        }
        let bytes = match read_limited(path, MAX_FLOOR_FILE) {
            Ok(b) => b,
            Err(UpdateError::State { .. }) => return Ok(Copy::Corrupt),
            Err(e) => return Err(e),
        };
        Ok(match decode(&bytes) {
            Some(floor) => Copy::Valid(floor),
            None => {
                tracing::warn!(path = %path.display(), "security floor copy is corrupt; ignored");
                Copy::Corrupt
            }
        })
    }

    /// The floor: the larger of the valid copies and the TPM's counter, 0
    /// on a device that never committed a release with a security version.
    pub fn get(&self) -> Result<u64, UpdateError> {
        Ok(self.files()?.max(self.tpm_floor()?))
    }

    /// The floor the data dir's copies hold.
    fn files(&self) -> Result<u64, UpdateError> {
        let a = Self::read_copy(&self.copies[0])?;
        let b = Self::read_copy(&self.copies[1])?;
        match (a, b) {
            (Copy::Corrupt, Copy::Corrupt) => Err(UpdateError::State {
                path: self.copies[0].clone(),
                reason: format!(
                    "both copies of the security floor ({} and {}) are corrupt; refusing to guess it",
                    self.copies[0].display(),
                    self.copies[1].display()
                ),
            }),
            (a, b) => {
                let value = |c| match c {
                    Copy::Valid(v) => v,
                    _ => 0,
                };
                Ok(value(a).max(value(b)))
            }
        }
    }

    /// Raises the floor to `security_version` (never lowers it); returns the
    /// floor now in force.
    pub fn raise(&self, security_version: u64) -> Result<u64, UpdateError> {
        let files = self.files()?;
        let tpm = self.tpm_floor()?;
        let current = files.max(tpm);
        if tpm < current {
            // The TPM behind the files (a cut before it was counted up, or
            // a raise over MAX_COUNTER_STEPS): catch it up.
            self.raise_tpm(current)?;
        }
        if security_version <= current {
            // Repair a missing or corrupt copy so both hold the floor.
            if current > 0 {
                for path in &self.copies {
                    if Self::read_copy(path)? != Copy::Valid(current) {
                        write_atomically(path, &encode(current))?;
                    }
                }
            }
            return Ok(current);
        }
        let bytes = encode(security_version);
        // Test builds only: a power cut before either copy is written.
        failpoint!(pause "floor-raise");
        write_atomically(&self.copies[0], &bytes)?;
        // Test builds only: a power cut with copy A new and copy B old.
        failpoint!(pause "floor-copy-a");
        write_atomically(&self.copies[1], &bytes)?;
        failpoint!(pause "floor-copy-b");
        let in_tpm = self.raise_tpm(security_version)?;
        if cfg!(feature = "tpm") && self.tpm.is_some() && in_tpm < security_version {
            tracing::warn!(
                in_tpm,
                floor = security_version,
                "the TPM's floor counter is behind the files (at most {MAX_COUNTER_STEPS} increments per raise); the next raise catches it up"
            );
        }
        tracing::info!(
            from = current,
            to = security_version,
            "security floor raised"
        );
        Ok(security_version)
    }

    /// Refuses a release of `security_version` (`what`: "install 2.0.1",
    /// "roll back to 2.0.1") if it is below the floor.
    pub fn check(&self, security_version: u64, what: &str) -> Result<(), UpdateError> {
        let floor = self.get()?;
        if security_version < floor {
            return Err(UpdateError::BelowFloor {
                what: what.to_owned(),
                security_version,
                floor,
            });
        }
        Ok(())
    }
}

#[cfg(feature = "tpm")]
fn tpm_error(tpm: &kernex_device::TpmConfig, e: &anyhow::Error) -> UpdateError {
    UpdateError::SlotState(format!(
        "the anti-rollback floor's TPM counter ({}): {e:#}",
        tpm.tcti
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_any_change() {
        let bytes = encode(42);
        assert_eq!(decode(&bytes), Some(42));
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            assert_eq!(decode(&bad), None, "flip at {at}");
        }
        for len in 0..bytes.len() {
            assert_eq!(decode(&bytes[..len]), None, "torn at {len}");
        }
        assert_eq!(decode(&encode(MAX_SECURITY_VERSION + 1)), None);
    }

    #[test]
    fn the_larger_valid_copy_wins_and_a_corrupt_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let floor = Floor::new(&data);
        assert_eq!(floor.get().ok(), Some(0));
        assert_eq!(floor.raise(5).ok(), Some(5));
        assert_eq!(floor.raise(3).ok(), Some(5), "never lowered");
        let a = dir.path().join(layout::SECURITY_FLOOR_A);
        let b = dir.path().join(layout::SECURITY_FLOOR_B);
        std::fs::write(&a, b"kernex-security-floor 1 9 00\n").unwrap();
        assert_eq!(floor.get().ok(), Some(5), "corrupt A ignored");
        std::fs::write(&b, encode(2)).unwrap();
        std::fs::write(&a, encode(7)).unwrap();
        assert_eq!(floor.get().ok(), Some(7), "the larger copy");
        std::fs::write(&a, b"junk").unwrap();
        std::fs::write(&b, b"junk").unwrap();
        assert!(floor.get().is_err(), "both corrupt is an error");
        assert!(floor.check(100, "install 9.0.0").is_err());
    }
}
