//! `install`: verify a bundle, clone its images into the inactive slot from
//! seeds and Range requests, verify the slot, and tell the bootloader to
//! try it.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use kernex_bootloader::{BootFlow, DEFAULT_ATTEMPTS, Slot};
use kernex_protocol::archive;
use kernex_protocol::container::{
    self, BLOCK, BundleLayout, ImageSpans, MANIFEST_MEMBER, SIGNATURE_MEMBER,
};
use kernex_protocol::index::{ChunkHash, ChunkIndex, IndexHead};
use kernex_protocol::limits::{MAX_MANIFEST_SIZE, MAX_SIGNATURE_SIZE};
use kernex_protocol::patch::{self, PatchTable};
use kernex_protocol::{
    ImageEntry, Keyring, Manifest, Sha256Digest, SlotClass, VerifiedManifest, VerifyOptions,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::journal::{ChunkKey, Journal};
use crate::slot::{SeedSlot, TargetSlot};
use crate::source::Source;
use crate::store::{DataDir, PendingInstall, SlotRecord};

/// This updater's version, compared with a bundle's `min-updater-version`.
pub const UPDATER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Boot attempts a freshly installed slot gets.
pub const TRY_ATTEMPTS: u32 = 3;
/// Bytes read first from a bundle: the manifest and signature of every
/// real bundle fit; more is fetched if not.
pub const FIRST_READ: u64 = 8 * 1024;
/// Largest merged Range request.
pub const MAX_REQUEST: u64 = 8 * 1024 * 1024;
/// Chunks written between two syncs of the slot and the journal.
pub const BATCH_CHUNKS: usize = 32;
/// Bytes written between two syncs of the slot and the journal.
pub const BATCH_BYTES: u64 = 2 * 1024 * 1024;
/// Bytes copied from the booted slot between two syncs. A power cut loses
/// at most this much copying, redone from the seed without downloading
/// anything, so it is far larger than [`BATCH_BYTES`] (which bounds the
/// downloads lost): syncing every 32 seed chunks made a 200 MiB delta
/// install spend most of its time in fsync.
pub const SEED_BATCH_BYTES: u64 = 32 * 1024 * 1024;
/// Times a chunk is fetched before a corrupt download is final: a bit
/// flipped on the way (a broken proxy, bad RAM in a router) is fetched
/// again, a chunk corrupt on the server fails the install.
pub const CHUNK_ATTEMPTS: u32 = 4;

/// Install settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct InstallOptions {
    /// Allow a version lower than the booted slot's.
    pub allow_downgrade: bool,
    /// Check certificate validity at this Unix time instead of now.
    pub at_time: Option<i64>,
}

/// How far an install is, given to the progress callback of
/// [`install_with_progress`] each time the install's progress is saved
/// (after every synced batch of chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct InstallProgress {
    /// Image bytes written and verified so far (all classes).
    pub done_bytes: u64,
    /// Image bytes in the bundle (all classes).
    pub total_bytes: u64,
    /// Bytes downloaded by this install so far (all runs).
    pub downloaded_bytes: u64,
}

impl InstallProgress {
    fn of(pending: &PendingInstall) -> Self {
        Self {
            done_bytes: pending.done_bytes,
            total_bytes: pending.total_bytes,
            downloaded_bytes: pending.downloaded_bytes,
        }
    }
}

/// Receives install progress ([`install_with_progress`]).
pub type ProgressFn<'a> = dyn Fn(InstallProgress) + 'a;

/// What an install did.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct InstallReport {
    /// Release version installed.
    pub version: String,
    /// Slot written.
    pub target: Option<Slot>,
    /// The slot already held this release (verified again, not rewritten).
    pub already_installed: bool,
    /// Bytes received from the source in this run.
    pub bytes_fetched: u64,
    /// Requests made (HTTP) or reads (file) in this run.
    pub requests: u64,
    /// Index pages reused from the booted slot's index.
    pub index_pages_reused: u64,
    /// Index pages fetched.
    pub index_pages_fetched: u64,
    /// Stored chunks fetched from the source.
    pub chunks_fetched: u64,
    /// Stored chunks copied from the booted slot.
    pub chunks_from_seed: u64,
    /// Stored chunks already in the target slot (from the journal).
    pub chunks_resumed: u64,
    /// Downloads of a chunk fetched again because it did not verify.
    pub chunks_refetched: u64,
    /// Chunks decoded from a patch against the booted slot.
    pub chunks_patched: u64,
    /// Patch frames that did not decode to their chunk (fetched from the
    /// archive instead).
    pub patch_failures: u64,
}

