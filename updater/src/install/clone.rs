//! Cloning an image into the target slot: what the journal vouches for,
//! what the booted slot holds, patch frames, and the archive, in the
//! protocol's request plan (`kernex_protocol::plan`).
//!
//! Each step runs on a pool of worker threads ([`writer::run_pool`]): the
//! booted slot's chunks are read and hashed in parallel, and the planner's
//! requests (merged ranges, unchanged) are fetched several at a time, each
//! worker on its own fork of the source ([`Source::fork`]), decompressing,
//! verifying and writing the chunks of its request as they stream in.

use std::collections::HashMap;
use std::sync::Mutex;

use kernex_protocol::archive;
use kernex_protocol::container::ImageSpans;
use kernex_protocol::index::{ChunkIndex, StoredChunk};
use kernex_protocol::patch::{self, PatchEntry, PatchTable};
use kernex_protocol::plan;
use kernex_protocol::reader::{Prefixed, RangeRead};
use kernex_protocol::{ImageEntry, Sha256Digest};

use super::readback::{Landed, read_back};
use super::writer::{Saver, Writer, run_pool};
use super::{CHUNK_ATTEMPTS, InstallReport};
use crate::error::UpdateError;
use crate::journal::{ChunkKey, Journal};
use crate::slot::{SeedSlot, TargetSlot};
use crate::source::{Sink, Source};
use crate::store::{DataDir, PendingInstall};

/// Stored chunks a seed task reads and hashes.
const SEED_TASK: usize = 64;

/// Everything one image's clone needs.
pub(super) struct ImageJob<'a> {
    pub entry: &'a ImageEntry,
    pub spans: ImageSpans,
    pub index: &'a ChunkIndex,
    pub seed: Option<(SeedSlot, ChunkIndex)>,
    /// A patch from the booted slot's image: its table and where its data
    /// starts in the bundle.
    pub patch: Option<(PatchTable, u64)>,
}

/// Where the clone reads the bundle and how.
pub(super) struct Reading<'a> {
    /// The install's source: forked for each worker.
    pub source: &'a dyn Source,
    /// The bundle's first bytes, already read.
    pub prefix: &'a [u8],
    /// Requests in flight at once.
    pub concurrency: usize,
}

/// The install state one image's clone updates.
pub(super) struct Progress<'a> {
    pub journal: &'a mut Journal,
    pub done: &'a std::collections::HashSet<ChunkKey>,
    pub data: &'a DataDir,
    pub pending: &'a mut PendingInstall,
    pub report: &'a mut InstallReport,
    pub progress: &'a super::ProgressFn<'a>,
}

/// A worker's own reader: a fork of the source, the prefix served from
/// memory until a chunk in it turned out corrupt.
struct Fetcher {
    source: Box<dyn Source>,
    use_prefix: bool,
}

impl Fetcher {
    fn read(
        &mut self,
        prefix: &[u8],
        offset: u64,
        len: u64,
        sink: &mut Sink<'_>,
    ) -> Result<(), UpdateError> {
        let prefix = if self.use_prefix { prefix } else { &[] };
        Prefixed::new(prefix, &mut *self.source).read_into(offset, len, sink)
    }
}

/// The error a worker stops with when another one failed (never the
/// install's error: the first failure is).
fn stopped() -> UpdateError {
    UpdateError::SlotState("stopped: another worker failed".into())
}

/// Clones one image into the target slot: chunks the journal vouches for,
/// then the booted slot's, then patch frames, then the archive; meanwhile
/// reads the slot back ([`readback`](super::readback)). Returns the SHA-256
/// of the image as read back.
pub(super) fn clone_image(
    job: ImageJob<'_>,
    reading: &Reading<'_>,
    target: &TargetSlot,
    state: Progress<'_>,
) -> Result<Option<Sha256Digest>, UpdateError> {
    let class = job.entry.slot_class;
    let landed = Landed::new(job.index.stored_chunks().len());
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_back(target, job.index, &landed, class));
        let result = clone_steps(&job, reading, target, state, &landed);
        landed.end();
        let digest = reader
            .join()
            .unwrap_or_else(|_| Err(UpdateError::SlotState("the slot reader panicked".into())));
        result?;
        digest
    })
}

