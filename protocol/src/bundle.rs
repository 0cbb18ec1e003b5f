//! Bundles: writing one from built archives, and opening, verifying and
//! extracting one.
//!
//! Reading is staged so nothing untrusted is used before it is checked:
//! [`Bundle::open`] checks the container's structure and sizes;
//! [`Bundle::verify`] checks the signature and yields a
//! [`VerifiedManifest`]; [`Bundle::extract_image`] and
//! [`Bundle::verify_contents`] take that verified manifest and check every
//! index, archive header and chunk against it.

use std::io::{self, Read, Seek, SeekFrom, Write};

use serde::Serialize;

use crate::archive::{ArchiveError, BuiltArchive};
use crate::container::{
    self, BLOCK, BundleLayout, ContainerError, MANIFEST_MEMBER, SIGNATURE_MEMBER,
};
use crate::digest::Sha256Digest;
use crate::index::{ChunkIndex, Delta, IndexError};
use crate::limits::*;
use crate::manifest::{
    ArchiveRef, FsType, ImageEntry, IndexRef, MANIFEST_FORMAT, Manifest, ManifestError, PatchRef,
    SlotClass, VerifiedManifest,
};
use crate::patch::{BuiltPatch, PatchError, PatchTable};
use crate::signature::{self, Keyring, SignatureError, VerifyOptions};
#[cfg(feature = "bita")]
use {
    crate::archive::{self, VerifiedChunk},
    sha2::{Digest, Sha256},
    std::collections::HashMap,
};

/// Why a bundle was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading or writing failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// The file ends early.
    #[error("bundle is truncated: {expected} bytes expected, {found} present")]
    Truncated {
        /// Size the layout needs.
        expected: u64,
        /// Size found.
        found: u64,
    },
    /// Extra data after the end of the bundle.
    #[error("bundle has {0} bytes of unexpected data after its end")]
    TrailingData(u64),
    /// A member is missing, misnamed or of the wrong size.
    #[error("bundle member {member}: {reason}")]
    Member {
        /// Member name.
        member: String,
        /// What is wrong.
        reason: String,
    },
    /// A container header is malformed.
    #[error(transparent)]
    Container(#[from] ContainerError),
    /// The manifest is malformed.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// A digest in the manifest does not match.
    #[error("{what} does not match the manifest: expected sha256 {expected}, found {found}")]
    Digest {
        /// What was hashed.
        what: String,
        /// Digest in the manifest.
        expected: Sha256Digest,
        /// Digest computed.
        found: Sha256Digest,
    },
    /// An index is malformed.
    #[error("{class} chunk index: {source}")]
    Index {
        /// The image.
        class: SlotClass,
        /// The error.
        source: IndexError,
    },
    /// An archive is malformed or a chunk is corrupt.
    #[error("{class} archive: {source}")]
    Archive {
        /// The image.
        class: SlotClass,
        /// The error.
        source: ArchiveError,
    },
    /// The manifest has no image of this class.
    #[error("bundle has no {0} image")]
    NoImage(SlotClass),
    /// A patch table is malformed.
    #[error("bundle member {member}: {source}")]
    Patch {
        /// The member.
        member: String,
        /// What is wrong.
        source: PatchError,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BundleError {
    let context = context.into();
    move |source| BundleError::Io { context, source }
}

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

/// What a device downloads to install a bundle ([`Bundle::delta_from`]).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BundleDelta {
    /// The release the device runs (None: nothing to seed from).
    pub from: Option<semver::Version>,
    /// The release it installs.
    pub to: semver::Version,
    /// Manifest, signature and their headers.
    pub manifest_bytes: u64,
    /// Per image.
    pub images: Vec<ImageDelta>,
    /// Everything downloaded.
    pub total_bytes: u64,
    /// The whole bundle, for comparison.
    pub full_bundle_bytes: u64,
}

/// One image's part of a [`BundleDelta`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageDelta {
    /// Slot class.
    pub slot_class: SlotClass,
    /// The delta.
    #[serde(flatten)]
    pub delta: Delta,
    /// Size of bita's own archive header for the new image, the index a
    /// plain bita client would download instead.
    pub bita_header_bytes: u64,
    /// Image size.
    pub image_size: u64,
}

