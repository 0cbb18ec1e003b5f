//! The compact chunk index a device downloads instead of bita's dictionary.
//!
//! bita's archive header lists every chunk with a 64-byte hash and absolute
//! offsets: ~380 KB for a 370 MB image at 64 KiB chunks, and a one-byte
//! change early in the image shifts every later offset. A device that holds
//! the previous release's index should pay only for what changed, so this
//! index is built to diff well:
//!
//! * **Truncated hashes.** Chunk hashes are BLAKE2b-512 truncated to
//!   `hash_len` bytes (16 by default, 12 at least), the same truncation bita
//!   does with `--hash-length`. A chunk hash only has to tell chunks of one
//!   device's images apart: with 2^20 chunks the chance of an accidental
//!   128-bit collision is about 2^-88. It is not the security boundary: the
//!   index itself is bound by SHA-256 in the signed manifest, and after
//!   writing a slot the updater checks the whole image's SHA-256, so a
//!   collision could at worst fail an install, never pass a wrong image.
//! * **No absolute offsets.** Stored chunks appear in the archive in the
//!   order they first appear in the image; a reader recomputes offsets by
//!   summing sizes, so one chunk that grows changes one entry, not all later
//!   ones. Repeats refer to a chunk by hash, runs of one repeated chunk
//!   (zeros) are one entry.
//! * **Content-defined pages.** Entries are grouped into pages that end after
//!   an entry whose hash has its low 6 bits zero (64 entries per page on
//!   average), so page boundaries move with the content. The index head
//!   lists each page's length and digest; a device fetches the head, reuses
//!   every page its previous index already holds, and fetches the few that
//!   changed.
//!
//! Layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KXINDEX1` |
//! | 8 | 1 | hash length in bytes |
//! | 9 | 1 | chunking algorithm: 1 RollSum, 2 BuzHash, 3 fixed size |
//! | 10 | 2 | reserved, zero |
//! | 12 | 4 | filter bits (rolling hash) |
//! | 16 | 4 | minimum chunk size |
//! | 20 | 4 | maximum chunk size (the chunk size, for fixed size) |
//! | 24 | 4 | rolling hash window size |
//! | 28 | 4 | page count |
//! | 32 | 8 | image size |
//! | 40 | 8 | chunk count (source order, repeats included) |
//! | 48 | 8 | offset of chunk data in the bita archive (its header size) |
//! | 56 | 8 | total size of all pages |
//! | 64 | 20 × pages | page table: length (u32), first 16 bytes of the page's SHA-256 |
//! | ... | | pages |
//!
//! A page is a sequence of entries: `0x00` stored chunk (hash, varint
//! source size, varint archive size; archive size equal to source size means
//! stored uncompressed, as in bita), `0x01` repeat (hash of an earlier stored
//! chunk), `0x02` run (varint n: the previous entry repeats n more times).

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::limits::*;

/// Magic at the start of every index.
pub const INDEX_MAGIC: &[u8; 8] = b"KXINDEX1";
/// Size of the fixed header.
pub const INDEX_HEADER_SIZE: usize = 64;
/// Size of one page table entry.
pub const PAGE_TABLE_ENTRY_SIZE: usize = 20;
/// Default truncated chunk hash length.
pub const DEFAULT_HASH_LEN: u8 = 16;
/// Mask on the first two hash bytes that ends a page (64 entries on average).
const PAGE_BOUNDARY_MASK: u16 = 0x3f;
/// Pages are cut after this many entries even without a boundary.
const MAX_PAGE_ENTRIES: usize = 1024;
/// Most source-order chunks an index may describe.
pub const MAX_CHUNK_COUNT: u64 = 1 << 28;

const TAG_STORED: u8 = 0;
const TAG_REPEAT: u8 = 1;
const TAG_RUN: u8 = 2;

/// Why an index was rejected.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Shorter than its header says.
    #[error("chunk index is truncated: needs {needed} bytes, has {found}")]
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// Not an index.
    #[error("not a Kernex chunk index (bad magic)")]
    BadMagic,
    /// A header field is out of range.
    #[error("chunk index header field {field} is invalid: {reason}")]
    Header {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A page's bytes do not match the page table's digest.
    #[error("chunk index page {page} does not match its digest")]
    PageDigest {
        /// Page number.
        page: usize,
    },
    /// A page entry is malformed.
    #[error("chunk index page {page}, entry {entry}: {reason}")]
    Entry {
        /// Page number.
        page: usize,
        /// Entry number within the page.
        entry: usize,
        /// What is wrong.
        reason: String,
    },
    /// Totals do not add up to the header's.
    #[error("chunk index totals disagree with its header: {0}")]
    Totals(String),
    /// Well-formed, but not in the canonical form this version writes.
    #[error(
        "chunk index is not in canonical form (pages split differently than the format defines)"
    )]
    NotCanonical,
}

