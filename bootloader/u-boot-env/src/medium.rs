//! Where the bytes of a copy live: a file or block device, or MTD flash.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Files up to this size holding a single-copy environment are replaced
/// atomically (write a new file, then rename it over the old one).
pub const MAX_ATOMIC_REPLACE_SIZE: u64 = 32 * 1024 * 1024;

/// Storage for environment copies. Implement it to put an environment
/// somewhere new, or to inject faults in tests.
pub trait Medium: std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `offset` (already erased on flash).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes written data durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Size of the device in bytes.
    fn size(&mut self) -> io::Result<u64>;
    /// Erase block size if the medium must be erased before it is written.
    fn erase_block_size(&self) -> Option<u64> {
        None
    }
    /// Erases `len` bytes at `offset` (both multiples of the erase block size).
    fn erase(&mut self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Whether this medium is NOR flash, where the boolean flag scheme is used.
    fn is_nor_flash(&self) -> bool {
        false
    }
    /// Replaces `data` at `offset` so that a crash leaves either the old or
    /// the new bytes. Returns `Ok(false)` if the medium cannot do that (then
    /// the caller writes in place).
    fn replace_atomically(&mut self, _offset: u64, _data: &[u8]) -> io::Result<bool> {
        Ok(false)
    }
}

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileMedium {
    path: PathBuf,
    file: File,
    regular: bool,
}

impl FileMedium {
    /// Opens `path` for reading, and for writing if `write`.
    pub fn open(path: &Path, write: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(write).open(path)?;
        let regular = file.metadata()?.is_file();
        Ok(Self {
            path: path.to_owned(),
            file,
            regular,
        })
    }
}

impl Medium for FileMedium {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.read_exact(buf)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.write_all(data)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size(&mut self) -> io::Result<u64> {
        self.file.seek(SeekFrom::End(0))
    }

    fn replace_atomically(&mut self, offset: u64, data: &[u8]) -> io::Result<bool> {
        let len = self.size()?;
        if !self.regular || len > MAX_ATOMIC_REPLACE_SIZE {
            return Ok(false);
        }
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return Ok(false);
        };
        let mut content = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        (&mut self.file).take(len).read_to_end(&mut content)?;
        if (content.len() as u64) < end {
            content.resize(end as usize, 0);
        }
        content[offset as usize..end as usize].copy_from_slice(data);

        let Some(name) = self.path.file_name() else {
            return Ok(false);
        };
        let mut tmp_name = name.to_owned();
        tmp_name.push(".kernex-new");
        let tmp = self.path.with_file_name(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        let permissions = self.file.metadata()?.permissions();
        {
            let mut new = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            new.write_all(&content)?;
            new.set_permissions(permissions)?;
            new.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // Make the rename durable; some filesystems (vfat) cannot sync a
            // directory, which is not an error for us.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        // On vfat (the env file on a Raspberry Pi's boot partition) the
        // directory sync above fails and a file's directory entry is its
        // inode: syncing the renamed file is what writes the entry and the
        // FAT, so a power cut after this returns keeps the new env
        // (hw-tests scenario 5 lost a commit without it).
        self.file.sync_all()?;
        Ok(true)
    }
}

/// An MTD character device (`/dev/mtdN`): erase before write.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub struct MtdMedium {
    file: File,
    erase_size: u64,
    size: u64,
    nor: bool,
}

#[cfg(target_os = "linux")]
impl MtdMedium {
    /// Opens an MTD device; its type, size and erase size come from sysfs
    /// (`/sys/class/mtd/mtdN/`). `sector_size` from the config overrides the
    /// erase size.
    pub fn open(path: &Path, write: bool, sector_size: Option<u64>) -> io::Result<Self> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an MTD device name"))?;
        let sys = Path::new("/sys/class/mtd").join(name);
        let read_sys = |attr: &str| -> io::Result<String> {
            let mut s = String::new();
            File::open(sys.join(attr))?
                .take(64)
                .read_to_string(&mut s)?;
            Ok(s.trim().to_owned())
        };
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let kind = read_sys("type")?;
        let size: u64 = read_sys("size")?
            .parse()
            .map_err(|_| bad("unreadable MTD size"))?;
        let sys_erase: u64 = read_sys("erasesize")?
            .parse()
            .map_err(|_| bad("unreadable MTD erase size"))?;
        let erase_size = sector_size.unwrap_or(sys_erase).max(1);
        let file = OpenOptions::new().read(true).write(write).open(path)?;
        Ok(Self {
            file,
            erase_size,
            size,
            nor: kind == "nor",
        })
    }
}

#[cfg(target_os = "linux")]
impl Medium for MtdMedium {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.read_exact(buf)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.write_all(data)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn size(&mut self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn erase_block_size(&self) -> Option<u64> {
        Some(self.erase_size)
    }

    fn erase(&mut self, offset: u64, len: u64) -> io::Result<()> {
        mtd_ioctl::erase(&self.file, offset, len)
    }

    fn is_nor_flash(&self) -> bool {
        self.nor
    }
}

/// The one ioctl this crate needs: MEMERASE. Kept in its own module so the
/// `unsafe` is in one place.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod mtd_ioctl {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// `struct erase_info_user` from `<mtd/mtd-abi.h>`.
    #[repr(C)]
    struct EraseInfoUser {
        start: u32,
        length: u32,
    }

    /// `_IOW('M', 2, struct erase_info_user)`.
    const MEMERASE: u64 = 0x4008_4d02;

    pub(super) fn erase(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "MTD erase beyond 4 GiB");
        let info = EraseInfoUser {
            start: u32::try_from(offset).map_err(|_| too_big())?,
            length: u32::try_from(len).map_err(|_| too_big())?,
        };
        // SAFETY: MEMERASE reads one `erase_info_user` through the pointer,
        // which points at a live, properly laid out value for the whole call;
        // the fd is owned by `file` and open.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                MEMERASE as _,
                &info as *const EraseInfoUser,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
