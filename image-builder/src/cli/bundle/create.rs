//! `kernex-image bundle create`: parses the options into a
//! [`BundleBuilder`] and prints what it made.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use kernex_protocol::Manifest;
use kernex_protocol::archive::ArchiveOptions;
use kernex_protocol::index::ChunkerParams;
use kernex_protocol::signature;
use serde::Serialize;

use crate::bundle::{self, BundleBuilder, Image};
use crate::progress;

/// Arguments of `bundle create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Hardware class the release is for, e.g. raspberrypi4-64.
    #[arg(long)]
    pub compatible: String,
    /// Release version (semver), e.g. 1.2.0.
    #[arg(long)]
    pub version: semver::Version,
    /// Root filesystem image.
    #[arg(long, value_name = "IMAGE")]
    pub rootfs: PathBuf,
    /// Optional agent partition image (models, prompts, tools).
    #[arg(long, value_name = "IMAGE")]
    pub agent: Option<PathBuf>,
    /// Signing private key (PEM).
    #[arg(long, value_name = "PEM")]
    pub key: PathBuf,
    /// Signing certificate (PEM); further certificates in the file are
    /// intermediates included in the signature.
    #[arg(long, value_name = "PEM")]
    pub cert: PathBuf,
    /// Output bundle file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Oldest updater version allowed to install this bundle.
    #[arg(long, default_value = "0.1.0")]
    pub min_updater_version: semver::Version,
    /// Anti-rollback generation (0 to 4294967295): a device that committed
    /// a release of a higher security version refuses to install or roll
    /// back to this one. Raise it with every release that fixes a
    /// vulnerability older releases must never bring back.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub security_version: u64,
    /// Free-form metadata, repeatable: --meta model=qwen-1.5b --meta quant=Q4_K_M.
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub metadata: Vec<(String, String)>,
    /// Health spec for the device's watchdog after it boots this release on
    /// trial: a TOML file with the keys of system.toml's `[health]` table at
    /// the top level (deadline, stability-window, max-revert-reboots,
    /// [[checks]] with type = service/http/command/llm/disk/memory), or the
    /// same as JSON when the name ends in .json. Checked against the
    /// protocol's limits before anything is built.
    #[arg(long, value_name = "FILE")]
    pub health: Option<PathBuf>,
    /// Average chunk size in bytes (rounded down to a power of two).
    #[arg(long, default_value_t = 32 * 1024)]
    pub avg_chunk_size: u32,
    /// Minimum chunk size in bytes.
    #[arg(long, default_value_t = 8 * 1024)]
    pub min_chunk_size: u32,
    /// Maximum chunk size in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_chunk_size: u32,
    /// Truncated chunk hash length in bytes (12 to 64).
    #[arg(long, default_value_t = 16)]
    pub hash_length: u8,
    /// zstd compression level (1 to 22).
    #[arg(long, default_value_t = 9)]
    pub compression_level: i32,
    /// Worker threads for hashing and compression (default: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Also encode the chunks this release adds against the images of an
    /// older release (repeatable: one patch per release devices may run).
    /// A device running that release then downloads each such chunk as a
    /// small zstd patch against its own slot instead of the whole chunk.
    /// The older bundle must verify against --keyring.
    #[arg(long, value_name = "OLD.kxb", requires = "keyring")]
    pub patch_from: Vec<PathBuf>,
    /// Keyring (PEM CA certificates) the --patch-from bundles must verify
    /// against.
    #[arg(long, value_name = "PEM")]
    pub keyring: Option<PathBuf>,
    /// zstd level of the patch frames (1 to 22; patches are made once per
    /// release and fetched by every device on the old release).
    #[arg(long, default_value_t = 19)]
    pub patch_level: i32,
    /// Print the result as JSON; progress goes to stderr as JSON lines
    /// (`{"event":"progress","step":..,"unit":"bytes"|"chunks","done":..,
    /// "total":..,"rate":..,"eta-seconds":..,"finished":..}`).
    #[arg(long)]
    pub json: bool,
}

/// Summary printed by `bundle create`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreateSummary {
    /// Bundle path.
    pub bundle: PathBuf,
    /// Bundle size.
    pub size: u64,
    /// The manifest.
    pub manifest: Manifest,
    /// Signer.
    pub signer: signature::SignerInfo,
}

/// Runs `bundle create`.
pub fn run(args: CreateArgs) -> Result<()> {
    let health = args
        .health
        .as_deref()
        .map(bundle::read_health_spec)
        .transpose()?;
    let signer = bundle::load_signer(&args.key, &args.cert)?;
    let keyring = match &args.keyring {
        Some(path) if !args.patch_from.is_empty() => {
            Some(bundle::load_keyring(std::slice::from_ref(path))?)
        }
        _ => None,
    };
    let mut builder = BundleBuilder::new(
        args.compatible.clone(),
        args.version.clone(),
        Image::file(&args.rootfs),
        &signer,
    )
    .min_updater_version(args.min_updater_version.clone())
    .security_version(args.security_version)
    .archive_options(ArchiveOptions {
        chunker: ChunkerParams::rollsum(
            args.avg_chunk_size,
            args.min_chunk_size,
            args.max_chunk_size,
            64,
        ),
        hash_len: args.hash_length,
        zstd_level: args.compression_level,
        threads: args.threads,
    })
    .patch_level(args.patch_level)
    .progress_mode(if args.json {
        progress::Mode::Json
    } else {
        progress::Mode::Bar
    });
    if let Some(agent) = &args.agent {
        builder = builder.agent(Image::file(agent));
    }
    for (key, value) in &args.metadata {
        builder = builder.metadata(key.clone(), value.clone());
    }
    if let Some(health) = health {
        builder = builder.health(health);
    }
    for old in &args.patch_from {
        builder = builder.patch_from(old.as_path());
    }
    if let Some(keyring) = &keyring {
        builder = builder.keyring(keyring);
    }
    let built = builder.build(&args.out)?;
    if !args.json {
        for image in &built.images {
            for version in &image.unpatched {
                eprintln!(
                    "note: no chunk of the {} image resembles {version}'s: no patch from it",
                    image.class
                );
            }
        }
    }
    let summary = CreateSummary {
        bundle: args.out.clone(),
        size: built.size,
        manifest: built.manifest,
        signer: built.signer,
    };
    if args.json {
        return crate::cli::print_json(&summary);
    }
    println!(
        "{}: release {} for {}, {} bytes, signed by {}",
        args.out.display(),
        summary.manifest.version,
        summary.manifest.compatible,
        summary.size,
        summary.signer.subject
    );
    if let Some(health) = &summary.manifest.health {
        println!("  health {}", super::describe_health(health));
    }
    for (image, built) in summary.manifest.images.iter().zip(&built.images) {
        println!(
            "  {:<6} {:>12} bytes {:<8} sha256 {}  archive {} bytes",
            image.slot_class.as_str(),
            image.size,
            image.filesystem.as_str(),
            image.sha256,
            image.archive.size
        );
        for p in &built.patches {
            println!(
                "         patch from {}: {} of {} new chunks patched, {} bytes",
                p.base_version, p.chunks_patched, p.chunks_new, p.size
            );
        }
    }
    Ok(())
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}
