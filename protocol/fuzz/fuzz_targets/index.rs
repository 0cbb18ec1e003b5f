//! `ChunkIndex::decode`, `IndexHead::decode` and
//! `IndexHead::size_from_prefix` on arbitrary bytes: no panic, and the three
//! agree on whatever they accept.
#![no_main]

use kernex_protocol::index::{ChunkIndex, Delta, IndexHead};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let prefix = IndexHead::size_from_prefix(data);
    let head = IndexHead::decode(data);
    if let Ok(head) = &head {
        assert_eq!(
            *prefix.as_ref().expect("a decoded head has a size"),
            head.head_size()
        );
        assert!(head.head_size() <= head.file_size());
    }
    let Ok(index) = ChunkIndex::decode(data) else {
        return;
    };
    assert_eq!(index.encode(), data, "decode accepts only canonical bytes");
    assert_eq!(
        index.head(),
        head.as_ref().expect("a decoded index has a head")
    );
    let occurrences = index.occurrences();
    assert_eq!(occurrences.len(), index.stored_chunks().len());
    assert_eq!(occurrences.iter().sum::<u64>(), index.chunk_count());
    let _ = index.archive_data_size();
    let fresh = Delta::between(None, &index);
    let same = Delta::between(Some(&index), &index);
    assert_eq!(same.chunks_fetched, 0);
    assert_eq!(fresh.chunks_fetched, index.stored_chunks().len() as u64);
});