/// Rolling-hash chunking algorithm, as bita names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChunkingAlgorithm {
    /// bup's rollsum (bita's default).
    RollSum,
    /// BuzHash.
    BuzHash,
    /// Fixed-size chunks.
    FixedSize,
}

/// How an image was cut into chunks. Two images share chunks only if cut
/// with the same parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChunkerParams {
    /// Algorithm.
    pub algorithm: ChunkingAlgorithm,
    /// Boundary when the low `filter_bits` bits of the rolling hash are set;
    /// the average chunk size is `2^(filter_bits+1)`.
    pub filter_bits: u32,
    /// Smallest chunk.
    pub min_chunk_size: u32,
    /// Largest chunk (the size, for fixed-size chunking).
    pub max_chunk_size: u32,
    /// Rolling hash window.
    pub window_size: u32,
}

impl ChunkerParams {
    /// Rolling-sum chunking around an average size (rounded down to a power
    /// of two), as `bita compress --avg-chunk-size --min-chunk-size
    /// --max-chunk-size --rolling-window-size`.
    pub fn rollsum(avg: u32, min: u32, max: u32, window: u32) -> Self {
        ChunkerParams {
            algorithm: ChunkingAlgorithm::RollSum,
            filter_bits: 30u32.saturating_sub(avg.leading_zeros()),
            min_chunk_size: min,
            max_chunk_size: max,
            window_size: window,
        }
    }

    /// Average chunk size the filter aims for.
    pub fn average_chunk_size(&self) -> u32 {
        match self.algorithm {
            ChunkingAlgorithm::FixedSize => self.max_chunk_size,
            _ => 1u32.checked_shl(self.filter_bits + 1).unwrap_or(u32::MAX),
        }
    }

    /// Checks the parameters are usable and within limits.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_chunk_size == 0 || self.max_chunk_size > MAX_CHUNK_SIZE {
            return Err(format!(
                "maximum chunk size {} is outside 1..={MAX_CHUNK_SIZE}",
                self.max_chunk_size
            ));
        }
        if self.algorithm != ChunkingAlgorithm::FixedSize {
            if self.min_chunk_size > self.max_chunk_size {
                return Err(format!(
                    "minimum chunk size {} is larger than the maximum {}",
                    self.min_chunk_size, self.max_chunk_size
                ));
            }
            if self.filter_bits == 0 || self.filter_bits > 30 {
                return Err(format!(
                    "filter bits {} is outside 1..=30",
                    self.filter_bits
                ));
            }
            if self.window_size == 0 || self.window_size > 4096 {
                return Err(format!(
                    "rolling hash window {} is outside 1..=4096",
                    self.window_size
                ));
            }
        }
        Ok(())
    }

    #[cfg(feature = "bita")]
    /// The same parameters as a bitar chunker configuration.
    pub fn to_bitar(&self) -> bitar::chunker::Config {
        let filter = bitar::chunker::FilterConfig {
            filter_bits: bitar::chunker::FilterBits::from_bits(self.filter_bits),
            min_chunk_size: self.min_chunk_size as usize,
            max_chunk_size: self.max_chunk_size as usize,
            window_size: self.window_size as usize,
        };
        match self.algorithm {
            ChunkingAlgorithm::RollSum => bitar::chunker::Config::RollSum(filter),
            ChunkingAlgorithm::BuzHash => bitar::chunker::Config::BuzHash(filter),
            ChunkingAlgorithm::FixedSize => {
                bitar::chunker::Config::FixedSize(self.max_chunk_size as usize)
            }
        }
    }

    fn algorithm_code(&self) -> u8 {
        match self.algorithm {
            ChunkingAlgorithm::RollSum => 1,
            ChunkingAlgorithm::BuzHash => 2,
            ChunkingAlgorithm::FixedSize => 3,
        }
    }
}

impl Default for ChunkerParams {
    /// Kernex's default: RollSum, 32 KiB average, 8 KiB to 4 MiB, 64-byte
    /// window. Smaller than bita's 64 KiB default because a device pays for
    /// whole chunks: halving the chunk size roughly halves the cost of a
    /// small change, and the compact index keeps the extra entries cheap.
    fn default() -> Self {
        ChunkerParams::rollsum(32 * 1024, 8 * 1024, 4 * 1024 * 1024, 64)
    }
}

/// A chunk hash: BLAKE2b-512 of the uncompressed chunk, truncated.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash {
    len: u8,
    bytes: [u8; 64],
}

impl ChunkHash {
    /// Hashes `data` (BLAKE2b-512, as bita) and truncates to `len` bytes
    /// (12..=64). `blake2b_simd` picks AVX2 at run time: every chunk an
    /// install writes is hashed, and this was a third of a full local
    /// install's CPU time with the portable implementation.
    pub fn of(data: &[u8], len: u8) -> Self {
        let full = blake2b_simd::Params::new().hash_length(64).hash(data);
        Self::from_slice(&full.as_bytes()[..usize::from(len.min(64))])
    }

