//! bita chunk archives: writing them (through bitar's chunkers and
//! dictionary format) and reading their headers back.
//!
//! An archive written here is a plain bita archive — `bita info` and `bita
//! clone` read it — whose chunk hashes are truncated to the index's hash
//! length and whose chunks are zstd-compressed (stored raw when compression
//! does not help, as bita does). Alongside it comes the compact
//! [`ChunkIndex`] a device downloads instead of the dictionary.

use std::io;

use crate::digest::Sha256Digest;
use crate::index::{ChunkHash, ChunkIndex, ChunkerParams, DEFAULT_HASH_LEN, StoredChunk};
use crate::limits::*;

// Writing archives and reading their dictionaries needs bitar (and through
// it an async runtime's traits); the device only verifies chunks, so all of
// that is behind the `bita` feature.
#[cfg(feature = "bita")]
use {
    crate::index::{ChunkingAlgorithm, IndexBuilder, Pushed},
    bitar::chunk_dictionary::{
        ChunkCompression, ChunkDescriptor, ChunkDictionary, ChunkerParameters, chunk_compression,
        chunker_parameters,
    },
    blake2::{Blake2b512, Digest},
    bytes::Bytes,
    futures_util::StreamExt,
    prost::Message,
    sha2::Sha256,
    std::collections::{BTreeMap, HashSet},
    std::io::{Read, Write},
    std::pin::Pin,
    std::sync::atomic::{AtomicBool, Ordering},
    std::sync::{Mutex, mpsc},
    std::task::{Context, Poll},
};

/// bita archive magic.
pub const BITA_MAGIC: &[u8; 6] = b"BITA1\0";

/// Why an archive could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the image or writing chunk data failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: io::Error,
    },
    /// Options out of range.
    #[error("invalid archive options: {0}")]
    Options(String),
    /// zstd failed.
    #[error("zstd {0}")]
    Zstd(String),
    /// The image is empty or too large.
    #[error("image of {0} bytes is outside 1..={MAX_IMAGE_SIZE}")]
    ImageSize(u64),
    /// Not a bita archive.
    #[error("not a bita archive (bad magic)")]
    BadMagic,
    /// Header larger than the limit.
    #[error("bita archive header of {found} bytes is more than the limit of {limit}")]
    HeaderTooLarge {
        /// The limit.
        limit: u64,
        /// The size found.
        found: u64,
    },
    /// The header's own checksum does not match.
    #[error("bita archive header checksum does not match (corrupt header)")]
    HeaderChecksum,
    /// The dictionary does not decode.
    #[error("bita archive dictionary does not decode: {0}")]
    Dictionary(String),
    /// The dictionary disagrees with the chunk index.
    #[error("bita archive dictionary disagrees with the chunk index: {0}")]
    Mismatch(String),
    /// A chunk's data does not match its hash.
    #[error("chunk {hash} at archive offset {offset} is corrupt: {reason}")]
    Chunk {
        /// Expected hash.
        hash: ChunkHash,
        /// Offset in the archive's chunk data.
        offset: u64,
        /// What failed.
        reason: String,
    },
}

#[cfg(feature = "bita")]
fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ArchiveError {
    move |source| ArchiveError::Io { context, source }
}

/// How to cut and compress an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveOptions {
    /// Chunker parameters.
    pub chunker: ChunkerParams,
    /// Truncated chunk hash length (12..=64).
    pub hash_len: u8,
    /// zstd level (1..=22).
    pub zstd_level: i32,
    /// Worker threads for hashing and compression (0: one per CPU).
    pub threads: usize,
}

impl Default for ArchiveOptions {
    fn default() -> Self {
        ArchiveOptions {
            chunker: ChunkerParams::default(),
            hash_len: DEFAULT_HASH_LEN,
            zstd_level: 9,
            threads: 0,
        }
    }
}

