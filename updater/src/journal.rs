//! The install journal: which verified chunks are already in the target slot.
//!
//! ```text
//! header (64 bytes): magic "KXJRNL01", SHA-256 of the manifest being
//!                    installed (32), target slot ('A' or 'B'), zero padding
//! records (8 bytes): slot class (0 rootfs, 1 agent), 3 zero bytes,
//!                    stored chunk id (u32 little-endian)
//! ```
//!
//! A chunk id is appended only after the chunk's data was written at every
//! image offset where it occurs; records are appended in small batches
//! with a plain `write` (no sync), so they survive the process being killed
//! (the page cache is the kernel's) and cost no flush. Only a checkpoint
//! ([`Journal::sync`], after the slot was synced) makes them survive a
//! power cut. Each stored chunk is recorded at most once, so the journal
//! never grows beyond `64 + 8 × stored chunks` bytes. A torn last record is
//! ignored, and so is a journal for another manifest or slot.
//!
//! The journal is a hint, not a proof: a resumed install re-reads and
//! re-hashes every journaled chunk from the slot before it skips it. So a
//! record whose data a power cut lost (the record reached the disk, the
//! data did not), or a record of garbage, costs only that chunk's fetch,
//! never a wrong image; and the slot's SHA-256 is checked whole before the
//! boot flip in any case.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use kernex_bootloader::Slot;
use kernex_protocol::{Sha256Digest, SlotClass};

use crate::error::{UpdateError, io_err};

/// Journal magic.
pub const JOURNAL_MAGIC: &[u8; 8] = b"KXJRNL01";
/// Header size.
pub const JOURNAL_HEADER: usize = 64;
/// Record size.
pub const JOURNAL_RECORD: usize = 8;

/// One journaled chunk: (image class, stored chunk id).
pub type ChunkKey = (SlotClass, u32);

fn class_code(class: SlotClass) -> u8 {
    match class {
        SlotClass::Rootfs => 0,
        SlotClass::Agent => 1,
    }
}

fn header(manifest: &Sha256Digest, target: Slot) -> [u8; JOURNAL_HEADER] {
    let mut h = [0u8; JOURNAL_HEADER];
    h[..8].copy_from_slice(JOURNAL_MAGIC);
    h[8..40].copy_from_slice(&manifest.0);
    h[40] = target.name().as_bytes()[0];
    h
}

/// Reads the chunks a journal records for `manifest` into `target`; empty
/// if the journal is missing or belongs to another install.
pub fn read(
    path: &Path,
    manifest: &Sha256Digest,
    target: Slot,
) -> Result<HashSet<ChunkKey>, UpdateError> {
    let mut out = HashSet::new();
    if !path.exists() {
        return Ok(out);
    }
    let limit = JOURNAL_HEADER as u64 + JOURNAL_RECORD as u64 * (2 << 28);
    let bytes = crate::store::read_limited(path, limit)?;
    if bytes.len() < JOURNAL_HEADER || bytes[..JOURNAL_HEADER] != header(manifest, target) {
        return Ok(out);
    }
    for rec in bytes[JOURNAL_HEADER..].chunks_exact(JOURNAL_RECORD) {
        let class = match rec[0] {
            0 => SlotClass::Rootfs,
            1 => SlotClass::Agent,
            _ => continue,
        };
        if rec[1..4] != [0, 0, 0] {
            continue;
        }
        let id = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
        out.insert((class, id));
    }
    Ok(out)
}

/// An open journal, appended to in batches.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: fs::File,
    pending: Vec<u8>,
}

impl Journal {
    /// Opens the journal for `manifest` into `target`, keeping its records
    /// if it belongs to the same install and starting it afresh otherwise.
    pub fn open(
        path: &Path,
        manifest: &Sha256Digest,
        target: Slot,
    ) -> Result<(Self, HashSet<ChunkKey>), UpdateError> {
        let done = read(path, manifest, target)?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let fresh = done.is_empty();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err("open", path))?;
        if fresh {
            file.set_len(0).map_err(io_err("truncate", path))?;
            file.write_all(&header(manifest, target))
                .map_err(io_err("write", path))?;
            file.sync_all().map_err(io_err("sync", path))?;
            if let Some(dir) = path.parent() {
                crate::store::sync_dir(dir);
            }
        } else {
            // Drop a torn last record so new records stay aligned.
            let len = file.metadata().map_err(io_err("stat", path))?.len();
            let aligned = JOURNAL_HEADER as u64
                + (len - JOURNAL_HEADER as u64) / JOURNAL_RECORD as u64 * JOURNAL_RECORD as u64;
            if aligned != len {
                file.set_len(aligned).map_err(io_err("truncate", path))?;
            }
        }
        Ok((
            Journal {
                path: path.to_owned(),
                file,
                pending: Vec::new(),
            },
            done,
        ))
    }

    /// Queues a chunk whose data is written (not yet synced).
    pub fn push(&mut self, key: ChunkKey) {
        self.pending.push(class_code(key.0));
        self.pending.extend_from_slice(&[0, 0, 0]);
        self.pending.extend_from_slice(&key.1.to_le_bytes());
    }

    /// Queued records.
    pub fn queued(&self) -> usize {
        self.pending.len() / JOURNAL_RECORD
    }

    /// Appends the queued records with a plain write: they survive a kill
    /// of the process, not (yet) a power cut ([`Journal::sync`]). Call only
    /// after their chunks' data was written to the slot.
    pub fn append(&mut self) -> Result<(), UpdateError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        crate::failpoints::failpoint!(pause "journal-write" => {
            // A power cut mid-write: half the records and a torn one.
            let before = self
                .file
                .metadata()
                .map_err(io_err("stat", &self.path))?
                .len();
            let torn = self.queued() / 2 * JOURNAL_RECORD + 3;
            self.file
                .write_all(&self.pending[..torn.min(self.pending.len())])
                .map_err(io_err("write", &self.path))?;
            self.file.sync_data().map_err(io_err("sync", &self.path))?;
            crate::failpoints::stop_self();
            // Continued, not killed: undo the torn write.
            self.file
                .set_len(before)
                .map_err(io_err("truncate", &self.path))?;
        });
        self.file
            .write_all(&self.pending)
            .map_err(io_err("write", &self.path))?;
        self.pending.clear();
        Ok(())
    }

    /// Appends the queued records and flushes the journal to the device.
    /// Call only after the slot holding their data was synced.
    pub fn sync(&mut self) -> Result<(), UpdateError> {
        self.append()?;
        self.file.sync_data().map_err(io_err("sync", &self.path))
    }

    /// A handle to flush appended records with ([`JournalSync`]) from
    /// another thread while this one appends.
    pub fn syncer(&self) -> Result<JournalSync, UpdateError> {
        Ok(JournalSync {
            file: self.file.try_clone().map_err(io_err("open", &self.path))?,
            path: self.path.clone(),
        })
    }
}

/// Flushes a [`Journal`]'s appended records to the device.
#[derive(Debug)]
pub struct JournalSync {
    file: fs::File,
    path: PathBuf,
}

impl JournalSync {
    /// Flushes every record appended so far. Call only after the slot
    /// holding their data was synced.
    pub fn sync(&self) -> Result<(), UpdateError> {
        self.file.sync_data().map_err(io_err("sync", &self.path))
    }
}
