//! Building patches (build host and server): finding where each new chunk
//! came from in the base image, and encoding it against those ranges.
//!
//! Memory does not grow with the base image: the base is read through
//! [`BaseImage`] (a file is read by ranges, never held whole), its anchor
//! index is 16 bytes per anchor (about one per 128 bytes of non-repetitive
//! base), and the new image's chunks are encoded in batches of
//! [`BATCH_BYTES`]. What stays in memory is the anchor index, one batch,
//! and the frames kept (at most the archive's chunk data, since a frame is
//! kept only when smaller than its archive chunk).

use std::collections::HashMap;
use std::io;

use super::{ENTRY_SIZE, MAX_WINDOW_LOG, PatchEntry, PatchTable, RANGE_SIZE};
use crate::archive::ArchiveError;
use crate::index::{ChunkHash, ChunkIndex};
use crate::limits::{MAX_PATCH_REF_BYTES, MAX_PATCH_REFS};

use super::BaseRange;

/// The base image a patch is encoded against, read by ranges: a slice in
/// memory, or a file (read with positioned reads, so it is never held
/// whole).
pub trait BaseImage: Sync {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; fails if the image ends before.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl BaseImage for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buf.len());
        let src = self
            .get(start..end)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the base image"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(unix)]
impl BaseImage for std::fs::File {
    fn size(&self) -> u64 {
        self.metadata().map_or(0, |m| m.len())
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

/// The gear table of the anchor hash: 256 fixed pseudo-random words
/// (splitmix64 from a constant seed), so every build finds the same
/// anchors.
const GEAR: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut state: u64 = 0x6b65_726e_6578_2d70; // "kernex-p"
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
};
/// One position in 2^7 is an anchor. A gear hash depends on the last 64
/// bytes only (older bytes are shifted out), so equal 64-byte windows in
/// two images give equal anchors.
const ANCHOR_MASK: u64 = (1 << 7) - 1;
const ANCHOR_WINDOW: usize = 64;
/// Anchors seen more often than this in the base (runs of zeros, padding)
/// say nothing about where a chunk came from and are dropped.
const MAX_ANCHOR_HITS: usize = 8;
/// Alignment buckets: anchor hits whose implied chunk start lies in the
/// same 4 KiB of the base vote together (small insertions shift it).
const BUCKET_SHIFT: u32 = 12;
/// Base bytes taken on each side of the matched region.
const REF_MARGIN: u64 = 4 * 1024;
/// The base is scanned for anchors in reads of this size.
const SCAN_BLOCK: usize = 4 << 20;
/// New-image bytes encoded per batch (all workers together).
pub const BATCH_BYTES: u64 = 32 << 20;

/// The anchor scan's state, so an image can be scanned in pieces.
#[derive(Default)]
struct AnchorScan {
    h: u64,
    pos: u64,
}

impl AnchorScan {
    fn feed(&mut self, data: &[u8], mut each: impl FnMut(u64, u64)) {
        for &b in data {
            self.h = (self.h << 1).wrapping_add(GEAR[usize::from(b)]);
            if self.pos + 1 >= ANCHOR_WINDOW as u64 && self.h & ANCHOR_MASK == 0 {
                each(self.h, self.pos);
            }
            self.pos += 1;
        }
    }
}

fn anchors(data: &[u8], mut each: impl FnMut(u64, usize)) {
    AnchorScan::default().feed(data, |h, i| each(h, i as usize));
}

/// One chunk encoded against the base: its base ranges and its frame.
pub type Encoded = (Vec<BaseRange>, Vec<u8>);

/// Finds where in a base image a chunk's content came from, and encodes
/// chunks against it.
pub struct PatchBuilder<'a, B: BaseImage + ?Sized = [u8]> {
    base: &'a B,
    base_len: u64,
    /// (anchor hash, end position in base), sorted; frequent hashes removed.
    anchors: Vec<(u64, u64)>,
    level: i32,
}

impl<B: BaseImage + ?Sized> std::fmt::Debug for PatchBuilder<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatchBuilder")
            .field("base_len", &self.base_len)
            .field("anchors", &self.anchors.len())
            .field("level", &self.level)
            .finish()
    }
}