    /// From raw bytes (at most 64; longer input is truncated).
    pub fn from_slice(bytes: &[u8]) -> Self {
        let len = bytes.len().min(64);
        let mut out = [0u8; 64];
        out[..len].copy_from_slice(&bytes[..len]);
        ChunkHash {
            len: len as u8,
            bytes: out,
        }
    }

    /// The hash bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn ends_page(&self) -> bool {
        u16::from_le_bytes([self.bytes[0], self.bytes[1]]) & PAGE_BOUNDARY_MASK == 0
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

/// One chunk stored in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredChunk {
    /// Hash of the uncompressed chunk.
    pub hash: ChunkHash,
    /// Uncompressed size.
    pub source_size: u32,
    /// Offset of its data, relative to the archive's chunk data start.
    pub archive_offset: u64,
    /// Size of its data in the archive (equal to `source_size`: stored raw).
    pub archive_size: u32,
}

impl StoredChunk {
    /// Whether the archive holds this chunk uncompressed.
    pub fn is_raw(&self) -> bool {
        self.archive_size == self.source_size
    }
}

/// A run of one stored chunk repeated in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    chunk: u32,
    count: u32,
}

/// One page of the index, as listed in the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef {
    /// Offset of the page in the index file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// First 16 bytes of the page's SHA-256.
    pub digest: [u8; 16],
}

/// The index head: fixed header and page table. A device fetches this
/// first, then only the pages it does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexHead {
    /// Chunk hash length.
    pub hash_len: u8,
    /// Chunker parameters.
    pub params: ChunkerParams,
    /// Image size.
    pub image_size: u64,
    /// Source-order chunk count.
    pub chunk_count: u64,
    /// Where chunk data starts in the bita archive.
    pub archive_data_offset: u64,
    /// The pages.
    pub pages: Vec<PageRef>,
}

