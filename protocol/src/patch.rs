//! Chunk patches: the chunks a release adds, encoded against an older
//! release's image.
//!
//! Content-defined chunking shares every chunk two releases have in common,
//! but a chunk that changed by a few bytes (a patched binary, an inode
//! table, a package replaced by its next version) is new and travels whole.
//! A patch fixes that for devices that run a known older release: for each
//! chunk the new image adds, it holds a zstd frame compressed with a few
//! ranges of the *base* image (the older release's image, which the device
//! has in its booted slot) as the prefix. zstd then encodes the chunk as
//! matches into its old version plus the edits.
//!
//! A bundle may carry patches from several older releases, one bundle
//! member each (`<class>.from-<base sha256>.kxp`, after the image's index
//! and archive). The signed manifest lists them ([`crate::manifest::PatchRef`]):
//! the base image's SHA-256, the member's size and the table's size and
//! SHA-256, so a device fetches the table, checks it, and then fetches only
//! the patch data of the chunks it lacks, with merged Range requests like
//! the archive's. The patch data itself is not bound by a digest: each
//! decoded chunk is checked against its hash in the (signed) chunk index,
//! exactly like a chunk from the archive, and a chunk that does not decode
//! or verify is fetched from the archive instead.
//!
//! # Member layout (little endian)
//!
//! ```text
//! table   header  magic "KXPATCH1" | base image size u64 | entry count u32 | reserved u32 (0)
//!         entries chunk u32 | data length u32 | range count u8 | reserved [u8; 3]
//!                 then per range: base offset u64 | length u32
//! data    the entries' zstd frames, concatenated in entry order
//! ```
//!
//! Entries are sorted by stored-chunk number (the chunk's position in the
//! new index's stored chunks), strictly increasing. The prefix of an entry
//! is its base ranges concatenated in the listed order; each frame
//! decompresses to exactly the chunk's source size.

use std::collections::HashMap;

use crate::archive::{self, ArchiveError, VerifiedChunk};
use crate::index::{ChunkHash, ChunkIndex, StoredChunk};
use crate::limits::{
    MAX_CHUNK_SIZE, MAX_IMAGE_SIZE, MAX_PATCH_REF_BYTES, MAX_PATCH_REFS, MAX_PATCH_TABLE_SIZE,
};

/// Magic at the start of a patch table.
pub const PATCH_MAGIC: &[u8; 8] = b"KXPATCH1";
/// Size of the table header.
pub const PATCH_HEADER_SIZE: usize = 24;
const ENTRY_SIZE: usize = 12;
const RANGE_SIZE: usize = 12;
/// Largest zstd frame of one chunk: a frame never needs to be larger than
/// the chunk plus zstd's worst-case overhead.
const MAX_FRAME_SIZE: u32 = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE / 128 + 1024;
/// zstd window a decoder accepts (2^27: 128 MiB), zstd's own default.
const MAX_WINDOW_LOG: u32 = 27;