impl<'a> PatchBuilder<'a, [u8]> {
    /// Indexes the anchors of a base image in memory. `level` is the zstd
    /// level of the frames (19 is a good trade: patches are made once per
    /// release).
    pub fn new(base: &'a [u8], level: i32) -> Self {
        let mut found = Vec::with_capacity(base.len() / (ANCHOR_MASK as usize + 1) + 16);
        let mut last = None;
        AnchorScan::default().feed(base, |h, i| push_anchor(&mut found, &mut last, h, i));
        Self::with_anchors(base, found, level)
    }
}

/// Records an anchor, but not the same hash again within a window: a run
/// of one repeated byte (zeros, padding) hashes alike at every position,
/// and would otherwise fill the index before the frequent-hash filter.
fn push_anchor(found: &mut Vec<(u64, u64)>, last: &mut Option<(u64, u64)>, h: u64, at: u64) {
    if let Some((lh, lat)) = *last
        && lh == h
        && at - lat < ANCHOR_WINDOW as u64
    {
        *last = Some((h, at));
        return;
    }
    *last = Some((h, at));
    found.push((h, at));
}

impl<'a, B: BaseImage + ?Sized> PatchBuilder<'a, B> {
    /// Indexes the anchors of `base`, read in blocks of a few MiB (a file
    /// is never read whole into memory).
    pub fn from_base(base: &'a B, level: i32) -> io::Result<Self> {
        let len = base.size();
        // About one anchor per 2^7 bytes: sized up front, so the index is
        // not doubled (and copied) as it grows.
        let expected = (len / (ANCHOR_MASK + 1)).saturating_add(1024);
        let mut found = Vec::with_capacity(usize::try_from(expected).unwrap_or(0).min(1 << 28));
        let mut last = None;
        let mut scan = AnchorScan::default();
        let mut buf = vec![0u8; SCAN_BLOCK];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(SCAN_BLOCK as u64) as usize;
            base.read_exact_at(at, &mut buf[..n])?;
            scan.feed(&buf[..n], |h, i| push_anchor(&mut found, &mut last, h, i));
            at += n as u64;
        }
        Ok(Self::with_anchors(base, found, level))
    }

    /// Sorts the anchors and drops, in place, the hashes found more than
    /// [`MAX_ANCHOR_HITS`] times.
    fn with_anchors(base: &'a B, mut found: Vec<(u64, u64)>, level: i32) -> Self {
        found.sort_unstable();
        let mut kept = 0;
        let mut i = 0;
        while i < found.len() {
            let mut j = i;
            while j < found.len() && found[j].0 == found[i].0 {
                j += 1;
            }
            if j - i <= MAX_ANCHOR_HITS {
                found.copy_within(i..j, kept);
                kept += j - i;
            }
            i = j;
        }
        found.truncate(kept);
        found.shrink_to_fit();
        PatchBuilder {
            base,
            base_len: base.size(),
            anchors: found,
            level,
        }
    }

    /// The base ranges a chunk most likely came from (best last: zstd
    /// encodes near matches cheaper), or none.
    pub fn refs_for(&self, data: &[u8]) -> Vec<BaseRange> {
        // bucket -> (votes, lowest and highest implied start)
        let mut votes: HashMap<i64, (u32, i64, i64)> = HashMap::new();
        anchors(data, |h, i| {
            let from = self.anchors.partition_point(|&(k, _)| k < h);
            for &(_, at) in self.anchors[from..].iter().take_while(|&&(k, _)| k == h) {
                let start = at as i64 - i as i64;
                let v = votes
                    .entry(start >> BUCKET_SHIFT)
                    .or_insert((0, start, start));
                v.0 += 1;
                v.1 = v.1.min(start);
                v.2 = v.2.max(start);
            }
        });
        let mut ranked: Vec<(u32, i64, i64)> = votes.into_values().collect();
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let Some(&(best, _, _)) = ranked.first() else {
            return Vec::new();
        };
        let base_len = self.base_len;
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let mut total = 0u64;
        for &(n, lo, hi) in ranked.iter().take(MAX_PATCH_REFS) {
            if n * 8 < best {
                break;
            }
            let start = (lo.max(0) as u64).saturating_sub(REF_MARGIN).min(base_len);
            let end = ((hi.max(0) as u64) + data.len() as u64 + REF_MARGIN).min(base_len);
            if end <= start {
                continue;
            }
            let room = u64::from(MAX_PATCH_REF_BYTES) - total;
            if room == 0 {
                break;
            }
            let end = end.min(start + room);
            // Merge with a span it overlaps.
            if let Some(s) = spans.iter_mut().find(|s| start <= s.1 && s.0 <= end) {
                let merged = (s.0.min(start), s.1.max(end));
                let grown = (merged.1 - merged.0) - (s.1 - s.0);
                if total + grown > u64::from(MAX_PATCH_REF_BYTES) {
                    continue;
                }
                total += grown;
                *s = merged;
            } else {
                total += end - start;
                spans.push((start, end));
            }
        }
        // Best-voted span last.
        spans.reverse();
        spans
            .into_iter()
            .map(|(s, e)| BaseRange {
                offset: s,
                len: (e - s) as u32,
            })
            .collect()
    }

    /// Encodes `data` against the base: the ranges and the frame, or None
    /// when no part of the base resembles it.
    pub fn encode(&self, data: &[u8]) -> Result<Option<Encoded>, ArchiveError> {
        let refs = self.refs_for(data);
        if refs.is_empty() {
            return Ok(None);
        }
        let total: usize = refs.iter().map(|r| r.len as usize).sum();
        let mut prefix = vec![0u8; total];
        let mut at = 0;
        for r in &refs {
            let end = at + r.len as usize;
            self.base
                .read_exact_at(r.offset, &mut prefix[at..end])
                .map_err(|source| ArchiveError::Io {
                    context: "reading the base image",
                    source,
                })?;
            at = end;
        }
        let frame = encode_frame(&prefix, data, self.level)?;
        Ok(Some((refs, frame)))
    }
}

