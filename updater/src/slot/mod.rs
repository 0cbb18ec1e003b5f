//! Slot devices: the booted slot is only ever read (as a seed); the target
//! slot is a distinct type, the only one with write methods.
//!
//! * [`identity`]: what a slot path resolves to, so that the target is
//!   never the booted slot however its path is spelt ([`check_target`]).
//! * [`capacity`]: whether the target has room for the images
//!   ([`check_room`]).
//!
//! An install runs both checks before it invalidates the target.

pub mod capacity;
pub mod identity;

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use kernex_protocol::archive::{self, VerifiedChunk};
use kernex_protocol::index::StoredChunk;
use kernex_protocol::{Sha256Digest, SlotClass};
use sha2::{Digest, Sha256};

use crate::error::{UpdateError, io_err};

pub use capacity::check_room;
pub use identity::{SlotIdentity, check_target};

/// A slot opened read-only: the booted slot, used as a seed.
#[derive(Debug)]
pub struct SeedSlot {
    path: PathBuf,
    file: fs::File,
}

impl SeedSlot {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self, UpdateError> {
        let file = fs::File::open(path).map_err(io_err("open the booted slot", path))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// Reads what should be `chunk` at `offset` and checks its hash; `None`
    /// if it is not (the seed does not hold what its index says).
    pub fn chunk_at(
        &self,
        offset: u64,
        chunk: &StoredChunk,
    ) -> Result<Option<VerifiedChunk>, UpdateError> {
        let mut buf = vec![0u8; chunk.source_size as usize];
        match self.file.read_exact_at(&mut buf, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io_err("read the booted slot", &self.path)(e)),
        }
        Ok(verify_plain(chunk, &buf))
    }

    /// Reads `len` bytes at `offset` (a patch's base range).
    pub fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, UpdateError> {
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(io_err("read the booted slot", &self.path))?;
        Ok(buf)
    }
}

/// Checks uncompressed `data` against `chunk` (size and hash).
pub(crate) fn verify_plain(chunk: &StoredChunk, data: &[u8]) -> Option<VerifiedChunk> {
    // A chunk stored raw has archive bytes equal to its data: checking the
    // data as such runs the protocol's own size and hash check.
    let raw = StoredChunk {
        archive_size: chunk.source_size,
        ..*chunk
    };
    archive::verify_chunk(&raw, data).ok()
}

/// The slot being installed into: never the booted one.
#[derive(Debug)]
pub struct TargetSlot {
    path: PathBuf,
    file: fs::File,
}

impl TargetSlot {
    /// Opens `path` for writing an image of `size` bytes: a block device
    /// must be large enough; a file is created if missing.
    pub fn open(path: &Path, size: u64) -> Result<Self, UpdateError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err("open the target slot", path))?;
        let meta = file.metadata().map_err(io_err("stat", path))?;
        if meta.file_type().is_block_device() {
            let mut f = &file;
            let capacity = f.seek(SeekFrom::End(0)).map_err(io_err("measure", path))?;
            if capacity < size {
                return Err(UpdateError::SlotState(format!(
                    "slot device {} holds {capacity} bytes, the image needs {size}",
                    path.display()
                )));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// The device or file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a verified chunk at each of `offsets`.
    pub fn write(&self, chunk: &VerifiedChunk, offsets: &[u64]) -> Result<(), UpdateError> {
        for &at in offsets {
            self.file
                .write_all_at(chunk.data(), at)
                .map_err(io_err("write the target slot", &self.path))?;
        }
        Ok(())
    }

    /// Reads back `chunk` at `offset` and checks it.
    pub fn holds(&self, offset: u64, chunk: &StoredChunk) -> Result<bool, UpdateError> {
        let mut buf = vec![0u8; chunk.source_size as usize];
        match self.file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(verify_plain(chunk, &buf).is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(io_err("read the target slot", &self.path)(e)),
        }
    }

    /// Reads `buf.len()` bytes at `offset` back from the slot.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), UpdateError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err("read back the target slot", &self.path))
    }

    /// Flushes written data to the device.
    pub fn sync(&self) -> Result<(), UpdateError> {
        self.file
            .sync_data()
            .map_err(io_err("sync the target slot", &self.path))
    }
}

/// SHA-256 of the first `size` bytes of a slot, read from the device.
pub fn digest(path: &Path, size: u64, class: SlotClass) -> Result<Sha256Digest, UpdateError> {
    let file = fs::File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut reader = file.take(size);
    let mut buf = vec![0u8; 1024 * 1024];
    let mut read = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    if read != size {
        return Err(UpdateError::Chunk {
            class,
            offset: read,
            reason: format!("slot {} ends after {read} of {size} bytes", path.display()),
        });
    }
    Ok(Sha256Digest::from_hasher(hasher))
}