fn header_err(field: &'static str, reason: impl Into<String>) -> IndexError {
    IndexError::Header {
        field,
        reason: reason.into(),
    }
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

/// First 16 bytes of a page's SHA-256, as the page table lists it.
pub fn page_digest(page: &[u8]) -> [u8; 16] {
    let full = Sha256::digest(page);
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

impl IndexHead {
    /// Parses the head from the first bytes of an index (at least
    /// [`IndexHead::size_from_prefix`] of them).
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        if bytes.len() < INDEX_HEADER_SIZE {
            return Err(IndexError::Truncated {
                needed: INDEX_HEADER_SIZE as u64,
                found: bytes.len() as u64,
            });
        }
        if &bytes[..8] != INDEX_MAGIC {
            return Err(IndexError::BadMagic);
        }
        let hash_len = bytes[8];
        if !(MIN_CHUNK_HASH_LEN..=MAX_CHUNK_HASH_LEN).contains(&hash_len) {
            return Err(header_err(
                "hash length",
                format!("{hash_len} is outside {MIN_CHUNK_HASH_LEN}..={MAX_CHUNK_HASH_LEN}"),
            ));
        }
        let algorithm = match bytes[9] {
            1 => ChunkingAlgorithm::RollSum,
            2 => ChunkingAlgorithm::BuzHash,
            3 => ChunkingAlgorithm::FixedSize,
            other => {
                return Err(header_err(
                    "chunking algorithm",
                    format!("unknown code {other}"),
                ));
            }
        };
        if bytes[10] != 0 || bytes[11] != 0 {
            return Err(header_err("reserved", "must be zero"));
        }
        let params = ChunkerParams {
            algorithm,
            filter_bits: le_u32(bytes, 12),
            min_chunk_size: le_u32(bytes, 16),
            max_chunk_size: le_u32(bytes, 20),
            window_size: le_u32(bytes, 24),
        };
        params
            .validate()
            .map_err(|reason| header_err("chunker parameters", reason))?;
        let page_count = le_u32(bytes, 28);
        if page_count > MAX_INDEX_PAGES {
            return Err(header_err(
                "page count",
                format!("{page_count} is more than the limit of {MAX_INDEX_PAGES}"),
            ));
        }
        let image_size = le_u64(bytes, 32);
        if image_size > MAX_IMAGE_SIZE {
            return Err(header_err(
                "image size",
                format!("{image_size} is more than the limit of {MAX_IMAGE_SIZE}"),
            ));
        }
        let chunk_count = le_u64(bytes, 40);
        if chunk_count > MAX_CHUNK_COUNT || chunk_count > image_size {
            return Err(header_err(
                "chunk count",
                format!("{chunk_count} chunks cannot make an image of {image_size} bytes"),
            ));
        }
        let archive_data_offset = le_u64(bytes, 48);
        if archive_data_offset > MAX_ARCHIVE_HEADER_SIZE {
            return Err(header_err(
                "archive data offset",
                format!(
                    "{archive_data_offset} is more than the limit of {MAX_ARCHIVE_HEADER_SIZE}"
                ),
            ));
        }
        let pages_size = le_u64(bytes, 56);
        let head_size =
            INDEX_HEADER_SIZE as u64 + u64::from(page_count) * PAGE_TABLE_ENTRY_SIZE as u64;
        // `pages_size` is any u64 here: add without overflowing.
        if pages_size > MAX_INDEX_SIZE - head_size {
            return Err(header_err(
                "pages size",
                format!(
                    "{pages_size} bytes of pages after a {head_size}-byte head is more than the index limit of {MAX_INDEX_SIZE}"
                ),
            ));
        }
        if (bytes.len() as u64) < head_size {
            return Err(IndexError::Truncated {
                needed: head_size,
                found: bytes.len() as u64,
            });
        }
        let mut pages = Vec::with_capacity(page_count as usize);
        let mut offset = head_size;
        for i in 0..page_count as usize {
            let at = INDEX_HEADER_SIZE + i * PAGE_TABLE_ENTRY_SIZE;
            let len = le_u32(bytes, at);
            if len == 0 || len > MAX_INDEX_PAGE_SIZE {
                return Err(header_err(
                    "page table",
                    format!("page {i} has length {len}, outside 1..={MAX_INDEX_PAGE_SIZE}"),
                ));
            }
            let mut digest = [0u8; 16];
            digest.copy_from_slice(&bytes[at + 4..at + 20]);
            pages.push(PageRef {
                offset,
                len,
                digest,
            });
            offset += u64::from(len);
        }
        if offset - head_size != pages_size {
            return Err(header_err(
                "pages size",
                format!(
                    "header says {pages_size} bytes of pages, page table adds up to {}",
                    offset - head_size
                ),
            ));
        }
        Ok(IndexHead {
            hash_len,
            params,
            image_size,
            chunk_count,
            archive_data_offset,
            pages,
        })
    }

    /// Size of the head in bytes.
    pub fn head_size(&self) -> u64 {
        INDEX_HEADER_SIZE as u64 + self.pages.len() as u64 * PAGE_TABLE_ENTRY_SIZE as u64
    }

    /// Size of the whole index file.
    pub fn file_size(&self) -> u64 {
        self.head_size() + self.pages.iter().map(|p| u64::from(p.len)).sum::<u64>()
    }

    /// Head size given only the fixed header (the first 64 bytes), so a
    /// reader knows how much more to fetch.
    pub fn size_from_prefix(header: &[u8]) -> Result<u64, IndexError> {
        if header.len() < INDEX_HEADER_SIZE {
            return Err(IndexError::Truncated {
                needed: INDEX_HEADER_SIZE as u64,
                found: header.len() as u64,
            });
        }
        if &header[..8] != INDEX_MAGIC {
            return Err(IndexError::BadMagic);
        }
        let page_count = le_u32(header, 28);
        if page_count > MAX_INDEX_PAGES {
            return Err(header_err(
                "page count",
                format!("{page_count} is too many"),
            ));
        }
        Ok(INDEX_HEADER_SIZE as u64 + u64::from(page_count) * PAGE_TABLE_ENTRY_SIZE as u64)
    }

    fn encode(&self, page_count_bytes: &mut Vec<u8>) {
        let out = page_count_bytes;
        out.extend_from_slice(INDEX_MAGIC);
        out.push(self.hash_len);
        out.push(self.params.algorithm_code());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.params.filter_bits.to_le_bytes());
        out.extend_from_slice(&self.params.min_chunk_size.to_le_bytes());
        out.extend_from_slice(&self.params.max_chunk_size.to_le_bytes());
        out.extend_from_slice(&self.params.window_size.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_count.to_le_bytes());
        out.extend_from_slice(&self.archive_data_offset.to_le_bytes());
        let pages_size: u64 = self.pages.iter().map(|p| u64::from(p.len)).sum();
        out.extend_from_slice(&pages_size.to_le_bytes());
        for page in &self.pages {
            out.extend_from_slice(&page.len.to_le_bytes());
            out.extend_from_slice(&page.digest);
        }
    }
}

/// A decoded chunk index: every stored chunk and the order that rebuilds
/// the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    head: IndexHead,
    chunks: Vec<StoredChunk>,
    runs: Vec<Run>,
}

/// Builds an index chunk by chunk, in image order.
#[derive(Debug)]
pub struct IndexBuilder {
    params: ChunkerParams,
    hash_len: u8,
    chunks: Vec<StoredChunk>,
    by_hash: HashMap<ChunkHash, u32>,
    runs: Vec<Run>,
    image_size: u64,
    chunk_count: u64,
    archive_size: u64,
}

/// What [`IndexBuilder::push`] decided for a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// First occurrence: its data must be appended to the archive.
    Stored,
    /// Already stored earlier: nothing to write.
    Repeat,
}