/// An opened bundle whose structure has been checked but whose signature
/// has not (yet).
#[derive(Debug)]
pub struct Bundle<R> {
    reader: R,
    manifest_bytes: Vec<u8>,
    signature: Vec<u8>,
    manifest: Manifest,
    layout: BundleLayout,
}

fn read_exact_at<R: Read + Seek>(
    r: &mut R,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, BundleError> {
    r.seek(SeekFrom::Start(offset))
        .map_err(io_err(format!("seeking to {what}")))?;
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(len)
        .read_to_end(&mut buf)
        .map_err(io_err(format!("reading {what}")))?;
    if (n as u64) < len {
        return Err(BundleError::Truncated {
            expected: offset + len,
            found: offset + n as u64,
        });
    }
    Ok(buf)
}

/// Verification summary of one image.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageReport {
    /// Slot class.
    pub slot_class: SlotClass,
    /// Image size.
    pub size: u64,
    /// Chunks in image order.
    pub chunks: u64,
    /// Distinct chunks stored in the archive.
    pub stored_chunks: u64,
    /// Bytes of chunk data.
    pub chunk_data_bytes: u64,
    /// Verified SHA-256 of the image.
    pub sha256: Sha256Digest,
}

impl<R: Read + Seek> Bundle<R> {
    /// Opens a bundle: reads the manifest and signature and checks that
    /// every member is where and as large as the manifest says. Does not
    /// check the signature.
    pub fn open(mut reader: R) -> Result<Self, BundleError> {
        let file_size = reader
            .seek(SeekFrom::End(0))
            .map_err(io_err("measuring the bundle"))?;
        let header = read_exact_at(&mut reader, 0, BLOCK, "the manifest header")?;
        let h = container::parse_member_header(&header, 0)?;
        if h.name != MANIFEST_MEMBER {
            return Err(BundleError::Member {
                member: h.name,
                reason: format!("expected {MANIFEST_MEMBER} first; not a Kernex bundle"),
            });
        }
        if h.size > MAX_MANIFEST_SIZE {
            return Err(ManifestError::TooLarge {
                limit: MAX_MANIFEST_SIZE,
                found: h.size,
            }
            .into());
        }
        let manifest_bytes = read_exact_at(&mut reader, BLOCK, h.size, "the manifest")?;
        let sig_at = BundleLayout::signature_header_offset(h.size);
        let header = read_exact_at(&mut reader, sig_at, BLOCK, "the signature header")?;
        let sh = container::parse_member_header(&header, sig_at)?;
        if sh.name != SIGNATURE_MEMBER {
            return Err(SignatureError::Unsigned.into());
        }
        if sh.size > MAX_SIGNATURE_SIZE {
            return Err(SignatureError::TooLarge {
                limit: MAX_SIGNATURE_SIZE,
                found: sh.size,
            }
            .into());
        }
        let signature = read_exact_at(&mut reader, sig_at + BLOCK, sh.size, "the signature")?;
        let manifest = Manifest::from_slice(&manifest_bytes)?;
        let layout = BundleLayout::compute(h.size, sh.size, &manifest);
        if file_size < layout.total_size {
            return Err(BundleError::Truncated {
                expected: layout.total_size,
                found: file_size,
            });
        }
        if file_size > layout.total_size {
            return Err(BundleError::TrailingData(file_size - layout.total_size));
        }
        for (name, at, span) in layout.members().into_iter().skip(2) {
            let block = read_exact_at(&mut reader, at, BLOCK, &name)?;
            let m = container::parse_member_header(&block, at)?;
            if m.name != name || m.size != span.size {
                return Err(BundleError::Member {
                    member: name,
                    reason: format!(
                        "found {:?} of {} bytes where the manifest puts {} bytes",
                        m.name, m.size, span.size
                    ),
                });
            }
        }
        let end = read_exact_at(
            &mut reader,
            layout.total_size - 2 * BLOCK,
            2 * BLOCK,
            "the end marker",
        )?;
        if end.iter().any(|&b| b != 0) {
            return Err(BundleError::Member {
                member: "end of archive".into(),
                reason: "end marker is not zero".into(),
            });
        }
        Ok(Bundle {
            reader,
            manifest_bytes,
            signature,
            manifest,
            layout,
        })
    }

