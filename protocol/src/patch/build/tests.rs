//! Tests of the patch builder.

use super::*;
use crate::index::StoredChunk;
use crate::patch::{decode_chunk, gather_prefix};

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
        |o, l| -> Result<Vec<u8>, ()> { Ok(base[o as usize..o as usize + l as usize].to_vec()) },
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

#[test]
fn a_frame_larger_than_its_chunk_is_refused() {
    let base = noise(1 << 16, 3);
    let data = noise(4096, 4);
    let frame = encode_frame(&base, &data, 3).unwrap();
    let mut chunk = chunk_of(&data);
    chunk.source_size = 1000;
    assert!(decode_chunk(&chunk, &base, &frame).is_err());
}

/// An index of `image` cut into fixed 16 KiB chunks.
fn index_of(image: &[u8]) -> ChunkIndex {
    let params = crate::index::ChunkerParams::default();
    let mut b = crate::index::IndexBuilder::new(params, 16);
    for c in image.chunks(16 * 1024) {
        let hash = ChunkHash::of(c, 16);
        if !b.contains(&hash) {
            b.push(hash, c.len() as u32, c.len() as u32);
        } else {
            b.push(hash, c.len() as u32, 0);
        }
    }
    b.finish(0)
}

/// A scratch file, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn with(name: &str, bytes: &[u8]) -> (Self, std::fs::File) {
        let path = std::env::temp_dir().join(format!("kernex-patch-{name}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        (Scratch(path), file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A new image: the base with a byte changed every 8 KiB (every 16 KiB
/// chunk is new).
fn edited(base: &[u8]) -> Vec<u8> {
    let mut new = base.to_vec();
    for at in (100..new.len()).step_by(8 * 1024) {
        new[at] ^= 0x77;
    }
    new
}

#[test]
fn a_base_read_from_a_file_gives_the_patch_of_the_base_in_memory() {
    // More new chunks than one batch holds, so batching is exercised.
    let base = noise((BATCH_BYTES + (4 << 20)) as usize, 9);
    let new = edited(&base);
    let (base_index, new_index) = (index_of(&base), index_of(&new));
    let read = |at: u64, len: u32| -> std::io::Result<Vec<u8>> {
        Ok(new[at as usize..at as usize + len as usize].to_vec())
    };
    let in_memory = build_patch(&base, &base_index, &new_index, read, 3, 2).unwrap();
    let (_scratch, file) = Scratch::with("same", &base);
    let calls = std::sync::Mutex::new(Vec::new());
    let from_file = build_patch_from(&file, &base_index, &new_index, read, 3, 2, &|d, t| {
        calls.lock().unwrap().push((d, t))
    })
    .unwrap();
    assert_eq!(in_memory, from_file);
    let (table, data, chunks_new) = from_file;
    assert!(chunks_new > 2000, "{chunks_new}");
    assert!(table.entries.len() as u64 * 10 >= chunks_new * 9);
    assert_eq!(table.data_size(), data.len() as u64);
    // Progress per batch, ending at the total.
    let calls = calls.into_inner().unwrap();
    assert!(calls.len() >= 2, "{calls:?}");
    assert_eq!(calls.last(), Some(&(chunks_new, chunks_new)));
    // Every entry decodes to its chunk with the file's prefix.
    let stored = new_index.stored_chunks();
    for e in table.entries.iter().step_by(97) {
        let prefix = gather_prefix(e, |o, l| -> std::io::Result<Vec<u8>> {
            let mut buf = vec![0u8; l as usize];
            BaseImage::read_exact_at(&file, o, &mut buf)?;
            Ok(buf)
        })
        .unwrap();
        let at = e.data_offset as usize;
        let frame = &data[at..at + e.data_len as usize];
        decode_chunk(&stored[e.chunk as usize], &prefix, frame).unwrap();
    }
}

#[test]
fn a_base_file_that_ends_early_is_an_error() {
    let base = noise(1 << 20, 5);
    let new = edited(&base);
    let (base_index, new_index) = (index_of(&base), index_of(&new));
    // The file holds half the base: anchors past it cannot be read.
    let (scratch, file) = Scratch::with("short", &base[..base.len() / 2]);
    let builder = PatchBuilder::from_base(&file, 3).unwrap();
    assert_eq!(builder.base_len, base.len() as u64 / 2);
    drop(scratch);
    // A base that shrinks between indexing and encoding.
    struct Shrinking<'a>(&'a [u8]);
    impl BaseImage for Shrinking<'_> {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if offset > 0 {
                return Err(std::io::Error::other("medium error"));
            }
            self.0.read_exact_at(offset, buf)
        }
    }
    let err = build_patch_from(
        &Shrinking(&base),
        &base_index,
        &new_index,
        |at, len| Ok(new[at as usize..at as usize + len as usize].to_vec()),
        3,
        1,
        &|_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("base image"), "{err}");
}

#[test]
fn a_zero_filled_base_adds_no_anchors_while_scanning() {
    // 64 MiB of zeros: the same gear hash at every position. Recorded
    // once per run, not once per position (which would be 64 MiB / 128
    // entries of 16 bytes before the frequent-hash filter).
    let zeros = vec![0u8; 64 << 20];
    let mut found = Vec::new();
    let mut last = None;
    AnchorScan::default().feed(&zeros, |h, i| push_anchor(&mut found, &mut last, h, i));
    assert!(found.len() <= 1, "{} anchors", found.len());
}

#[test]
fn the_base_is_read_in_bounded_pieces_never_whole() {
    // A base three scan blocks long, read through a reader that records
    // its largest read: the builder holds no more of the base than that.
    struct Counting<'a> {
        bytes: &'a [u8],
        largest: std::sync::atomic::AtomicUsize,
    }
    impl BaseImage for Counting<'_> {
        fn size(&self) -> u64 {
            self.bytes.len() as u64
        }
        fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            self.largest
                .fetch_max(buf.len(), std::sync::atomic::Ordering::Relaxed);
            self.bytes.read_exact_at(offset, buf)
        }
    }
    let bytes = noise(3 * SCAN_BLOCK, 21);
    let new = edited(&bytes);
    let base = Counting {
        bytes: &bytes,
        largest: Default::default(),
    };
    let (table, _, chunks_new) = build_patch_from(
        &base,
        &index_of(&bytes),
        &index_of(&new),
        |at, len| Ok(new[at as usize..at as usize + len as usize].to_vec()),
        3,
        2,
        &|_, _| {},
    )
    .unwrap();
    assert!(chunks_new > 0 && !table.entries.is_empty());
    let largest = base.largest.into_inner();
    assert!(largest <= SCAN_BLOCK, "a read of {largest} bytes");
    assert!(largest < bytes.len() / 2, "a read of {largest} bytes");
}