impl IndexBuilder {
    /// A new, empty index for chunks cut with `params`, hashed to
    /// `hash_len` bytes.
    pub fn new(params: ChunkerParams, hash_len: u8) -> Self {
        IndexBuilder {
            params,
            hash_len,
            chunks: Vec::new(),
            by_hash: HashMap::new(),
            runs: Vec::new(),
            image_size: 0,
            chunk_count: 0,
            archive_size: 0,
        }
    }

    /// Whether a chunk with this hash is already stored.
    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Adds the next chunk of the image. `archive_size` is the size of its
    /// data in the archive if it is stored now (ignored for a repeat).
    pub fn push(&mut self, hash: ChunkHash, source_size: u32, archive_size: u32) -> Pushed {
        self.image_size += u64::from(source_size);
        self.chunk_count += 1;
        let (id, pushed) = match self.by_hash.get(&hash) {
            Some(&id) => (id, Pushed::Repeat),
            None => {
                let id = self.chunks.len() as u32;
                self.chunks.push(StoredChunk {
                    hash,
                    source_size,
                    archive_offset: self.archive_size,
                    archive_size,
                });
                self.archive_size += u64::from(archive_size);
                self.by_hash.insert(hash, id);
                (id, Pushed::Stored)
            }
        };
        match self.runs.last_mut() {
            Some(run) if run.chunk == id => run.count += 1,
            _ => self.runs.push(Run {
                chunk: id,
                count: 1,
            }),
        }
        pushed
    }

    /// Total size of stored chunk data so far.
    pub fn archive_data_size(&self) -> u64 {
        self.archive_size
    }

    /// Finishes the index; `archive_data_offset` is where chunk data starts
    /// in the bita archive (its header size).
    pub fn finish(self, archive_data_offset: u64) -> ChunkIndex {
        let head = IndexHead {
            hash_len: self.hash_len,
            params: self.params,
            image_size: self.image_size,
            chunk_count: self.chunk_count,
            archive_data_offset,
            pages: Vec::new(),
        };
        let mut index = ChunkIndex {
            head,
            chunks: self.chunks,
            runs: self.runs,
        };
        let (_, pages) = index.encode_pages();
        index.head.pages = pages;
        index
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(bytes: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            // Reject overlong encodings so every value has one form.
            if b == 0 && shift > 0 {
                return None;
            }
            return Some(v);
        }
    }
    None
}

impl ChunkIndex {
    /// Encodes pages and returns (page bytes, page table).
    fn encode_pages(&self) -> (Vec<u8>, Vec<PageRef>) {
        let mut body = Vec::new();
        let mut pages = Vec::new();
        let mut page_start = 0usize;
        let mut entries_in_page = 0usize;
        let mut seen = vec![false; self.chunks.len()];
        let head_size = INDEX_HEADER_SIZE as u64;
        let close = |body: &Vec<u8>, page_start: &mut usize, pages: &mut Vec<PageRef>| {
            if body.len() > *page_start {
                let page = &body[*page_start..];
                pages.push(PageRef {
                    offset: *page_start as u64, // made absolute below
                    len: page.len() as u32,
                    digest: page_digest(page),
                });
                *page_start = body.len();
            }
        };
        let mut prev_ends_page = false;
        for run in &self.runs {
            let chunk = &self.chunks[run.chunk as usize];
            if entries_in_page > 0 && (prev_ends_page || entries_in_page >= MAX_PAGE_ENTRIES) {
                close(&body, &mut page_start, &mut pages);
                entries_in_page = 0;
            }
            let first = !seen[run.chunk as usize];
            seen[run.chunk as usize] = true;
            if first {
                body.push(TAG_STORED);
                body.extend_from_slice(chunk.hash.as_bytes());
                push_varint(&mut body, u64::from(chunk.source_size));
                push_varint(&mut body, u64::from(chunk.archive_size));
            } else {
                body.push(TAG_REPEAT);
                body.extend_from_slice(chunk.hash.as_bytes());
            }
            if run.count > 1 {
                body.push(TAG_RUN);
                push_varint(&mut body, u64::from(run.count - 1));
            }
            entries_in_page += 1;
            prev_ends_page = chunk.hash.ends_page();
        }
        close(&body, &mut page_start, &mut pages);
        let table_size = pages.len() as u64 * PAGE_TABLE_ENTRY_SIZE as u64;
        for page in &mut pages {
            page.offset += head_size + table_size;
        }
        (body, pages)
    }

    /// Encodes the index file.
    pub fn encode(&self) -> Vec<u8> {
        let (body, pages) = self.encode_pages();
        let head = IndexHead {
            pages,
            ..self.head.clone()
        };
        let mut out = Vec::with_capacity(head.head_size() as usize + body.len());
        head.encode(&mut out);
        out.extend_from_slice(&body);
        out
    }