#[cfg(feature = "bita")]
impl ArchiveOptions {
    fn validate(&self) -> Result<(), ArchiveError> {
        self.chunker.validate().map_err(ArchiveError::Options)?;
        if !(MIN_CHUNK_HASH_LEN..=MAX_CHUNK_HASH_LEN).contains(&self.hash_len) {
            return Err(ArchiveError::Options(format!(
                "hash length {} is outside {MIN_CHUNK_HASH_LEN}..={MAX_CHUNK_HASH_LEN}",
                self.hash_len
            )));
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(ArchiveError::Options(format!(
                "zstd level {} is outside 1..=22",
                self.zstd_level
            )));
        }
        Ok(())
    }
}

/// An archive written by [`build_archive`]: its header and index, and the
/// image's digest. The chunk data went to the writer passed in; the archive
/// file is `header` followed by that data.
#[derive(Debug, Clone)]
pub struct BuiltArchive {
    /// The bita header (magic, dictionary, data offset, checksum).
    pub header: Vec<u8>,
    /// The compact index.
    pub index: ChunkIndex,
    /// The encoded index file.
    pub index_bytes: Vec<u8>,
    /// Image size.
    pub image_size: u64,
    /// SHA-256 of the image.
    pub image_sha256: Sha256Digest,
    /// Bytes of chunk data written.
    pub data_size: u64,
}

#[cfg(feature = "bita")]
/// A `std::io::Read` seen as a tokio `AsyncRead`, for bitar's streaming
/// chunker. Reads block; it is only polled from a dedicated thread.
struct BlockingAsyncRead<R>(R);

#[cfg(feature = "bita")]
impl<R: Read + Unpin> tokio::io::AsyncRead for BlockingAsyncRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = loop {
            match self.0.read(buf.initialize_unfilled()) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(feature = "bita")]
struct Hashed {
    seq: u64,
    hash: ChunkHash,
    data: Bytes,
    compressed: Option<Vec<u8>>,
}

