//! The `BootFlow` trait and its three backends.

use std::path::{Path, PathBuf};

use u_boot_env::{Env, Store};

use crate::grubenv::GrubEnv;
use crate::{BootError, BootState, BootedSlot, Slot};

/// One bootloader's A/B state, behind the variables of the boot-state
/// contract (`BOOT_ORDER`, `BOOT_A_LEFT`, `BOOT_B_LEFT`).
///
/// Backends implement [`BootFlow::state`] and [`BootFlow::modify`]; the
/// contract's operations are provided on top of them, the same for all.
///
/// ```
/// use kernex_bootloader::{BootFlow, BootedSlot, File, Slot};
///
/// let dir = tempfile::tempdir()?;
/// let mut flow = File::new(dir.path().join("boot-state"), BootedSlot::Fixed(Slot::A));
/// // After installing into B: try B first, 3 times.
/// flow.set_try_next(Slot::B, 3)?;
/// assert_eq!(flow.primary_slot()?, Some(Slot::B));
/// // B booted but failed its health checks.
/// flow.mark_bad(Slot::B)?;
/// assert_eq!(flow.primary_slot()?, Some(Slot::A));
/// assert_eq!(flow.attempts_left(Slot::B)?, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait BootFlow: std::fmt::Debug {
    /// `"u-boot"`, `"grub"` or `"file"`.
    fn name(&self) -> &'static str;

    /// The slot that is running now (from the kernel command line, or fixed).
    fn booted_slot(&self) -> Result<Slot, BootError>;

    /// The current variables, decoded.
    fn state(&mut self) -> Result<BootState, BootError>;

    /// Reads the state, lets `change` modify it and writes it back, keeping
    /// every other variable of the bootloader as it was.
    fn modify(
        &mut self,
        change: &mut dyn FnMut(&mut BootState) -> Result<(), BootError>,
    ) -> Result<BootState, BootError>;

    /// The slot the bootloader will boot next; `None` if no slot has
    /// attempts left (the boot script then resets the counters and boots
    /// the first slot of `BOOT_ORDER`).
    fn primary_slot(&mut self) -> Result<Option<Slot>, BootError> {
        Ok(self.state()?.primary())
    }

    /// Boot attempts left for `slot`.
    fn attempts_left(&mut self, slot: Slot) -> Result<u32, BootError> {
        Ok(self.state()?.attempts_left(slot))
    }

    /// Puts `slot` first in `BOOT_ORDER` with `attempts` (1..=9) tries.
    fn set_try_next(&mut self, slot: Slot, attempts: u32) -> Result<(), BootError> {
        self.modify(&mut |s| s.set_try_next(slot, attempts))
            .map(drop)
    }

    /// `slot` is good: its counter goes back to 3 (the order is unchanged).
    fn mark_good(&mut self, slot: Slot) -> Result<(), BootError> {
        self.modify(&mut |s| {
            s.mark_good(slot);
            Ok(())
        })
        .map(drop)
    }

    /// `slot` is bad: counter 0, moved to the end of `BOOT_ORDER`.
    fn mark_bad(&mut self, slot: Slot) -> Result<(), BootError> {
        self.modify(&mut |s| {
            s.mark_bad(slot);
            Ok(())
        })
        .map(drop)
    }
}

/// U-Boot: the environment described by `fw_env.config`.
#[derive(Debug)]
pub struct UBoot {
    store: Store,
    booted: BootedSlot,
}

impl UBoot {
    /// Over an opened environment.
    pub fn new(store: Store, booted: BootedSlot) -> Self {
        Self { store, booted }
    }

    /// Opens the environment an `fw_env.config` describes (normally
    /// [`u_boot_env::config::DEFAULT_CONFIG_PATH`]).
    pub fn from_config_file(path: impl AsRef<Path>, booted: BootedSlot) -> Result<Self, BootError> {
        Ok(Self::new(Store::from_config_file(path)?, booted))
    }

    /// The underlying environment store.
    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }
}

