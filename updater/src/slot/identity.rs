//! What a slot's path is on this system, so that the slot an install writes
//! is told apart from the booted one by what it resolves to, never by how
//! its path is spelt: its canonical path, a file's device and inode, a
//! block device's device number, a loop device's backing file, and the disk
//! a partition lies on.
//!
//! A symlink, a hard link, `dir/../a.img`, a bind mount, a `/dev/disk/by-*`
//! link or a second device node of the booted partition, and a loop device
//! over the booted slot's file all resolve to the booted slot, and
//! [`check_target`] refuses them before anything is written.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use kernex_bootloader::Slot;
use kernex_protocol::SlotClass;

use crate::config::SystemConfig;
use crate::error::{UpdateError, io_err};

/// Where the kernel lists block devices by number (`MAJOR:MINOR`).
const SYS_DEV_BLOCK: &str = "/sys/dev/block";
/// Longest sysfs attribute read (a loop device's backing file path).
const MAX_SYSFS_READ: u64 = 8192;
/// Symlinks followed when resolving a path that does not exist yet.
const MAX_SYMLINKS: usize = 40;

/// One thing a path can resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// A canonical path (symlinks and `..` resolved).
    Path(PathBuf),
    /// A file (or any node but a block device) by its device and inode.
    File { dev: u64, ino: u64 },
    /// A block device by its device number.
    Block { rdev: u64 },
}

impl Key {
    /// What it is: "file (device 254:0, inode 12)".
    fn what(&self) -> String {
        match self {
            Key::Path(p) => format!("path {}", p.display()),
            Key::File { dev, ino } => {
                format!("file (device {}:{}, inode {ino})", major(*dev), minor(*dev))
            }
            Key::Block { rdev } => format!("block device {}:{}", major(*rdev), minor(*rdev)),
        }
    }
}

/// The major number of a Linux device number (glibc's `gnu_dev_major`).
fn major(dev: u64) -> u64 {
    ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000)
}

/// The minor number of a Linux device number (glibc's `gnu_dev_minor`).
fn minor(dev: u64) -> u64 {
    (dev & 0xff) | ((dev >> 12) & 0xffff_ff00)
}

/// A slot path and what it resolves to.
#[derive(Debug, Clone)]
pub struct SlotIdentity {
    path: PathBuf,
    /// What the path is, each with how it got there ("" when directly).
    is: Vec<(Key, String)>,
    /// What it lies inside: the disk a partition is on, and that disk's
    /// backing file when it is a loop device.
    within: Vec<(Key, String)>,
}

impl SlotIdentity {
    /// Resolves `path`. A path that does not exist yet (a file slot the
    /// install creates) resolves to its canonical path only.
    pub fn resolve(path: &Path) -> Result<Self, UpdateError> {
        let mut is = Vec::new();
        let mut within = Vec::new();
        is.push((Key::Path(canonical(path)?), String::new()));
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self {
                    path: path.to_owned(),
                    is,
                    within,
                });
            }
            Err(e) => return Err(io_err("stat the slot", path)(e)),
        };
        if meta.file_type().is_block_device() {
            let rdev = meta.rdev();
            is.push((Key::Block { rdev }, String::new()));
            let sys = Path::new(SYS_DEV_BLOCK).join(format!("{}:{}", major(rdev), minor(rdev)));
            if let Some((file, key)) = loop_backing(&sys) {
                is.push((key, format!("a loop device backed by {}", file.display())));
            }
            if sys.join("partition").exists()
                && let Ok(dir) = fs::canonicalize(&sys)
                && let Some(disk) = dir.parent()
            {
                if let Some(rdev) = read_sysfs(&disk.join("dev")).and_then(|d| parse_dev(&d)) {
                    within.push((
                        Key::Block { rdev },
                        format!("a partition of {}", disk.display()),
                    ));
                }
                if let Some((file, key)) = loop_backing(disk) {
                    within.push((
                        key,
                        format!("a partition of a loop device backed by {}", file.display()),
                    ));
                }
            }
        } else {
            is.push((
                Key::File {
                    dev: meta.dev(),
                    ino: meta.ino(),
                },
                String::new(),
            ));
        }
        Ok(Self {
            path: path.to_owned(),
            is,
            within,
        })
    }

    /// The path as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why writing `self` would write (part of) `other`, if it would: they
    /// are one file, device or path, or one lies inside the other.
    pub fn overlap(&self, other: &SlotIdentity) -> Option<String> {
        let how = |who: &SlotIdentity, via: &str| {
            if via.is_empty() {
                String::new()
            } else {
                format!("; {} is {via}", who.path.display())
            }
        };
        for (a, via_a) in &self.is {
            for (b, via_b) in &other.is {
                if a == b {
                    return Some(format!(
                        "the same {}{}{}",
                        a.what(),
                        how(self, via_a),
                        how(other, via_b)
                    ));
                }
            }
        }
        let inside = |outer: &SlotIdentity, inner: &SlotIdentity| {
            outer.is.iter().find_map(|(a, _)| {
                inner.within.iter().find(|(b, _)| a == b).map(|(b, via)| {
                    format!(
                        "{} is {via} ({}), which {} is",
                        inner.path.display(),
                        b.what(),
                        outer.path.display()
                    )
                })
            })
        };
        inside(self, other).or_else(|| inside(other, self))
    }
}

