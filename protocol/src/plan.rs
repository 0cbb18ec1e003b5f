//! Which byte ranges a device requests to install a bundle: a sans-IO
//! planner, one set of rules for the device that fetches and for the
//! server that previews.
//!
//! After [`crate::reader::read_head`] (the first [`FIRST_READ`] bytes, more
//! only if the manifest and signature do not fit) and
//! [`crate::reader::check_members`] (each member header and the end marker,
//! [`crate::reader::member_reads`]), a device installs each image in
//! manifest order:
//!
//! 1. the index head (its page table), then the index pages its booted
//!    slot's index does not hold ([`reusable_pages`]), adjacent missing
//!    pages in one request ([`page_groups`]);
//! 2. the chunks its booted slot holds are copied from it, when the two
//!    indexes hash chunks alike ([`seed_usable`]);
//! 3. when the bundle carries a patch from the booted slot's image, its
//!    table, then the frames of the chunks still missing that the patch
//!    covers ([`split_patched`], adjacent frames in one request:
//!    [`frame_group_end`]);
//! 4. the rest from the archive, adjacent chunks in one request
//!    ([`chunk_group_end`]).
//!
//! Every request is at most [`MAX_REQUEST`] bytes (an index page request
//! may pass it by its last page), and only the part of it past the bytes
//! the first read holds is fetched ([`crate::reader::clip`]). The device
//! runs these functions on what it really holds (its journal and a seed
//! that reads back right may skip more); [`plan_image`] runs them on what a
//! device running the old release holds, so the server's preview
//! (`Bundle::delta_from`) is the sum of the requests the device makes.

use std::collections::HashMap;
use std::ops::Range;

use serde::Serialize;

use crate::container::{ImageSpans, Span};
use crate::digest::Sha256Digest;
use crate::index::{ChunkHash, ChunkIndex, Delta, IndexHead, StoredChunk, page_digest};
use crate::manifest::{ImageEntry, PatchRef};
use crate::patch::{PatchEntry, PatchTable};
use crate::reader::clip;

pub use crate::reader::FIRST_READ;

/// Largest merged Range request.
pub const MAX_REQUEST: u64 = 8 * 1024 * 1024;

/// What a request fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReadKind {
    /// The start of the bundle: manifest and signature.
    Head,
    /// An index head.
    IndexHead,
    /// Index pages.
    IndexPages,
    /// A patch table.
    PatchTable,
    /// Patch frames.
    PatchFrames,
    /// Archive chunks.
    Chunks,
}

/// One range request, in bundle offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Request {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// What it fetches.
    pub kind: ReadKind,
}

/// For each page of `head`, where the same page lies in `old` (the booted
/// slot's index file): reused from there, not fetched. None: fetched.
pub fn reusable_pages(head: &IndexHead, old: Option<&[u8]>) -> Vec<Option<Range<usize>>> {
    let mut old_pages: HashMap<[u8; 16], Range<usize>> = HashMap::new();
    if let Some(old) = old
        && let Ok(old_head) = IndexHead::decode(old)
    {
        for p in &old_head.pages {
            let range = p.offset as usize..p.offset as usize + p.len as usize;
            if let Some(bytes) = old.get(range.clone())
                && page_digest(bytes) == p.digest
            {
                old_pages.insert(p.digest, range);
            }
        }
    }
    head.pages
        .iter()
        .map(|p| {
            old_pages
                .get(&p.digest)
                .filter(|r| r.len() == p.len as usize)
                .cloned()
        })
        .collect()
}

/// The pages to fetch, as runs of adjacent pages, one request each: a run
/// starts at a page not reused and grows while the next is not reused
/// either and the run is below [`MAX_REQUEST`].
pub fn page_groups(head: &IndexHead, reused: &[Option<Range<usize>>]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let missing = |i: usize| reused.get(i).is_none_or(Option::is_none);
    let mut i = 0;
    while i < head.pages.len() {
        if !missing(i) {
            i += 1;
            continue;
        }
        let start = i;
        let mut len = 0u64;
        while i < head.pages.len() && missing(i) && len < MAX_REQUEST {
            len += u64::from(head.pages[i].len);
            i += 1;
        }
        out.push(start..i);
    }
    out
}