/// The steps of [`clone_image`].
fn clone_steps(
    job: &ImageJob<'_>,
    reading: &Reading<'_>,
    target: &TargetSlot,
    state: Progress<'_>,
    landed: &Landed,
) -> Result<(), UpdateError> {
    let class = job.entry.slot_class;
    let index = job.index;
    let stored = index.stored_chunks();
    let mut offsets: Vec<Vec<u64>> = vec![Vec::new(); stored.len()];
    for (at, id, _) in index.image_chunks() {
        if let Some(o) = offsets.get_mut(id) {
            o.push(at);
        }
    }
    let Progress {
        journal,
        done,
        data,
        pending,
        report,
        progress,
    } = state;
    let fetched = || reading.source.fetched_bytes();
    let mut saver = Saver::new(
        data,
        progress,
        journal.syncer()?,
        pending.downloaded_bytes,
        fetched(),
    );
    let mut todo: Vec<usize> = Vec::new();
    // 1. Chunks the journal says are in the target: re-read and re-hash.
    for (id, chunk) in stored.iter().enumerate() {
        let first = offsets[id].first().copied().unwrap_or(0);
        if done.contains(&(class, id as u32)) && target.holds(first, chunk)? {
            report.chunks_resumed += 1;
            pending.done_bytes += u64::from(chunk.source_size) * offsets[id].len() as u64;
            landed.mark(id);
        } else {
            todo.push(id);
        }
    }
    let writer = Writer::new(class, target, landed, journal, pending, report);
    let workers = reading.concurrency.max(1);
    // 2. Chunks the booted slot holds, by its recorded index, re-hashed.
    if let Some((seed, seed_index)) = &job.seed {
        let seed_at = plan::seed_offsets(seed_index);
        let tasks: Vec<&[usize]> = todo.chunks(SEED_TASK).collect();
        let rest = Mutex::new(Vec::new());
        run_pool(
            workers,
            &tasks,
            &writer,
            &mut saver,
            &fetched,
            &|| Ok(()),
            &|_: &mut (), ids: &&[usize]| {
                for &id in *ids {
                    if writer.stopped() {
                        return Err(stopped());
                    }
                    let chunk = &stored[id];
                    let from_seed = match seed_at.get(&chunk.hash) {
                        Some(&at) => seed.chunk_at(at, chunk)?,
                        None => None,
                    };
                    match from_seed {
                        Some(v) => writer.put(id, &v, &offsets[id], 0, |r| {
                            r.chunks_from_seed += 1;
                        })?,
                        None => lock(&rest).push(id),
                    }
                }
                Ok(())
            },
        )?;
        todo = rest.into_inner().unwrap_or_else(|e| e.into_inner());
        todo.sort_unstable();
    }
    saver.save(&writer, fetched())?;
    let fork = || -> Result<Fetcher, UpdateError> {
        Ok(Fetcher {
            source: reading.source.fork()?,
            use_prefix: true,
        })
    };
    // 3a. Chunks the patch from the booted slot's image covers.
    if let (Some((table, patch_start)), Some((seed, _))) = (&job.patch, &job.seed) {
        let (patched, rest) = plan::split_patched(todo, table);
        let mut groups = Vec::new();
        let mut i = 0;
        while i < patched.len() {
            let end = plan::frame_group_end(&patched, i);
            groups.push(i..end);
            i = end;
        }
        let rest = Mutex::new(rest);
        let frames = Frames {
            patched: &patched,
            data_start: *patch_start,
            seed,
            stored,
            offsets: &offsets,
            prefix: reading.prefix,
            writer: &writer,
            rest: &rest,
        };
        run_pool(
            workers,
            &groups,
            &writer,
            &mut saver,
            &fetched,
            &fork,
            &|f: &mut Fetcher, g: &std::ops::Range<usize>| frames.fetch(f, g.clone()),
        )?;
        todo = rest.into_inner().unwrap_or_else(|e| e.into_inner());
        todo.sort_unstable();
        saver.save(&writer, fetched())?;
    }
    // 3b. The rest from the archive.
    let mut groups = Vec::new();
    let mut i = 0;
    while i < todo.len() {
        let end = plan::chunk_group_end(&todo, stored, i);
        groups.push(i..end);
        i = end;
    }
    let chunks = Chunks {
        todo: &todo,
        stored,
        data_start: job.spans.archive.offset + index.archive_data_offset(),
        offsets: &offsets,
        prefix: reading.prefix,
        writer: &writer,
    };
    run_pool(
        workers,
        &groups,
        &writer,
        &mut saver,
        &fetched,
        &fork,
        &|f: &mut Fetcher, g: &std::ops::Range<usize>| chunks.fetch(f, g.clone()),
    )?;
    saver.save(&writer, fetched())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Step 3a: patch frames, decoded against the seed and verified; a frame
/// that does not give its chunk leaves the chunk to the archive.
struct Frames<'a, 'j> {
    patched: &'a [(usize, &'a PatchEntry)],
    data_start: u64,
    seed: &'a SeedSlot,
    stored: &'a [StoredChunk],
    offsets: &'a [Vec<u64>],
    prefix: &'a [u8],
    writer: &'a Writer<'j>,
    rest: &'a Mutex<Vec<usize>>,
}