/// The manifest and signature of a bundle, and its layout.
#[derive(Debug)]
pub struct BundleHead {
    /// Manifest bytes as signed.
    pub manifest_bytes: Vec<u8>,
    /// Detached signature.
    pub signature: Vec<u8>,
    /// Every member's place.
    pub layout: BundleLayout,
}

fn rejected(what: impl std::fmt::Display) -> UpdateError {
    UpdateError::Bundle(what.to_string())
}

/// Reads the manifest and signature from the start of a bundle and checks
/// that the bundle is as large as they say. Nothing is trusted yet.
pub fn read_head(source: &mut dyn Source) -> Result<BundleHead, UpdateError> {
    let first = match source.total_size() {
        Some(total) => FIRST_READ.min(total),
        None => FIRST_READ,
    };
    let mut head = source.read_range(0, first)?;
    fn need(head: &mut Vec<u8>, end: u64, source: &mut dyn Source) -> Result<(), UpdateError> {
        let have = head.len() as u64;
        if end > have {
            let more = source.read_range(have, end - have)?;
            head.extend_from_slice(&more);
        }
        Ok(())
    }
    need(&mut head, BLOCK, source)?;
    let h = container::parse_member_header(&head[..BLOCK as usize], 0).map_err(rejected)?;
    if h.name != MANIFEST_MEMBER {
        return Err(rejected(format!(
            "first member is {:?}, expected {MANIFEST_MEMBER}: not a Kernex bundle",
            h.name
        )));
    }
    if h.size > MAX_MANIFEST_SIZE {
        return Err(rejected(format!(
            "manifest of {} bytes is larger than the limit of {MAX_MANIFEST_SIZE}",
            h.size
        )));
    }
    let sig_at = BundleLayout::signature_header_offset(h.size);
    need(&mut head, sig_at + BLOCK, source)?;
    let s =
        container::parse_member_header(&head[sig_at as usize..(sig_at + BLOCK) as usize], sig_at)
            .map_err(rejected)?;
    if s.name != SIGNATURE_MEMBER {
        return Err(rejected(
            "the bundle is not signed (no manifest.sig member)",
        ));
    }
    if s.size > MAX_SIGNATURE_SIZE {
        return Err(rejected(format!(
            "signature of {} bytes is larger than the limit of {MAX_SIGNATURE_SIZE}",
            s.size
        )));
    }
    need(&mut head, sig_at + BLOCK + s.size, source)?;
    let manifest_bytes = head[BLOCK as usize..(BLOCK + h.size) as usize].to_vec();
    let signature = head[(sig_at + BLOCK) as usize..(sig_at + BLOCK + s.size) as usize].to_vec();
    let manifest = Manifest::from_slice(&manifest_bytes).map_err(rejected)?;
    let layout = BundleLayout::compute(h.size, s.size, &manifest);
    match source.total_size() {
        Some(total) if total < layout.total_size => {
            return Err(rejected(format!(
                "bundle is truncated: {total} bytes, its manifest needs {}",
                layout.total_size
            )));
        }
        Some(total) if total > layout.total_size => {
            return Err(rejected(format!(
                "bundle has {} bytes of unexpected data after its end",
                total - layout.total_size
            )));
        }
        Some(_) => {}
        None => return Err(rejected("the source did not say how large the bundle is")),
    }
    Ok(BundleHead {
        manifest_bytes,
        signature,
        layout,
    })
}