/// The request for the pages `group` of an index whose member data starts
/// at `index_offset`.
pub fn page_request(index_offset: u64, head: &IndexHead, group: &Range<usize>) -> Request {
    let pages = &head.pages[group.clone()];
    Request {
        offset: index_offset + pages.first().map_or(0, |p| p.offset),
        len: pages.iter().map(|p| u64::from(p.len)).sum(),
        kind: ReadKind::IndexPages,
    }
}

/// Whether chunks of an image indexed as `old` can seed one indexed as
/// `new`: both truncate chunk hashes to the same length.
pub fn seed_usable(old: &ChunkIndex, new: &ChunkIndex) -> bool {
    old.hash_len() == new.hash_len()
}

/// Where each stored chunk of a seed first occurs in its image.
pub fn seed_offsets(seed: &ChunkIndex) -> HashMap<ChunkHash, u64> {
    let mut at: HashMap<ChunkHash, u64> = HashMap::new();
    for (offset, _, c) in seed.image_chunks() {
        at.entry(c.hash).or_insert(offset);
    }
    at
}

/// The patch of `entry` from the base image `base`, and its member's span,
/// if the bundle carries one.
pub fn patch_from<'e>(
    entry: &'e ImageEntry,
    spans: &ImageSpans,
    base: &Sha256Digest,
) -> Option<(&'e PatchRef, Span)> {
    let (k, patch) = entry.patch_from(base)?;
    let (_, span) = spans.patches.get(k)?;
    Some((patch, *span))
}

/// The request for a patch's table.
pub fn table_request(patch: &PatchRef, span: &Span) -> Request {
    Request {
        offset: span.offset,
        len: patch.table_size,
        kind: ReadKind::PatchTable,
    }
}

/// The table of a patch as fetched, if a device may use it: it matches the
/// manifest and the index, and is for a base image of `base_size` bytes
/// (the booted slot's). Otherwise why not: the chunks then come from the
/// archive.
pub fn usable_patch(
    bytes: &[u8],
    patch: &PatchRef,
    index: &ChunkIndex,
    base_size: u64,
) -> Result<PatchTable, String> {
    match PatchTable::from_member(bytes, patch, index) {
        Ok(t) if t.base_size == base_size => Ok(t),
        Ok(t) => Err(format!(
            "the patch is for an image of {} bytes, the booted slot's is {base_size}",
            t.base_size
        )),
        Err(e) => Err(format!("the patch table is invalid: {e}")),
    }
}

/// Splits the stored chunks `todo` into those the patch has a frame for
/// (fetched as frames, in order) and the rest.
pub fn split_patched(
    todo: Vec<usize>,
    table: &PatchTable,
) -> (Vec<(usize, &PatchEntry)>, Vec<usize>) {
    let mut patched = Vec::new();
    let mut rest = Vec::new();
    for id in todo {
        match u32::try_from(id).ok().and_then(|n| table.entry(n)) {
            Some(e) => patched.push((id, e)),
            None => rest.push(id),
        }
    }
    (patched, rest)
}

/// End (exclusive) of the run of frames from `start` fetched in one
/// request: adjacent frames, at most [`MAX_REQUEST`] bytes in all.
pub fn frame_group_end(patched: &[(usize, &PatchEntry)], start: usize) -> usize {
    let Some((_, first)) = patched.get(start) else {
        return start;
    };
    let mut end = first.data_offset + u64::from(first.data_len);
    let mut i = start + 1;
    while let Some((_, e)) = patched.get(i) {
        if e.data_offset != end || end + u64::from(e.data_len) - first.data_offset > MAX_REQUEST {
            break;
        }
        end += u64::from(e.data_len);
        i += 1;
    }
    i
}

/// The request for the frames `patched[run]` of a patch whose frames start
/// at bundle offset `data_start`.
pub fn frames_request(
    data_start: u64,
    patched: &[(usize, &PatchEntry)],
    run: Range<usize>,
) -> Request {
    let frames = &patched[run];
    let first = frames.first().map_or(0, |(_, e)| e.data_offset);
    Request {
        offset: data_start + first,
        len: frames.iter().map(|(_, e)| u64::from(e.data_len)).sum(),
        kind: ReadKind::PatchFrames,
    }
}

