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

use crate::archive::{self, ArchiveError, VerifiedChunk};
use crate::index::{ChunkIndex, StoredChunk};
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

mod build;

pub use build::{
    BATCH_BYTES, BaseImage, BuiltPatch, Encoded, PatchBuilder, build_patch, build_patch_from,
    encode_frame,
};

#[cfg(test)]
mod tests {
    use super::*;

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
}
