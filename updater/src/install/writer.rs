//! Writing verified chunks from several threads, and the install's save
//! points.
//!
//! Workers ([`Writer::put`]) write a verified chunk at its image offsets
//! with `pwrite` (no lock) and queue its journal record; every
//! [`JOURNAL_BATCH_CHUNKS`] chunks or [`JOURNAL_BATCH_BYTES`] fetched
//! bytes, the queued records are appended to the journal with a plain
//! `write`. That is the save point: it survives the process being killed,
//! so a kill loses at most one batch plus what the workers hold.
//!
//! Nothing a worker does waits for the disk. The install's own thread
//! ([`Saver`]) shows progress, saves the pending install record every
//! [`STATE_EVERY`], and makes the save points durable every
//! [`CHECKPOINT_EVERY`] (sync the slot, then the journal) while the workers
//! go on: a power cut loses at most that much work, and the slot's data
//! streams to the disk during the clone instead of all at its end. The slot
//! and the journal are synced once more before the slot's final check
//! (`install::run`), and the boot flip comes only after that check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kernex_protocol::SlotClass;
use kernex_protocol::archive::VerifiedChunk;

use super::readback::Landed;
use super::{InstallProgress, InstallReport, ProgressFn};
use crate::error::UpdateError;
use crate::journal::{Journal, JournalSync};
use crate::slot::TargetSlot;
use crate::store::{DataDir, PendingInstall};

/// Chunks whose journal records are appended together.
pub const JOURNAL_BATCH_CHUNKS: usize = 16;
/// Fetched bytes whose chunks' journal records are appended together: a
/// kill re-fetches at most this much plus a chunk per worker.
pub const JOURNAL_BATCH_BYTES: u64 = 128 * 1024;
/// How often the progress callback runs.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// How often the pending install record (done and downloaded bytes) is
/// saved.
pub const STATE_EVERY: Duration = Duration::from_secs(2);
/// How often the slot and the journal are made durable while the clone
/// runs (on the install's own thread, the workers going on): what a power
/// cut may cost, and how much data the final sync may find unwritten.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// What the workers of one image's clone change together.
pub(super) struct Shared<'a> {
    journal: &'a mut Journal,
    pub pending: &'a mut PendingInstall,
    pub report: &'a mut InstallReport,
    /// Fetched bytes behind the queued journal records.
    queued_bytes: u64,
}

/// Writes verified chunks into the target from any thread.
pub(super) struct Writer<'a> {
    pub class: SlotClass,
    target: &'a TargetSlot,
    landed: &'a Landed,
    shared: Mutex<Shared<'a>>,
    /// Set when a worker failed: the others stop at their next chunk.
    stop: AtomicBool,
    first_error: Mutex<Option<UpdateError>>,
}

impl<'a> Writer<'a> {
    pub fn new(
        class: SlotClass,
        target: &'a TargetSlot,
        landed: &'a Landed,
        journal: &'a mut Journal,
        pending: &'a mut PendingInstall,
        report: &'a mut InstallReport,
    ) -> Self {
        Self {
            class,
            target,
            landed,
            shared: Mutex::new(Shared {
                journal,
                pending,
                report,
                queued_bytes: 0,
            }),
            stop: AtomicBool::new(false),
            first_error: Mutex::new(None),
        }
    }

    /// The state the workers share.
    pub fn shared(&self) -> MutexGuard<'_, Shared<'a>> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes a verified chunk at each of `offsets` and queues its journal
    /// record; `fetched` is what fetching it cost (0 for a seed copy).
    /// `count` adds to the report's counts.
    pub fn put(
        &self,
        id: usize,
        chunk: &VerifiedChunk,
        offsets: &[u64],
        fetched: u64,
        count: impl FnOnce(&mut InstallReport),
    ) -> Result<(), UpdateError> {
        self.target.write(chunk, offsets)?;
        self.landed.mark(id);
        let bytes = chunk.data().len() as u64 * offsets.len() as u64;
        let mut s = self.shared();
        s.pending.done_bytes += bytes;
        s.queued_bytes += fetched;
        count(&mut *s.report);
        s.journal.push((self.class, id as u32));
        if s.journal.queued() >= JOURNAL_BATCH_CHUNKS || s.queued_bytes >= JOURNAL_BATCH_BYTES {
            s.journal.append()?;
            s.queued_bytes = 0;
        }
        Ok(())
    }

    /// Appends every queued journal record.
    pub fn flush(&self) -> Result<(), UpdateError> {
        let mut s = self.shared();
        s.queued_bytes = 0;
        s.journal.append()
    }

    /// Whether a worker failed and the others should stop.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Stops the workers at their next chunk.
    pub fn halt(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Records a worker's failure (the first one is the install's error)
    /// and stops the others.
    pub fn fail(&self, e: UpdateError) {
        self.stop.store(true, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(e);
        }
    }

