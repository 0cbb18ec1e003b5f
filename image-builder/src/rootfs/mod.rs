//! Reproducible root filesystem images: a directory or a tarball in, an
//! ext4, squashfs or EROFS image out, byte-identical for the same input.
//!
//! The input is first staged into a private directory next to the output
//! (tarballs are extracted there, directories are copied), so the mkfs tool
//! only ever sees a tree with known owners, modes and timestamps. Then each
//! tool runs with every source of variation pinned:
//!
//! - **ext4** (`mkfs.ext4 -d`, e2fsprogs 1.47.0): a private `mke2fs.conf`
//!   (`MKE2FS_CONFIG`) so the host's defaults do not leak in, `LC_ALL=C` (the
//!   tree is walked in `alphasort` order), `-U <uuid>` (stable across
//!   releases: derived from the label unless given, never from the content,
//!   because ext4 seeds its metadata checksums with it),
//!   `-E hash_seed=<a second UUID derived from the first>,root_owner=0:0,nodiscard,lazy_itable_init=0,lazy_journal_init=0`,
//!   `-T default -b 4096 -I 256` (`-N` when the tree needs more inodes),
//!   `E2FSPROGS_FAKE_TIME=<timestamp>` (2^40 for 0, which libext2fs reads
//!   as "unset"; the time fields keep only its low bits, all zero). mke2fs
//!   1.47.0 copies ctime/atime from the staged files and cannot be told
//!   otherwise, so a `debugfs -w` pass (same fake time, else it stamps the
//!   clock into `s_wtime`) sets atime/ctime/mtime/crtime of every used inode
//!   and the superblock's mkfs/write/check times to `timestamp`.
//! - **squashfs** (`mksquashfs` 4.5.1): `-reproducible -all-time T
//!   -mkfs-time T -no-xattrs` (`-all-root` when not running as root), with
//!   `SOURCE_DATE_EPOCH` removed from its environment (it refuses both).
//! - **EROFS** (`mkfs.erofs`, erofs-utils 1.5): `-T T -U <uuid> -x -1`
//!   (`--all-root` when not running as root).
//!
//! Extended attributes are not carried into any image.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::str::FromStr;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Most bytes a tarball may unpack to, checked before each entry is written.
pub const MAX_UNPACKED_BYTES: u64 = 64 << 30;
/// Most entries a tarball may hold.
pub const MAX_TAR_ENTRIES: u64 = 4_000_000;

const BLOCK_SIZE: u64 = 4096;
const INODE_SIZE: u64 = 256;
const MIB: u64 = 1 << 20;

/// The filesystem a root filesystem image is built as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Ext4,
    Squashfs,
    Erofs,
}

impl Filesystem {
    pub const ALL: [Filesystem; 3] = [Filesystem::Ext4, Filesystem::Squashfs, Filesystem::Erofs];

    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Squashfs => "squashfs",
            Filesystem::Erofs => "erofs",
        }
    }

    /// The mkfs tool and the Debian package that provides it.
    pub fn tool(self) -> (&'static str, &'static str) {
        match self {
            Filesystem::Ext4 => ("mkfs.ext4", "e2fsprogs"),
            Filesystem::Squashfs => ("mksquashfs", "squashfs-tools"),
            Filesystem::Erofs => ("mkfs.erofs", "erofs-utils"),
        }
    }
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Filesystem {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Filesystem::ALL
            .into_iter()
            .find(|fs| fs.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| anyhow!("unknown filesystem {s:?} (expected ext4, squashfs or erofs)"))
    }
}

/// How to build the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsOptions {
    pub filesystem: Filesystem,
    /// Image size in bytes (ext4 only); content size plus a margin when `None`.
    pub size: Option<u64>,
    /// Volume label (ext4 only: squashfs has none, erofs-utils 1.5 cannot set one).
    pub label: Option<String>,
    /// Every timestamp in the image (SOURCE_DATE_EPOCH).
    pub timestamp: u64,
    /// Filesystem UUID (ext4, erofs); when `None`, derived from the label
    /// (stable across releases, so ext4 metadata checksums stay put).
    pub uuid: Option<String>,
}

