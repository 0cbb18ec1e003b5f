//! `kernex-image bundle verify`: checks a bundle exactly as a device will.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kernex_protocol::bundle::ImageReport;
use kernex_protocol::signature::{self, VerifyOptions};
use serde::Serialize;

use crate::{bundle, progress};

/// Arguments of `bundle verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// Trusted CA certificates (PEM); repeatable.
    #[arg(long, value_name = "PEM", required = true)]
    pub keyring: Vec<PathBuf>,
    /// Check certificate validity at this Unix time instead of now.
    #[arg(long, value_name = "UNIX-SECONDS")]
    pub at_time: Option<i64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Output of `verify`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyOutput {
    /// True: the command fails otherwise.
    pub verified: bool,
    /// Release version.
    pub version: semver::Version,
    /// Hardware class.
    pub compatible: String,
    /// Who signed.
    pub signer: signature::SignerInfo,
    /// Per-image results.
    pub images: Vec<ImageReport>,
}

/// Runs `bundle verify`.
pub fn run(args: VerifyArgs) -> Result<()> {
    let keyring = bundle::load_keyring(&args.keyring)?;
    let mut b = bundle::open(&args.bundle)?;
    let verified = b
        .verify(
            &keyring,
            VerifyOptions {
                at_time: args.at_time,
            },
        )
        .with_context(|| format!("signature of {} does not verify", args.bundle.display()))?;
    let total: u64 = verified.images.iter().map(|i| i.size).sum();
    let bar = progress::bytes(total, "verify", args.json);
    let images = b
        .verify_contents(&verified, &|n| bar.set_position(n))
        .with_context(|| format!("contents of {} do not verify", args.bundle.display()))?;
    bar.finish_and_clear();
    let out = VerifyOutput {
        verified: true,
        version: verified.version.clone(),
        compatible: verified.compatible.clone(),
        signer: verified.signer().clone(),
        images,
    };
    if args.json {
        return crate::cli::print_json(&out);
    }
    println!(
        "OK: {} release {} for {}, signed by {}",
        args.bundle.display(),
        out.version,
        out.compatible,
        out.signer
    );
    for image in &out.images {
        println!(
            "  {:<6} {} bytes, {} chunks verified, sha256 {}",
            image.slot_class.as_str(),
            image.size,
            image.stored_chunks,
            image.sha256
        );
    }
    Ok(())
}
