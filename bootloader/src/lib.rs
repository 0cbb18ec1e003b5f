//! The Kernex boot-state contract.
//!
//! Which slot boots is decided by the bootloader from three variables, the
//! ones RAUC's U-Boot integration uses, so existing boards and scripts work
//! unchanged:
//!
//! - `BOOT_ORDER` — slots to try, in order, e.g. `A B`;
//! - `BOOT_A_LEFT`, `BOOT_B_LEFT` — boot attempts left (default 3).
//!
//! The boot script (`bootloader/uboot/boot.cmd`, or the GRUB snippet)
//! decrements the first slot in `BOOT_ORDER` with attempts left and boots it
//! with `kernex.slot=X` on the kernel command line. The updater, through a
//! [`BootFlow`], puts a freshly installed slot first ([`BootFlow::set_try_next`]),
//! and after the health checks marks it good (counter back to 3) or bad
//! (counter 0, last in the order). See `bootloader/README.md`.
//!
//! Backends: [`UBoot`] (the U-Boot env, through the `u-boot-env` crate and
//! `fw_env.config`), [`Grub`] (`grubenv`) and [`File`] (a plain file for
//! tests and simulated devices), chosen by [`BootloaderConfig`].

mod config;
mod error;
mod file;
mod flow;
mod grubenv;
mod slot;
mod state;

pub use config::{Backend, BootloaderConfig, DEFAULT_FW_ENV_CONFIG, DEFAULT_GRUBENV};
pub use error::BootError;
pub use flow::{BootFlow, File, Grub, MAX_STATE_FILE, UBoot};
pub use grubenv::{GRUB_ENV_HEADER, GRUB_ENV_SIZE, GrubEnv, MAX_GRUB_ENV_SIZE};
pub use slot::{BootedSlot, MAX_CMDLINE, PROC_CMDLINE, Slot, slot_from_cmdline};
pub use state::{
    BOOT_ORDER, BootSelection, BootState, DEFAULT_ATTEMPTS, DEFAULT_ORDER, MAX_ATTEMPTS, Vars,
};
pub use u_boot_env;