/// Checks the signature, then that the release is for this device.
pub fn verify_head(
    head: &BundleHead,
    config: &SystemConfig,
    booted: Option<&Manifest>,
    options: &InstallOptions,
) -> Result<VerifiedManifest, UpdateError> {
    let pem = crate::store::read_limited(&config.keyring, 4 * 1024 * 1024)?;
    let keyring = Keyring::from_pem(&pem).map_err(|e| UpdateError::Config {
        path: config.keyring.clone(),
        reason: format!("keyring: {e}"),
    })?;
    let verified = kernex_protocol::signature::verify_manifest(
        &keyring,
        &head.manifest_bytes,
        &head.signature,
        VerifyOptions {
            at_time: options.at_time,
        },
    )
    .map_err(rejected)?;
    if verified.compatible != config.compatible {
        return Err(UpdateError::Refused(format!(
            "bundle is for {:?}, this device is {:?}",
            verified.compatible, config.compatible
        )));
    }
    let ours =
        semver::Version::parse(UPDATER_VERSION).map_err(|e| UpdateError::Refused(e.to_string()))?;
    if verified.min_updater_version > ours {
        return Err(UpdateError::Refused(format!(
            "bundle needs updater {} or later, this is {ours}",
            verified.min_updater_version
        )));
    }
    if let Some(booted) = booted
        && verified.version < booted.version
        && !options.allow_downgrade
    {
        return Err(UpdateError::Refused(format!(
            "bundle version {} is lower than the booted {} (use --allow-downgrade)",
            verified.version, booted.version
        )));
    }
    for image in &verified.images {
        if config.slots.pair(image.slot_class).is_none() {
            return Err(UpdateError::Refused(format!(
                "bundle carries a {} image but this device has no {} slots",
                image.slot_class, image.slot_class
            )));
        }
    }
    for class in config.slots.classes() {
        if verified.image(class).is_none() {
            return Err(UpdateError::Refused(format!(
                "this device has {class} slots but the bundle has no {class} image: a bundle must update every slot of the pair it boots"
            )));
        }
    }
    Ok(verified)
}

/// The slot to install into: the one not booted. Refused when the booted
/// slot is not committed (its counter is below [`DEFAULT_ATTEMPTS`]: the
/// boot script decremented it and no `mark-good` reset it) while the
/// bootloader would still fall back to the other slot (its counter is above
/// 0): overwriting that slot would leave an unproven image with no way back.
pub fn choose_target(flow: &mut dyn BootFlow) -> Result<(Slot, Slot), UpdateError> {
    let booted = flow.booted_slot()?;
    let target = booted.other();
    let state = flow.state()?;
    let booted_left = state.attempts_left(booted);
    let other_left = state.attempts_left(target);
    if booted_left < DEFAULT_ATTEMPTS && other_left > 0 {
        return Err(UpdateError::SlotState(format!(
            "slot {booted} is booted but not committed ({} is {booted_left}, mark-good sets it to {DEFAULT_ATTEMPTS}) and slot {target} is its only fallback; run `kernex-updater mark-good` once {booted} is healthy (or `mark-bad` to go back to {target}) before installing",
            booted.left_var()
        )));
    }
    Ok((booted, target))
}

