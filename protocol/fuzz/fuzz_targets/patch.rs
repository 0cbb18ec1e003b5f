//! `PatchTable::decode` on arbitrary bytes, and `decode_chunk` on an
//! arbitrary frame against a fixed prefix: no panic; whatever the table
//! parser accepts re-encodes to the same bytes and keeps its ranges inside
//! the base image.
#![no_main]

use kernex_protocol::index::{ChunkHash, StoredChunk};
use kernex_protocol::patch::{PatchTable, decode_chunk};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = PatchTable::decode(data) {
        assert_eq!(table.encode(), data, "decode accepts only canonical bytes");
        let mut at = 0u64;
        for e in &table.entries {
            assert_eq!(e.data_offset, at);
            at += u64::from(e.data_len);
            for r in &e.refs {
                assert!(r.offset + u64::from(r.len) <= table.base_size);
            }
        }
    }
    let prefix = [0x5au8; 4096];
    let chunk = StoredChunk {
        hash: ChunkHash::of(b"kernex", 16),
        source_size: 64 * 1024,
        archive_offset: 0,
        archive_size: data.len() as u32,
    };
    let _ = decode_chunk(&chunk, &prefix, data);
});
