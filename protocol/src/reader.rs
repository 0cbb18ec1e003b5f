//! Reading a bundle from any source, by byte ranges.
//!
//! A bundle is read the same way wherever it lies: a local file, an
//! object store, an HTTP server answering `Range` requests. [`RangeRead`]
//! is the one interface (after bitar's `ArchiveReader`): it streams a range
//! of bytes and learns the source's size from its first read. Every
//! `Read + Seek` (a `File`, a `Cursor`) is a [`RangeRead`]; the device's
//! HTTP source and the server's blob store implement it themselves.
//!
//! The rules for the start of a bundle live here, once:
//! [`read_head`] reads the first [`FIRST_READ`] bytes (fewer when the
//! bundle is smaller: any size works), checks the manifest and signature
//! member headers and their size limits, reads more only when the manifest
//! and signature do not fit, computes the layout and checks that the
//! source is exactly as large as the layout says. [`Prefixed`] then serves
//! later reads of those first bytes from memory, so nothing is fetched
//! twice. [`check_members`] checks every other member header and the end
//! marker (what a reader of the whole file, `Bundle::open`, does; a device
//! uses only bytes the signed manifest binds by digest, and does not spend
//! requests on them); [`check_index_head`] and [`check_index`] check an
//! image's index against the manifest: digests, sizes, and the archive
//! sizes it implies.

use std::io::{Read, Seek, SeekFrom};

use crate::bundle::BundleError;
use crate::container::{self, BLOCK, BundleLayout, MANIFEST_MEMBER, SIGNATURE_MEMBER};
use crate::digest::Sha256Digest;
use crate::index::{ChunkIndex, IndexHead};
use crate::limits::{MAX_MANIFEST_SIZE, MAX_SIGNATURE_SIZE};
use crate::manifest::{ImageEntry, Manifest, ManifestError};
use crate::signature::SignatureError;

/// Bytes read first from a bundle: the manifest and signature of every
/// real bundle fit, usually with the first index head and pages; more is
/// fetched if not. A smaller bundle is read whole.
pub const FIRST_READ: u64 = 8 * 1024;

/// Receives the bytes of a range, in order.
pub type Sink<'a, E> = dyn FnMut(&[u8]) -> Result<(), E> + 'a;

/// A source of bundle bytes, read by ranges.
pub trait RangeRead {
    /// What a read fails with. The bundle rules' own rejections convert
    /// into it, so a reader's caller sees one error type.
    type Error: From<BundleError>;

    /// The source's size, once known (an HTTP source learns it from its
    /// first response).
    fn known_size(&mut self) -> Result<Option<u64>, Self::Error>;

    /// Streams bytes `offset..offset + len` to `sink`, in order, each byte
    /// once. Fails if the source ends before.
    fn read_into(
        &mut self,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_, Self::Error>,
    ) -> Result<(), Self::Error>;

    /// Reads bytes `0..len`, or the whole source if it is shorter, in one
    /// request; afterwards [`RangeRead::known_size`] is known.
    fn read_start(&mut self, len: u64) -> Result<Vec<u8>, Self::Error>;