fn page_digest(page: &[u8]) -> [u8; 16] {
    let full = Sha256::digest(page);
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// Gets an image's index: the head, pages the old index already holds, the
/// rest fetched (adjacent pages in one request), all checked against the
/// verified manifest.
pub fn fetch_index(
    source: &mut dyn Source,
    spans: &ImageSpans,
    entry: &ImageEntry,
    old: Option<&[u8]>,
    report: &mut InstallReport,
) -> Result<(Vec<u8>, ChunkIndex), UpdateError> {
    let class = entry.slot_class;
    let head_bytes = source.read_range(spans.index.offset, entry.index.head_size)?;
    if Sha256Digest::of(&head_bytes) != entry.index.head_sha256 {
        return Err(rejected(format!(
            "{class} index head does not match the manifest"
        )));
    }
    let head = IndexHead::decode(&head_bytes).map_err(rejected)?;
    if head.file_size() != entry.index.size || head.head_size() != entry.index.head_size {
        return Err(rejected(format!(
            "{class} index size disagrees with the manifest"
        )));
    }
    let mut old_pages: HashMap<[u8; 16], &[u8]> = HashMap::new();
    if let Some(old) = old
        && let Ok(old_head) = IndexHead::decode(old)
    {
        for p in &old_head.pages {
            let (start, end) = (p.offset as usize, p.offset as usize + p.len as usize);
            if let Some(bytes) = old.get(start..end) {
                old_pages.insert(p.digest, bytes);
            }
        }
    }
    let mut pages: Vec<Option<Vec<u8>>> = Vec::with_capacity(head.pages.len());
    for p in &head.pages {
        let reused = old_pages
            .get(&p.digest)
            .filter(|b| b.len() == p.len as usize && page_digest(b) == p.digest)
            .map(|b| b.to_vec());
        if reused.is_some() {
            report.index_pages_reused += 1;
        }
        pages.push(reused);
    }
    let mut i = 0;
    while i < pages.len() {
        if pages[i].is_some() {
            i += 1;
            continue;
        }
        let start = i;
        let mut len = 0u64;
        while i < pages.len() && pages[i].is_none() && len < MAX_REQUEST {
            len += u64::from(head.pages[i].len);
            i += 1;
        }
        let bytes = source.read_range(spans.index.offset + head.pages[start].offset, len)?;
        let mut at = 0usize;
        for (k, slot) in pages.iter_mut().enumerate().take(i).skip(start) {
            let n = head.pages[k].len as usize;
            *slot = bytes.get(at..at + n).map(<[u8]>::to_vec);
            at += n;
            report.index_pages_fetched += 1;
        }
    }
    let mut bytes = head_bytes;
    for page in pages.into_iter().flatten() {
        bytes.extend_from_slice(&page);
    }
    if Sha256Digest::of(&bytes) != entry.index.sha256 {
        return Err(rejected(format!(
            "{class} index does not match the manifest"
        )));
    }
    let index = ChunkIndex::decode(&bytes).map_err(rejected)?;
    if index.image_size() != entry.size
        || index.archive_data_offset() != entry.archive.header_size
        || entry.archive.header_size + index.archive_data_size() != entry.archive.size
    {
        return Err(rejected(format!(
            "{class} index disagrees with the manifest's image or archive sizes"
        )));
    }
    Ok((bytes, index))
}

/// Writes chunks to the target, keeps the journal and the progress.
struct Writer<'a> {
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
struct ImageJob<'a> {
    entry: &'a ImageEntry,
    spans: ImageSpans,
    index: &'a ChunkIndex,
    seed: Option<(SeedSlot, ChunkIndex)>,
    /// A patch from the booted slot's image: its table and where its data
    /// starts in the bundle.
    patch: Option<(PatchTable, u64)>,
}

/// Fetches and checks the table of the patch from the booted slot's image
/// `base`, if the bundle carries one. A table that does not match the
/// manifest is not used (the chunks come from the archive), like a chunk
/// that does not verify: the install goes on.
fn fetch_patch_table(
    source: &mut dyn Source,
    spans: &ImageSpans,
    entry: &ImageEntry,
    base: &Sha256Digest,
    base_size: u64,
    index: &ChunkIndex,
) -> Result<Option<(PatchTable, u64)>, UpdateError> {
    let class = entry.slot_class;
    let Some((k, patch)) = entry.patch_from(base) else {
        return Ok(None);
    };
    let Some((_, span)) = spans.patches.get(k) else {
        return Err(rejected(format!("{class} patch {k} is not in the layout")));
    };
    let bytes = source.read_range(span.offset, patch.table_size)?;
    let table = match PatchTable::from_member(&bytes, patch, index) {
        Ok(t) if t.base_size == base_size => t,
        Ok(t) => {
            tracing::warn!(%class, patch_base = t.base_size, slot = base_size, "patch is for an image of another size; fetching whole chunks");
            return Ok(None);
        }
        Err(e) => {
            tracing::warn!(%class, error = %e, "patch table is invalid; fetching whole chunks");
            return Ok(None);
        }
    };
    tracing::info!(%class, from = %patch.base_version, entries = table.entries.len(), "using the patch from the booted release");
    Ok(Some((table, span.offset + patch.table_size)))
}

