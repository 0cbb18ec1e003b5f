//! `kernex-image bundle inspect`: a bundle's manifest, signer and layout,
//! without verifying it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kernex_protocol::index::ChunkerParams;
use kernex_protocol::signature;
use kernex_protocol::{Manifest, SlotClass, container};
use serde::Serialize;

use crate::bundle;

/// Arguments of `bundle inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Index statistics shown by `inspect`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct IndexStats {
    /// Slot class.
    pub slot_class: SlotClass,
    /// Chunker parameters.
    pub chunker: ChunkerParams,
    /// Hash length.
    pub hash_length: u8,
    /// Chunks in image order.
    pub chunks: u64,
    /// Distinct stored chunks.
    pub stored_chunks: u64,
    /// Bytes of compressed chunk data.
    pub chunk_data_bytes: u64,
    /// Index pages.
    pub index_pages: u64,
    /// Index head size.
    pub index_head_bytes: u64,
}

/// Output of `inspect`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct InspectOutput {
    /// Always false: inspect does not check the signature.
    pub verified: bool,
    /// The manifest.
    pub manifest: Manifest,
    /// Signer named in the signature (not checked).
    pub signer: Option<signature::SignerInfo>,
    /// Why the signer could not be read, if it could not.
    pub signer_error: Option<String>,
    /// Member layout.
    pub layout: container::BundleLayout,
    /// Per-image index statistics.
    pub images: Vec<IndexStats>,
}

/// Runs `bundle inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    let mut b = bundle::open(&args.bundle)?;
    let manifest = b.unverified_manifest().clone();
    let (signer, signer_error) = match signature::signer_of(b.signature()) {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut images = Vec::new();
    for image in &manifest.images {
        let index = b.read_index(&manifest, image.slot_class).with_context(|| {
            format!(
                "unable to read the {} index of {}",
                image.slot_class,
                args.bundle.display()
            )
        })?;
        images.push(IndexStats {
            slot_class: image.slot_class,
            chunker: *index.params(),
            hash_length: index.hash_len(),
            chunks: index.chunk_count(),
            stored_chunks: index.stored_chunks().len() as u64,
            chunk_data_bytes: index.archive_data_size(),
            index_pages: index.head().pages.len() as u64,
            index_head_bytes: index.head().head_size(),
        });
    }
    let out = InspectOutput {
        verified: false,
        manifest,
        signer,
        signer_error,
        layout: b.layout().clone(),
        images,
    };
    if args.json {
        return crate::cli::print_json(&out);
    }
    let m = &out.manifest;
    println!("bundle:       {}", args.bundle.display());
    println!("version:      {}", m.version);
    println!("compatible:   {}", m.compatible);
    println!("min updater:  {}", m.min_updater_version);
    println!(
        "security:     {} (anti-rollback generation)",
        m.security_version
    );
    match (&out.signer, &out.signer_error) {
        (Some(s), _) => println!("signed by:    {s} (NOT verified; use `bundle verify`)"),
        (None, Some(e)) => println!("signed by:    unreadable signature: {e}"),
        _ => {}
    }
    for (k, v) in &m.metadata {
        println!("meta:         {k} = {v}");
    }
    if let Some(health) = &m.health {
        println!("health:       {}", super::describe_health(health));
    }
    for (image, stats) in m.images.iter().zip(&out.images) {
        println!("image {}:", image.slot_class);
        println!("  filesystem  {}", image.filesystem);
        println!("  size        {} bytes", image.size);
        println!("  sha256      {}", image.sha256);
        println!(
            "  chunks      {} ({} stored, {} bytes compressed, avg target {} bytes)",
            stats.chunks,
            stats.stored_chunks,
            stats.chunk_data_bytes,
            stats.chunker.average_chunk_size()
        );
        println!(
            "  index       {} bytes ({} pages, head {} bytes, {}-byte hashes)",
            image.index.size, stats.index_pages, stats.index_head_bytes, stats.hash_length
        );
        println!(
            "  archive     {} bytes (header {} bytes)",
            image.archive.size, image.archive.header_size
        );
        for p in &image.patches {
            println!(
                "  patch       from {} (image sha256 {}): {} bytes (table {} bytes)",
                p.base_version, p.base_sha256, p.size, p.table_size
            );
        }
    }
    Ok(())
}
