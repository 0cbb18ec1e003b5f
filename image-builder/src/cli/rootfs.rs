//! `kernex-image rootfs`: a reproducible filesystem image from a directory
//! or tarball.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::rootfs::{self, Filesystem, RootfsOptions};

/// Arguments of `rootfs`.
#[derive(Debug, Args)]
pub struct RootfsArgs {
    /// Root filesystem: a directory, or a .tar, .tar.gz/.tgz or .tar.zst tarball.
    pub input: PathBuf,
    /// Filesystem to build.
    #[arg(long = "fs", value_enum, default_value_t = Filesystem::Ext4)]
    pub filesystem: Filesystem,
    /// Output image file (replaced atomically).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Image size in bytes (ext4 only; default: content plus a margin).
    #[arg(long)]
    pub size: Option<u64>,
    /// Volume label (ext4 only).
    #[arg(long)]
    pub label: Option<String>,
    /// Timestamp for every file and the filesystem itself (Unix seconds);
    /// defaults to $SOURCE_DATE_EPOCH, else 0.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    pub timestamp: u64,
    /// Filesystem UUID (ext4, erofs); default: derived from --label, the same
    /// for every release (ext4 seeds its metadata checksums with it).
    #[arg(long)]
    pub uuid: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `rootfs`.
pub fn run(args: RootfsArgs) -> Result<()> {
    let options = RootfsOptions {
        filesystem: args.filesystem,
        size: args.size,
        label: args.label.clone(),
        timestamp: args.timestamp,
        uuid: args.uuid.clone(),
    };
    let report = rootfs::build_rootfs(&args.input, &args.out, &options).with_context(|| {
        format!(
            "unable to build a {} image from {}",
            args.filesystem.as_str(),
            args.input.display()
        )
    })?;
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "{}: {} image, {} bytes, sha256 {}",
        report.path.display(),
        report.filesystem.as_str(),
        report.size_bytes,
        report.sha256
    );
    println!(
        "  {} files, {} directories, {} symlinks, {} bytes of content, timestamp {}",
        report.files, report.directories, report.symlinks, report.content_bytes, report.timestamp
    );
    Ok(())
}