#[cfg(feature = "bita")]
/// Cuts `input` into chunks, hashes and compresses them in parallel, writes
/// each stored chunk's data to `data_out` in archive order, and returns the
/// bita header and compact index. `progress` is called with the number of
/// image bytes consumed so far.
pub fn build_archive<R: Read + Send + Unpin>(
    input: R,
    data_out: &mut dyn Write,
    options: &ArchiveOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<BuiltArchive, ArchiveError> {
    options.validate()?;
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let hash_len = options.hash_len;
    let level = options.zstd_level;
    let (work_tx, work_rx) = mpsc::sync_channel::<(u64, Bytes)>(threads * 4);
    let (image_tx, image_rx) = mpsc::sync_channel::<Bytes>(threads * 4);
    let (done_tx, done_rx) = mpsc::sync_channel::<Result<Hashed, ArchiveError>>(threads * 4);
    let stop = AtomicBool::new(false);
    let work_rx = Mutex::new(work_rx);
    let claimed: Mutex<HashSet<ChunkHash>> = Mutex::new(HashSet::new());
    let chunker_config = options.chunker.to_bitar();

    std::thread::scope(|scope| -> Result<BuiltArchive, ArchiveError> {
        // Producer: cut the image into chunks.
        let stop = &stop;
        let producer = scope.spawn(move || -> Result<(), ArchiveError> {
            let mut chunks = chunker_config.new_chunker(BlockingAsyncRead(input));
            let mut seq = 0u64;
            futures_executor::block_on(async {
                while let Some(next) = chunks.next().await {
                    let (_, chunk) = next.map_err(io_err("reading the image"))?;
                    let data = chunk.into_inner();
                    if stop.load(Ordering::Relaxed)
                        || image_tx.send(data.clone()).is_err()
                        || work_tx.send((seq, data)).is_err()
                    {
                        break; // the consumer stopped on an error
                    }
                    seq += 1;
                }
                Ok(())
            })
        });
        // Whole-image digests: SHA-256 for the manifest, BLAKE2b-512 for
        // bita's source checksum.
        let digester = scope.spawn(move || {
            let mut sha = Sha256::new();
            let mut b2 = Blake2b512::new();
            for data in image_rx {
                sha.update(&data);
                b2.update(&data);
            }
            (Sha256Digest::from_hasher(sha), b2.finalize().to_vec())
        });
        // Workers: hash every chunk, compress the ones not seen before.
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            let claimed = &claimed;
            scope.spawn(move || {
                let mut compressor = match zstd::bulk::Compressor::new(level) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = done_tx.send(Err(ArchiveError::Zstd(e.to_string())));
                        return;
                    }
                };
                loop {
                    let next = match work_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, data)) = next else { return };
                    let hash = ChunkHash::of(&data, hash_len);
                    let first = claimed.lock().map(|mut c| c.insert(hash)).unwrap_or(true);
                    let item = if first {
                        compressor
                            .compress(&data)
                            .map_err(|e| ArchiveError::Zstd(e.to_string()))
                            .map(|c| Hashed {
                                seq,
                                hash,
                                data,
                                compressed: Some(c),
                            })
                    } else {
                        Ok(Hashed {
                            seq,
                            hash,
                            data,
                            compressed: None,
                        })
                    };
                    if done_tx.send(item).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);

        // Consumer: put chunks back in order, decide stored or repeat, write.
        let mut builder = IndexBuilder::new(options.chunker, hash_len);
        let mut consumed = 0u64;
        let mut data_size = 0u64;
        let mut consume = || -> Result<(), ArchiveError> {
            let mut pending: BTreeMap<u64, Hashed> = BTreeMap::new();
            let mut next_seq = 0u64;
            for item in done_rx.iter() {
                let item = item?;
                pending.insert(item.seq, item);
                while let Some(item) = pending.remove(&next_seq) {
                    next_seq += 1;
                    let len = item.data.len() as u32;
                    consumed += u64::from(len);
                    if builder.contains(&item.hash) {
                        builder.push(item.hash, len, 0);
                    } else {
                        // A worker skips compressing a chunk when a later
                        // duplicate claimed it first; compress it here.
                        let compressed = match item.compressed {
                            Some(c) => c,
                            None => zstd::bulk::compress(&item.data, level)
                                .map_err(|e| ArchiveError::Zstd(e.to_string()))?,
                        };
                        let stored: &[u8] = if compressed.len() < item.data.len() {
                            &compressed
                        } else {
                            &item.data
                        };
                        data_out
                            .write_all(stored)
                            .map_err(io_err("writing chunk data"))?;
                        data_size += stored.len() as u64;
                        let pushed = builder.push(item.hash, len, stored.len() as u32);
                        debug_assert_eq!(pushed, Pushed::Stored);
                    }
                    progress(consumed);
                }
            }
            if !pending.is_empty() {
                return Err(ArchiveError::Options(
                    "a worker thread stopped before hashing every chunk".into(),
                ));
            }
            Ok(())
        };
        let consumed_all = consume();
        // Whatever happened, let every thread finish: stop the producer,
        // and drain the work queue it may be blocked on.
        drop(done_rx);
        if consumed_all.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        while let Ok(Ok(_)) = work_rx.lock().map(|rx| rx.recv()) {}
        let produced = producer
            .join()
            .map_err(|_| ArchiveError::Options("chunker thread failed".into()))?;
        let (image_sha256, source_b2) = digester
            .join()
            .map_err(|_| ArchiveError::Options("digest thread failed".into()))?;
        produced?;
        consumed_all?;
        let image_size = consumed;
        if image_size == 0 || image_size > MAX_IMAGE_SIZE {
            return Err(ArchiveError::ImageSize(image_size));
        }
        // The dictionary needs the header size only through the index's
        // archive data offset, so finish a provisional index first.
        let provisional = builder.finish(0);
        let dictionary = dictionary_for(&provisional, options, source_b2);
        let header = bitar::header::build(&dictionary, None)
            .map_err(|e| ArchiveError::Dictionary(e.to_string()))?;
        let index = provisional.with_archive_data_offset(header.len() as u64);
        let index_bytes = index.encode();
        Ok(BuiltArchive {
            header,
            index,
            index_bytes,
            image_size,
            image_sha256,
            data_size,
        })
    })
}