/// End (exclusive) of the run of chunks `todo[start..]` fetched in one
/// request: adjacent in the archive, at most [`MAX_REQUEST`] bytes in all
/// (a single larger chunk is a request of its own).
pub fn chunk_group_end(todo: &[usize], stored: &[StoredChunk], start: usize) -> usize {
    let Some(first) = todo.get(start).and_then(|&id| stored.get(id)) else {
        return start;
    };
    let mut end = first.archive_offset + u64::from(first.archive_size);
    let mut i = start + 1;
    while let Some(c) = todo.get(i).and_then(|&id| stored.get(id)) {
        if c.archive_offset != end
            || end + u64::from(c.archive_size) - first.archive_offset > MAX_REQUEST
        {
            break;
        }
        end += u64::from(c.archive_size);
        i += 1;
    }
    i
}

/// The request for the chunks `todo[run]` of an archive whose chunk data
/// starts at bundle offset `data_start`.
pub fn chunks_request(
    data_start: u64,
    todo: &[usize],
    stored: &[StoredChunk],
    run: Range<usize>,
) -> Request {
    let chunks: Vec<&StoredChunk> = todo[run].iter().filter_map(|&id| stored.get(id)).collect();
    Request {
        offset: data_start + chunks.first().map_or(0, |c| c.archive_offset),
        len: chunks.iter().map(|c| u64::from(c.archive_size)).sum(),
        kind: ReadKind::Chunks,
    }
}

/// What the device holds for one image: its booted slot's index (as
/// recorded at install) and that slot's image in the manifest it booted.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    /// The index file.
    pub index_bytes: &'a [u8],
    /// The same index, decoded.
    pub index: &'a ChunkIndex,
    /// SHA-256 and size of the booted image, when its manifest has one.
    pub image: Option<(Sha256Digest, u64)>,
}

/// One image's requests, as a device holding `held` makes them.
#[derive(Debug, Clone, Default)]
pub struct ImagePlan {
    /// The requests, in order, each clipped to what the first read did
    /// not hold (dropped when it held all).
    pub requests: Vec<Request>,
    /// The same, summed by kind.
    pub delta: Delta,
}

impl ImagePlan {
    fn push(&mut self, held: u64, request: Request) {
        let Some((offset, len)) = clip(held, request.offset, request.len) else {
            return;
        };
        let d = &mut self.delta;
        match request.kind {
            ReadKind::Head => {}
            ReadKind::IndexHead => d.index_head_bytes += len,
            ReadKind::IndexPages => d.index_page_bytes += len,
            ReadKind::PatchTable => d.patch_table_bytes += len,
            ReadKind::PatchFrames => d.patch_bytes += len,
            ReadKind::Chunks => d.chunk_bytes += len,
        }
        self.requests.push(Request {
            offset,
            len,
            kind: request.kind,
        });
    }
}

/// The requests a device holding `held` makes for one image of a bundle,
/// the first `prefix` bytes of which it read first: `index_bytes` is the
/// image's index, `spans` its members, and `patch_table` reads the table
/// of a patch member (a device fetches it; the preview reads it from the
/// bundle). Assumes a fresh install whose seed reads back right and whose
/// patch frames all decode.
pub fn plan_image<E>(
    entry: &ImageEntry,
    spans: &ImageSpans,
    index: &ChunkIndex,
    held: Option<Held<'_>>,
    prefix: u64,
    patch_table: &mut dyn FnMut(&Request) -> Result<Vec<u8>, E>,
) -> Result<ImagePlan, E> {
    plan_image_offered(entry, spans, index, held, prefix, None, patch_table)
}

