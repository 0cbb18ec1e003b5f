//! Bundles: writing one from built archives, and opening, verifying and
//! extracting one.
//!
//! A bundle is read through a [`RangeRead`] (a file, a buffer, the
//! server's object store; the device reads it over HTTP with the same
//! rules, see [`crate::reader`] and [`crate::plan`]). Reading is staged so
//! nothing untrusted is used before it is checked:
//! [`Bundle::open`] checks the container's structure and sizes;
//! [`Bundle::verify`] checks the signature and yields a
//! [`VerifiedManifest`]; [`Bundle::extract_image`] and
//! [`Bundle::verify_contents`] take that verified manifest and check every
//! index, archive header and chunk against it.

use std::io::{self, Read, Write};

use serde::Serialize;

use crate::archive::{ArchiveError, BuiltArchive};
use crate::container::{self, BundleLayout, ContainerError, MANIFEST_MEMBER, SIGNATURE_MEMBER};
use crate::digest::Sha256Digest;
use crate::index::{ChunkIndex, Delta, IndexError};
use crate::manifest::{
    ArchiveRef, FsType, ImageEntry, IndexRef, MANIFEST_FORMAT, Manifest, ManifestError, PatchRef,
    SlotClass, VerifiedManifest,
};
use crate::patch::{BuiltPatch, PatchError, PatchTable};
use crate::plan::{Held, plan_image_offered};
use crate::reader::{
    BundleHead, RangeRead, Sink, check_index, check_members, clip, member_reads, read_head,
};
use crate::signature::{self, Keyring, SignatureError, VerifyOptions};
#[cfg(feature = "bita")]
use {
    crate::archive::{self, VerifiedChunk},
    sha2::{Digest, Sha256},
    std::collections::HashMap,
};

mod write;

pub use write::{ImageInput, ReleaseInfo, manifest_for, write_bundle};

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

/// What a device downloads to install a bundle ([`Bundle::delta_from`]).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BundleDelta {
    /// The release the device runs (None: nothing to seed from).
    pub from: Option<semver::Version>,
    /// The release it installs.
    pub to: semver::Version,
    /// The first read (manifest, signature and whatever else of the
    /// bundle's first [`crate::reader::FIRST_READ`] bytes).
    pub manifest_bytes: u64,
    /// The container's other member headers and its end marker, past the
    /// first read ([`check_members`]).
    pub container_bytes: u64,
    /// Per image.
    pub images: Vec<ImageDelta>,
    /// Everything downloaded.
    pub total_bytes: u64,
    /// Range requests made.
    pub requests: u64,
    /// The whole bundle, for comparison.
    pub full_bundle_bytes: u64,
}

/// One image's part of a [`BundleDelta`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageDelta {
    /// Slot class.
    pub slot_class: SlotClass,
    /// The delta: bytes fetched for this image, by kind (what the first
    /// read already held is not counted again).
    #[serde(flatten)]
    pub delta: Delta,
    /// Size of bita's own archive header for the new image, the index a
    /// plain bita client would download instead.
    pub bita_header_bytes: u64,
    /// Image size.
    pub image_size: u64,
}

/// An opened bundle whose structure has been checked but whose signature
/// has not (yet). Read through any [`RangeRead`]: a file, a buffer, an
/// object store.
#[derive(Debug)]
pub struct Bundle<R> {
    reader: R,
    head: BundleHead,
    /// The reads [`read_head`] made: (offset, bytes).
    head_reads: Vec<(u64, u64)>,
}

/// Records the reads made through it.
struct Recorder<'a, R: ?Sized> {
    inner: &'a mut R,
    reads: Vec<(u64, u64)>,
}

impl<R: RangeRead + ?Sized> RangeRead for Recorder<'_, R> {
    type Error = R::Error;

    fn known_size(&mut self) -> Result<Option<u64>, R::Error> {
        self.inner.known_size()
    }

    fn read_into(
        &mut self,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_, R::Error>,
    ) -> Result<(), R::Error> {
        self.reads.push((offset, len));
        self.inner.read_into(offset, len, sink)
    }

    fn read_start(&mut self, len: u64) -> Result<Vec<u8>, R::Error> {
        let bytes = self.inner.read_start(len)?;
        self.reads.push((0, bytes.len() as u64));
        Ok(bytes)
    }
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