/// Step 3a: the chunks `todo` names that the patch covers, fetched as
/// frames (adjacent frames in one request), decoded against the seed and
/// verified. Returns the chunks still to fetch from the archive: those
/// without a frame, and those whose frame did not decode or verify.
#[allow(clippy::too_many_arguments)] // one step of clone_image
fn apply_patch(
    todo: Vec<usize>,
    table: &PatchTable,
    data_start: u64,
    seed: &SeedSlot,
    stored: &[kernex_protocol::index::StoredChunk],
    offsets: &[Vec<u64>],
    source: &mut dyn Source,
    writer: &mut Writer<'_>,
    report: &mut InstallReport,
) -> Result<Vec<usize>, UpdateError> {
    let class = writer.class;
    let mut rest = Vec::new();
    let mut patched: Vec<(usize, &kernex_protocol::patch::PatchEntry)> = Vec::new();
    for id in todo {
        match u32::try_from(id).ok().and_then(|n| table.entry(n)) {
            Some(e) => patched.push((id, e)),
            None => rest.push(id),
        }
    }
    let fetched_at_start = source.fetched_bytes();
    let mut i = 0;
    while i < patched.len() {
        let first = patched[i].1;
        let mut end = first.data_offset + u64::from(first.data_len);
        let mut group = vec![patched[i]];
        i += 1;
        while i < patched.len() {
            let e = patched[i].1;
            if e.data_offset != end || end + u64::from(e.data_len) - first.data_offset > MAX_REQUEST
            {
                break;
            }
            end += u64::from(e.data_len);
            group.push(patched[i]);
            i += 1;
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut next = 0usize;
        source.fetch(
            data_start + first.data_offset,
            end - first.data_offset,
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
        let fetched = source.fetched_bytes() - fetched_at_start;
        writer.commit(Some(fetched))?;
        writer.pending.downloaded_bytes = writer.fetched_before + fetched;
    }
    // The archive fetch adds its own bytes to what this step fetched.
    writer.fetched_before = writer.pending.downloaded_bytes;
    rest.sort_unstable();
    Ok(rest)
}

#[allow(clippy::too_many_arguments)] // one image's whole clone, called once
fn clone_image(
    job: ImageJob<'_>,
    source: &mut dyn Source,
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
        let mut seed_at: HashMap<ChunkHash, u64> = HashMap::new();
        for (at, _, c) in seed_index.image_chunks() {
            seed_at.entry(c.hash).or_insert(at);
        }
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
    let fetched_before = writer.fetched_before;
    // 3b. The rest from the archive, adjacent chunks in one request.
    let data_start = job.spans.archive.offset + index.archive_data_offset();
    let fetched_at_start = source.fetched_bytes();
    // Failed downloads per stored chunk; a chunk that does not verify is
    // fetched again (with the rest of its request) after a backoff.
    let mut failures: HashMap<usize, u32> = HashMap::new();
    let mut i = 0;
    while i < todo.len() {
        let group_start = i;
        let first = todo[i];
        let mut group = vec![first];
        let mut end = stored[first].archive_offset + u64::from(stored[first].archive_size);
        i += 1;
        while i < todo.len() {
            let c = &stored[todo[i]];
            if c.archive_offset != end
                || end + u64::from(c.archive_size) - stored[first].archive_offset > MAX_REQUEST
            {
                break;
            }
            end += u64::from(c.archive_size);
            group.push(todo[i]);
            i += 1;
        }
        let start = stored[first].archive_offset;
        let mut buf: Vec<u8> = Vec::new();
        let mut next = 0usize;
        let mut corrupt: Option<usize> = None;
        let result = source.fetch(
            data_start + start,
            end - start,
            &mut |mut bytes: &[u8]| {
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
            },
        );
        if let Err(e) = result {
            let fetched = source.fetched_bytes() - fetched_at_start;
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
            report.chunks_refetched += 1;
            std::thread::sleep(delay);
            i = group_start + bad;
            writer.pending.downloaded_bytes = fetched_before + fetched;
            continue;
        }
        let fetched = source.fetched_bytes() - fetched_at_start;
        writer.commit(Some(fetched))?;
        writer.pending.downloaded_bytes = fetched_before + fetched;
    }
    Ok(())
}

/// Installs the bundle at `source` into the inactive slot.
pub fn install(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    source: &mut dyn Source,
    options: &InstallOptions,
) -> Result<InstallReport, UpdateError> {
    install_with_progress(config, flow, source, options, &|_| {})
}

/// [`install`], calling `progress` each time the install's progress is
/// saved: after every synced batch of chunks, on the install's own thread.
/// The same progress also lands in the data dir's pending install record
/// (`kernex-updater status`).
pub fn install_with_progress(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    source: &mut dyn Source,
    options: &InstallOptions,
    progress: &ProgressFn<'_>,
) -> Result<InstallReport, UpdateError> {
    let data = DataDir::new(&config.data_dir);
    let result = run(config, flow, source, options, &data, progress);
    let (outcome, reason, version, target) = match &result {
        Ok(r) => (
            crate::store::Outcome::Installed,
            format!(
                "{} installed into slot {}; boots next (fetched {} bytes)",
                r.version,
                r.target.map(|s| s.name()).unwrap_or("?"),
                r.bytes_fetched
            ),
            Some(r.version.clone()),
            r.target,
        ),
        Err(e) => {
            let pending = data.pending().ok().flatten();
            (
                crate::store::Outcome::Failed,
                e.to_string(),
                pending.as_ref().map(|p| p.version.clone()),
                pending.map(|p| p.target),
            )
        }
    };
    data.set_last_install(&crate::store::LastInstall {
        outcome,
        reason,
        version,
        target,
        at: crate::store::now(),
    })?;
    result
}

fn run(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    source: &mut dyn Source,
    options: &InstallOptions,
    data: &DataDir,
    progress: &ProgressFn<'_>,
) -> Result<InstallReport, UpdateError> {
    let (booted, target) = choose_target(flow)?;
    let booted_record = data.slot_record(booted)?;
    let booted_manifest = match &booted_record {
        Some(r) => Some(r.manifest()?),
        None => None,
    };
    let head = read_head(source)?;
    let verified = verify_head(&head, config, booted_manifest.as_ref(), options)?;
    let manifest_sha256 = Sha256Digest::of(verified.bytes());
    let mut report = InstallReport {
        version: verified.version.to_string(),
        target: Some(target),
        ..InstallReport::default()
    };
    let total_bytes: u64 = verified.images.iter().map(|i| i.size).sum();

    // The target may already hold exactly this release (an earlier run
    // stopped between recording it and writing the boot env).
    if let Some(record) = data.slot_record(target)?
        && record.verified
        && record.manifest_digest() == manifest_sha256
    {
        verify_slots(config, &verified, target)?;
        flow.set_try_next(target, TRY_ATTEMPTS)?;
        data.clear_pending()?;
        report.already_installed = true;
        report.bytes_fetched = source.fetched_bytes();
        report.requests = source.requests();
        return Ok(report);
    }

    // From here on the target is written: forget what it held, and make
    // sure the bootloader cannot boot it half-written.
    let mut pending = match data.pending()? {
        Some(p) if p.manifest_sha256 == manifest_sha256 && p.target == target => PendingInstall {
            source: source.name().to_owned(),
            done_bytes: 0,
            ..p
        },
        _ => PendingInstall {
            source: source.name().to_owned(),
            version: verified.version.to_string(),
            manifest_sha256,
            target,
            total_bytes,
            done_bytes: 0,
            downloaded_bytes: 0,
            started_at: crate::store::now(),
        },
    };
    data.set_pending(&pending)?;
    progress(InstallProgress::of(&pending));
    data.clear_slot(target)?;
    let state = flow.state()?;
    if state.attempts_left(target) > 0 || state.order.first() == Some(&target) {
        flow.mark_bad(target)?;
    }
    let (mut journal, done) = Journal::open(&data.journal_path(), &manifest_sha256, target)?;

    let mut indexes: Vec<(SlotClass, Vec<u8>)> = Vec::new();
    for entry in &verified.images {
        let class = entry.slot_class;
        let spans = head
            .layout
            .image(class)
            .cloned()
            .ok_or_else(|| rejected(format!("no {class} members in the layout")))?;
        let pair = config
            .slots
            .pair(class)
            .ok_or_else(|| UpdateError::Refused(format!("no {class} slots")))?;
        let old = data.slot_index(booted, class)?;
        let (index_bytes, index) = fetch_index(
            source,
            &spans,
            entry,
            old.as_ref().map(|(b, _)| b.as_slice()),
            &mut report,
        )?;
        let base_image = booted_manifest
            .as_ref()
            .and_then(|m| m.image(class))
            .map(|e| (e.sha256, e.size));
        let seed = match old {
            Some((_, old_index)) if old_index.hash_len() == index.hash_len() => {
                match SeedSlot::open(pair.path(booted)) {
                    Ok(s) => Some((s, old_index)),
                    Err(e) => {
                        tracing::warn!(error = %e, "booted slot cannot be read; not used as a seed");
                        None
                    }
                }
            }
            _ => None,
        };
        let patch = match (&seed, base_image) {
            (Some(_), Some((base, base_size))) => {
                fetch_patch_table(source, &spans, entry, &base, base_size, &index)?
            }
            _ => None,
        };
        let slot = TargetSlot::open(pair.path(target), entry.size)?;
        clone_image(
            ImageJob {
                entry,
                spans,
                index: &index,
                seed,
                patch,
            },
            source,
            &slot,
            &mut journal,
            &done,
            data,
            &mut pending,
            &mut report,
            progress,
        )?;
        slot.sync()?;
        indexes.push((class, index_bytes));
    }
    progress(InstallProgress::of(&pending));
    // Every chunk written, synced and journaled; the final SHA-256 check of
    // the slot is next (hw-tests cuts the power here).
    #[cfg(debug_assertions)]
    pause_at("verify");
    if let Err(e) = verify_slots(config, &verified, target) {
        // The journal vouched for chunks the slot does not hold: start over.
        crate::store::remove(&data.journal_path())?;
        return Err(e);
    }
    let record = SlotRecord {
        manifest: String::from_utf8(verified.bytes().to_vec())
            .map_err(|_| rejected("manifest is not UTF-8"))?,
        signature: hex::encode(&head.signature),
        verified: true,
        installed_at: crate::store::now(),
    };
    let refs: Vec<(SlotClass, &[u8])> = indexes.iter().map(|(c, b)| (*c, b.as_slice())).collect();
    data.write_slot(target, &record, &refs)?;
    #[cfg(debug_assertions)]
    pause_at("slot-record");
    flow.set_try_next(target, TRY_ATTEMPTS)?;
    #[cfg(debug_assertions)]
    pause_at("env-write");
    data.clear_pending()?;
    report.bytes_fetched = source.fetched_bytes();
    report.requests = source.requests();
    Ok(report)
}

/// Debug builds only (never compiled into a release): whether
/// `KERNEX_TEST_PAUSE_AT` names this `step` (`step` for its first
/// occurrence, `step:N` for its N-th), so a power-cut test can stop the
/// process exactly there with [`stop_self`] and SIGKILL it.
#[cfg(debug_assertions)]
pub(crate) fn pause_requested(step: &str) -> bool {
    use std::sync::atomic::{AtomicU32, Ordering};
    static HITS: AtomicU32 = AtomicU32::new(0);
    let Ok(want) = std::env::var("KERNEX_TEST_PAUSE_AT") else {
        return false;
    };
    let (name, nth) = match want.split_once(':') {
        Some((name, n)) => (name, n.parse().unwrap_or(1)),
        None => (want.as_str(), 1),
    };
    name == step && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth
}

/// Debug builds only: stops this process (SIGSTOP, through `kill`, as the
/// crate has no unsafe code); carries on if it is continued instead.
#[cfg(debug_assertions)]
pub(crate) fn stop_self() {
    tracing::warn!("KERNEX_TEST_PAUSE_AT: stopping");
    let pid = std::process::id().to_string();
    if let Err(e) = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
    {
        tracing::warn!("unable to stop: {e}");
    }
}

/// Debug builds only: [`stop_self`] when `step` is the one requested.
#[cfg(debug_assertions)]
fn pause_at(step: &str) {
    if pause_requested(step) {
        stop_self();
    }
}

/// Re-reads every image of `target` and checks size and SHA-256.
fn verify_slots(
    config: &SystemConfig,
    verified: &VerifiedManifest,
    target: Slot,
) -> Result<(), UpdateError> {
    verify_images(config, &verified.images, target)
}

/// Re-reads each of `images` from its slot `target` and checks size and
/// SHA-256 against the entry.
pub fn verify_images(
    config: &SystemConfig,
    images: &[kernex_protocol::manifest::ImageEntry],
    target: Slot,
) -> Result<(), UpdateError> {
    for entry in images {
        let pair = config
            .slots
            .pair(entry.slot_class)
            .ok_or_else(|| UpdateError::Refused(format!("no {} slots", entry.slot_class)))?;
        let path: &Path = pair.path(target);
        let found = crate::slot::digest(path, entry.size, entry.slot_class)?;
        if found != entry.sha256 {
            return Err(UpdateError::SlotVerify {
                slot: target,
                class: entry.slot_class,
                expected: entry.sha256.to_hex(),
                found: found.to_hex(),
                size: entry.size,
            });
        }
    }
    Ok(())
}