/// A malformed patch table or patch frame.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The table is shorter than its header or its entries.
    #[error("patch table is truncated: needs {needed} bytes, has {found}")]
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// Not a patch table.
    #[error("not a Kernex patch table (bad magic)")]
    BadMagic,
    /// A value out of range (names the entry).
    #[error("patch table {field}: {reason}")]
    Invalid {
        /// Which field.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PatchError {
    PatchError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A range of the base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseRange {
    /// Offset in the base image.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// One patched chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchEntry {
    /// The chunk's number among the new index's stored chunks.
    pub chunk: u32,
    /// Offset of its frame, relative to the start of the patch data.
    pub data_offset: u64,
    /// Length of its frame.
    pub data_len: u32,
    /// The base ranges whose concatenation is the frame's prefix.
    pub refs: Vec<BaseRange>,
}

impl PatchEntry {
    /// Bytes of base image this entry's prefix holds.
    pub fn ref_bytes(&self) -> u64 {
        self.refs.iter().map(|r| u64::from(r.len)).sum()
    }
}

/// A decoded patch table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PatchTable {
    /// Size of the base image the ranges point into.
    pub base_size: u64,
    /// The entries, by chunk number.
    pub entries: Vec<PatchEntry>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl PatchTable {
    /// Bytes of patch data after the table.
    pub fn data_size(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.data_len)).sum()
    }

    /// The encoded table.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(PATCH_HEADER_SIZE + self.entries.len() * (ENTRY_SIZE + RANGE_SIZE));
        out.extend_from_slice(PATCH_MAGIC);
        out.extend_from_slice(&self.base_size.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        for e in &self.entries {
            out.extend_from_slice(&e.chunk.to_le_bytes());
            out.extend_from_slice(&e.data_len.to_le_bytes());
            out.push(e.refs.len() as u8);
            out.extend_from_slice(&[0u8; 3]);
            for r in &e.refs {
                out.extend_from_slice(&r.offset.to_le_bytes());
                out.extend_from_slice(&r.len.to_le_bytes());
            }
        }
        out
    }

    /// Parses a table. Every size is bounded before anything is allocated
    /// from it; ranges are checked to lie inside the base image.
    pub fn decode(bytes: &[u8]) -> Result<Self, PatchError> {
        let truncated = |needed: usize| PatchError::Truncated {
            needed: needed as u64,
            found: bytes.len() as u64,
        };
        if bytes.len() as u64 > MAX_PATCH_TABLE_SIZE {
            return Err(invalid(
                "size",
                format!(
                    "{} bytes, more than the limit of {MAX_PATCH_TABLE_SIZE}",
                    bytes.len()
                ),
            ));
        }
        if bytes.len() < PATCH_HEADER_SIZE {
            return Err(truncated(PATCH_HEADER_SIZE));
        }
        if &bytes[..8] != PATCH_MAGIC {
            return Err(PatchError::BadMagic);
        }
        let base_size = le_u64(bytes, 8);
        if base_size == 0 || base_size > MAX_IMAGE_SIZE {
            return Err(invalid(
                "base size",
                format!("{base_size} is outside 1..={MAX_IMAGE_SIZE}"),
            ));
        }
        let count = le_u32(bytes, 16) as usize;
        if le_u32(bytes, 20) != 0 {
            return Err(invalid("reserved", "must be zero"));
        }
        // Each entry takes at least one entry header and one range.
        let room = (bytes.len() - PATCH_HEADER_SIZE) / (ENTRY_SIZE + RANGE_SIZE);
        if count > room {
            return Err(truncated(
                PATCH_HEADER_SIZE.saturating_add(count.saturating_mul(ENTRY_SIZE + RANGE_SIZE)),
            ));
        }
        let mut entries = Vec::with_capacity(count);
        let mut at = PATCH_HEADER_SIZE;
        let mut data_offset = 0u64;
        let mut previous: Option<u32> = None;
        for i in 0..count {
            let field = |name: &str| format!("entries[{i}].{name}");
            if bytes.len() < at + ENTRY_SIZE {
                return Err(truncated(at + ENTRY_SIZE));
            }
            let chunk = le_u32(bytes, at);
            let data_len = le_u32(bytes, at + 4);
            let nrefs = usize::from(bytes[at + 8]);
            if bytes[at + 9..at + 12] != [0, 0, 0] {
                return Err(invalid(field("reserved"), "must be zero"));
            }
            at += ENTRY_SIZE;
            if previous.is_some_and(|p| chunk <= p) {
                return Err(invalid(
                    field("chunk"),
                    format!("{chunk} does not follow {}", previous.unwrap_or(0)),
                ));
            }
            previous = Some(chunk);
            if data_len == 0 || data_len > MAX_FRAME_SIZE {
                return Err(invalid(
                    field("data-length"),
                    format!("{data_len} is outside 1..={MAX_FRAME_SIZE}"),
                ));
            }
            if nrefs == 0 || nrefs > MAX_PATCH_REFS {
                return Err(invalid(
                    field("ranges"),
                    format!("{nrefs} ranges, expected 1..={MAX_PATCH_REFS}"),
                ));
            }
            if bytes.len() < at + nrefs * RANGE_SIZE {
                return Err(truncated(at + nrefs * RANGE_SIZE));
            }
            let mut refs = Vec::with_capacity(nrefs);
            let mut total = 0u64;
            for _ in 0..nrefs {
                let offset = le_u64(bytes, at);
                let len = le_u32(bytes, at + 8);
                at += RANGE_SIZE;
                let end = offset.checked_add(u64::from(len));
                if len == 0 || end.is_none_or(|end| end > base_size) {
                    return Err(invalid(
                        field("ranges"),
                        format!(
                            "{len} bytes at {offset} is not inside the base image of {base_size} bytes"
                        ),
                    ));
                }
                total += u64::from(len);
                refs.push(BaseRange { offset, len });
            }
            if total > u64::from(MAX_PATCH_REF_BYTES) {
                return Err(invalid(
                    field("ranges"),
                    format!(
                        "{total} bytes of base image, more than the limit of {MAX_PATCH_REF_BYTES}"
                    ),
                ));
            }
            entries.push(PatchEntry {
                chunk,
                data_offset,
                data_len,
                refs,
            });
            data_offset += u64::from(data_len);
        }
        if at != bytes.len() {
            return Err(invalid(
                "size",
                format!("{} bytes after the last entry", bytes.len() - at),
            ));
        }
        Ok(PatchTable { base_size, entries })
    }

    /// Checks the table against the new image's index (every chunk number
    /// names a stored chunk) and the patch member's size.
    pub fn check(
        &self,
        index: &ChunkIndex,
        table_size: u64,
        member_size: u64,
    ) -> Result<(), PatchError> {
        let stored = index.stored_chunks().len() as u64;
        if let Some(last) = self.entries.last()
            && u64::from(last.chunk) >= stored
        {
            return Err(invalid(
                "chunk",
                format!(
                    "{} is not a chunk of the image ({stored} chunks)",
                    last.chunk
                ),
            ));
        }
        if table_size + self.data_size() != member_size {
            return Err(invalid(
                "size",
                format!(
                    "table of {table_size} bytes and {} bytes of data do not make the member's {member_size} bytes",
                    self.data_size()
                ),
            ));
        }
        Ok(())
    }

    /// The table of a patch member, as fetched (`table-size` bytes from
    /// its start): checked against the manifest's `table-sha256`, decoded,
    /// and checked against the new image's index and the member's size.
    pub fn from_member(
        bytes: &[u8],
        patch: &crate::manifest::PatchRef,
        index: &ChunkIndex,
    ) -> Result<Self, PatchError> {
        let digest = crate::Sha256Digest::of(bytes);
        if digest != patch.table_sha256 {
            return Err(invalid(
                "sha256",
                format!(
                    "{digest} does not match the manifest's {}",
                    patch.table_sha256
                ),
            ));
        }
        let table = PatchTable::decode(bytes)?;
        table.check(index, patch.table_size, patch.size)?;
        Ok(table)
    }

    /// The entry for a stored chunk, if the patch has one.
    pub fn entry(&self, chunk: u32) -> Option<&PatchEntry> {
        self.entries
            .binary_search_by_key(&chunk, |e| e.chunk)
            .ok()
            .map(|i| &self.entries[i])
    }
}