#[cfg(feature = "bita")]
fn dictionary_for(
    index: &ChunkIndex,
    options: &ArchiveOptions,
    source_b2: Vec<u8>,
) -> ChunkDictionary {
    let params = index.params();
    let algorithm = match params.algorithm {
        ChunkingAlgorithm::RollSum => chunker_parameters::ChunkingAlgorithm::Rollsum,
        ChunkingAlgorithm::BuzHash => chunker_parameters::ChunkingAlgorithm::Buzhash,
        ChunkingAlgorithm::FixedSize => chunker_parameters::ChunkingAlgorithm::FixedSize,
    };
    let fixed = params.algorithm == ChunkingAlgorithm::FixedSize;
    ChunkDictionary {
        application_version: format!("kernex-protocol {}", env!("CARGO_PKG_VERSION")),
        source_checksum: source_b2,
        source_total_size: index.image_size(),
        chunker_params: Some(ChunkerParameters {
            chunk_filter_bits: if fixed { 0 } else { params.filter_bits },
            min_chunk_size: if fixed { 0 } else { params.min_chunk_size },
            max_chunk_size: params.max_chunk_size,
            rolling_hash_window_size: if fixed { 0 } else { params.window_size },
            chunk_hash_length: u32::from(index.hash_len()),
            chunking_algorithm: algorithm as i32,
        }),
        chunk_compression: Some(ChunkCompression {
            compression: chunk_compression::CompressionType::Zstd as i32,
            compression_level: options.zstd_level as u32,
        }),
        rebuild_order: index.image_chunks().map(|(_, id, _)| id as u32).collect(),
        chunk_descriptors: index
            .stored_chunks()
            .iter()
            .map(|c| ChunkDescriptor {
                checksum: c.hash.as_bytes().to_vec(),
                archive_size: c.archive_size,
                archive_offset: c.archive_offset,
                source_size: c.source_size,
            })
            .collect(),
        metadata: Default::default(),
    }
}

#[cfg(feature = "bita")]
/// A parsed bita archive header.
#[derive(Debug, Clone)]
pub struct ArchiveHeader {
    /// The decoded dictionary.
    pub dictionary: ChunkDictionary,
    /// Header size; chunk data starts here.
    pub size: u64,
}

#[cfg(feature = "bita")]
/// Parses a bita archive header from its bytes (exactly the header).
pub fn parse_archive_header(bytes: &[u8]) -> Result<ArchiveHeader, ArchiveError> {
    let size = archive_header_size(bytes)?;
    if (bytes.len() as u64) < size {
        return Err(ArchiveError::Dictionary(format!(
            "header is truncated: {} of {size} bytes",
            bytes.len()
        )));
    }
    let size_usize = size as usize;
    let body_end = size_usize - 64;
    let checksum = Blake2b512::digest(&bytes[..body_end]);
    if checksum.as_slice() != &bytes[body_end..size_usize] {
        return Err(ArchiveError::HeaderChecksum);
    }
    let dict_end = body_end - 8;
    let dictionary = ChunkDictionary::decode(&bytes[14..dict_end])
        .map_err(|e| ArchiveError::Dictionary(e.to_string()))?;
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&bytes[dict_end..body_end]);
    let data_offset = u64::from_le_bytes(offset);
    if data_offset != size {
        return Err(ArchiveError::Dictionary(format!(
            "chunk data offset {data_offset} does not follow the header ({size} bytes)"
        )));
    }
    Ok(ArchiveHeader { dictionary, size })
}

/// The header size, from the first 14 bytes (magic and dictionary size).
pub fn archive_header_size(prefix: &[u8]) -> Result<u64, ArchiveError> {
    if prefix.len() < 14 {
        return Err(ArchiveError::Dictionary("header is truncated".into()));
    }
    if &prefix[..6] != BITA_MAGIC {
        return Err(ArchiveError::BadMagic);
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&prefix[6..14]);
    let dict_size = u64::from_le_bytes(len);
    let size = dict_size.saturating_add(14 + 8 + 64);
    if size > MAX_ARCHIVE_HEADER_SIZE {
        return Err(ArchiveError::HeaderTooLarge {
            limit: MAX_ARCHIVE_HEADER_SIZE,
            found: size,
        });
    }
    Ok(size)
}