    /// Decodes and fully checks an index file.
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexError> {
        if bytes.len() as u64 > MAX_INDEX_SIZE {
            return Err(header_err(
                "size",
                format!(
                    "{} bytes is more than the limit of {MAX_INDEX_SIZE}",
                    bytes.len()
                ),
            ));
        }
        let head = IndexHead::decode(bytes)?;
        let file_size = head.file_size();
        if (bytes.len() as u64) < file_size {
            return Err(IndexError::Truncated {
                needed: file_size,
                found: bytes.len() as u64,
            });
        }
        if (bytes.len() as u64) > file_size {
            return Err(IndexError::Totals(format!(
                "{} bytes of trailing data after the last page",
                bytes.len() as u64 - file_size
            )));
        }
        let hash_len = usize::from(head.hash_len);
        let max_chunk = head.params.max_chunk_size.min(MAX_CHUNK_SIZE);
        let mut chunks: Vec<StoredChunk> = Vec::new();
        let mut by_hash: HashMap<ChunkHash, u32> = HashMap::new();
        let mut runs: Vec<Run> = Vec::new();
        let mut chunk_count: u64 = 0;
        let mut image_size: u64 = 0;
        let mut archive_size: u64 = 0;
        for (page_no, page) in head.pages.iter().enumerate() {
            let start = page.offset as usize;
            let data = &bytes[start..start + page.len as usize];
            if page_digest(data) != page.digest {
                return Err(IndexError::PageDigest { page: page_no });
            }
            let mut pos = 0usize;
            let mut entry = 0usize;
            let mut after_entry = false;
            while pos < data.len() {
                let err = |reason: &str| IndexError::Entry {
                    page: page_no,
                    entry,
                    reason: reason.to_string(),
                };
                let tag = data[pos];
                pos += 1;
                match tag {
                    TAG_STORED | TAG_REPEAT => {
                        let hash_bytes = data
                            .get(pos..pos + hash_len)
                            .ok_or_else(|| err("truncated hash"))?;
                        let hash = ChunkHash::from_slice(hash_bytes);
                        pos += hash_len;
                        let id = if tag == TAG_STORED {
                            let source_size = read_varint(data, &mut pos)
                                .ok_or_else(|| err("bad source size"))?;
                            let stored_size = read_varint(data, &mut pos)
                                .ok_or_else(|| err("bad archive size"))?;
                            if source_size == 0 || source_size > u64::from(max_chunk) {
                                return Err(err(&format!(
                                    "source size {source_size} is outside 1..={max_chunk}"
                                )));
                            }
                            if stored_size == 0 || stored_size > source_size {
                                return Err(err(&format!(
                                    "archive size {stored_size} is outside 1..={source_size}"
                                )));
                            }
                            if by_hash.contains_key(&hash) {
                                return Err(err(&format!("chunk {hash} is stored twice")));
                            }
                            let id = chunks.len() as u32;
                            chunks.push(StoredChunk {
                                hash,
                                source_size: source_size as u32,
                                archive_offset: archive_size,
                                archive_size: stored_size as u32,
                            });
                            archive_size += stored_size;
                            by_hash.insert(hash, id);
                            id
                        } else {
                            *by_hash
                                .get(&hash)
                                .ok_or_else(|| err(&format!("repeat of unknown chunk {hash}")))?
                        };
                        runs.push(Run {
                            chunk: id,
                            count: 1,
                        });
                        chunk_count += 1;
                        image_size += u64::from(chunks[id as usize].source_size);
                        after_entry = true;
                        entry += 1;
                    }
                    TAG_RUN => {
                        if !after_entry {
                            return Err(err("run without a preceding chunk"));
                        }
                        let more =
                            read_varint(data, &mut pos).ok_or_else(|| err("bad run length"))?;
                        if more == 0 || more > head.chunk_count {
                            return Err(err(&format!("run length {more} is out of range")));
                        }
                        let Some(run) = runs.last_mut() else {
                            return Err(err("run without a preceding chunk"));
                        };
                        run.count = run
                            .count
                            .checked_add(more as u32)
                            .filter(|_| more <= u64::from(u32::MAX))
                            .ok_or_else(|| err("run too long"))?;
                        let size = u64::from(chunks[run.chunk as usize].source_size);
                        chunk_count += more;
                        image_size = image_size.saturating_add(size.saturating_mul(more));
                        after_entry = false;
                    }
                    other => return Err(err(&format!("unknown entry tag {other:#04x}"))),
                }
                if chunk_count > head.chunk_count || image_size > head.image_size {
                    return Err(IndexError::Totals(format!(
                        "entries describe more than the header's {} chunks / {} bytes",
                        head.chunk_count, head.image_size
                    )));
                }
            }
        }
        if chunk_count != head.chunk_count || image_size != head.image_size {
            return Err(IndexError::Totals(format!(
                "entries describe {chunk_count} chunks / {image_size} bytes, header says {} / {}",
                head.chunk_count, head.image_size
            )));
        }
        // Merge runs of the same chunk that the page encoding split.
        let mut merged: Vec<Run> = Vec::with_capacity(runs.len());
        for run in runs {
            match merged.last_mut() {
                Some(last) if last.chunk == run.chunk => {
                    last.count = last
                        .count
                        .checked_add(run.count)
                        .ok_or_else(|| IndexError::Totals("run too long".into()))?
                }
                _ => merged.push(run),
            }
        }
        let index = ChunkIndex {
            head,
            chunks,
            runs: merged,
        };
        if index.encode() != bytes {
            return Err(IndexError::NotCanonical);
        }
        Ok(index)
    }

