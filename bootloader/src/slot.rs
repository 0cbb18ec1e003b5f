//! Slot names and where the booted slot is read from.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::BootError;

/// One half of the A/B pair.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Slot {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The other slot of the pair.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `"A"` or `"B"`, as in `BOOT_ORDER`.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    /// The env variable holding this slot's attempts: `BOOT_A_LEFT`.
    pub fn left_var(self) -> &'static str {
        match self {
            Slot::A => "BOOT_A_LEFT",
            Slot::B => "BOOT_B_LEFT",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Slot {
    type Err = BootError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "A" | "a" => Ok(Slot::A),
            "B" | "b" => Ok(Slot::B),
            _ => Err(BootError::InvalidSlot {
                value: s.chars().take(40).collect(),
            }),
        }
    }
}

/// The default kernel command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

/// Largest command line read.
pub const MAX_CMDLINE: u64 = 64 * 1024;

/// The slot named on a kernel command line: `kernex.slot=X`, or RAUC's
/// `rauc.slot=X` (kernex.slot wins if both are there). `None` if neither.
///
/// ```
/// use kernex_bootloader::{Slot, slot_from_cmdline};
/// let cmdline = "console=ttyAMA0 root=/dev/mmcblk0p3 rauc.slot=B rootwait";
/// assert_eq!(slot_from_cmdline(cmdline)?, Some(Slot::B));
/// # Ok::<(), kernex_bootloader::BootError>(())
/// ```
pub fn slot_from_cmdline(cmdline: &str) -> Result<Option<Slot>, BootError> {
    let mut rauc = None;
    let mut kernex = None;
    for word in cmdline.split_ascii_whitespace() {
        if let Some(v) = word.strip_prefix("kernex.slot=") {
            kernex = Some(v);
        } else if let Some(v) = word.strip_prefix("rauc.slot=") {
            rauc = Some(v);
        }
    }
    kernex.or(rauc).map(str::parse).transpose()
}

/// Where a backend learns which slot is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootedSlot {
    /// Read from a kernel command line file (normally `/proc/cmdline`).
    Cmdline(PathBuf),
    /// Fixed, for tests and simulated devices.
    Fixed(Slot),
}

impl Default for BootedSlot {
    fn default() -> Self {
        BootedSlot::Cmdline(PathBuf::from(PROC_CMDLINE))
    }
}

impl BootedSlot {
    /// The booted slot.
    pub fn resolve(&self) -> Result<Slot, BootError> {
        match self {
            BootedSlot::Fixed(s) => Ok(*s),
            BootedSlot::Cmdline(path) => {
                let bytes = crate::file::read_limited(path, MAX_CMDLINE)?;
                let text = String::from_utf8_lossy(&bytes);
                slot_from_cmdline(&text)?
                    .ok_or_else(|| BootError::NoSlotOnCmdline { path: path.clone() })
            }
        }
    }
}