impl<R: RangeRead> Bundle<R> {
    /// Opens a bundle: reads the manifest and signature ([`read_head`])
    /// and checks that every member is where and as large as the manifest
    /// says ([`check_members`]). Does not check the signature.
    pub fn open(mut reader: R) -> Result<Self, R::Error> {
        let mut recorder = Recorder {
            inner: &mut reader,
            reads: Vec::new(),
        };
        let head = read_head(&mut recorder)?;
        let head_reads = recorder.reads;
        check_members(&mut reader, &head.layout)?;
        Ok(Bundle {
            reader,
            head,
            head_reads,
        })
    }

    /// The manifest, NOT verified: for display only.
    pub fn unverified_manifest(&self) -> &Manifest {
        &self.head.manifest
    }

    /// The manifest bytes as signed.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.head.manifest_bytes
    }

    /// The detached signature (DER).
    pub fn signature(&self) -> &[u8] {
        &self.head.signature
    }

    /// Member layout.
    pub fn layout(&self) -> &BundleLayout {
        &self.head.layout
    }

    /// Checks the signature against `keyring`.
    pub fn verify(
        &self,
        keyring: &Keyring,
        options: VerifyOptions,
    ) -> Result<VerifiedManifest, BundleError> {
        Ok(signature::verify_manifest(
            keyring,
            &self.head.manifest_bytes,
            &self.head.signature,
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
            .head
            .layout
            .image(class)
            .cloned()
            .ok_or(BundleError::NoImage(class))?;
        Ok((entry, spans))
    }

    /// Reads an image's index file and checks it against the manifest
    /// ([`check_index`]): the bytes and the decoded index.
    pub fn read_index_file(
        &mut self,
        manifest: &Manifest,
        class: SlotClass,
    ) -> Result<(Vec<u8>, ChunkIndex), R::Error> {
        let (entry, spans) = self.entry(manifest, class)?;
        let bytes = self
            .reader
            .read_range(spans.index.offset, spans.index.size)?;
        let index = check_index(entry, &bytes)?;
        Ok((bytes, index))
    }

    /// Reads an image's index and checks it against the manifest. With an
    /// unverified manifest this only proves consistency, not authenticity.
    pub fn read_index(
        &mut self,
        manifest: &Manifest,
        class: SlotClass,
    ) -> Result<ChunkIndex, R::Error> {
        self.read_index_file(manifest, class)
            .map(|(_, index)| index)
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
    ) -> Result<Option<PatchTable>, R::Error> {
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
        let bytes = self.reader.read_range(span.offset, patch.table_size)?;
        Ok(Some(
            PatchTable::from_member(&bytes, patch, index).map_err(|source| BundleError::Patch {
                member: name,
                source,
            })?,
        ))
    }

    /// What a device holding `old`'s images downloads to install this
    /// bundle (`old` None: a device with nothing to seed from): the sum of
    /// the requests `kernex-updater install` makes, by the same rules
    /// ([`read_head`], [`check_members`] and [`crate::plan::plan_image`],
    /// each read past the first one only), so the server's rollout preview
    /// and `kernex-image bundle delta` are exact.
    pub fn delta_from<S: RangeRead<Error = R::Error>>(
        &mut self,
        old: Option<&mut Bundle<S>>,
    ) -> Result<BundleDelta, R::Error> {
        self.delta_from_offered(old, &[])
    }

    /// [`Bundle::delta_from`] for a device that is also offered the
    /// patches `offered` outside the bundle ([`crate::offered`]): what it
    /// downloads when it uses them (each only for an image whose held
    /// image it is from, and which the bundle carries no patch from).
    pub fn delta_from_offered<S: RangeRead<Error = R::Error>>(
        &mut self,
        mut old: Option<&mut Bundle<S>>,
        offered: &[crate::offered::Offered],
    ) -> Result<BundleDelta, R::Error> {
        let manifest = self.head.manifest.clone();
        let prefix = self.head.prefix.len() as u64;
        let mut images = Vec::new();
        let mut requests = self.head_reads.len() as u64;
        for (k, image) in manifest.images.iter().enumerate() {
            let class = image.slot_class;
            let (_, spans) = self.entry(&manifest, class)?;
            let offer = offered.iter().find(|o| o.class == class);
            let index = self.read_index(&manifest, class)?;
            let held = match old.as_deref_mut() {
                Some(o) => {
                    let m = o.head.manifest.clone();
                    match m.image(class) {
                        Some(e) => Some((o.read_index_file(&m, class)?, (e.sha256, e.size))),
                        None => None,
                    }
                }
                None => None,
            };
            let held = held.as_ref().map(|((bytes, index), base)| Held {
                index_bytes: bytes,
                index,
                image: Some(*base),
            });
            let reader = &mut self.reader;
            let virtual_patch = offer.map(|o| (&o.patch, crate::offered::span(k, &o.patch)));
            let plan = plan_image_offered(
                image,
                &spans,
                &index,
                held,
                prefix,
                virtual_patch,
                &mut |r| match offer {
                    Some(o) if crate::offered::locate(r.offset).is_some() => Ok(o.table.clone()),
                    _ => reader.read_range(r.offset, r.len),
                },
            )?;
            requests += plan.requests.len() as u64;
            images.push(ImageDelta {
                slot_class: class,
                delta: plan.delta,
                bita_header_bytes: image.archive.header_size,
                image_size: image.size,
            });
        }
        let manifest_bytes: u64 = self.head_reads.iter().map(|(_, n)| n).sum();
        let container: Vec<(u64, u64)> = member_reads(&self.head.layout)
            .into_iter()
            .filter_map(|(at, n)| clip(prefix, at, n))
            .collect();
        requests += container.len() as u64;
        let container_bytes: u64 = container.iter().map(|(_, n)| n).sum();
        let total_bytes = manifest_bytes
            + container_bytes
            + images.iter().map(|i| i.delta.total_bytes()).sum::<u64>();
        Ok(BundleDelta {
            from: old.map(|o| o.head.manifest.version.clone()),
            to: manifest.version.clone(),
            manifest_bytes,
            container_bytes,
            images,
            total_bytes,
            requests,
            full_bundle_bytes: self.head.layout.total_size,
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
    ) -> Result<archive::ArchiveHeader, R::Error> {
        let (entry, spans) = self.entry(manifest, class)?;
        let name = container::archive_member(class);
        let bytes = self
            .reader
            .read_range(spans.archive.offset, entry.archive.header_size)?;
        let digest = Sha256Digest::of(&bytes);
        if digest != entry.archive.header_sha256 {
            return Err(BundleError::Digest {
                what: format!("{name} header"),
                expected: entry.archive.header_sha256,
                found: digest,
            }
            .into());
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
            }
            .into());
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
    ) -> Result<ImageReport, R::Error> {
        let manifest = verified.manifest();
        let index = self.read_index(manifest, class)?;
        self.read_archive_header(manifest, class, &index)?;
        let (entry, spans) = self.entry(manifest, class)?;
        let data_start = spans.archive.offset + index.archive_data_offset();
        let occurrences = index.occurrences();
        // Chunks that occur more than once are kept after first use, up to
        // a budget; beyond it they are read again.
        const CACHE_BUDGET: u64 = 32 * 1024 * 1024;
        let mut cache: HashMap<usize, VerifiedChunk> = HashMap::new();
        let mut cached_bytes = 0u64;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        let arch = |source| BundleError::Archive { class, source };
        for (_, id, chunk) in index.image_chunks() {
            let verified_chunk = match cache.get(&id) {
                Some(c) => c.clone(),
                None => {
                    let buf = self.reader.read_range(
                        data_start + chunk.archive_offset,
                        u64::from(chunk.archive_size),
                    )?;
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
                .map_err(io_err("writing the image"))
                .map_err(R::Error::from)?;
            written += verified_chunk.data().len() as u64;
            progress(written);
        }
        let digest = Sha256Digest::from_hasher(hasher);
        if digest != entry.sha256 || written != entry.size {
            return Err(BundleError::Digest {
                what: format!("{class} image"),
                expected: entry.sha256,
                found: digest,
            }
            .into());
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
    ) -> Result<Vec<ImageReport>, R::Error> {
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
