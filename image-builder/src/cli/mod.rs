//! The command line: one module per command.

pub mod bundle;
pub mod disk;
pub mod keys;
pub mod provision;
pub mod rootfs;

use clap::{Parser, Subcommand};

/// Build Kernex root filesystem images, signed release bundles, factory disk
/// images and development keys; provision boards.
#[derive(Debug, Parser)]
#[command(
    name = "kernex-image",
    version,
    about = "Build Kernex root filesystem images, signed release bundles, factory disk images and development keys; provision boards",
    long_about = "kernex-image turns a root filesystem into what Kernex devices install.\n\n\
A release goes through three steps: `rootfs` makes a reproducible filesystem image \
(ext4, squashfs or erofs) from a directory or tarball; `bundle create` cuts that image \
into content-defined chunks, compresses them into a bita archive, writes the compact \
chunk index devices use to fetch only what changed, and signs the manifest with an \
X.509 certificate; `bundle verify` checks a bundle exactly as a device will.\n\n\
`disk create` writes a complete, flashable disk image for a board profile (partition table, \
boot files, boot state, slot A from a verified bundle, data partition); `provision` writes \
it to one board on a factory line, reads its TPM's EK, pre-authorises it with the control \
plane and prints a report.\n\n\
`keys create` makes a development CA and signing certificate. They are for development \
and CI only: keep production signing keys in an HSM or an offline CA.",
    after_help = concat!(
        "EXAMPLES:\n",
        "    kernex-image keys create --out keys/\n",
        "    kernex-image rootfs ./rootfs-dir --fs ext4 --out rootfs.img\n",
        "    kernex-image bundle create --compatible qemu-aarch64 --version 1.2.0 \\\n",
        "        --rootfs rootfs.img --key keys/signing.key --cert keys/signing.crt --out release-1.2.0.kxb\n",
        "    kernex-image bundle inspect release-1.2.0.kxb --json\n",
        "    kernex-image bundle verify release-1.2.0.kxb --keyring keys/ca.crt\n",
        "    kernex-image disk create --board qemu-aarch64 --bundle release-1.2.0.kxb \\\n",
        "        --keyring keys/ca.crt --output disk.img\n",
        "    kernex-image provision --image disk.img --target /dev/sdX \\\n",
        "        --server https://kernex.example.com --enroll-token kxe_... --api-token kxo_... \\\n",
        "        --device-id SN-0042 --json\n\n",
        "EXIT STATUS:\n",
        "    0 on success, 1 on any error (the error names what failed), 2 on a usage error.\n\n",
        "ENVIRONMENT:\n",
        "    RUST_LOG             log filter for the diagnostics written to stderr (default: warn)\n",
        "    SOURCE_DATE_EPOCH    default time stamp of rootfs and disk create\n",
        "    KERNEX_API_TOKEN     provision --api-token\n",
        "    KERNEX_ENROLL_TOKEN  provision --enroll-token"
    )
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Create development signing keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Build a reproducible ext4, squashfs or erofs image from a directory or tarball.
    #[command(
        long_about = "Build a reproducible ext4, squashfs or erofs image from a directory or tarball.\n\n\
The same input gives the same bytes: the tree is staged in sorted order, every timestamp is \
set to --timestamp (SOURCE_DATE_EPOCH), owners come from the tarball (root for a directory \
built by a non-root user), and the UUID and hash seed are fixed per label (not per content, \
so a small change stays a small delta). Uses \
mkfs.ext4 (e2fsprogs), mksquashfs (squashfs-tools) or mkfs.erofs (erofs-utils). Extended \
attributes are not carried over."
    )]
    Rootfs(rootfs::RootfsArgs),
    /// Build, inspect, verify and compare release bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Write factory disk images for a board (partition table, boot files,
    /// boot state, slots, data partition).
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// Provision one board on a factory line: write the disk image, read the
    /// TPM's EK, pre-authorise the device, write its identity, report.
    #[command(long_about = provision::LONG_ABOUT)]
    Provision(provision::ProvisionArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Keys(cmd) => keys::run(cmd),
        Command::Rootfs(args) => rootfs::run(args),
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Disk(cmd) => disk::run(cmd),
        Command::Provision(args) => provision::run(args),
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
