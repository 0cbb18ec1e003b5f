//! Cloning an image into the target slot: what the journal vouches for,
//! what the booted slot holds, patch frames, and the archive, in the
//! protocol's request plan (`kernex_protocol::plan`), writing and
//! journaling verified chunks in synced batches.

use std::collections::{HashMap, HashSet};

use kernex_protocol::archive;
use kernex_protocol::container::ImageSpans;
use kernex_protocol::index::{ChunkIndex, StoredChunk};
use kernex_protocol::patch::{self, PatchTable};
use kernex_protocol::plan;
use kernex_protocol::reader::{Prefixed, RangeRead};
use kernex_protocol::{ImageEntry, SlotClass};

use super::{
    BATCH_BYTES, BATCH_CHUNKS, CHUNK_ATTEMPTS, InstallProgress, InstallReport, ProgressFn,
    SEED_BATCH_BYTES,
};
use crate::error::UpdateError;
use crate::journal::{ChunkKey, Journal};
use crate::slot::{SeedSlot, TargetSlot};
use crate::source::Source;
use crate::store::{DataDir, PendingInstall};

/// Writes chunks to the target, keeps the journal and the progress.
pub(super) struct Writer<'a> {
    class: SlotClass,
    target: &'a TargetSlot,
    journal: &'a mut Journal,
    data: &'a DataDir,
    pending: &'a mut PendingInstall,
    batch_bytes: u64,
    fetched_before: u64,
    progress: &'a ProgressFn<'a>,
}

impl Writer<'_> {
    /// Writes a chunk and queues its journal record; syncs both once the
    /// batch is full: [`BATCH_CHUNKS`] or [`BATCH_BYTES`] for downloaded
    /// chunks, [`SEED_BATCH_BYTES`] for chunks copied from the seed.
    fn put(
        &mut self,
        id: usize,
        chunk: &archive::VerifiedChunk,
        offsets: &[u64],
        from_seed: bool,
    ) -> Result<(), UpdateError> {
        self.target.write(chunk, offsets)?;
        let bytes = chunk.data().len() as u64 * offsets.len() as u64;
        self.pending.done_bytes += bytes;
        self.batch_bytes += bytes;
        self.journal.push((self.class, id as u32));
        let full = if from_seed {
            self.batch_bytes >= SEED_BATCH_BYTES
        } else {
            self.journal.queued() >= BATCH_CHUNKS || self.batch_bytes >= BATCH_BYTES
        };
        if full {
            self.commit(None)?;
        }
        Ok(())
    }

    fn commit(&mut self, fetched: Option<u64>) -> Result<(), UpdateError> {
        if self.journal.queued() == 0 {
            return Ok(());
        }
        self.target.sync()?;
        self.journal.commit()?;
        self.batch_bytes = 0;
        if let Some(f) = fetched {
            self.pending.downloaded_bytes = self.fetched_before + f;
        }
        self.data.set_pending(self.pending)?;
        (self.progress)(InstallProgress::of(self.pending));
        Ok(())
    }
}

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

/// Step 3a: the chunks `todo` names that the patch covers, fetched as
/// frames (adjacent frames in one request), decoded against the seed and
/// verified. Returns the chunks still to fetch from the archive: those
/// without a frame, and those whose frame did not decode or verify.
#[allow(clippy::too_many_arguments)] // one step of clone_image
fn apply_patch<S: Source + ?Sized>(
    todo: Vec<usize>,
    table: &PatchTable,
    data_start: u64,
    seed: &SeedSlot,
    stored: &[StoredChunk],
    offsets: &[Vec<u64>],
    source: &mut Prefixed<'_, S>,
    writer: &mut Writer<'_>,
    report: &mut InstallReport,
) -> Result<Vec<usize>, UpdateError> {
    let class = writer.class;
    let (patched, mut rest) = plan::split_patched(todo, table);
    let fetched_at_start = source.inner().fetched_bytes();
    let mut i = 0;
    while i < patched.len() {
        let end = plan::frame_group_end(&patched, i);
        let request = plan::frames_request(data_start, &patched, i..end);
        let group = &patched[i..end];
        i = end;
        let mut buf: Vec<u8> = Vec::new();
        let mut next = 0usize;
        source.read_into(
            request.offset,
            request.len,
            &mut |mut bytes: &[u8]| {
                while !bytes.is_empty() {
                    let Some(&(id, e)) = group.get(next) else {
                        return Ok(());
                    };
                    let n = (e.data_len as usize - buf.len()).min(bytes.len());
                    buf.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if buf.len() == e.data_len as usize {
                        let prefix = patch::gather_prefix(e, |o, l| seed.read_at(o, l))?;
                        match patch::decode_chunk(&stored[id], &prefix, &buf) {
                            Ok(chunk) => {
                                writer.put(id, &chunk, &offsets[id], false)?;
                                report.chunks_patched += 1;
                            }
                            Err(err) => {
                                tracing::warn!(%class, chunk = id, error = %err, "patch frame does not give its chunk; fetching it from the archive");
                                report.patch_failures += 1;
                                rest.push(id);
                            }
                        }
                        buf.clear();
                        next += 1;
                    }
                }
                Ok(())
            },
        )?;
        let fetched = source.inner().fetched_bytes() - fetched_at_start;
        writer.commit(Some(fetched))?;
        writer.pending.downloaded_bytes = writer.fetched_before + fetched;
    }
    // The archive fetch adds its own bytes to what this step fetched.
    writer.fetched_before = writer.pending.downloaded_bytes;
    rest.sort_unstable();
    Ok(rest)
}

