//! `archive::verify_chunk` on arbitrary chunk data, against a chunk
//! description also taken from the input: no panic, no allocation beyond
//! the protocol's limits, and what verifies has the described size and hash.
//!
//! Input: hash length (1 byte, folded into 12..=64), source size (u32
//! little-endian), the chunk hash, then the chunk's archive bytes (raw when
//! as long as the source size, zstd otherwise).
#![no_main]

use kernex_protocol::archive::verify_chunk;
use kernex_protocol::index::{ChunkHash, StoredChunk};
use kernex_protocol::limits::{MAX_CHUNK_HASH_LEN, MIN_CHUNK_HASH_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&hash_len, rest)) = data.split_first() else {
        return;
    };
    let span = MAX_CHUNK_HASH_LEN - MIN_CHUNK_HASH_LEN + 1;
    let hash_len = usize::from(MIN_CHUNK_HASH_LEN + hash_len % span);
    let Some((size, rest)) = rest.split_first_chunk::<4>() else {
        return;
    };
    if rest.len() < hash_len {
        return;
    }
    let (hash, archive_bytes) = rest.split_at(hash_len);
    let Ok(archive_size) = u32::try_from(archive_bytes.len()) else {
        return;
    };
    let chunk = StoredChunk {
        hash: ChunkHash::from_slice(hash),
        source_size: u32::from_le_bytes(*size),
        archive_offset: 0,
        archive_size,
    };
    if let Ok(verified) = verify_chunk(&chunk, archive_bytes) {
        assert_eq!(verified.data().len(), chunk.source_size as usize);
        assert_eq!(ChunkHash::of(verified.data(), hash_len as u8), chunk.hash);
    }
});