    /// Reads `offset..offset + len` into memory.
    fn read_range(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, Self::Error> {
        let mut out = Vec::with_capacity(len.min(1 << 24) as usize);
        self.read_into(offset, len, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> BundleError {
    move |source| BundleError::Io { context, source }
}

impl<T: Read + Seek> RangeRead for T {
    type Error = BundleError;

    fn known_size(&mut self) -> Result<Option<u64>, BundleError> {
        self.seek(SeekFrom::End(0))
            .map(Some)
            .map_err(io_err("measuring the bundle".into()))
    }

    fn read_into(
        &mut self,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_, BundleError>,
    ) -> Result<(), BundleError> {
        self.seek(SeekFrom::Start(offset))
            .map_err(io_err(format!("seeking to byte {offset}")))?;
        let mut buf = vec![0u8; len.min(256 * 1024) as usize];
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = self
                .read(&mut buf[..want])
                .map_err(io_err(format!("reading bytes {offset}..{}", offset + len)))?;
            if n == 0 {
                return Err(BundleError::Truncated {
                    expected: offset + len,
                    found: offset + len - left,
                });
            }
            sink(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    fn read_start(&mut self, len: u64) -> Result<Vec<u8>, BundleError> {
        let size = self.known_size()?.unwrap_or(0);
        self.read_range(0, len.min(size))
    }
}

/// A reader whose first bytes are already in memory (those [`read_head`]
/// read): reads of them are served from memory, the rest of a read goes
/// to the source. Only the part past the prefix is ever requested, so what
/// a device fetches is exactly [`Prefixed::clip`] of what it reads.
#[derive(Debug)]
pub struct Prefixed<'r, R: ?Sized> {
    prefix: &'r [u8],
    inner: &'r mut R,
}

impl<'r, R: RangeRead + ?Sized> Prefixed<'r, R> {
    /// Serves `prefix` (bytes `0..prefix.len()` of the source) from memory.
    pub fn new(prefix: &'r [u8], inner: &'r mut R) -> Self {
        Self { prefix, inner }
    }

    /// The source itself.
    pub fn inner(&mut self) -> &mut R {
        self.inner
    }

    /// Reads everything from the source from now on: after a download of
    /// the prefix turned out corrupt, fetching again must not serve the
    /// same bytes.
    pub fn forget_prefix(&mut self) {
        self.prefix = &[];
    }
}

/// The part of `offset..offset + len` past a prefix of `held` bytes: what
/// is requested from the source (None: nothing).
pub fn clip(held: u64, offset: u64, len: u64) -> Option<(u64, u64)> {
    let end = offset.saturating_add(len);
    let start = offset.max(held);
    (start < end).then(|| (start, end - start))
}

impl<R: RangeRead + ?Sized> RangeRead for Prefixed<'_, R> {
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
        let held = self.prefix.len() as u64;
        if offset < held {
            let end = offset.saturating_add(len).min(held);
            sink(&self.prefix[offset as usize..end as usize])?;
        }
        match clip(held, offset, len) {
            Some((at, n)) => self.inner.read_into(at, n, sink),
            None => Ok(()),
        }
    }

    fn read_start(&mut self, len: u64) -> Result<Vec<u8>, R::Error> {
        self.inner.read_start(len)
    }
}

/// The start of a bundle: its manifest and signature, as read, and the
/// layout they fix. Nothing in it is trusted yet.
#[derive(Debug, Clone)]
pub struct BundleHead {
    /// Bytes `0..prefix.len()` of the bundle: everything [`read_head`]
    /// read (serve later reads of them with [`Prefixed`]).
    pub prefix: Vec<u8>,
    /// Manifest bytes as signed.
    pub manifest_bytes: Vec<u8>,
    /// The detached signature (DER).
    pub signature: Vec<u8>,
    /// The manifest, parsed, NOT verified.
    pub manifest: Manifest,
    /// Every member's place.
    pub layout: BundleLayout,
}

fn slice(bytes: &[u8], start: u64, end: u64) -> &[u8] {
    bytes.get(start as usize..end as usize).unwrap_or_default()
}

/// Reads and checks the start of a bundle (see the module docs). Works for
/// a bundle of any size: a bundle smaller than [`FIRST_READ`] is read
/// whole in one request.
pub fn read_head<R: RangeRead + ?Sized>(r: &mut R) -> Result<BundleHead, R::Error> {
    let mut prefix = r.read_start(FIRST_READ)?;
    let size = r.known_size()?.ok_or_else(|| BundleError::Member {
        member: MANIFEST_MEMBER.into(),
        reason: "the source did not say how large the bundle is".into(),
    })?;
    // Bytes `0..end` in `prefix`, read on demand.
    let mut need = |prefix: &mut Vec<u8>, end: u64| -> Result<(), R::Error> {
        let have = prefix.len() as u64;
        if end > size {
            return Err(BundleError::Truncated {
                expected: end,
                found: size,
            }
            .into());
        }
        if end > have {
            let more = r.read_range(have, end - have)?;
            prefix.extend_from_slice(&more);
        }
        Ok(())
    };
    need(&mut prefix, BLOCK)?;
    let h =
        container::parse_member_header(slice(&prefix, 0, BLOCK), 0).map_err(BundleError::from)?;
    if h.name != MANIFEST_MEMBER {
        return Err(BundleError::Member {
            member: h.name,
            reason: format!("expected {MANIFEST_MEMBER} first; not a Kernex bundle"),
        }
        .into());
    }
    if h.size > MAX_MANIFEST_SIZE {
        return Err(BundleError::from(ManifestError::TooLarge {
            limit: MAX_MANIFEST_SIZE,
            found: h.size,
        })
        .into());
    }
    let sig_at = BundleLayout::signature_header_offset(h.size);
    need(&mut prefix, sig_at + BLOCK)?;
    let sh = container::parse_member_header(slice(&prefix, sig_at, sig_at + BLOCK), sig_at)
        .map_err(BundleError::from)?;
    if sh.name != SIGNATURE_MEMBER {
        return Err(BundleError::from(SignatureError::Unsigned).into());
    }
    if sh.size > MAX_SIGNATURE_SIZE {
        return Err(BundleError::from(SignatureError::TooLarge {
            limit: MAX_SIGNATURE_SIZE,
            found: sh.size,
        })
        .into());
    }
    let sig_end = sig_at + BLOCK + sh.size;
    need(&mut prefix, sig_end)?;
    let manifest_bytes = slice(&prefix, BLOCK, BLOCK + h.size).to_vec();
    let signature = slice(&prefix, sig_at + BLOCK, sig_end).to_vec();
    let manifest = Manifest::from_slice(&manifest_bytes).map_err(BundleError::from)?;
    let layout = BundleLayout::compute(h.size, sh.size, &manifest);
    if size < layout.total_size {
        return Err(BundleError::Truncated {
            expected: layout.total_size,
            found: size,
        }
        .into());
    }
    if size > layout.total_size {
        return Err(BundleError::TrailingData(size - layout.total_size).into());
    }
    Ok(BundleHead {
        prefix,
        manifest_bytes,
        signature,
        manifest,
        layout,
    })
}

/// Checks every member header after the signature (name and size where
/// the manifest puts them) and the end-of-archive marker.
pub fn check_members<R: RangeRead + ?Sized>(
    r: &mut R,
    layout: &BundleLayout,
) -> Result<(), R::Error> {
    for (name, at, span) in layout.members().into_iter().skip(2) {
        let block = r.read_range(at, BLOCK)?;
        let m = container::parse_member_header(&block, at).map_err(BundleError::from)?;
        if m.name != name || m.size != span.size {
            return Err(BundleError::Member {
                member: name,
                reason: format!(
                    "found {:?} of {} bytes where the manifest puts {} bytes",
                    m.name, m.size, span.size
                ),
            }
            .into());
        }
    }
    let end = r.read_range(layout.total_size - 2 * BLOCK, 2 * BLOCK)?;
    if end.iter().any(|&b| b != 0) {
        return Err(BundleError::Member {
            member: "end of archive".into(),
            reason: "end marker is not zero".into(),
        }
        .into());
    }
    Ok(())
}

/// Checks an image's index head (the first `entry.index.head-size` bytes
/// of its index) against the manifest and decodes it.
pub fn check_index_head(entry: &ImageEntry, bytes: &[u8]) -> Result<IndexHead, BundleError> {
    let class = entry.slot_class;
    let name = container::index_member(class);
    let found = Sha256Digest::of(bytes);
    if found != entry.index.head_sha256 {
        return Err(BundleError::Digest {
            what: format!("{name} head"),
            expected: entry.index.head_sha256,
            found,
        });
    }
    let head = IndexHead::decode(bytes).map_err(|source| BundleError::Index { class, source })?;
    if head.file_size() != entry.index.size || head.head_size() != entry.index.head_size {
        return Err(BundleError::Member {
            member: name,
            reason: format!(
                "head describes an index of {} bytes with a {}-byte head, the manifest {} and {}",
                head.file_size(),
                head.head_size(),
                entry.index.size,
                entry.index.head_size
            ),
        });
    }
    Ok(head)
}

/// Checks a whole index against the manifest (head and whole digests) and
/// decodes it; then that it describes the manifest's image size and the
/// archive's header and data sizes.
pub fn check_index(entry: &ImageEntry, bytes: &[u8]) -> Result<ChunkIndex, BundleError> {
    let class = entry.slot_class;
    let name = container::index_member(class);
    let head_size = entry.index.head_size as usize;
    let head = Sha256Digest::of(&bytes[..head_size.min(bytes.len())]);
    if head != entry.index.head_sha256 {
        return Err(BundleError::Digest {
            what: format!("{name} head"),
            expected: entry.index.head_sha256,
            found: head,
        });
    }
    let whole = Sha256Digest::of(bytes);
    if whole != entry.index.sha256 {
        return Err(BundleError::Digest {
            what: name,
            expected: entry.index.sha256,
            found: whole,
        });
    }
    let index = ChunkIndex::decode(bytes).map_err(|source| BundleError::Index { class, source })?;
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
    if index.archive_data_offset() != entry.archive.header_size
        || entry
            .archive
            .header_size
            .checked_add(index.archive_data_size())
            != Some(entry.archive.size)
    {
        return Err(BundleError::Member {
            member: name,
            reason: format!(
                "describes an archive of {} + {} bytes, the manifest one of {} + {}",
                index.archive_data_offset(),
                index.archive_data_size(),
                entry.archive.header_size,
                entry.archive.size.saturating_sub(entry.archive.header_size)
            ),
        });
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_only_what_lies_past_the_prefix() {
        assert_eq!(clip(100, 0, 50), None);
        assert_eq!(clip(100, 50, 50), None);
        assert_eq!(clip(100, 50, 100), Some((100, 50)));
        assert_eq!(clip(100, 200, 10), Some((200, 10)));
        assert_eq!(clip(0, 0, 0), None);
    }

    #[test]
    fn prefixed_serves_the_prefix_and_reads_only_the_rest() {
        #[derive(Debug)]
        struct Counting {
            data: Vec<u8>,
            reads: Vec<(u64, u64)>,
        }
        impl RangeRead for Counting {
            type Error = BundleError;
            fn known_size(&mut self) -> Result<Option<u64>, BundleError> {
                Ok(Some(self.data.len() as u64))
            }
            fn read_into(
                &mut self,
                offset: u64,
                len: u64,
                sink: &mut Sink<'_, BundleError>,
            ) -> Result<(), BundleError> {
                self.reads.push((offset, len));
                sink(&self.data[offset as usize..(offset + len) as usize])
            }
            fn read_start(&mut self, len: u64) -> Result<Vec<u8>, BundleError> {
                let n = len.min(self.data.len() as u64);
                self.read_range(0, n)
            }
        }
        let data: Vec<u8> = (0..=255u8).collect();
        let mut source = Counting {
            data: data.clone(),
            reads: Vec::new(),
        };
        let prefix = data[..100].to_vec();
        let mut p = Prefixed::new(&prefix, &mut source);
        assert_eq!(p.read_range(10, 20).unwrap(), data[10..30]);
        assert_eq!(p.read_range(90, 20).unwrap(), data[90..110]);
        assert_eq!(p.read_range(150, 6).unwrap(), data[150..156]);
        assert_eq!(source.reads, vec![(100, 10), (150, 6)]);
    }

    #[test]
    fn a_read_seek_source_reports_a_short_read_as_truncation() {
        let mut c = std::io::Cursor::new(vec![1u8; 10]);
        assert_eq!(c.read_start(FIRST_READ).unwrap().len(), 10);
        let err = c.read_range(5, 10).unwrap_err();
        assert!(matches!(err, BundleError::Truncated { .. }), "{err}");
    }
}
