//! Whole-system tests for Kernex: real U-Boot, a real Linux kernel and an
//! A/B disk under QEMU.
//!
//! The pieces, each usable on its own:
//!
//! - [`arch`]: the two boards (arm64 `virt`, x86_64 `pc`) and what differs
//!   between them;
//! - [`assets`]: the kernel, its modules and BusyBox fetched by
//!   `scripts/setup.d/70-hw-tests.sh`, and the `kernex-updater` binary of
//!   this workspace with the shared libraries it needs;
//! - [`guest`]: a release's slot image (kernel + an initramfs-only
//!   userland: BusyBox, the updater, a tiny agent) and its signed bundle,
//!   built with `kernex-image`;
//! - [`disk`]: the factory disk image (MBR: boot, slot A, slot B, data),
//!   written into a plain file without root or loop devices;
//! - [`machine`]: QEMU with U-Boot as its firmware, driven over the serial
//!   console, optionally with a TPM (swtpm) and a NIC on QEMU's user network;
//!   or a lab board (a real one, or QEMU run as one): serial console, power
//!   by operator-given commands, commands and bundles over ssh;
//! - [`scenarios`]: scenarios 1 and 2 written once for any board (QEMU or
//!   lab), run by `tests/scenarios.rs` and by `kernex-hw-run`;
//! - [`server`]: a real `kernex-server` on the host's loopback for the
//!   guest's daemon;
//! - [`layout`] and [`vendor`]: the vendor boards (Raspberry Pi 4 on QEMU's
//!   `raspi4b`, Jetson Orin Nano's UEFI + GRUB path on `virt` with AAVMF)
//!   booting the factory image `kernex-image disk create` makes for their
//!   board profile.
//!
//! See hw-tests/README.md for the scenarios built on them.

pub mod arch;
pub mod assets;
pub mod cpio;
pub mod disk;
pub mod guest;
pub mod layout;
pub mod machine;
pub mod scenarios;
pub mod server;
pub mod vendor;

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// Runs `cmd`; an error names the command and carries its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?} (is it installed? see scripts/setup)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Writes `data` into `file` at byte `offset` (the file is not truncated).
pub fn write_at(file: &Path, offset: u64, data: &[u8]) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .with_context(|| format!("open {}", file.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data).with_context(|| {
        format!(
            "write {} bytes at {offset} into {}",
            data.len(),
            file.display()
        )
    })?;
    Ok(())
}
