//! Recognise the filesystem in an image by its superblock magic.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};
use kernex_protocol::FsType;

/// The filesystem in the image at `path`: ext2/3/4, squashfs, erofs, or
/// raw when none is recognised.
pub fn detect(path: &Path) -> Result<FsType> {
    let f = File::open(path).with_context(|| format!("unable to open {}", path.display()))?;
    detect_in(f).with_context(|| format!("unable to read {}", path.display()))
}

/// The filesystem in the image `image` reads (from its start): ext2/3/4,
/// squashfs, erofs, or raw when none is recognised.
pub fn detect_in(mut image: impl Read + Seek) -> std::io::Result<FsType> {
    let mut read_at = |offset: u64, buf: &mut [u8]| -> std::io::Result<bool> {
        image.seek(SeekFrom::Start(offset))?;
        match image.read_exact(buf) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e),
        }
    };
    let mut head = [0u8; 4];
    if read_at(0, &mut head)? && &head == b"hsqs" {
        return Ok(FsType::Squashfs);
    }
    let mut magic = [0u8; 4];
    if read_at(1024, &mut magic)? && u32::from_le_bytes(magic) == 0xE0F5_E1E2 {
        return Ok(FsType::Erofs);
    }
    let mut ext = [0u8; 2];
    if read_at(1024 + 56, &mut ext)? && u16::from_le_bytes(ext) == 0xEF53 {
        return Ok(FsType::Ext4);
    }
    Ok(FsType::Raw)
}