/// [`plan_image`], with a patch offered outside the bundle
/// ([`crate::offered`]) at its virtual span: used, like a bundle's own
/// patch, when it is from the held image and the bundle carries none
/// from it.
pub fn plan_image_offered<E>(
    entry: &ImageEntry,
    spans: &ImageSpans,
    index: &ChunkIndex,
    held: Option<Held<'_>>,
    prefix: u64,
    offered: Option<(&PatchRef, Span)>,
    patch_table: &mut dyn FnMut(&Request) -> Result<Vec<u8>, E>,
) -> Result<ImagePlan, E> {
    let mut plan = ImagePlan::default();
    let head = index.head();
    plan.push(
        prefix,
        Request {
            offset: spans.index.offset,
            len: entry.index.head_size,
            kind: ReadKind::IndexHead,
        },
    );
    let reused = reusable_pages(head, held.map(|h| h.index_bytes));
    for group in page_groups(head, &reused) {
        plan.delta.index_pages_fetched += group.len() as u64;
        plan.push(prefix, page_request(spans.index.offset, head, &group));
    }
    let stored = index.stored_chunks();
    let seed = held.filter(|h| seed_usable(h.index, index));
    let mut todo: Vec<usize> = (0..stored.len()).collect();
    if let Some(seed) = seed {
        let at = seed_offsets(seed.index);
        todo.retain(|&id| !at.contains_key(&stored[id].hash));
    }
    plan.delta.chunks_reused = (stored.len() - todo.len()) as u64;
    if let Some((base, base_size)) = seed.and_then(|s| s.image)
        && let Some((patch, span)) = patch_from(entry, spans, &base)
            .or_else(|| offered.filter(|(p, _)| p.base_sha256 == base))
    {
        let request = table_request(patch, &span);
        plan.push(prefix, request);
        let bytes = patch_table(&request)?;
        if let Ok(table) = usable_patch(&bytes, patch, index, base_size) {
            let (patched, rest) = split_patched(todo, &table);
            let data_start = span.offset + patch.table_size;
            let mut i = 0;
            while i < patched.len() {
                let end = frame_group_end(&patched, i);
                plan.push(prefix, frames_request(data_start, &patched, i..end));
                i = end;
            }
            plan.delta.chunks_patched = patched.len() as u64;
            todo = rest;
        }
    }
    todo.sort_unstable();
    plan.delta.chunks_fetched = todo.len() as u64;
    let data_start = spans.archive.offset + index.archive_data_offset();
    let mut i = 0;
    while i < todo.len() {
        let end = chunk_group_end(&todo, stored, i);
        plan.push(prefix, chunks_request(data_start, &todo, stored, i..end));
        i = end;
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{ChunkerParams, DEFAULT_HASH_LEN, IndexBuilder};

    fn build(chunks: &[Vec<u8>]) -> ChunkIndex {
        let mut b = IndexBuilder::new(ChunkerParams::default(), DEFAULT_HASH_LEN);
        for data in chunks {
            b.push(
                ChunkHash::of(data, DEFAULT_HASH_LEN),
                data.len() as u32,
                100,
            );
        }
        b.finish(0)
    }

    #[test]
    fn adjacent_chunks_merge_up_to_the_request_limit() {
        let chunks: Vec<Vec<u8>> = (0..10u32).map(|i| i.to_le_bytes().repeat(4)).collect();
        let index = build(&chunks);
        let stored = index.stored_chunks();
        let todo = vec![0, 1, 2, 5, 6, 9];
        let mut runs = Vec::new();
        let mut i = 0;
        while i < todo.len() {
            let end = chunk_group_end(&todo, stored, i);
            runs.push(chunks_request(1000, &todo, stored, i..end));
            i = end;
        }
        let spans: Vec<(u64, u64)> = runs.iter().map(|r| (r.offset, r.len)).collect();
        assert_eq!(spans, vec![(1000, 300), (1500, 200), (1900, 100)]);
    }

    #[test]
    fn pages_the_old_index_holds_are_not_fetched() {
        let chunks: Vec<Vec<u8>> = (0..3000u32).map(|i| i.to_le_bytes().repeat(4)).collect();
        let old = build(&chunks);
        let mut changed = chunks.clone();
        changed[1500] = b"something else".to_vec();
        let new = build(&changed);
        let old_bytes = old.encode();
        let reused = reusable_pages(new.head(), Some(&old_bytes));
        let fetched: usize = page_groups(new.head(), &reused)
            .iter()
            .map(Range::len)
            .sum();
        assert!((1..=2).contains(&fetched), "{fetched}");
        let all: usize = page_groups(new.head(), &reusable_pages(new.head(), None))
            .iter()
            .map(Range::len)
            .sum();
        assert_eq!(all, new.head().pages.len());
    }
}
