//! `kernex-image bundle`: create, inspect, verify and compare bundles, one
//! module per command.

mod create;
mod delta;
mod inspect;
mod verify;

use anyhow::Result;
use clap::Subcommand;
use kernex_protocol::manifest::HealthSpec;

pub use create::{CreateArgs, CreateSummary};
pub use delta::DeltaArgs;
pub use inspect::{IndexStats, InspectArgs, InspectOutput};
pub use verify::{VerifyArgs, VerifyOutput};

/// Bundle commands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum BundleCommand {
    /// Build and sign a bundle from filesystem images.
    #[command(long_about = "Build and sign a bundle from filesystem images.\n\n\
Each image is cut into content-defined chunks (RollSum, 32 KiB average by default), \
compressed with zstd into a bita archive, and indexed in the compact Kernex chunk index \
devices use to fetch only the chunks they lack. The manifest binds the image (size and \
SHA-256), the index and the archive header by digest, and is signed with a detached \
CMS signature. With --patch-from OLD.kxb the bundle also carries, per image, a patch \
from OLD's image: the chunks this release adds, each as a zstd frame against the part of \
the old image it resembles, so a device running OLD fetches a few bytes per changed chunk \
instead of the chunk. The bundle is written to a temporary file and renamed into place, so \
a failed build never leaves a partial bundle at --out.")]
    Create(CreateArgs),
    /// Show a bundle's manifest, signer and layout (without verifying it).
    #[command(long_about = "Show a bundle's manifest, signer and layout.\n\n\
Inspect checks the bundle's structure but NOT its signature: use `bundle verify` for that. \
With --json the output is the machine interface (manifest, unverified signer, member layout, \
index statistics per image).")]
    Inspect(InspectArgs),
    /// Verify a bundle exactly as a device will: signature, then every byte.
    #[command(long_about = "Verify a bundle exactly as a device will.\n\n\
Checks the signature against the keyring (signer chain, expiry, codeSigning usage), then \
every image: index and archive header digests, every chunk's hash, and the whole image's \
SHA-256. Exits 0 only if everything verifies; otherwise prints what failed and exits 1.")]
    Verify(VerifyArgs),
    /// Show what a device running one release downloads to update to another.
    #[command(
        long_about = "Show what a device running OLD downloads to install NEW.\n\n\
For each image: the index head, the index pages and the compressed chunks the device does \
not already hold, plus the manifest, signature and container headers. Neither bundle's \
signature is checked."
    )]
    Delta(DeltaArgs),
}

/// Runs a bundle command.
pub fn run(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Create(args) => create::run(args),
        BundleCommand::Inspect(args) => inspect::run(args),
        BundleCommand::Verify(args) => verify::run(args),
        BundleCommand::Delta(args) => delta::run(args),
    }
}

/// One line about a health spec: its checks by type and its timings.
fn describe_health(health: &HealthSpec) -> String {
    let checks = health.checks.as_deref().unwrap_or_default();
    let types: Vec<String> = checks
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_else(|| "?".into())
        })
        .collect();
    let mut line = format!("{} checks ({})", checks.len(), types.join(", "));
    if let Some(d) = health.deadline {
        line.push_str(&format!(", deadline {d} s"));
    }
    if let Some(w) = health.stability_window {
        line.push_str(&format!(", stability window {w} s"));
    }
    line
}
