//! Whether the target slots have room for the images, checked before
//! anything is written: a block device's own size, a pair's configured
//! `size`, and for file slots the free space of their filesystem.

use std::fs;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kernex_bootloader::Slot;
use kernex_protocol::manifest::ImageEntry;

use crate::config::SystemConfig;
use crate::error::{UpdateError, io_err};

/// What the file slots on one filesystem still need.
#[derive(Debug)]
struct FsNeed {
    /// The filesystem's device (`st_dev` of a path on it).
    dev: u64,
    /// A path on it, asked for its free space.
    at: PathBuf,
    /// Bytes the images need beyond what their files already hold.
    bytes: u64,
    /// The slot files, for the message.
    files: Vec<String>,
}

/// Refuses, naming the sizes, an image larger than its slot in `target`:
/// larger than the pair's configured `size`, than a block device, or (for
/// file slots) than what the file already holds plus the free space of its
/// filesystem (as an unprivileged user may use it: `f_bavail`), summed
/// over the slots that share a filesystem.
pub fn check_room(
    config: &SystemConfig,
    target: Slot,
    images: &[ImageEntry],
) -> Result<(), UpdateError> {
    let mut needs: Vec<FsNeed> = Vec::new();
    for entry in images {
        let class = entry.slot_class;
        let Some(pair) = config.slots.pair(class) else {
            return Err(UpdateError::Refused(format!("no {class} slots")));
        };
        let path = pair.path(target);
        let size = entry.size;
        if let Some(limit) = pair.size
            && size > limit
        {
            return Err(UpdateError::SlotState(format!(
                "the {class} image is {size} bytes, larger than slot {target} {} ({limit} bytes, slots.{class}.size)",
                path.display()
            )));
        }
        let (dev, at, held) = match fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => {
                let capacity = block_device_size(path)?;
                if capacity < size {
                    return Err(UpdateError::SlotState(format!(
                        "the {class} image is {size} bytes, larger than slot {target} {} (a block device of {capacity} bytes)",
                        path.display()
                    )));
                }
                continue;
            }
            // Allocated bytes: writing into a sparse file's holes needs space.
            Ok(meta) if meta.is_file() => (
                meta.dev(),
                path.to_owned(),
                meta.blocks().saturating_mul(512),
            ),
            // A character device (/dev/null in tests): its configured size only.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
                    _ => PathBuf::from("."),
                };
                match fs::metadata(&dir) {
                    Ok(meta) => (meta.dev(), dir, 0),
                    // Opening the slot says what is wrong with its directory.
                    Err(_) => continue,
                }
            }
            Err(e) => return Err(io_err("stat the target slot", path)(e)),
        };
        let bytes = size.saturating_sub(held);
        let file = path.display().to_string();
        match needs.iter_mut().find(|n| n.dev == dev) {
            Some(n) => {
                n.bytes = n.bytes.saturating_add(bytes);
                n.files.push(file);
            }
            None => needs.push(FsNeed {
                dev,
                at,
                bytes,
                files: vec![file],
            }),
        }
    }
    for need in needs.iter().filter(|n| n.bytes > 0) {
        let vfs = rustix::fs::statvfs(&need.at).map_err(|e| UpdateError::Io {
            action: "measure the free space of",
            path: need.at.clone(),
            source: e.into(),
        })?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        if need.bytes > free {
            return Err(UpdateError::SlotState(format!(
                "slot {target} has no room: writing {} needs {} more bytes, the filesystem holding it has {free} bytes free",
                need.files.join(" and "),
                need.bytes
            )));
        }
    }
    Ok(())
}

/// A block device's size in bytes (its end, by seeking there).
pub(crate) fn block_device_size(path: &Path) -> Result<u64, UpdateError> {
    let mut file = fs::File::open(path).map_err(io_err("open the target slot", path))?;
    file.seek(SeekFrom::End(0))
        .map_err(io_err("measure the target slot", path))
}
