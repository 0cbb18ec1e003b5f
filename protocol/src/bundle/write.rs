//! Writing a bundle from built archives: the manifest, then every member
//! in the container's fixed order.

use super::*;

/// One image to put in a bundle.
#[derive(Debug)]
pub struct ImageInput<'a> {
    /// The slot class.
    pub class: SlotClass,
    /// The filesystem in the image.
    pub filesystem: FsType,
    /// The built archive.
    pub built: &'a BuiltArchive,
    /// Chunk patches from older images ([`crate::patch::build_patch`]).
    pub patches: &'a [BuiltPatch],
}

/// Manifest fields that are not derived from the images.
#[derive(Debug, Clone)]
pub struct ReleaseInfo {
    /// Release version.
    pub version: semver::Version,
    /// Hardware class.
    pub compatible: String,
    /// Oldest updater allowed to install.
    pub min_updater_version: semver::Version,
    /// Anti-rollback generation ([`Manifest::security_version`]).
    pub security_version: u64,
    /// Free-form metadata.
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// The manifest describing `images`.
pub fn manifest_for(
    release: &ReleaseInfo,
    images: &[ImageInput<'_>],
) -> Result<Manifest, ManifestError> {
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        version: release.version.clone(),
        compatible: release.compatible.clone(),
        min_updater_version: release.min_updater_version.clone(),
        security_version: release.security_version,
        images: images
            .iter()
            .map(|i| {
                let head_size = i.built.index.head().head_size();
                ImageEntry {
                    slot_class: i.class,
                    filesystem: i.filesystem,
                    size: i.built.image_size,
                    sha256: i.built.image_sha256,
                    index: IndexRef {
                        size: i.built.index_bytes.len() as u64,
                        sha256: Sha256Digest::of(&i.built.index_bytes),
                        head_size,
                        head_sha256: Sha256Digest::of(&i.built.index_bytes[..head_size as usize]),
                    },
                    archive: ArchiveRef {
                        size: i.built.header.len() as u64 + i.built.data_size,
                        header_size: i.built.header.len() as u64,
                        header_sha256: Sha256Digest::of(&i.built.header),
                    },
                    patches: i
                        .patches
                        .iter()
                        .map(|p| PatchRef {
                            base_sha256: p.base_sha256,
                            base_version: p.base_version.clone(),
                            size: (p.table.len() + p.data.len()) as u64,
                            table_size: p.table.len() as u64,
                            table_sha256: Sha256Digest::of(&p.table),
                        })
                        .collect(),
                }
            })
            .collect(),
        metadata: release.metadata.clone(),
        health: None,
    };
    manifest.validate()?;
    Ok(manifest)
}

/// Writes a bundle: manifest, signature, and for each image its index and
/// archive (header, then the chunk data read from `data`, which must be
/// exactly what [`archive::build_archive`] wrote). Returns the bundle size.
pub fn write_bundle(
    out: &mut dyn Write,
    manifest_bytes: &[u8],
    signature: &[u8],
    images: &mut [(ImageInput<'_>, &mut dyn Read)],
) -> Result<u64, BundleError> {
    let manifest = Manifest::from_slice(manifest_bytes)?;
    let layout = BundleLayout::compute(
        manifest_bytes.len() as u64,
        signature.len() as u64,
        &manifest,
    );
    let member = |out: &mut dyn Write, name: &str, data: &[u8]| -> Result<(), BundleError> {
        container::write_member_header(out, name, data.len() as u64)
            .map_err(io_err("writing the bundle"))?;
        out.write_all(data).map_err(io_err("writing the bundle"))?;
        container::write_padding(out, data.len() as u64).map_err(io_err("writing the bundle"))
    };
    member(out, MANIFEST_MEMBER, manifest_bytes)?;
    member(out, SIGNATURE_MEMBER, signature)?;
    for (image, entry) in images.iter_mut().zip(&manifest.images) {
        let (input, data) = image;
        if input.class != entry.slot_class {
            return Err(BundleError::Member {
                member: container::index_member(input.class),
                reason: "images are not in manifest order".into(),
            });
        }
        member(
            out,
            &container::index_member(input.class),
            &input.built.index_bytes,
        )?;
        let name = container::archive_member(input.class);
        container::write_member_header(out, &name, entry.archive.size)
            .map_err(io_err("writing the bundle"))?;
        out.write_all(&input.built.header)
            .map_err(io_err("writing the bundle"))?;
        let copied = io::copy(&mut data.take(input.built.data_size), out)
            .map_err(io_err("copying chunk data"))?;
        if copied != input.built.data_size {
            return Err(BundleError::Member {
                member: name,
                reason: format!(
                    "chunk data is {copied} bytes, expected {}",
                    input.built.data_size
                ),
            });
        }
        container::write_padding(out, entry.archive.size).map_err(io_err("writing the bundle"))?;
        for patch in input.patches {
            let name = container::patch_member(input.class, &patch.base_sha256);
            let size = (patch.table.len() + patch.data.len()) as u64;
            container::write_member_header(out, &name, size)
                .map_err(io_err("writing the bundle"))?;
            out.write_all(&patch.table)
                .map_err(io_err("writing the bundle"))?;
            out.write_all(&patch.data)
                .map_err(io_err("writing the bundle"))?;
            container::write_padding(out, size).map_err(io_err("writing the bundle"))?;
        }
    }
    container::write_end(out).map_err(io_err("writing the bundle"))?;
    Ok(layout.total_size)
}