fn zstd_err(code: usize) -> ArchiveError {
    ArchiveError::Zstd(zstd::zstd_safe::get_error_name(code).to_string())
}

/// One zstd frame of `data` with `prefix` as its single-use dictionary.
pub fn encode_frame(prefix: &[u8], data: &[u8], level: i32) -> Result<Vec<u8>, ArchiveError> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let span = (prefix.len() + data.len()).max(1) as u64;
    let window_log = (64 - (span - 1).leading_zeros()).clamp(10, MAX_WINDOW_LOG);
    let mut cctx = CCtx::create();
    for p in [
        CParameter::CompressionLevel(level),
        CParameter::WindowLog(window_log),
        CParameter::ContentSizeFlag(true),
        CParameter::ChecksumFlag(false),
    ] {
        cctx.set_parameter(p).map_err(zstd_err)?;
    }
    cctx.ref_prefix(prefix).map_err(zstd_err)?;
    let mut out: Vec<u8> = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).map_err(zstd_err)?;
    Ok(out)
}

/// A built patch, ready to go into a bundle.
#[derive(Debug, Clone)]
pub struct BuiltPatch {
    /// The base release's version.
    pub base_version: semver::Version,
    /// SHA-256 of the base image.
    pub base_sha256: crate::Sha256Digest,
    /// The encoded table.
    pub table: Vec<u8>,
    /// The frames.
    pub data: Vec<u8>,
    /// Chunks of the new image the base lacks.
    pub chunks_new: u64,
    /// Of those, chunks patched (the rest travel from the archive).
    pub chunks_patched: u64,
}

/// Builds the patch of `new` (its index and a reader of its image) against
/// `base` (the older image, in memory, with its index). A chunk gets an
/// entry when the base holds something like it and its frame is smaller
/// than its archive form; chunks the base holds whole need none. Uses
/// `threads` worker threads. [`build_patch_from`] reads the base from a
/// file instead.
pub fn build_patch(
    base: &[u8],
    base_index: &ChunkIndex,
    new_index: &ChunkIndex,
    read_chunk: impl FnMut(u64, u32) -> io::Result<Vec<u8>>,
    level: i32,
    threads: usize,
) -> Result<(PatchTable, Vec<u8>, u64), ArchiveError> {
    build_patch_with(
        PatchBuilder::new(base, level),
        base_index,
        new_index,
        read_chunk,
        threads,
        &|_, _| {},
    )
}