/// Clones one image into the target slot: chunks the journal vouches for,
/// then the booted slot's, then patch frames, then the archive.
#[allow(clippy::too_many_arguments)] // one image's whole clone, called once
pub(super) fn clone_image<S: Source + ?Sized>(
    job: ImageJob<'_>,
    source: &mut Prefixed<'_, S>,
    target: &TargetSlot,
    journal: &mut Journal,
    done: &HashSet<ChunkKey>,
    data: &DataDir,
    pending: &mut PendingInstall,
    report: &mut InstallReport,
    progress: &ProgressFn<'_>,
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
    let fetched_before = pending.downloaded_bytes;
    let mut writer = Writer {
        class,
        target,
        journal,
        data,
        pending,
        batch_bytes: 0,
        fetched_before,
        progress,
    };
    let mut todo: Vec<usize> = Vec::new();
    // 1. Chunks the journal says are in the target: re-read and re-hash.
    for (id, chunk) in stored.iter().enumerate() {
        let first = offsets[id].first().copied().unwrap_or(0);
        if done.contains(&(class, id as u32)) && target.holds(first, chunk)? {
            report.chunks_resumed += 1;
            writer.pending.done_bytes += u64::from(chunk.source_size) * offsets[id].len() as u64;
        } else {
            todo.push(id);
        }
    }
    // 2. Chunks the booted slot holds, by its recorded index, re-hashed.
    if let Some((seed, seed_index)) = &job.seed {
        let seed_at = plan::seed_offsets(seed_index);
        let mut rest = Vec::with_capacity(todo.len());
        for id in todo {
            let chunk = &stored[id];
            let from_seed = match seed_at.get(&chunk.hash) {
                Some(&at) => seed.chunk_at(at, chunk)?,
                None => None,
            };
            match from_seed {
                Some(v) => {
                    writer.put(id, &v, &offsets[id], true)?;
                    report.chunks_from_seed += 1;
                }
                None => rest.push(id),
            }
        }
        todo = rest;
    }
    writer.commit(Some(0))?;
    // 3a. Chunks the patch from the booted slot's image covers.
    if let (Some((table, patch_start)), Some((seed, _))) = (&job.patch, &job.seed) {
        todo = apply_patch(
            todo,
            table,
            *patch_start,
            seed,
            stored,
            &offsets,
            source,
            &mut writer,
            report,
        )?;
    }
    // 3b. The rest from the archive.
    let data_start = job.spans.archive.offset + index.archive_data_offset();
    fetch_archive(
        &todo,
        stored,
        data_start,
        &offsets,
        source,
        &mut writer,
        report,
    )
}

/// Step 3b: the chunks `todo` from the archive, adjacent chunks in one
/// request; a chunk that does not verify is fetched again (with the rest
/// of its request) after a backoff, up to [`CHUNK_ATTEMPTS`] times.
fn fetch_archive<S: Source + ?Sized>(
    todo: &[usize],
    stored: &[StoredChunk],
    data_start: u64,
    offsets: &[Vec<u64>],
    source: &mut Prefixed<'_, S>,
    writer: &mut Writer<'_>,
    report: &mut InstallReport,
) -> Result<(), UpdateError> {
    let class = writer.class;
    let fetched_before = writer.fetched_before;
    let fetched_at_start = source.inner().fetched_bytes();
    // Failed downloads per stored chunk; a chunk that does not verify is
    // fetched again (with the rest of its request) after a backoff.
    let mut failures: HashMap<usize, u32> = HashMap::new();
    let mut i = 0;
    while i < todo.len() {
        let group_start = i;
        let end = plan::chunk_group_end(todo, stored, i);
        let request = plan::chunks_request(data_start, todo, stored, i..end);
        let group = &todo[i..end];
        i = end;
        let mut buf: Vec<u8> = Vec::new();
        let mut next = 0usize;
        let mut corrupt: Option<usize> = None;
        let result = source.read_into(request.offset, request.len, &mut |mut bytes: &[u8]| {
            while !bytes.is_empty() {
                let Some(&id) = group.get(next) else {
                    return Ok(());
                };
                let chunk = &stored[id];
                let want = chunk.archive_size as usize - buf.len();
                let n = want.min(bytes.len());
                buf.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                if buf.len() == chunk.archive_size as usize {
                    let verified = archive::verify_chunk(chunk, &buf).map_err(|e| {
                        corrupt = Some(next);
                        UpdateError::Chunk {
                            class,
                            offset: offsets[id].first().copied().unwrap_or(0),
                            reason: format!("downloaded chunk does not verify: {e}"),
                        }
                    })?;
                    writer.put(id, &verified, &offsets[id], false)?;
                    report.chunks_fetched += 1;
                    buf.clear();
                    next += 1;
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            let fetched = source.inner().fetched_bytes() - fetched_at_start;
            writer.commit(Some(fetched))?;
            let Some(bad) = corrupt else {
                return Err(e);
            };
            // Everything before the bad chunk is written; start again there.
            let id = group[bad];
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
            source.forget_prefix();
            report.chunks_refetched += 1;
            std::thread::sleep(delay);
            i = group_start + bad;
            writer.pending.downloaded_bytes = fetched_before + fetched;
            continue;
        }
        let fetched = source.inner().fetched_bytes() - fetched_at_start;
        writer.commit(Some(fetched))?;
        writer.pending.downloaded_bytes = fetched_before + fetched;
    }
    Ok(())
}
