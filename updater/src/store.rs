//! The data directory: small records written atomically. Its file names
//! are [`kernex_device::layout`]'s:
//!
//! ```text
//! <data-dir>/slot-A/record.json     what slot A holds (manifest, signature, image digests)
//! <data-dir>/slot-A/rootfs.kxi      that release's chunk index (agent.kxi likewise)
//! <data-dir>/install/state.json     the install in progress: target, bundle, progress
//! <data-dir>/install/journal        verified chunks written to the target (see `journal`)
//! <data-dir>/last-install.json      the last install's outcome and reason
//! <data-dir>/budget.json            bytes downloaded today (UTC), for metered links
//! ```
//!
//! A slot's record is removed before anything is written to the slot and
//! written again only after the slot verified, so a record always describes
//! what the slot really holds.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kernex_bootloader::Slot;
use kernex_device::layout;
use kernex_protocol::index::ChunkIndex;
use kernex_protocol::{Sha256Digest, SlotClass};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{UpdateError, io_err};

/// Largest JSON record read.
pub const MAX_RECORD_SIZE: u64 = 1024 * 1024;

/// Reads at most `limit` bytes of `path`; more is an error.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, UpdateError> {
    let file = fs::File::open(path).map_err(io_err("open", path))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    if bytes.len() as u64 > limit {
        return Err(UpdateError::State {
            path: path.to_owned(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(bytes)
}

/// Syncs a directory so a rename or unlink in it is durable.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to a new file beside `path`, syncs it and renames it over
/// `path`: a crash leaves the old or the new file, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".new");
    let tmp = path.with_file_name(name);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("sync", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err("replace", path))?;
    sync_dir(dir);
    Ok(())
}

/// Removes a file if it exists, durably.
pub fn remove(path: &Path) -> Result<(), UpdateError> {
    match fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                sync_dir(dir);
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, UpdateError> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read_limited(path, MAX_RECORD_SIZE)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| UpdateError::State {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), UpdateError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| UpdateError::State {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    write_atomically(path, &bytes)
}

/// What a slot holds, as recorded after it was written and verified
/// (`kernex-device`'s format: the image builder writes it too).
pub use kernex_device::SlotRecord;

/// The install in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PendingInstall {
    /// Where the bundle comes from.
    pub source: String,
    /// Release version.
    pub version: String,
    /// SHA-256 of the manifest bytes.
    pub manifest_sha256: Sha256Digest,
    /// The slot being written.
    pub target: Slot,
    /// Image bytes in the bundle (all classes).
    pub total_bytes: u64,
    /// Image bytes written and verified so far.
    pub done_bytes: u64,
    /// Bytes downloaded by this install so far (all runs).
    pub downloaded_bytes: u64,
    /// Unix time the install started.
    pub started_at: u64,
}

/// How an install ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Written, verified, and set to boot next.
    Installed,
    /// Stopped with an error (resumable unless the bundle was rejected).
    Failed,
}

/// The last install's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LastInstall {
    /// Outcome.
    pub outcome: Outcome,
    /// The error chain, or a short summary.
    pub reason: String,
    /// Release version, if the manifest was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Target slot, if one was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Slot>,
    /// Unix time.
    pub at: u64,
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Over `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn record_path(&self, slot: Slot) -> PathBuf {
        self.root.join(layout::slot_record(slot))
    }

    fn index_path(&self, slot: Slot, class: SlotClass) -> PathBuf {
        self.root.join(layout::slot_index(slot, class))
    }

    /// The install directory.
    pub fn install_dir(&self) -> PathBuf {
        self.root.join(layout::INSTALL_DIR)
    }

    /// The journal of the install in progress.
    pub fn journal_path(&self) -> PathBuf {
        self.root.join(layout::JOURNAL)
    }

    /// The budget counter.
    pub fn budget_path(&self) -> PathBuf {
        self.root.join(layout::BUDGET)
    }

    /// What `slot` holds, if recorded.
    pub fn slot_record(&self, slot: Slot) -> Result<Option<SlotRecord>, UpdateError> {
        read_json(&self.record_path(slot))
    }

    /// The recorded chunk index of `class` in `slot`, checked against the
    /// recorded manifest's digest. `None` if there is no record, no index,
    /// or the index does not match (it is then not used as a seed).
    pub fn slot_index(
        &self,
        slot: Slot,
        class: SlotClass,
    ) -> Result<Option<(Vec<u8>, ChunkIndex)>, UpdateError> {
        let Some(record) = self.slot_record(slot)? else {
            return Ok(None);
        };
        let manifest = record.manifest()?;
        let Some(entry) = manifest.image(class) else {
            return Ok(None);
        };
        let path = self.index_path(slot, class);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = read_limited(&path, kernex_protocol::limits::MAX_INDEX_SIZE)?;
        if Sha256Digest::of(&bytes) != entry.index.sha256 {
            tracing::warn!(path = %path.display(), "recorded index does not match its manifest; not used");
            return Ok(None);
        }
        match ChunkIndex::decode(&bytes) {
            Ok(index) => Ok(Some((bytes, index))),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "recorded index does not decode; not used");
                Ok(None)
            }
        }
    }

    /// Forgets what `slot` holds: done before the slot is written.
    pub fn clear_slot(&self, slot: Slot) -> Result<(), UpdateError> {
        remove(&self.record_path(slot))
    }

    /// Records what `slot` holds: indexes first, the record last.
    pub fn write_slot(
        &self,
        slot: Slot,
        record: &SlotRecord,
        indexes: &[(SlotClass, &[u8])],
    ) -> Result<(), UpdateError> {
        self.clear_slot(slot)?;
        for (class, bytes) in indexes {
            write_atomically(&self.index_path(slot, *class), bytes)?;
        }
        write_json(&self.record_path(slot), record)
    }

    /// The install in progress.
    pub fn pending(&self) -> Result<Option<PendingInstall>, UpdateError> {
        read_json(&self.root.join(layout::INSTALL_STATE))
    }

    /// Saves the install in progress.
    pub fn set_pending(&self, pending: &PendingInstall) -> Result<(), UpdateError> {
        write_json(&self.root.join(layout::INSTALL_STATE), pending)
    }

    /// Drops the install in progress and its journal.
    pub fn clear_pending(&self) -> Result<(), UpdateError> {
        remove(&self.journal_path())?;
        remove(&self.root.join(layout::INSTALL_STATE))
    }

    /// The last install's outcome.
    pub fn last_install(&self) -> Result<Option<LastInstall>, UpdateError> {
        read_json(&self.root.join(layout::LAST_INSTALL))
    }

    /// Records the last install's outcome.
    pub fn set_last_install(&self, last: &LastInstall) -> Result<(), UpdateError> {
        write_json(&self.root.join(layout::LAST_INSTALL), last)
    }

    /// Reads a JSON state file of the data dir.
    pub(crate) fn read<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, UpdateError> {
        read_json(path)
    }

    /// Writes a JSON state file of the data dir.
    pub(crate) fn write<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), UpdateError> {
        write_json(path, value)
    }
}
