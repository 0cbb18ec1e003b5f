//! Bounded reads and atomic writes of small state files.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::BootError;

pub(crate) fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, BootError> {
    let io_err = |source| BootError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > limit {
        return Err(BootError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(bytes)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}

/// Writes `bytes` to a new file beside `path`, syncs it and renames it over
/// `path`: a crash leaves either the old or the new file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BootError> {
    let tmp = sibling(path, ".kernex-new");
    let io_err = |action, source| BootError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io_err("create a new version of", e))?;
        f.write_all(bytes).map_err(|e| io_err("write", e))?;
        f.sync_all().map_err(|e| io_err("sync", e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io_err("replace", e))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Make the rename durable; vfat cannot sync a directory, which is fine.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