    /// The first failure, if any.
    pub fn take_error(&self) -> Option<UpdateError> {
        self.first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// The install's own thread while workers clone: progress, the pending
/// install record, and checkpoints ([module docs](self)).
pub(super) struct Saver<'a> {
    pub data: &'a DataDir,
    pub progress: &'a ProgressFn<'a>,
    /// Flushes the journal from this thread.
    pub journal: JournalSync,
    /// `pending.downloaded_bytes` and the source's byte count when the
    /// clone started: downloaded = before + (count now − count then).
    pub downloaded_before: u64,
    pub fetched_at_start: u64,
    last_progress: Instant,
    last_state: Instant,
    last_checkpoint: Instant,
}

impl<'a> Saver<'a> {
    pub fn new(
        data: &'a DataDir,
        progress: &'a ProgressFn<'a>,
        journal: JournalSync,
        downloaded_before: u64,
        fetched_at_start: u64,
    ) -> Self {
        let now = Instant::now();
        Self {
            data,
            progress,
            journal,
            downloaded_before,
            fetched_at_start,
            last_progress: now,
            last_state: now,
            last_checkpoint: now,
        }
    }

    /// The pending install as it stands, with `fetched` the source's
    /// byte count now.
    fn snapshot(&self, writer: &Writer<'_>, fetched: u64) -> PendingInstall {
        let mut s = writer.shared();
        s.pending.downloaded_bytes =
            self.downloaded_before + fetched.saturating_sub(self.fetched_at_start);
        s.pending.clone()
    }

    /// Runs what is due: progress, the pending record, a checkpoint.
    fn tick(&mut self, writer: &Writer<'_>, fetched: u64) -> Result<(), UpdateError> {
        let now = Instant::now();
        if now - self.last_progress >= PROGRESS_EVERY {
            self.last_progress = now;
            (self.progress)(InstallProgress::of(&self.snapshot(writer, fetched)));
        }
        if now - self.last_checkpoint >= CHECKPOINT_EVERY {
            self.last_checkpoint = now;
            // Records appended before the slot sync have their data on
            // the device once both syncs return.
            writer.flush()?;
            writer.target.sync()?;
            self.journal.sync()?;
        }
        if now - self.last_state >= STATE_EVERY {
            self.last_state = now;
            self.data.set_pending(&self.snapshot(writer, fetched))?;
        }
        Ok(())
    }

    /// Saves the pending record and reports progress now (the end of a
    /// step).
    pub fn save(&mut self, writer: &Writer<'_>, fetched: u64) -> Result<(), UpdateError> {
        writer.flush()?;
        let snapshot = self.snapshot(writer, fetched);
        self.data.set_pending(&snapshot)?;
        self.last_state = Instant::now();
        (self.progress)(InstallProgress::of(&snapshot));
        Ok(())
    }
}

/// Runs `work` on every task with `workers` threads, each pulling the next
/// task, while this thread runs the [`Saver`]; `fetched` reads the
/// source's byte count. Stops at the first failure (after the workers'
/// current chunks) and returns it, with every chunk written so far
/// journaled.
pub(super) fn run_pool<T, W, F>(
    workers: usize,
    tasks: &[T],
    writer: &Writer<'_>,
    saver: &mut Saver<'_>,
    fetched: &dyn Fn() -> u64,
    make_worker: &(dyn Fn() -> Result<W, UpdateError> + Sync),
    work: &F,
) -> Result<(), UpdateError>
where
    T: Sync,
    F: Fn(&mut W, &T) -> Result<(), UpdateError> + Sync,
{
    if tasks.is_empty() {
        return Ok(());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = workers.clamp(1, tasks.len());
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut tick_result = Ok(());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let next = &next;
            scope.spawn(move || {
                let result = make_worker().and_then(|mut w| {
                    loop {
                        if writer.stopped() {
                            return Ok(());
                        }
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(task) = tasks.get(k) else {
                            return Ok(());
                        };
                        work(&mut w, task)?;
                    }
                });
                if let Err(e) = result {
                    writer.fail(e);
                }
                let _ = done_tx.send(());
            });
        }
        drop(done_tx);
        let mut running = workers;
        while running > 0 {
            match done_rx.recv_timeout(PROGRESS_EVERY / 2) {
                Ok(()) => running -= 1,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if tick_result.is_ok()
                && let Err(e) = saver.tick(writer, fetched())
            {
                writer.halt();
                tick_result = Err(e);
            }
        }
    });
    tick_result?;
    match writer.take_error() {
        Some(e) => {
            // What was done stays done: journaled, and in the pending
            // record for `status`.
            saver.save(writer, fetched())?;
            Err(e)
        }
        None => writer.flush(),
    }
}