#[cfg(feature = "bita")]
/// Checks that a bita dictionary describes exactly the chunks of `index`.
pub fn check_dictionary(
    dictionary: &ChunkDictionary,
    index: &ChunkIndex,
) -> Result<(), ArchiveError> {
    let mismatch = |what: String| Err(ArchiveError::Mismatch(what));
    if dictionary.source_total_size != index.image_size() {
        return mismatch(format!(
            "image size {} vs {}",
            dictionary.source_total_size,
            index.image_size()
        ));
    }
    let Some(params) = &dictionary.chunker_params else {
        return mismatch("dictionary has no chunker parameters".into());
    };
    if params.chunk_hash_length != u32::from(index.hash_len()) {
        return mismatch(format!(
            "hash length {} vs {}",
            params.chunk_hash_length,
            index.hash_len()
        ));
    }
    if params.max_chunk_size != index.params().max_chunk_size {
        return mismatch("chunker parameters differ".into());
    }
    match dictionary.chunk_compression.as_ref().map(|c| c.compression) {
        Some(c)
            if c == chunk_compression::CompressionType::Zstd as i32
                || c == chunk_compression::CompressionType::None as i32 => {}
        _ => return mismatch("chunk compression is not zstd".into()),
    }
    if dictionary.chunk_descriptors.len() != index.stored_chunks().len() {
        return mismatch(format!(
            "{} stored chunks vs {}",
            dictionary.chunk_descriptors.len(),
            index.stored_chunks().len()
        ));
    }
    for (i, (d, c)) in dictionary
        .chunk_descriptors
        .iter()
        .zip(index.stored_chunks())
        .enumerate()
    {
        if d.checksum != c.hash.as_bytes()
            || d.source_size != c.source_size
            || d.archive_offset != c.archive_offset
            || d.archive_size != c.archive_size
        {
            return mismatch(format!("stored chunk {i} differs"));
        }
    }
    if dictionary.rebuild_order.len() as u64 != index.chunk_count() {
        return mismatch("rebuild order length differs".into());
    }
    for (i, (a, (_, b, _))) in dictionary
        .rebuild_order
        .iter()
        .zip(index.image_chunks())
        .enumerate()
    {
        if *a as usize != b {
            return mismatch(format!("rebuild order differs at chunk {i}"));
        }
    }
    Ok(())
}

/// An uncompressed chunk whose hash has been checked. The only way to get
/// one is [`verify_chunk`], so code that writes slots can insist on it.
#[derive(Debug, Clone)]
pub struct VerifiedChunk {
    hash: ChunkHash,
    data: Vec<u8>,
}