impl RootfsOptions {
    pub fn new(filesystem: Filesystem) -> Self {
        RootfsOptions {
            filesystem,
            size: None,
            label: None,
            timestamp: 0,
            uuid: None,
        }
    }
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootfsReport {
    pub filesystem: Filesystem,
    pub path: PathBuf,
    pub size_bytes: u64,
    pub sha256: String,
    /// UUID written into the image (`None` for squashfs, which has none).
    pub uuid: Option<String>,
    /// SHA-256 over the staged tree (paths, types, modes, owners, content).
    pub content_sha256: String,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub other: u64,
    /// Bytes of regular file content.
    pub content_bytes: u64,
    pub timestamp: u64,
}

/// Builds `out` from `input` (a directory, or a `.tar`, `.tar.gz`/`.tgz` or
/// `.tar.zst` tarball). The same input and options give the same bytes.
pub fn build_rootfs(input: &Path, out: &Path, opts: &RootfsOptions) -> Result<RootfsReport> {
    check_options(opts)?;
    let (tool, package) = opts.filesystem.tool();
    find_tool(tool, package)?;
    if opts.filesystem == Filesystem::Ext4 {
        find_tool("debugfs", "e2fsprogs")?;
        find_tool("dumpe2fs", "e2fsprogs")?;
    }

    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let input_meta =
        fs::metadata(input).with_context(|| format!("unable to read input {}", input.display()))?;
    if input_meta.is_dir() {
        let resolve = |p: &Path| {
            p.canonicalize()
                .with_context(|| format!("unable to resolve {}", p.display()))
        };
        if resolve(&out_dir)?.starts_with(resolve(input)?) {
            bail!(
                "the output {} is inside the input directory {}; it would be copied into itself",
                out.display(),
                input.display()
            );
        }
    }
    let work = tempfile::Builder::new()
        .prefix(".kernex-rootfs-")
        .tempdir_in(&out_dir)
        .with_context(|| {
            format!(
                "unable to create a staging directory in {}",
                out_dir.display()
            )
        })?;
    let root = work.path().join("root");
    let mut owners = if input_meta.is_dir() {
        stage_directory(input, &root)?
    } else {
        stage_tarball(input, &root)?
    };
    owners.entry(PathBuf::new()).or_insert(Owner {
        uid: 0,
        gid: 0,
        mode: 0o755,
    });
    let as_root = running_as_root();
    let all_root = owners.values().all(|o| o.uid == 0 && o.gid == 0);
    if !as_root && !all_root {
        let (path, o) = owners
            .iter()
            .find(|(_, o)| o.uid != 0 || o.gid != 0)
            .map(|(p, o)| (p.display().to_string(), *o))
            .unwrap_or_default();
        bail!(
            "{}: entry /{path} is owned by {}:{}; keeping non-root owners needs running as root",
            input.display(),
            o.uid,
            o.gid
        );
    }
    apply_metadata(&root, &owners, opts.timestamp, as_root)?;
    let tree = describe_tree(&root, &owners)?;

    // The UUID (and the ext4 hash seed derived from it) must NOT follow
    // the content: ext4's metadata checksums are seeded with the UUID, so a
    // UUID that changed with every release would change every group
    // descriptor, bitmap and inode table block, and a one-file update
    // would cost megabytes. It is stable per label instead.
    let uuid = match &opts.uuid {
        Some(u) => parse_uuid(u)?,
        None => {
            let label = opts.label.as_deref().unwrap_or("");
            let seed: [u8; 32] = Sha256::digest(label.as_bytes()).into();
            uuid_from(&seed, b"kernex-rootfs-uuid")
        }
    };

    let tmp_out = work.path().join("image");
    match opts.filesystem {
        Filesystem::Ext4 => make_ext4(&root, &tmp_out, opts, &tree, &uuid, work.path(), !as_root)?,
        Filesystem::Squashfs => make_squashfs(&root, &tmp_out, opts, !as_root)?,
        Filesystem::Erofs => make_erofs(&root, &tmp_out, opts, &uuid, !as_root)?,
    }
    let sha256 = sha256_file(&tmp_out)?;
    let size_bytes = fs::metadata(&tmp_out)
        .with_context(|| format!("unable to stat {}", tmp_out.display()))?
        .len();
    fs::rename(&tmp_out, out)
        .with_context(|| format!("unable to move the image to {}", out.display()))?;

    Ok(RootfsReport {
        filesystem: opts.filesystem,
        path: out.to_path_buf(),
        size_bytes,
        sha256,
        uuid: (opts.filesystem != Filesystem::Squashfs).then_some(uuid),
        content_sha256: hex::encode(tree.digest),
        files: tree.files,
        directories: tree.directories,
        symlinks: tree.symlinks,
        other: tree.other,
        content_bytes: tree.content_bytes,
        timestamp: opts.timestamp,
    })
}

fn check_options(opts: &RootfsOptions) -> Result<()> {
    if opts.timestamp > u64::from(u32::MAX) {
        bail!(
            "timestamp {} does not fit the 32-bit time fields of these filesystems",
            opts.timestamp
        );
    }
    if let Some(label) = &opts.label {
        match opts.filesystem {
            Filesystem::Ext4 if label.len() > 16 => {
                bail!("ext4 label {label:?} is longer than 16 bytes")
            }
            Filesystem::Ext4 => {}
            Filesystem::Squashfs => bail!("squashfs has no volume label (label {label:?} given)"),
            Filesystem::Erofs => {
                bail!("erofs-utils 1.5 cannot set a volume label (label {label:?} given)")
            }
        }
    }
    if opts.size.is_some() && opts.filesystem != Filesystem::Ext4 {
        bail!(
            "a fixed size is only supported for ext4; {} images are as large as their content",
            opts.filesystem
        );
    }
    if let Some(u) = &opts.uuid {
        parse_uuid(u)?;
    }
    Ok(())
}

fn find_tool(tool: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "{tool} not found; install the Debian package {package} (apt-get install {package})"
            )
        })
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Owner and permission bits an entry gets in the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Owner {
    uid: u32,
    gid: u32,
    mode: u32,
}