/// Decodes one patched chunk: `prefix` is the entry's base ranges
/// concatenated, `frame` its data. The result is hash-checked like a chunk
/// from the archive.
pub fn decode_chunk(
    chunk: &StoredChunk,
    prefix: &[u8],
    frame: &[u8],
) -> Result<VerifiedChunk, ArchiveError> {
    let corrupt = |reason: String| ArchiveError::Chunk {
        hash: chunk.hash,
        offset: chunk.archive_offset,
        reason: format!("patch: {reason}"),
    };
    if chunk.source_size > MAX_CHUNK_SIZE {
        return Err(corrupt(format!(
            "source size {} is more than the limit of {MAX_CHUNK_SIZE}",
            chunk.source_size
        )));
    }
    let mut dctx = zstd::zstd_safe::DCtx::create();
    dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(MAX_WINDOW_LOG))
        .map_err(|c| corrupt(zstd::zstd_safe::get_error_name(c).to_string()))?;
    dctx.ref_prefix(prefix)
        .map_err(|c| corrupt(zstd::zstd_safe::get_error_name(c).to_string()))?;
    let mut data: Vec<u8> = Vec::with_capacity(chunk.source_size as usize);
    dctx.decompress(&mut data, frame).map_err(|c| {
        corrupt(format!(
            "does not decompress: {}",
            zstd::zstd_safe::get_error_name(c)
        ))
    })?;
    archive::verify_decoded(chunk, data)
}

/// Concatenates an entry's base ranges, read through `read_at(offset,
/// len)`.
pub fn gather_prefix<E>(
    entry: &PatchEntry,
    mut read_at: impl FnMut(u64, u32) -> Result<Vec<u8>, E>,
) -> Result<Vec<u8>, E> {
    let mut prefix = Vec::with_capacity(entry.ref_bytes() as usize);
    for r in &entry.refs {
        prefix.extend_from_slice(&read_at(r.offset, r.len)?);
    }
    Ok(prefix)
}

// ---------------------------------------------------------------------------
// Building patches (build host).

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

