//! `kernex-image provision`: one board on a factory line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::provision::{self, ProvisionOptions};

/// Arguments of `provision`.
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// The disk image (`kernex-image disk create`).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// The board's disk (e.g. /dev/sdX, checked to be large enough) or a file.
    #[arg(long, value_name = "DEVICE|FILE")]
    pub target: PathBuf,
    /// The control plane, e.g. https://kernex.example.com.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The factory enrollment token the device enrolls with.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KERNEX_ENROLL_TOKEN",
        hide_env_values = true
    )]
    pub enroll_token: String,
    /// An operator API token allowed to pre-authorise devices.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "KERNEX_API_TOKEN",
        hide_env_values = true
    )]
    pub api_token: String,
    /// The device id (serial) it enrolls as; default with --tpm: `ek-` and
    /// the first 16 hex digits of the EK fingerprint.
    #[arg(long, value_name = "SERIAL")]
    pub device_id: Option<String>,
    /// TCTI of the board's TPM, e.g. device:/dev/tpmrm0 or
    /// swtpm:host=127.0.0.1,port=2321 (needs a build with `--features tpm`).
    #[arg(long, value_name = "TCTI")]
    pub tpm: Option<String>,
    /// Print the report as JSON (for the line's MES).
    #[arg(long)]
    pub json: bool,
}

/// The long help of `provision`.
pub const LONG_ABOUT: &str = "Provision one board on a factory line, unattended.\n\n\
Reads the disk image's record (written by `disk create` on its data partition); reads the \
board's TPM endorsement key (--tpm); pre-authorises the device with the control plane \
(POST /api/v1/tpm/preauthorizations with the operator's API token: the EK, or the serial \
alone without a TPM); writes the image to --target and reads it back (the SHA-256 must \
match); writes the device's identity into the target's data partition ([server] in \
etc/kernex/system.toml with url, device-id and enrollment-token-file; the enrollment token, \
mode 0600; etc/kernex/provisioning.json); prints the report: serial, EK fingerprint, image \
version, slot A digest, time.\n\n\
The server is asked before the target is written, so a rejected token or EK leaves the \
target untouched. Running it again for the same board is safe: the server answers 200 \
for the same device and EK, and the target gets the same bytes.";

/// Runs `provision`.
pub fn run(args: ProvisionArgs) -> Result<()> {
    let opts = ProvisionOptions {
        image: args.image.clone(),
        target: args.target.clone(),
        server: args.server.clone(),
        enroll_token: args.enroll_token.clone(),
        api_token: args.api_token.clone(),
        device_id: args.device_id.clone(),
        tpm: args.tpm.clone(),
        quiet: args.json,
    };
    let report = provision::provision(&opts).with_context(|| {
        format!(
            "unable to provision {} from {}",
            args.target.display(),
            args.image.display()
        )
    })?;
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "provisioned {}: {} {} (slot A sha256 {}) on {}, EK {}, pre-authorised with {} ({}), {} in {:.1} s",
        report.device_id,
        report.board,
        report.image_version.as_deref().unwrap_or("unsigned image"),
        report.slot_a_sha256,
        report.target.display(),
        report.ek_fingerprint.as_deref().unwrap_or("none (no TPM)"),
        report.server,
        match report.preauthorization_outcome {
            crate::preauth::Outcome::Created => "created",
            crate::preauth::Outcome::AlreadyPresent => "already present",
        },
        report.time,
        report.seconds
    );
    Ok(())
}
