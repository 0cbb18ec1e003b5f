//! The final check of a written slot, run while the slot is written: a
//! thread reads the slot back in image order, each chunk as soon as it has
//! been written (or found in the slot by the journal), and hashes it with
//! SHA-256. The install compares the digest with the manifest's after the
//! slot was synced, before the boot flip: the same check as re-reading the
//! whole slot afterwards (the bytes hashed are the slot's, read after their
//! last write of this run), without a second pass over the image.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use kernex_protocol::index::ChunkIndex;
use kernex_protocol::{Sha256Digest, SlotClass};
use sha2::{Digest, Sha256};

use crate::error::UpdateError;
use crate::slot::TargetSlot;

/// Which stored chunks are in the slot, shared by the writers and the
/// reader.
#[derive(Debug)]
pub(super) struct Landed {
    chunks: Vec<AtomicBool>,
    /// Set when the clone ends, done or failed: the reader stops waiting.
    ended: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Landed {
    pub fn new(stored: usize) -> Self {
        Self {
            chunks: (0..stored).map(|_| AtomicBool::new(false)).collect(),
            ended: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Stored chunk `id` is written at every image offset where it occurs.
    pub fn mark(&self, id: usize) {
        if let Some(c) = self.chunks.get(id) {
            c.store(true, Ordering::Release);
        }
        self.wake.notify_all();
    }

    /// The clone ended (the reader hashes what is there and stops).
    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.wake.notify_all();
    }

    /// Waits until chunk `id` landed; false if the clone ended without it.
    fn wait(&self, id: usize) -> bool {
        let Some(c) = self.chunks.get(id) else {
            return false;
        };
        loop {
            if c.load(Ordering::Acquire) {
                return true;
            }
            if self.ended.load(Ordering::Acquire) {
                return c.load(Ordering::Acquire);
            }
            let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            // A short timeout: a mark between the checks and the wait is
            // seen at the next turn.
            let _ = self
                .wake
                .wait_timeout(guard, Duration::from_millis(5))
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Reads the image of `index` back from `slot` as its chunks land and
/// returns its SHA-256; None if the clone ended before every chunk landed.
pub(super) fn read_back(
    slot: &TargetSlot,
    index: &ChunkIndex,
    landed: &Landed,
    class: SlotClass,
) -> Result<Option<Sha256Digest>, UpdateError> {
    let mut hasher = Sha256::new();
    let mut buf = Vec::new();
    let mut at_end = 0u64;
    for (at, id, chunk) in index.image_chunks() {
        if !landed.wait(id) {
            return Ok(None);
        }
        buf.resize(chunk.source_size as usize, 0);
        slot.read_exact_at(&mut buf, at)?;
        hasher.update(&buf);
        at_end = at + u64::from(chunk.source_size);
    }
    if at_end != index.image_size() {
        return Err(UpdateError::Chunk {
            class,
            offset: at_end,
            reason: format!(
                "the index's chunks end at {at_end}, the image is {} bytes",
                index.image_size()
            ),
        });
    }
    Ok(Some(Sha256Digest::from_hasher(hasher)))
}