    /// The manifest, NOT verified: for display only.
    pub fn unverified_manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The manifest bytes as signed.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The detached signature (DER).
    pub fn signature(&self) -> &[u8] {
        &self.signature
    }

    /// Member layout.
    pub fn layout(&self) -> &BundleLayout {
        &self.layout
    }

    /// Checks the signature against `keyring`.
    pub fn verify(
        &self,
        keyring: &Keyring,
        options: VerifyOptions,
    ) -> Result<VerifiedManifest, BundleError> {
        Ok(signature::verify_manifest(
            keyring,
            &self.manifest_bytes,
            &self.signature,
            options,
        )?)
    }

    fn entry<'m>(
        &self,
        manifest: &'m Manifest,
        class: SlotClass,
    ) -> Result<(&'m ImageEntry, crate::container::ImageSpans), BundleError> {
        let entry = manifest.image(class).ok_or(BundleError::NoImage(class))?;
        let spans = self
            .layout
            .image(class)
            .cloned()
            .ok_or(BundleError::NoImage(class))?;
        Ok((entry, spans))
    }

    /// Reads an image's index and checks it against the manifest. With an
    /// unverified manifest this only proves consistency, not authenticity.
    pub fn read_index(
        &mut self,
        manifest: &Manifest,
        class: SlotClass,
    ) -> Result<ChunkIndex, BundleError> {
        let (entry, spans) = self.entry(manifest, class)?;
        let name = container::index_member(class);
        let bytes = read_exact_at(
            &mut self.reader,
            spans.index.offset,
            spans.index.size,
            &name,
        )?;
        let head_size = entry.index.head_size as usize;
        let head = Sha256Digest::of(&bytes[..head_size.min(bytes.len())]);
        if head != entry.index.head_sha256 {
            return Err(BundleError::Digest {
                what: format!("{name} head"),
                expected: entry.index.head_sha256,
                found: head,
            });
        }
        let whole = Sha256Digest::of(&bytes);
        if whole != entry.index.sha256 {
            return Err(BundleError::Digest {
                what: name,
                expected: entry.index.sha256,
                found: whole,
            });
        }
        let index =
            ChunkIndex::decode(&bytes).map_err(|source| BundleError::Index { class, source })?;
        if index.image_size() != entry.size {
            return Err(BundleError::Member {
                member: name,
                reason: format!(
                    "describes {} bytes, manifest says {}",
                    index.image_size(),
                    entry.size
                ),
            });
        }
        Ok(index)
    }

    /// Reads the table of an image's patch from the base image `base`,
    /// checks it against the manifest, and against `index` (the image's
    /// index, from [`Bundle::read_index`]). None when the bundle carries no
    /// patch from that base.
    pub fn read_patch_table(
        &mut self,
        manifest: &Manifest,
        class: SlotClass,
        base: &Sha256Digest,
        index: &ChunkIndex,
    ) -> Result<Option<PatchTable>, BundleError> {
        let (entry, spans) = self.entry(manifest, class)?;
        let Some((k, patch)) = entry.patch_from(base) else {
            return Ok(None);
        };
        let name = container::patch_member(class, base);
        let span = spans
            .patches
            .get(k)
            .map(|(_, s)| *s)
            .ok_or_else(|| BundleError::Member {
                member: name.clone(),
                reason: "not in the layout".into(),
            })?;
        let bytes = read_exact_at(&mut self.reader, span.offset, patch.table_size, &name)?;
        PatchTable::from_member(&bytes, patch, index)
            .map(Some)
            .map_err(|source| BundleError::Patch {
                member: name,
                source,
            })
    }

    /// What a device holding `old`'s images downloads to install this
    /// bundle (`old` None: a device with nothing to seed from), per image:
    /// the index head and the pages it lacks, then each chunk it lacks from
    /// the patch from its image when this bundle carries one, else from the
    /// archive. Exactly what `kernex-updater install` fetches; the server's
    /// rollout preview and `kernex-image bundle delta` print it.
    pub fn delta_from<S: Read + Seek>(
        &mut self,
        mut old: Option<&mut Bundle<S>>,
    ) -> Result<BundleDelta, BundleError> {
        let manifest = self.manifest.clone();
        let mut images = Vec::new();
        for image in &manifest.images {
            let class = image.slot_class;
            let new_index = self.read_index(&manifest, class)?;
            let (old_index, old_sha) = match old.as_deref_mut() {
                Some(o) => {
                    let m = o.manifest.clone();
                    match m.image(class) {
                        Some(e) => (Some(o.read_index(&m, class)?), Some(e.sha256)),
                        None => (None, None),
                    }
                }
                None => (None, None),
            };
            let mut delta = Delta::between(old_index.as_ref(), &new_index);
            // A device uses its booted slot as a seed (and so a patch
            // against it) only when the chunk hashes have the same length.
            if let (Some(old_index), Some(base)) = (old_index.as_ref(), old_sha)
                && old_index.hash_len() == new_index.hash_len()
                && let Some(table) = self.read_patch_table(&manifest, class, &base, &new_index)?
            {
                let patch = image.patch_from(&base).map(|(_, p)| p.table_size);
                delta.apply_patch(&table, patch.unwrap_or(0), old_index, &new_index);
            }
            images.push(ImageDelta {
                slot_class: class,
                delta,
                bita_header_bytes: image.archive.header_size,
                image_size: image.size,
            });
        }
        let layout = &self.layout;
        // Manifest and signature with their headers; the device then knows
        // where every other member is.
        let manifest_bytes = layout.signature.end() + container::padding(layout.signature.size);
        let total_bytes =
            manifest_bytes + images.iter().map(|i| i.delta.total_bytes()).sum::<u64>();
        Ok(BundleDelta {
            from: old.map(|o| o.manifest.version.clone()),
            to: manifest.version.clone(),
            manifest_bytes,
            images,
            total_bytes,
            full_bundle_bytes: layout.total_size,
        })
    }

    #[cfg(feature = "bita")]
    /// Reads an image's bita header, checks it against the manifest and the
    /// index.
    pub fn read_archive_header(
        &mut self,
        manifest: &Manifest,
        class: SlotClass,
        index: &ChunkIndex,
    ) -> Result<archive::ArchiveHeader, BundleError> {
        let (entry, spans) = self.entry(manifest, class)?;
        let name = container::archive_member(class);
        let bytes = read_exact_at(
            &mut self.reader,
            spans.archive.offset,
            entry.archive.header_size,
            &name,
        )?;
        let digest = Sha256Digest::of(&bytes);
        if digest != entry.archive.header_sha256 {
            return Err(BundleError::Digest {
                what: format!("{name} header"),
                expected: entry.archive.header_sha256,
                found: digest,
            });
        }
        let arch = |source| BundleError::Archive { class, source };
        let header = archive::parse_archive_header(&bytes).map_err(arch)?;
        archive::check_dictionary(&header.dictionary, index).map_err(arch)?;
        if index.archive_data_offset() != header.size
            || header.size + index.archive_data_size() != entry.archive.size
        {
            return Err(BundleError::Member {
                member: name,
                reason: "archive size disagrees with its header and index".into(),
            });
        }
        Ok(header)
    }

    #[cfg(feature = "bita")]
    /// Writes the image of `class` to `out`, checking every chunk and the
    /// whole image against the verified manifest. `progress` gets the image
    /// bytes written so far.
    pub fn extract_image(
        &mut self,
        verified: &VerifiedManifest,
        class: SlotClass,
        out: &mut dyn Write,
        progress: &dyn Fn(u64),
    ) -> Result<ImageReport, BundleError> {
        let manifest = verified.manifest();
        let index = self.read_index(manifest, class)?;
        self.read_archive_header(manifest, class, &index)?;
        let (entry, spans) = self.entry(manifest, class)?;
        let data_start = spans.archive.offset + index.archive_data_offset();
        let occurrences = index.occurrences();
        // Chunks that occur more than once are kept after first use, up to
        // a budget; beyond it they are read again.
        const CACHE_BUDGET: u64 = 256 * 1024 * 1024;
        let mut cache: HashMap<usize, VerifiedChunk> = HashMap::new();
        let mut cached_bytes = 0u64;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let mut buf = Vec::new();
        let arch = |source| BundleError::Archive { class, source };
        for (_, id, chunk) in index.image_chunks() {
            let verified_chunk = match cache.get(&id) {
                Some(c) => c.clone(),
                None => {
                    self.reader
                        .seek(SeekFrom::Start(data_start + chunk.archive_offset))
                        .map_err(io_err("seeking to a chunk"))?;
                    buf.resize(chunk.archive_size as usize, 0);
                    self.reader
                        .read_exact(&mut buf)
                        .map_err(io_err("reading a chunk"))?;
                    let v = archive::verify_chunk(chunk, &buf).map_err(arch)?;
                    if occurrences[id] > 1
                        && cached_bytes + u64::from(chunk.source_size) <= CACHE_BUDGET
                    {
                        cached_bytes += u64::from(chunk.source_size);
                        cache.insert(id, v.clone());
                    }
                    v
                }
            };
            hasher.update(verified_chunk.data());
            out.write_all(verified_chunk.data())
                .map_err(io_err("writing the image"))?;
            written += verified_chunk.data().len() as u64;
            progress(written);
        }
        let digest = Sha256Digest::from_hasher(hasher);
        if digest != entry.sha256 || written != entry.size {
            return Err(BundleError::Digest {
                what: format!("{class} image"),
                expected: entry.sha256,
                found: digest,
            });
        }
        Ok(ImageReport {
            slot_class: class,
            size: written,
            chunks: index.chunk_count(),
            stored_chunks: index.stored_chunks().len() as u64,
            chunk_data_bytes: index.archive_data_size(),
            sha256: digest,
        })
    }

    #[cfg(feature = "bita")]
    /// Checks every image in full (index, archive header, every chunk, the
    /// image digest) without writing it anywhere.
    pub fn verify_contents(
        &mut self,
        verified: &VerifiedManifest,
        progress: &dyn Fn(u64),
    ) -> Result<Vec<ImageReport>, BundleError> {
        let classes: Vec<SlotClass> = verified.images.iter().map(|i| i.slot_class).collect();
        let mut done = 0u64;
        let mut reports = Vec::new();
        for class in classes {
            let report =
                self.extract_image(verified, class, &mut io::sink(), &|n| progress(done + n))?;
            done += report.size;
            reports.push(report);
            let manifest = verified.manifest();
            if let Some(entry) = manifest.image(class)
                && !entry.patches.is_empty()
            {
                let index = self.read_index(manifest, class)?;
                for p in &entry.patches {
                    self.read_patch_table(manifest, class, &p.base_sha256, &index)?;
                }
            }
        }
        Ok(reports)
    }
}
