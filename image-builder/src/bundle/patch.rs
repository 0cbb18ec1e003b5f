//! Patches from older bundles: the chunks a release adds, each encoded as a
//! zstd frame against the part of an older image it resembles.

use std::io::{BufWriter, Cursor, Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};
use kernex_protocol::SlotClass;
use kernex_protocol::archive::BuiltArchive;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::patch::{self, BuiltPatch};
use kernex_protocol::signature::VerifyOptions;

use super::{BundleBuilder, Input};
use crate::progress;

/// The patches of the image `new` (of `class`, archived as `built`) from
/// each older bundle of `builder` that carries an image of its class, and
/// the versions of those whose image nothing of `new` resembles.
pub(super) fn build(
    builder: &BundleBuilder<'_>,
    class: SlotClass,
    built: &BuiltArchive,
    new: &Input<'_>,
) -> Result<(Vec<BuiltPatch>, Vec<semver::Version>)> {
    let mut out = (Vec::new(), Vec::new());
    for old in &builder.patch_from {
        match old {
            Input::File(path) => {
                let bundle = super::open(path)?;
                from_one(builder, class, built, new, bundle, old, &mut out)?;
            }
            Input::Bytes(bytes) => {
                let bundle = Bundle::open(Cursor::new(*bytes))
                    .with_context(|| format!("{} is not a valid bundle", old.name()))?;
                from_one(builder, class, built, new, bundle, old, &mut out)?;
            }
        }
    }
    Ok(out)
}

/// Adds the patch from the older bundle `bundle` (read from `source`) to
/// `out`, if there is one to make.
fn from_one<R: Read + Seek>(
    builder: &BundleBuilder<'_>,
    class: SlotClass,
    built: &BuiltArchive,
    new: &Input<'_>,
    mut bundle: Bundle<R>,
    source: &Input<'_>,
    out: &mut (Vec<BuiltPatch>, Vec<semver::Version>),
) -> Result<()> {
    let keyring = builder
        .keyring
        .context("patches from older bundles need a keyring to verify them against")?;
    let verified = bundle
        .verify(keyring, VerifyOptions::default())
        .with_context(|| format!("{} does not verify", source.name()))?;
    let compatible = &builder.release.compatible;
    if &verified.compatible != compatible {
        bail!(
            "{} is for {:?}, this release for {:?}: a patch between them is never used",
            source.name(),
            verified.compatible,
            compatible
        );
    }
    let Some(entry) = verified.image(class).cloned() else {
        return Ok(());
    };
    if entry.sha256 == built.image_sha256 {
        return Ok(()); // the same image: nothing to patch
    }
    if out.0.iter().any(|p| p.base_sha256 == entry.sha256) {
        return Ok(()); // two old releases with the same image
    }
    // The base image goes to a scratch file, read back by ranges: memory
    // does not grow with it (kernex_protocol::patch::build_patch_from).
    let mut base = match &builder.scratch_dir {
        Some(dir) => tempfile::tempfile_in(dir)
            .with_context(|| format!("unable to create a temporary file in {}", dir.display()))?,
        None => tempfile::tempfile().context("unable to create a temporary file")?,
    };
    let bar = progress::Step::new(
        builder.progress,
        progress::Unit::Bytes,
        entry.size,
        &format!("{class} from {}", verified.version),
    );
    {
        let mut writer = BufWriter::with_capacity(1 << 20, &mut base);
        bundle
            .extract_image(&verified, class, &mut writer, &|n| bar.set_position(n))
            .with_context(|| format!("unable to read the {class} image of {}", source.name()))?;
        writer
            .flush()
            .context("unable to write the base image to a temporary file")?;
    }
    bar.finish();
    let base_index = bundle.read_index(verified.manifest(), class)?;
    let mut image = new.open(&format!("{class} image"), false)?;
    let read_chunk = |at: u64, len: u32| -> std::io::Result<Vec<u8>> {
        image.seek(SeekFrom::Start(at))?;
        let mut buf = vec![0u8; len as usize];
        image.read_exact(&mut buf)?;
        Ok(buf)
    };
    let threads = match builder.archive.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let bar = progress::Step::new(
        builder.progress,
        progress::Unit::Chunks,
        0,
        &format!("{class} patch from {}", verified.version),
    );
    let (table, data, chunks_new) = patch::build_patch_from(
        &base,
        &base_index,
        &built.index,
        read_chunk,
        builder.patch_level,
        threads,
        &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .with_context(|| format!("unable to build the {class} patch from {}", source.name()))?;
    bar.finish();
    if table.entries.is_empty() {
        out.1.push(verified.version.clone());
        return Ok(());
    }
    out.0.push(BuiltPatch {
        base_version: verified.version.clone(),
        base_sha256: entry.sha256,
        table: table.encode(),
        chunks_patched: table.entries.len() as u64,
        data,
        chunks_new,
    });
    Ok(())
}