impl Frames<'_, '_> {
    /// Fetches the frames `patched[run]` (adjacent: one request).
    fn fetch(&self, f: &mut Fetcher, run: std::ops::Range<usize>) -> Result<(), UpdateError> {
        let class = self.writer.class;
        let request = plan::frames_request(self.data_start, self.patched, run.clone());
        let group = &self.patched[run];
        let mut buf: Vec<u8> = Vec::new();
        let mut next = 0usize;
        f.read(
            self.prefix,
            request.offset,
            request.len,
            &mut |mut bytes: &[u8]| {
                while !bytes.is_empty() {
                    let Some(&(id, e)) = group.get(next) else {
                        return Ok(());
                    };
                    if self.writer.stopped() {
                        return Err(stopped());
                    }
                    let n = (e.data_len as usize - buf.len()).min(bytes.len());
                    buf.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if buf.len() == e.data_len as usize {
                        let prefix = patch::gather_prefix(e, |o, l| self.seed.read_at(o, l))?;
                        match patch::decode_chunk(&self.stored[id], &prefix, &buf) {
                            Ok(chunk) => {
                                self.writer.put(
                                    id,
                                    &chunk,
                                    &self.offsets[id],
                                    u64::from(e.data_len),
                                    |r| r.chunks_patched += 1,
                                )?;
                            }
                            Err(err) => {
                                tracing::warn!(%class, chunk = id, error = %err, "patch frame does not give its chunk; fetching it from the archive");
                                self.writer.shared().report.patch_failures += 1;
                                lock(self.rest).push(id);
                            }
                        }
                        buf.clear();
                        next += 1;
                    }
                }
                Ok(())
            },
        )
    }
}

/// Step 3b: archive chunks; a chunk that does not verify is fetched again
/// (with the rest of its request) after a backoff, up to
/// [`CHUNK_ATTEMPTS`] times.
struct Chunks<'a, 'j> {
    todo: &'a [usize],
    stored: &'a [StoredChunk],
    data_start: u64,
    offsets: &'a [Vec<u64>],
    prefix: &'a [u8],
    writer: &'a Writer<'j>,
}

impl Chunks<'_, '_> {
    /// Fetches the chunks `todo[run]` (adjacent: one request).
    fn fetch(&self, f: &mut Fetcher, run: std::ops::Range<usize>) -> Result<(), UpdateError> {
        let class = self.writer.class;
        let mut failures: HashMap<usize, u32> = HashMap::new();
        let mut start = run.start;
        loop {
            let group = &self.todo[start..run.end];
            let request =
                plan::chunks_request(self.data_start, self.todo, self.stored, start..run.end);
            let mut buf: Vec<u8> = Vec::new();
            let mut next = 0usize;
            let mut corrupt: Option<usize> = None;
            let result = f.read(
                self.prefix,
                request.offset,
                request.len,
                &mut |mut bytes: &[u8]| {
                    while !bytes.is_empty() {
                        let Some(&id) = group.get(next) else {
                            return Ok(());
                        };
                        if self.writer.stopped() {
                            return Err(stopped());
                        }
                        let chunk = &self.stored[id];
                        let size = chunk.archive_size as usize;
                        // A chunk that lies whole in what arrived is
                        // verified in place, without a copy.
                        let whole = buf.is_empty() && bytes.len() >= size;
                        if !whole {
                            let n = (size - buf.len()).min(bytes.len());
                            buf.extend_from_slice(&bytes[..n]);
                            bytes = &bytes[n..];
                        }
                        if whole || buf.len() == size {
                            let data = if whole {
                                let (data, rest) = bytes.split_at(size);
                                bytes = rest;
                                data
                            } else {
                                &buf[..]
                            };
                            let verified = archive::verify_chunk(chunk, data).map_err(|e| {
                                corrupt = Some(next);
                                UpdateError::Chunk {
                                    class,
                                    offset: self.offsets[id].first().copied().unwrap_or(0),
                                    reason: format!("downloaded chunk does not verify: {e}"),
                                }
                            })?;
                            self.writer.put(
                                id,
                                &verified,
                                &self.offsets[id],
                                u64::from(chunk.archive_size),
                                |r| r.chunks_fetched += 1,
                            )?;
                            buf.clear();
                            next += 1;
                        }
                    }
                    Ok(())
                },
            );
            let Err(e) = result else {
                return Ok(());
            };
            let Some(bad) = corrupt else {
                return Err(e);
            };
            // Everything before the bad chunk is written; start again there.
            start += bad;
            let id = self.todo[start];
            let n = failures.entry(id).or_insert(0);
            *n += 1;
            if *n >= CHUNK_ATTEMPTS {
                return Err(match e {
                    UpdateError::Chunk {
                        class,
                        offset,
                        reason,
                    } => UpdateError::Chunk {
                        class,
                        offset,
                        reason: format!("{reason} (fetched {n} times)"),
                    },
                    other => other,
                });
            }
            let delay = crate::source::FIRST_BACKOFF
                .saturating_mul(1 << (*n - 1))
                .min(crate::source::MAX_BACKOFF);
            tracing::warn!(%class, chunk = id, error = %e, ?delay, "fetching the chunk again");
            // The chunk may lie in the bundle's first read: fetch it anew.
            f.use_prefix = false;
            self.writer.shared().report.chunks_refetched += 1;
            std::thread::sleep(delay);
        }
    }
}