    /// The same index for an archive whose chunk data starts at
    /// `archive_data_offset` (pages do not depend on it).
    pub fn with_archive_data_offset(mut self, archive_data_offset: u64) -> Self {
        self.head.archive_data_offset = archive_data_offset;
        self
    }

    /// The head (header and page table).
    pub fn head(&self) -> &IndexHead {
        &self.head
    }

    /// Chunker parameters.
    pub fn params(&self) -> &ChunkerParams {
        &self.head.params
    }

    /// Chunk hash length.
    pub fn hash_len(&self) -> u8 {
        self.head.hash_len
    }

    /// Image size in bytes.
    pub fn image_size(&self) -> u64 {
        self.head.image_size
    }

    /// Where chunk data starts in the bita archive.
    pub fn archive_data_offset(&self) -> u64 {
        self.head.archive_data_offset
    }

    /// Stored chunks, in archive order.
    pub fn stored_chunks(&self) -> &[StoredChunk] {
        &self.chunks
    }

    /// Number of chunks in image order (repeats included).
    pub fn chunk_count(&self) -> u64 {
        self.head.chunk_count
    }

    /// Total size of the archive's chunk data.
    pub fn archive_data_size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.archive_size)).sum()
    }

    /// Every chunk of the image in order, with its offset in the image:
    /// `(image offset, stored chunk index, chunk)`.
    pub fn image_chunks(&self) -> impl Iterator<Item = (u64, usize, &StoredChunk)> + '_ {
        self.runs
            .iter()
            .flat_map(move |run| (0..run.count).map(move |_| run.chunk as usize))
            .scan(0u64, move |offset, id| {
                let chunk = &self.chunks[id];
                let at = *offset;
                *offset += u64::from(chunk.source_size);
                Some((at, id, chunk))
            })
    }

    /// How many times each stored chunk occurs in the image.
    pub fn occurrences(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.chunks.len()];
        for run in &self.runs {
            counts[run.chunk as usize] += u64::from(run.count);
        }
        counts
    }

    /// Set of every chunk hash in this index.
    pub fn hashes(&self) -> HashSet<ChunkHash> {
        self.chunks.iter().map(|c| c.hash).collect()
    }

    /// Stored chunks whose hash is not in `have`: what a device holding
    /// `have` must fetch.
    pub fn missing<'a>(
        &'a self,
        have: &'a HashSet<ChunkHash>,
    ) -> impl Iterator<Item = &'a StoredChunk> + 'a {
        self.chunks.iter().filter(move |c| !have.contains(&c.hash))
    }
}

/// What a device must download to go from one release's image to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct Delta {
    /// Bytes of the new index head (always fetched).
    pub index_head_bytes: u64,
    /// Index pages the device does not hold.
    pub index_pages_fetched: u64,
    /// Bytes of those pages.
    pub index_page_bytes: u64,
    /// Chunks the device does not hold.
    pub chunks_fetched: u64,
    /// Archive bytes of those chunks.
    pub chunk_bytes: u64,
    /// Chunks the device can copy from what it holds.
    pub chunks_reused: u64,
    /// Bytes of the patch table (0: no patch from the device's image).
    pub patch_table_bytes: u64,
    /// Chunks fetched as patch frames instead of from the archive (they
    /// are not counted in `chunks_fetched`).
    pub chunks_patched: u64,
    /// Bytes of those frames.
    pub patch_bytes: u64,
}

impl Delta {
    /// Everything fetched for the image (index, patch and chunks).
    pub fn total_bytes(&self) -> u64 {
        self.index_head_bytes
            + self.index_page_bytes
            + self.patch_table_bytes
            + self.patch_bytes
            + self.chunk_bytes
    }

    /// Accounts for a patch from the device's image: the table, and each
    /// chunk the device lacks that has a frame, fetched as that frame.
    pub fn apply_patch(
        &mut self,
        table: &crate::patch::PatchTable,
        table_size: u64,
        old: &ChunkIndex,
        new: &ChunkIndex,
    ) {
        let comparable =
            old.head.params == new.head.params && old.head.hash_len == new.head.hash_len;
        let have = if comparable {
            old.hashes()
        } else {
            HashSet::new()
        };
        self.patch_table_bytes = table_size;
        for (id, chunk) in new.chunks.iter().enumerate() {
            if have.contains(&chunk.hash) {
                continue;
            }
            if let Some(e) = u32::try_from(id).ok().and_then(|id| table.entry(id)) {
                self.chunks_fetched -= 1;
                self.chunk_bytes -= u64::from(chunk.archive_size);
                self.chunks_patched += 1;
                self.patch_bytes += u64::from(e.data_len);
            }
        }
    }