impl BootFlow for UBoot {
    fn name(&self) -> &'static str {
        "u-boot"
    }

    fn booted_slot(&self) -> Result<Slot, BootError> {
        self.booted.resolve()
    }

    fn state(&mut self) -> Result<BootState, BootError> {
        BootState::from_vars(&self.store.read()?)
    }

    /// Fails if the environment cannot be read: writing only the contract's
    /// variables over a corrupt environment would drop `bootcmd` and the
    /// board's settings that U-Boot would otherwise take from its defaults.
    fn modify(
        &mut self,
        change: &mut dyn FnMut(&mut BootState) -> Result<(), BootError>,
    ) -> Result<BootState, BootError> {
        let mut env = self.store.read()?;
        let mut state = BootState::from_vars(&env)?;
        change(&mut state)?;
        state.to_vars(&mut env)?;
        self.store.write(&env)?;
        Ok(state)
    }
}

/// GRUB: a `grubenv` block, for x86 boxes (see `bootloader/grub/`).
#[derive(Debug)]
pub struct Grub {
    path: PathBuf,
    booted: BootedSlot,
}

impl Grub {
    /// Over the grubenv at `path` (e.g. `/boot/grub/grubenv`). A missing
    /// file reads as the defaults and is created on the first write.
    pub fn new(path: impl Into<PathBuf>, booted: BootedSlot) -> Self {
        Self {
            path: path.into(),
            booted,
        }
    }

    fn load(&self) -> Result<GrubEnv, BootError> {
        if !self.path.exists() {
            return Ok(GrubEnv::new());
        }
        GrubEnv::load(&self.path)
    }
}

impl BootFlow for Grub {
    fn name(&self) -> &'static str {
        "grub"
    }

    fn booted_slot(&self) -> Result<Slot, BootError> {
        self.booted.resolve()
    }

    fn state(&mut self) -> Result<BootState, BootError> {
        BootState::from_vars(&self.load()?)
    }

    fn modify(
        &mut self,
        change: &mut dyn FnMut(&mut BootState) -> Result<(), BootError>,
    ) -> Result<BootState, BootError> {
        let mut env = self.load()?;
        let mut state = BootState::from_vars(&env)?;
        change(&mut state)?;
        state.to_vars(&mut env)?;
        env.save(&self.path)?;
        Ok(state)
    }
}

/// Largest state file the `File` backend reads.
pub const MAX_STATE_FILE: u64 = 64 * 1024;

/// A plain text file of `NAME=value` lines, for tests and simulated devices.
/// A missing file reads as the defaults; writes are atomic.
#[derive(Debug)]
pub struct File {
    path: PathBuf,
    booted: BootedSlot,
}

impl File {
    /// Over the file at `path`.
    pub fn new(path: impl Into<PathBuf>, booted: BootedSlot) -> Self {
        Self {
            path: path.into(),
            booted,
        }
    }

    fn load(&self) -> Result<Env, BootError> {
        if !self.path.exists() {
            return Ok(Env::new());
        }
        let bytes = crate::file::read_limited(&self.path, MAX_STATE_FILE)?;
        let text = String::from_utf8(bytes).map_err(|_| BootError::Io {
            action: "read",
            path: self.path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
        })?;
        Env::from_text(&text).map_err(|source| BootError::StateFile {
            path: self.path.clone(),
            source,
        })
    }
}

impl BootFlow for File {
    fn name(&self) -> &'static str {
        "file"
    }

    fn booted_slot(&self) -> Result<Slot, BootError> {
        self.booted.resolve()
    }

    fn state(&mut self) -> Result<BootState, BootError> {
        BootState::from_vars(&self.load()?)
    }

    fn modify(
        &mut self,
        change: &mut dyn FnMut(&mut BootState) -> Result<(), BootError>,
    ) -> Result<BootState, BootError> {
        let mut env = self.load()?;
        let mut state = BootState::from_vars(&env)?;
        change(&mut state)?;
        state.to_vars(&mut env)?;
        crate::file::write_atomically(&self.path, env.to_text().as_bytes())?;
        Ok(state)
    }
}