fn anchors(data: &[u8], mut each: impl FnMut(u64, usize)) {
    let mut h = 0u64;
    for (i, &b) in data.iter().enumerate() {
        h = (h << 1).wrapping_add(GEAR[usize::from(b)]);
        if i + 1 >= ANCHOR_WINDOW && h & ANCHOR_MASK == 0 {
            each(h, i);
        }
    }
}

/// One chunk encoded against the base: its base ranges and its frame.
pub type Encoded = (Vec<BaseRange>, Vec<u8>);

/// Finds where in a base image a chunk's content came from, and encodes
/// chunks against it.
pub struct PatchBuilder<'a> {
    base: &'a [u8],
    /// (anchor hash, end position in base), sorted; frequent hashes removed.
    anchors: Vec<(u64, u64)>,
    level: i32,
}

impl std::fmt::Debug for PatchBuilder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatchBuilder")
            .field("base_len", &self.base.len())
            .field("anchors", &self.anchors.len())
            .field("level", &self.level)
            .finish()
    }
}

impl<'a> PatchBuilder<'a> {
    /// Indexes the base image's anchors. `level` is the zstd level of the
    /// frames (19 is a good trade: patches are made once per release).
    pub fn new(base: &'a [u8], level: i32) -> Self {
        let mut found = Vec::with_capacity(base.len() / (ANCHOR_MASK as usize + 1) + 16);
        anchors(base, |h, i| found.push((h, i as u64)));
        found.sort_unstable();
        let mut kept = Vec::with_capacity(found.len());
        let mut i = 0;
        while i < found.len() {
            let mut j = i;
            while j < found.len() && found[j].0 == found[i].0 {
                j += 1;
            }
            if j - i <= MAX_ANCHOR_HITS {
                kept.extend_from_slice(&found[i..j]);
            }
            i = j;
        }
        kept.shrink_to_fit();
        PatchBuilder {
            base,
            anchors: kept,
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
        let base_len = self.base.len() as u64;
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
        let mut prefix = Vec::new();
        for r in &refs {
            let s = r.offset as usize;
            prefix.extend_from_slice(&self.base[s..s + r.len as usize]);
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
/// `threads` worker threads.
pub fn build_patch(
    base: &[u8],
    base_index: &ChunkIndex,
    new_index: &ChunkIndex,
    mut read_chunk: impl FnMut(u64, u32) -> std::io::Result<Vec<u8>>,
    level: i32,
    threads: usize,
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
    let mut jobs: Vec<(u32, Vec<u8>)> = Vec::new();
    for (id, chunk) in stored.iter().enumerate() {
        if comparable && have.contains(&chunk.hash) {
            continue;
        }
        let Some(at) = first_at[id] else { continue };
        let data = read_chunk(at, chunk.source_size).map_err(|source| ArchiveError::Io {
            context: "reading the new image",
            source,
        })?;
        jobs.push((id as u32, data));
    }
    let chunks_new = jobs.len() as u64;
    let builder = PatchBuilder::new(base, level);
    let threads = threads.clamp(1, 64);
    let per = jobs.len().div_ceil(threads).max(1);
    type Part = Result<Vec<(u32, Option<Encoded>)>, ArchiveError>;
    let results: Vec<Part> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
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
                h.join()
                    .unwrap_or_else(|_| Err(ArchiveError::Zstd("a patch worker panicked".into())))
            })
            .collect()
    });
    let mut table = PatchTable {
        base_size: base.len() as u64,
        entries: Vec::new(),
    };
    let mut data = Vec::new();
    for part in results {
        for (id, encoded) in part? {
            let Some((refs, frame)) = encoded else {
                continue;
            };
            let chunk = &stored[id as usize];
            // Worth it only when smaller than the archive's chunk plus the
            // entry's own bytes.
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
    Ok((table, data, chunks_new))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn chunk_of(data: &[u8]) -> StoredChunk {
        StoredChunk {
            hash: ChunkHash::of(data, 16),
            source_size: data.len() as u32,
            archive_offset: 0,
            archive_size: data.len() as u32,
        }
    }

    #[test]
    fn a_chunk_moved_and_edited_is_found_and_costs_a_fraction() {
        let base = noise(2 << 20, 7);
        // The new chunk: 32 KiB from 1 MiB + 123 into the base, with a few
        // bytes changed.
        let mut new = base[(1 << 20) + 123..(1 << 20) + 123 + 32 * 1024].to_vec();
        for i in [100usize, 5000, 20000, 31000] {
            new[i] ^= 0x5a;
        }
        let builder = PatchBuilder::new(&base, 19);
        let refs = builder.refs_for(&new);
        assert!(!refs.is_empty());
        let r = refs.last().unwrap();
        assert!(r.offset <= (1 << 20) + 123);
        assert!(r.offset + u64::from(r.len) >= (1 << 20) + 123 + 32 * 1024);
        let (refs, frame) = builder.encode(&new).unwrap().unwrap();
        assert!(frame.len() < 200, "frame is {} bytes", frame.len());
        let prefix = gather_prefix(
            &PatchEntry {
                chunk: 0,
                data_offset: 0,
                data_len: frame.len() as u32,
                refs,
            },
            |o, l| -> Result<Vec<u8>, ()> {
                Ok(base[o as usize..o as usize + l as usize].to_vec())
            },
        )
        .unwrap();
        let chunk = chunk_of(&new);
        let decoded = decode_chunk(&chunk, &prefix, &frame).unwrap();
        assert_eq!(decoded.data(), &new[..]);
        // The wrong prefix decodes to something else, which fails the hash.
        let wrong = vec![0u8; prefix.len()];
        assert!(decode_chunk(&chunk, &wrong, &frame).is_err());
    }

    #[test]
    fn unrelated_data_finds_no_reference() {
        let base = noise(1 << 20, 1);
        let new = noise(64 * 1024, 2);
        assert!(PatchBuilder::new(&base, 3).refs_for(&new).is_empty());
    }

    #[test]
    fn runs_of_zeros_do_not_anchor() {
        let base = vec![0u8; 1 << 20];
        let builder = PatchBuilder::new(&base, 3);
        assert!(builder.anchors.is_empty());
    }

    fn sample() -> PatchTable {
        PatchTable {
            base_size: 1 << 20,
            entries: vec![
                PatchEntry {
                    chunk: 3,
                    data_offset: 0,
                    data_len: 10,
                    refs: vec![BaseRange {
                        offset: 0,
                        len: 100,
                    }],
                },
                PatchEntry {
                    chunk: 9,
                    data_offset: 10,
                    data_len: 20,
                    refs: vec![
                        BaseRange {
                            offset: 4096,
                            len: 8192,
                        },
                        BaseRange {
                            offset: (1 << 20) - 10,
                            len: 10,
                        },
                    ],
                },
            ],
        }
    }

    #[test]
    fn table_round_trips() {
        let t = sample();
        let bytes = t.encode();
        assert_eq!(PatchTable::decode(&bytes).unwrap(), t);
        assert_eq!(t.data_size(), 30);
        assert_eq!(t.entry(9).unwrap().data_offset, 10);
        assert!(t.entry(4).is_none());
    }

    #[test]
    fn bad_tables_are_rejected_with_the_field() {
        let good = sample().encode();
        let err = |bytes: &[u8]| PatchTable::decode(bytes).unwrap_err().to_string();
        // Every truncation.
        for n in 0..good.len() {
            assert!(PatchTable::decode(&good[..n]).is_err(), "{n} bytes parsed");
        }
        let mut b = good.clone();
        b[0] = b'X';
        assert!(err(&b).contains("magic"));
        // A range past the end of the base.
        let mut t = sample();
        t.entries[1].refs[1].len = 11;
        assert!(err(&t.encode()).contains("not inside the base image"));
        // Unsorted chunks.
        let mut t = sample();
        t.entries[1].chunk = 3;
        assert!(err(&t.encode()).contains("does not follow"));
        // Too many ranges, too many bytes of base.
        let mut t = sample();
        t.entries[0].refs = vec![BaseRange { offset: 0, len: 1 }; MAX_PATCH_REFS + 1];
        assert!(err(&t.encode()).contains("ranges"));
        let mut t = sample();
        t.base_size = 1 << 30;
        t.entries[0].refs = vec![BaseRange {
            offset: 0,
            len: MAX_PATCH_REF_BYTES + 1,
        }];
        assert!(err(&t.encode()).contains("limit"));
        // A count that claims more entries than the bytes hold.
        let mut b = good.clone();
        b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(err(&b).contains("truncated"));
        // Trailing bytes.
        let mut b = good;
        b.push(0);
        assert!(err(&b).contains("after the last entry"));
    }

    #[test]
    fn a_frame_larger_than_its_chunk_is_refused() {
        let base = noise(1 << 16, 3);
        let data = noise(4096, 4);
        let frame = encode_frame(&base, &data, 3).unwrap();
        let mut chunk = chunk_of(&data);
        chunk.source_size = 1000;
        assert!(decode_chunk(&chunk, &base, &frame).is_err());
    }
}