mod stage;
mod tools;

use stage::*;
use tools::*;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_inodes_complements_free_ranges() -> Result<()> {
        let dump = "Inodes per group:         8\nFree inodes:              9\nGroup 0: (Blocks 0-1)\n  Free inodes: 5-6\nGroup 1: (Blocks 2-3)\n  Free inodes: 10, 12-16\n";
        assert_eq!(used_inodes(dump)?, vec![1, 2, 3, 4, 7, 8, 9, 11]);
        Ok(())
    }

    #[test]
    fn safe_relative_refuses_escapes() {
        assert!(safe_relative(Path::new("../evil")).is_err());
        assert!(safe_relative(Path::new("a/../../evil")).is_err());
        assert!(safe_relative(Path::new("/etc/passwd")).is_err());
        assert_eq!(
            safe_relative(Path::new("./etc/passwd")).ok(),
            Some(PathBuf::from("etc/passwd"))
        );
    }

    #[test]
    fn uuids_round_trip() -> Result<()> {
        let u = uuid_from(&[7; 32], b"x");
        assert_eq!(parse_uuid(&u)?, u);
        assert!(parse_uuid("not-a-uuid").is_err());
        Ok(())
    }

    #[test]
    fn filesystem_names() -> Result<()> {
        for fs in Filesystem::ALL {
            assert_eq!(fs.to_string().parse::<Filesystem>()?, fs);
        }
        assert!("btrfs".parse::<Filesystem>().is_err());
        Ok(())
    }
}