/// [`build_patch`] with the base read through [`BaseImage`] (e.g. a
/// `File`), so memory does not grow with the base image, and `progress`
/// called with (new-image chunks done, chunks to do).
pub fn build_patch_from<B: BaseImage + ?Sized>(
    base: &B,
    base_index: &ChunkIndex,
    new_index: &ChunkIndex,
    read_chunk: impl FnMut(u64, u32) -> io::Result<Vec<u8>>,
    level: i32,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(PatchTable, Vec<u8>, u64), ArchiveError> {
    let builder = PatchBuilder::from_base(base, level).map_err(|source| ArchiveError::Io {
        context: "reading the base image",
        source,
    })?;
    build_patch_with(
        builder, base_index, new_index, read_chunk, threads, progress,
    )
}

type Part = Result<Vec<(u32, Option<Encoded>)>, ArchiveError>;

fn build_patch_with<B: BaseImage + ?Sized>(
    builder: PatchBuilder<'_, B>,
    base_index: &ChunkIndex,
    new_index: &ChunkIndex,
    mut read_chunk: impl FnMut(u64, u32) -> io::Result<Vec<u8>>,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(PatchTable, Vec<u8>, u64), ArchiveError> {
    let have: std::collections::HashSet<ChunkHash> = base_index.hashes();
    let comparable =
        base_index.params() == new_index.params() && base_index.hash_len() == new_index.hash_len();
    let stored = new_index.stored_chunks();
    let mut first_at: Vec<Option<u64>> = vec![None; stored.len()];
    for (at, id, _) in new_index.image_chunks() {
        if let Some(slot) = first_at.get_mut(id)
            && slot.is_none()
        {
            *slot = Some(at);
        }
    }
    // The chunks to encode: (stored chunk number, image offset).
    let todo: Vec<(u32, u64)> = stored
        .iter()
        .enumerate()
        .filter(|(_, chunk)| !(comparable && have.contains(&chunk.hash)))
        .filter_map(|(id, _)| first_at[id].map(|at| (id as u32, at)))
        .collect();
    drop(first_at);
    drop(have);
    let chunks_new = todo.len() as u64;
    let threads = threads.clamp(1, 64);
    let mut table = PatchTable {
        base_size: builder.base_len,
        entries: Vec::new(),
    };
    let mut data = Vec::new();
    let mut done = 0u64;
    let mut next = 0;
    while next < todo.len() {
        // One batch of new chunks, read in image order.
        let mut batch: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut batch_bytes = 0u64;
        while next < todo.len() && batch_bytes < BATCH_BYTES {
            let (id, at) = todo[next];
            let chunk = read_chunk(at, stored[id as usize].source_size).map_err(|source| {
                ArchiveError::Io {
                    context: "reading the new image",
                    source,
                }
            })?;
            batch_bytes += chunk.len() as u64;
            batch.push((id, chunk));
            next += 1;
        }
        let per = batch.len().div_ceil(threads).max(1);
        let results: Vec<Part> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .chunks(per)
                .map(|part| {
                    let builder = &builder;
                    s.spawn(move || -> Part {
                        part.iter()
                            .map(|(id, data)| Ok((*id, builder.encode(data)?)))
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ArchiveError::Zstd("a patch worker panicked".into()))
                    })
                })
                .collect()
        });
        for part in results {
            for (id, encoded) in part? {
                let Some((refs, frame)) = encoded else {
                    continue;
                };
                let chunk = &stored[id as usize];
                // Worth it only when smaller than the archive's chunk plus
                // the entry's own bytes.
                let entry_cost = (ENTRY_SIZE + refs.len() * RANGE_SIZE) as u64;
                if frame.len() as u64 + entry_cost >= u64::from(chunk.archive_size) {
                    continue;
                }
                table.entries.push(PatchEntry {
                    chunk: id,
                    data_offset: data.len() as u64,
                    data_len: frame.len() as u32,
                    refs,
                });
                data.extend_from_slice(&frame);
            }
        }
        done += batch.len() as u64;
        progress(done, chunks_new);
    }
    Ok((table, data, chunks_new))
}

#[cfg(test)]
mod tests;