impl VerifiedChunk {
    /// The chunk's hash.
    pub fn hash(&self) -> &ChunkHash {
        &self.hash
    }
    /// The uncompressed data.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// Takes the data.
    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

/// Decompresses one stored chunk's archive bytes and checks its hash.
pub fn verify_chunk(
    chunk: &StoredChunk,
    archive_bytes: &[u8],
) -> Result<VerifiedChunk, ArchiveError> {
    let corrupt = |reason: String| ArchiveError::Chunk {
        hash: chunk.hash,
        offset: chunk.archive_offset,
        reason,
    };
    // Decompression allocates the declared size up front: bound it first.
    if chunk.source_size > MAX_CHUNK_SIZE {
        return Err(corrupt(format!(
            "source size {} is more than the limit of {MAX_CHUNK_SIZE}",
            chunk.source_size
        )));
    }
    if archive_bytes.len() != chunk.archive_size as usize {
        return Err(corrupt(format!(
            "{} bytes, expected {}",
            archive_bytes.len(),
            chunk.archive_size
        )));
    }
    let data = if chunk.is_raw() {
        archive_bytes.to_vec()
    } else {
        zstd::bulk::decompress(archive_bytes, chunk.source_size as usize)
            .map_err(|e| corrupt(format!("does not decompress: {e}")))?
    };
    if data.len() != chunk.source_size as usize {
        return Err(corrupt(format!(
            "decompresses to {} bytes, expected {}",
            data.len(),
            chunk.source_size
        )));
    }
    verify_decoded(chunk, data)
}

/// Checks a chunk's decoded data (from the archive or from a patch) against
/// its size and hash.
pub fn verify_decoded(chunk: &StoredChunk, data: Vec<u8>) -> Result<VerifiedChunk, ArchiveError> {
    if data.len() != chunk.source_size as usize {
        return Err(ArchiveError::Chunk {
            hash: chunk.hash,
            offset: chunk.archive_offset,
            reason: format!(
                "decodes to {} bytes, expected {}",
                data.len(),
                chunk.source_size
            ),
        });
    }
    let hash = ChunkHash::of(&data, chunk.hash.as_bytes().len() as u8);
    if hash != chunk.hash {
        return Err(ArchiveError::Chunk {
            hash: chunk.hash,
            offset: chunk.archive_offset,
            reason: format!("hash is {hash}"),
        });
    }
    Ok(VerifiedChunk {
        hash: chunk.hash,
        data,
    })
}

#[cfg(all(test, feature = "bita"))]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Half compressible text-like, half noise.
                if (i / 4096) % 2 == 0 {
                    b"kernex "[i % 7]
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn archive_round_trips_through_header_and_chunks() {
        let mut image = pseudo_random(3 << 20, 7);
        image.extend(vec![0u8; 1 << 20]);
        let mut data = Vec::new();
        let built = build_archive(&image[..], &mut data, &ArchiveOptions::default(), &|_| {})
            .expect("builds");
        assert_eq!(built.image_size, image.len() as u64);
        assert_eq!(built.image_sha256, Sha256Digest::of(&image));
        assert_eq!(built.data_size, data.len() as u64);
        let header = parse_archive_header(&built.header).expect("parses");
        check_dictionary(&header.dictionary, &built.index).expect("consistent");
        let index = ChunkIndex::decode(&built.index_bytes).expect("index decodes");
        let mut rebuilt = Vec::new();
        for (_, _, chunk) in index.image_chunks() {
            let at = chunk.archive_offset as usize;
            let v =
                verify_chunk(chunk, &data[at..at + chunk.archive_size as usize]).expect("verifies");
            rebuilt.extend_from_slice(v.data());
        }
        assert_eq!(rebuilt, image);
        // Same input, same bytes, whatever the thread timing.
        let mut data2 = Vec::new();
        let again = build_archive(
            &image[..],
            &mut data2,
            &ArchiveOptions {
                threads: 3,
                ..Default::default()
            },
            &|_| {},
        )
        .expect("builds");
        assert_eq!(again.header, built.header);
        assert_eq!(data2, data);
    }

    /// A writer that fails after `left` bytes, like a full disk.
    struct FullDisk {
        left: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_failure_stops_every_thread_and_is_reported() {
        // Large enough that the producer is still chunking when the
        // consumer fails, so a missed wake-up would hang here.
        let image = pseudo_random(16 << 20, 11);
        let err = build_archive(
            &image[..],
            &mut FullDisk { left: 50_000 },
            &ArchiveOptions::default(),
            &|_| {},
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("disk full"), "{err}");
    }

    #[test]
    fn read_failure_is_reported() {
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("medium error"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let err = build_archive(
            Broken(3 << 20),
            &mut Vec::new(),
            &ArchiveOptions::default(),
            &|_| {},
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("medium error"), "{err}");
    }

    #[test]
    fn oversized_chunk_is_rejected_before_allocating() {
        let data = zstd::bulk::compress(b"kernex", 3).expect("compresses");
        let chunk = StoredChunk {
            hash: ChunkHash::of(b"kernex", DEFAULT_HASH_LEN),
            source_size: u32::MAX,
            archive_offset: 0,
            archive_size: data.len() as u32,
        };
        let err = verify_chunk(&chunk, &data).expect_err("must fail");
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn corrupt_chunk_is_named() {
        let image = pseudo_random(200_000, 3);
        let mut data = Vec::new();
        let built = build_archive(&image[..], &mut data, &ArchiveOptions::default(), &|_| {})
            .expect("builds");
        let chunk = built.index.stored_chunks()[0];
        let mut bytes = data[..chunk.archive_size as usize].to_vec();
        bytes[5] ^= 1;
        let err = verify_chunk(&chunk, &bytes).expect_err("must fail");
        assert!(err.to_string().contains(&chunk.hash.to_string()), "{err}");
    }
}