    /// The delta from `old` (what the device's active slot and stored index
    /// hold; `None` for a device with nothing) to `new`.
    pub fn between(old: Option<&ChunkIndex>, new: &ChunkIndex) -> Delta {
        let have = old.map(|o| o.hashes()).unwrap_or_default();
        let old_pages: HashSet<[u8; 16]> = old
            .map(|o| o.head.pages.iter().map(|p| p.digest).collect())
            .unwrap_or_default();
        let mut delta = Delta {
            index_head_bytes: new.head.head_size(),
            ..Delta::default()
        };
        for page in &new.head.pages {
            if !old_pages.contains(&page.digest) {
                delta.index_pages_fetched += 1;
                delta.index_page_bytes += u64::from(page.len);
            }
        }
        // Chunk parameters must agree for any chunk to be shared.
        let comparable = old.is_some_and(|o| {
            o.head.params == new.head.params && o.head.hash_len == new.head.hash_len
        });
        for chunk in &new.chunks {
            if comparable && have.contains(&chunk.hash) {
                delta.chunks_reused += 1;
            } else {
                delta.chunks_fetched += 1;
                delta.chunk_bytes += u64::from(chunk.archive_size);
            }
        }
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(chunks: &[(&[u8], u32)]) -> ChunkIndex {
        let mut b = IndexBuilder::new(ChunkerParams::default(), DEFAULT_HASH_LEN);
        for (data, archive) in chunks {
            let h = ChunkHash::of(data, DEFAULT_HASH_LEN);
            b.push(h, data.len() as u32, *archive);
        }
        b.finish(1234)
    }

    #[test]
    fn round_trip_with_repeats_and_runs() {
        let a = vec![1u8; 100];
        let z = vec![0u8; 200];
        let c = vec![3u8; 50];
        let idx = build(&[
            (&a, 10),
            (&z, 5),
            (&z, 5),
            (&z, 5),
            (&c, 50),
            (&a, 10),
            (&z, 5),
        ]);
        let bytes = idx.encode();
        let back = ChunkIndex::decode(&bytes).expect("decodes");
        assert_eq!(back, idx);
        assert_eq!(back.chunk_count(), 7);
        assert_eq!(back.image_size(), 100 + 600 + 50 + 100 + 200);
        assert_eq!(back.stored_chunks().len(), 3);
        let offsets: Vec<u64> = back.image_chunks().map(|(o, _, _)| o).collect();
        assert_eq!(offsets, vec![0, 100, 300, 500, 700, 750, 850]);
        assert!(back.stored_chunks()[2].is_raw());
    }

    #[test]
    fn every_truncation_and_bit_flip_is_rejected_without_panic() {
        let chunks: Vec<Vec<u8>> = (0..300u32).map(|i| i.to_le_bytes().repeat(10)).collect();
        let refs: Vec<(&[u8], u32)> = chunks.iter().map(|c| (c.as_slice(), 20)).collect();
        let bytes = build(&refs).encode();
        for cut in 0..bytes.len() {
            assert!(ChunkIndex::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for at in 0..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x10;
            let result = ChunkIndex::decode(&b);
            // Chunker parameters (bytes 12..28) and the archive data offset
            // (48..56) are not checkable from the index alone; the
            // manifest's digest binds them.
            if !(12..28).contains(&at) && !(48..56).contains(&at) {
                assert!(result.is_err(), "flip at {at}");
            }
        }
    }

    #[test]
    fn huge_pages_size_is_rejected_without_overflow() {
        let mut bytes = build(&[(&[7u8; 100], 10)]).encode();
        bytes[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = IndexHead::decode(&bytes).expect_err("must fail");
        assert!(
            matches!(
                err,
                IndexError::Header {
                    field: "pages size",
                    ..
                }
            ),
            "{err}"
        );
        assert!(ChunkIndex::decode(&bytes).is_err());
    }

    #[test]
    fn local_change_touches_few_pages() {
        let chunks: Vec<Vec<u8>> = (0..5000u32).map(|i| i.to_le_bytes().repeat(8)).collect();
        let refs: Vec<(&[u8], u32)> = chunks.iter().map(|c| (c.as_slice(), 20)).collect();
        let old = build(&refs);
        let mut changed = refs.clone();
        let edited = b"a changed chunk".repeat(3);
        changed[2500] = (&edited, 30);
        let new = build(&changed);
        let delta = Delta::between(Some(&old), &new);
        assert_eq!(delta.chunks_fetched, 1);
        assert_eq!(delta.chunk_bytes, 30);
        assert!(delta.index_pages_fetched <= 2, "{delta:?}");
        assert!(new.head().pages.len() > 40);
        let full = Delta::between(None, &new);
        assert_eq!(full.index_pages_fetched as usize, new.head().pages.len());
    }
}
