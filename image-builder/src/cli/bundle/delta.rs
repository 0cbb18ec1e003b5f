//! `kernex-image bundle delta`: what a device running one release
//! downloads to install another.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::bundle;

/// Arguments of `bundle delta`.
#[derive(Debug, Args)]
pub struct DeltaArgs {
    /// The release the device runs now.
    pub old: PathBuf,
    /// The release to install.
    pub new: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `bundle delta`.
pub fn run(args: DeltaArgs) -> Result<()> {
    let mut old = bundle::open(&args.old)?;
    let mut new = bundle::open(&args.new)?;
    let out = new.delta_from(Some(&mut old)).with_context(|| {
        format!(
            "unable to compare {} with {}",
            args.new.display(),
            args.old.display()
        )
    })?;
    if out.images.is_empty() {
        bail!("{} carries no image", args.new.display());
    }
    if args.json {
        return crate::cli::print_json(&out);
    }
    let from = out
        .from
        .as_ref()
        .map_or_else(|| "nothing".to_string(), ToString::to_string);
    println!(
        "{from} -> {}: a device downloads {} bytes (full bundle: {} bytes)",
        out.to, out.total_bytes, out.full_bundle_bytes
    );
    println!(
        "  manifest + signature + headers: {} bytes",
        out.manifest_bytes
    );
    for i in &out.images {
        println!(
            "  {:<6} index head {} B, {} index pages {} B, {} chunks {} B ({} chunks reused); bita header alone: {} B",
            i.slot_class.as_str(),
            i.delta.index_head_bytes,
            i.delta.index_pages_fetched,
            i.delta.index_page_bytes,
            i.delta.chunks_fetched,
            i.delta.chunk_bytes,
            i.delta.chunks_reused,
            i.bita_header_bytes
        );
        if i.delta.patch_table_bytes > 0 {
            println!(
                "         patch from {from}: table {} B, {} chunks as patches {} B",
                i.delta.patch_table_bytes, i.delta.chunks_patched, i.delta.patch_bytes
            );
        }
    }
    Ok(())
}