/// Refuses to install into `target` when any of its slots resolves to a
/// slot of `booted` (of any class), or two of its slots to one another:
/// the error names both paths and what they share.
pub fn check_target(config: &SystemConfig, booted: Slot, target: Slot) -> Result<(), UpdateError> {
    let mut booted_ids: Vec<(SlotClass, SlotIdentity)> = Vec::new();
    let mut target_ids: Vec<(SlotClass, SlotIdentity)> = Vec::new();
    for class in config.slots.classes() {
        if let Some(pair) = config.slots.pair(class) {
            booted_ids.push((class, SlotIdentity::resolve(pair.path(booted))?));
            target_ids.push((class, SlotIdentity::resolve(pair.path(target))?));
        }
    }
    for (i, (tc, t)) in target_ids.iter().enumerate() {
        for (bc, b) in &booted_ids {
            if let Some(why) = t.overlap(b) {
                return Err(UpdateError::SlotState(format!(
                    "refusing to write slot {target} ({tc}) {}: it resolves to the booted slot {booted} ({bc}) {}: {why}",
                    t.path.display(),
                    b.path.display()
                )));
            }
        }
        for (oc, o) in &target_ids[i + 1..] {
            if let Some(why) = t.overlap(o) {
                return Err(UpdateError::SlotState(format!(
                    "refusing to write slot {target}: its {tc} slot {} and its {oc} slot {} are one: {why}",
                    t.path.display(),
                    o.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// `path` with symlinks and `..` resolved; for a path that does not exist
/// yet, its final symlinks followed and its directory resolved.
fn canonical(path: &Path) -> Result<PathBuf, UpdateError> {
    let mut path = path.to_owned();
    for _ in 0..MAX_SYMLINKS {
        match fs::canonicalize(&path) {
            Ok(c) => return Ok(c),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_err("resolve the slot path", &path)(e));
            }
            Err(_) => {}
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        // A dangling symlink: the install would create what it points to.
        if let Ok(link) = fs::read_link(&path) {
            path = dir.join(link);
            continue;
        }
        let name = path.file_name().map(std::ffi::OsStr::to_os_string);
        return match (fs::canonicalize(&dir), name) {
            (Ok(d), Some(name)) => Ok(d.join(name)),
            _ => std::path::absolute(&path).map_err(io_err("resolve the slot path", &path)),
        };
    }
    Err(UpdateError::SlotState(format!(
        "slot path {}: more than {MAX_SYMLINKS} symlinks",
        path.display()
    )))
}

/// The backing file of the loop device whose sysfs directory is `sys`,
/// and its identity; `None` for another device or a deleted backing file.
fn loop_backing(sys: &Path) -> Option<(PathBuf, Key)> {
    let file = read_sysfs(&sys.join("loop").join("backing_file"))?;
    if file.ends_with(" (deleted)") {
        return None;
    }
    let file = PathBuf::from(file);
    let meta = fs::metadata(&file).ok()?;
    let key = Key::File {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Some((file, key))
}

/// A sysfs attribute, without its newline.
fn read_sysfs(path: &Path) -> Option<String> {
    let mut text = String::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_SYSFS_READ)
        .read_to_string(&mut text)
        .ok()?;
    Some(text.trim_end_matches('\n').to_owned())
}

/// A sysfs `dev` attribute (`MAJOR:MINOR`) as a device number.
fn parse_dev(text: &str) -> Option<u64> {
    let (ma, mi) = text.split_once(':')?;
    let (ma, mi): (u64, u64) = (ma.parse().ok()?, mi.parse().ok()?);
    Some(((ma & 0xfff) << 8) | ((ma & !0xfff) << 32) | (mi & 0xff) | ((mi & !0xff) << 12))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(disk: u64, part: u64) -> SlotIdentity {
        SlotIdentity {
            path: PathBuf::from(format!("/dev/part{part}")),
            is: vec![(Key::Block { rdev: part }, String::new())],
            within: vec![(Key::Block { rdev: disk }, "a partition of the disk".into())],
        }
    }

    fn disk(rdev: u64) -> SlotIdentity {
        SlotIdentity {
            path: PathBuf::from("/dev/disk"),
            is: vec![(Key::Block { rdev }, String::new())],
            within: Vec::new(),
        }
    }

    // Partitions are not made for loop devices here (no partscan in the
    // test container), so the rule is checked on identities as
    // `resolve` builds them from sysfs.
    #[test]
    fn a_disk_overlaps_its_partitions_and_sibling_partitions_do_not_overlap() {
        let (p2, p3, whole) = (partition(100, 102), partition(100, 103), disk(100));
        assert_eq!(p2.overlap(&p3), None);
        assert_eq!(p3.overlap(&p2), None);
        assert!(
            whole
                .overlap(&p2)
                .is_some_and(|w| w.contains("a partition"))
        );
        assert!(p2.overlap(&whole).is_some());
        assert!(p2.overlap(&partition(200, 102)).is_some());
    }

    #[test]
    fn device_numbers_round_trip() {
        for (ma, mi) in [(7u64, 0u64), (179, 2), (259, 65536), (8, 300)] {
            let dev = parse_dev(&format!("{ma}:{mi}")).unwrap_or(0);
            assert_eq!((major(dev), minor(dev)), (ma, mi));
        }
    }
}
