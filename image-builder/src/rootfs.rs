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

// ---------------------------------------------------------------- staging

/// Copies a directory tree into `root`, in sorted order. Everything is owned
/// by root; modes, symlinks, hard links and special files are kept.
fn stage_directory(src: &Path, root: &Path) -> Result<BTreeMap<PathBuf, Owner>> {
    let mut owners = BTreeMap::new();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    fs::create_dir(root).with_context(|| format!("unable to create {}", root.display()))?;
    let meta = fs::metadata(src).with_context(|| format!("unable to read {}", src.display()))?;
    owners.insert(
        PathBuf::new(),
        Owner {
            uid: 0,
            gid: 0,
            mode: meta.mode() & 0o7777,
        },
    );
    copy_dir(src, root, Path::new(""), &mut owners, &mut links)?;
    Ok(owners)
}

fn copy_dir(
    src_root: &Path,
    root: &Path,
    rel: &Path,
    owners: &mut BTreeMap<PathBuf, Owner>,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<()> {
    let dir = src_root.join(rel);
    let mut names = fs::read_dir(&dir)
        .with_context(|| format!("unable to list {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("unable to list {}", dir.display()))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let src = src_root.join(&rel);
        let dst = root.join(&rel);
        let meta = fs::symlink_metadata(&src)
            .with_context(|| format!("unable to stat {}", src.display()))?;
        let ft = meta.file_type();
        owners.insert(
            rel.clone(),
            Owner {
                uid: 0,
                gid: 0,
                mode: meta.mode() & 0o7777,
            },
        );
        if ft.is_dir() {
            fs::create_dir(&dst).with_context(|| format!("unable to create {}", dst.display()))?;
            copy_dir(src_root, root, &rel, owners, links)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&src)
                .with_context(|| format!("unable to read symlink {}", src.display()))?;
            std::os::unix::fs::symlink(&target, &dst)
                .with_context(|| format!("unable to create symlink {}", dst.display()))?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                    fs::hard_link(root.join(first), &dst)
                        .with_context(|| format!("unable to create hard link {}", dst.display()))?;
                    continue;
                }
                links.insert((meta.dev(), meta.ino()), rel.clone());
            }
            copy_file(&src, &dst)?;
        } else if ft.is_fifo() {
            make_node(&dst, "p", None)?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() { "c" } else { "b" };
            make_node(&dst, kind, Some(split_dev(meta.rdev())))?;
        } else {
            bail!("{}: sockets cannot be put into an image", src.display());
        }
    }
    Ok(())
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let mut reader =
        File::open(src).with_context(|| format!("unable to open {}", src.display()))?;
    let mut writer =
        File::create(dst).with_context(|| format!("unable to create {}", dst.display()))?;
    io::copy(&mut reader, &mut writer)
        .with_context(|| format!("unable to copy {} to {}", src.display(), dst.display()))?;
    Ok(())
}

fn split_dev(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    (major, minor)
}

/// Creates a fifo or device node with coreutils' `mknod` (no unsafe code here).
fn make_node(path: &Path, kind: &str, dev: Option<(u64, u64)>) -> Result<()> {
    let mut cmd = Command::new("mknod");
    cmd.arg(path).arg(kind);
    if let Some((major, minor)) = dev {
        if !running_as_root() {
            bail!(
                "{}: device nodes can only be created when running as root",
                path.display()
            );
        }
        cmd.arg(major.to_string()).arg(minor.to_string());
    }
    run(&mut cmd, "mknod", path)?;
    Ok(())
}

/// Extracts a tarball into `root`, refusing entries that would land outside it.
fn stage_tarball(tarball: &Path, root: &Path) -> Result<BTreeMap<PathBuf, Owner>> {
    let file = File::open(tarball)
        .with_context(|| format!("unable to open tarball {}", tarball.display()))?;
    let name = tarball
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let reader: Box<dyn Read> =
        if name.ends_with(".gz") || name.ends_with(".tgz") {
            Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
        } else if name.ends_with(".zst") || name.ends_with(".tzst") {
            Box::new(zstd::stream::read::Decoder::new(file).with_context(|| {
                format!("unable to start zstd decoding of {}", tarball.display())
            })?)
        } else if name.ends_with(".tar") {
            Box::new(BufReader::new(file))
        } else {
            bail!(
                "{}: not a directory or a .tar, .tar.gz or .tar.zst tarball",
                tarball.display()
            );
        };
    fs::create_dir(root).with_context(|| format!("unable to create {}", root.display()))?;
    let mut archive = tar::Archive::new(reader);
    let mut owners = BTreeMap::new();
    let mut unpacked = 0u64;
    let mut count = 0u64;
    let entries = archive
        .entries()
        .with_context(|| format!("unable to read tarball {}", tarball.display()))?;
    for entry in entries {
        let mut entry =
            entry.with_context(|| format!("unable to read an entry of {}", tarball.display()))?;
        count += 1;
        if count > MAX_TAR_ENTRIES {
            bail!("{}: more than {MAX_TAR_ENTRIES} entries", tarball.display());
        }
        let raw = entry
            .path()
            .with_context(|| format!("{}: entry {count} has an invalid path", tarball.display()))?
            .into_owned();
        let ctx = || format!("{}: entry {}", tarball.display(), raw.display());
        let rel = safe_relative(&raw).with_context(ctx)?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let owner = Owner {
            uid: u32::try_from(header.uid().with_context(ctx)?).with_context(ctx)?,
            gid: u32::try_from(header.gid().with_context(ctx)?).with_context(ctx)?,
            mode: header.mode().with_context(ctx)? & 0o7777,
        };
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                owners.insert(rel, owner);
                continue;
            }
            bail!("{}: the root is not a directory", ctx());
        }
        let dst = root.join(&rel);
        prepare_parents(root, &rel, &mut owners).with_context(ctx)?;
        match kind {
            tar::EntryType::Directory => match fs::symlink_metadata(&dst) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_entry(&dst).with_context(ctx)?;
                    fs::create_dir(&dst).with_context(ctx)?;
                }
                Err(_) => fs::create_dir(&dst).with_context(ctx)?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                unpacked = unpacked.saturating_add(size);
                if unpacked > MAX_UNPACKED_BYTES {
                    bail!(
                        "{}: unpacks to more than {MAX_UNPACKED_BYTES} bytes",
                        tarball.display()
                    );
                }
                remove_entry(&dst).with_context(ctx)?;
                let mut out = File::create(&dst).with_context(ctx)?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut out).with_context(ctx)?;
                if copied != size {
                    bail!("{}: truncated ({copied} of {size} bytes)", ctx());
                }
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .with_context(ctx)?
                    .ok_or_else(|| anyhow!("{}: symlink without a target", ctx()))?;
                remove_entry(&dst).with_context(ctx)?;
                std::os::unix::fs::symlink(&target, &dst).with_context(ctx)?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .with_context(ctx)?
                    .ok_or_else(|| anyhow!("{}: hard link without a target", ctx()))?;
                let target = safe_relative(&target).with_context(ctx)?;
                check_parents(root, &target).with_context(ctx)?;
                let target_path = root.join(&target);
                let meta = fs::symlink_metadata(&target_path).with_context(|| {
                    format!(
                        "{}: hard link target {} is not in the tarball before it",
                        ctx(),
                        target.display()
                    )
                })?;
                if meta.is_dir() {
                    bail!("{}: hard link to directory {}", ctx(), target.display());
                }
                remove_entry(&dst).with_context(ctx)?;
                fs::hard_link(&target_path, &dst).with_context(ctx)?;
                if let Some(o) = owners.get(&target).copied() {
                    owners.insert(rel, o);
                }
                continue;
            }
            tar::EntryType::Fifo | tar::EntryType::Char | tar::EntryType::Block => {
                remove_entry(&dst).with_context(ctx)?;
                let dev = match kind {
                    tar::EntryType::Fifo => None,
                    _ => Some((
                        u64::from(header.device_major().with_context(ctx)?.unwrap_or(0)),
                        u64::from(header.device_minor().with_context(ctx)?.unwrap_or(0)),
                    )),
                };
                let k = match kind {
                    tar::EntryType::Fifo => "p",
                    tar::EntryType::Char => "c",
                    _ => "b",
                };
                make_node(&dst, k, dev).with_context(ctx)?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            other => bail!("{}: unsupported entry type {other:?}", ctx()),
        }
        owners.insert(rel, owner);
    }
    Ok(owners)
}

/// Turns a tar path into a relative path below the root, refusing `..` and
/// absolute paths (`./` prefixes are fine).
fn safe_relative(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => bail!(
                "path {} contains '..' and would escape the root",
                path.display()
            ),
            Component::RootDir | Component::Prefix(_) => {
                bail!(
                    "path {} is absolute; only paths relative to the root are accepted",
                    path.display()
                )
            }
        }
    }
    Ok(out)
}

/// Creates missing parent directories of `rel`, refusing to go through a
/// symlink (an earlier entry `etc -> /etc` must not let `etc/passwd` escape).
fn prepare_parents(root: &Path, rel: &Path, owners: &mut BTreeMap<PathBuf, Owner>) -> Result<()> {
    let mut cur = root.to_path_buf();
    let mut cur_rel = PathBuf::new();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        cur_rel.push(c);
        owners.entry(cur_rel.clone()).or_insert(Owner {
            uid: 0,
            gid: 0,
            mode: 0o755,
        });
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                bail!(
                    "parent {} is a symlink; writing through it could escape the root",
                    display_rel(root, &cur)
                )
            }
            Ok(_) => bail!("parent {} is not a directory", display_rel(root, &cur)),
            Err(_) => fs::create_dir(&cur)
                .with_context(|| format!("unable to create {}", cur.display()))?,
        }
    }
    Ok(())
}

/// Refuses a path whose parents include a symlink (without creating anything).
fn check_parents(root: &Path, rel: &Path) -> Result<()> {
    let mut cur = root.to_path_buf();
    for c in rel.parent().into_iter().flat_map(Path::components) {
        cur.push(c);
        if fs::symlink_metadata(&cur).is_ok_and(|m| !m.is_dir()) {
            bail!(
                "parent {} is not a directory; following it could escape the root",
                display_rel(root, &cur)
            );
        }
    }
    Ok(())
}

fn display_rel(root: &Path, path: &Path) -> String {
    format!("/{}", path.strip_prefix(root).unwrap_or(path).display())
}

fn remove_entry(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => bail!("{} already exists as a directory", path.display()),
        Ok(_) => {
            fs::remove_file(path).with_context(|| format!("unable to replace {}", path.display()))
        }
        Err(_) => Ok(()),
    }
}

/// Sets owners, modes and timestamps on the staged tree, children before
/// their directory (so a directory's mtime is not disturbed afterwards).
fn apply_metadata(
    root: &Path,
    owners: &BTreeMap<PathBuf, Owner>,
    timestamp: u64,
    as_root: bool,
) -> Result<()> {
    let time = filetime::FileTime::from_unix_time(i64::try_from(timestamp).unwrap_or(i64::MAX), 0);
    // Reverse lexical order visits "a/b" before "a".
    for (rel, owner) in owners.iter().rev() {
        let path = root.join(rel);
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("unable to stat {}", path.display()))?;
        if as_root {
            std::os::unix::fs::lchown(&path, Some(owner.uid), Some(owner.gid))
                .with_context(|| format!("unable to set owner of {}", path.display()))?;
        }
        if !meta.file_type().is_symlink() {
            fs::set_permissions(&path, fs::Permissions::from_mode(owner.mode))
                .with_context(|| format!("unable to set mode of {}", path.display()))?;
        }
        filetime::set_symlink_file_times(&path, time, time)
            .with_context(|| format!("unable to set times of {}", path.display()))?;
    }
    Ok(())
}

/// A canonical description of the staged tree: counts and a digest.
#[derive(Debug, Default)]
struct Tree {
    digest: [u8; 32],
    files: u64,
    directories: u64,
    symlinks: u64,
    other: u64,
    content_bytes: u64,
    /// Blocks the content needs at 4 KiB (files, directories, long symlinks).
    blocks: u64,
    inodes: u64,
}

fn describe_tree(root: &Path, owners: &BTreeMap<PathBuf, Owner>) -> Result<Tree> {
    let mut tree = Tree::default();
    let mut hasher = Sha256::new();
    let mut walk = Walk {
        root,
        owners,
        seen: HashMap::new(),
    };
    walk.visit(Path::new(""), &mut tree, &mut hasher)?;
    tree.digest = hasher.finalize().into();
    Ok(tree)
}

#[derive(Debug)]
struct Walk<'a> {
    root: &'a Path,
    owners: &'a BTreeMap<PathBuf, Owner>,
    seen: HashMap<u64, PathBuf>,
}

impl Walk<'_> {
    fn visit(&mut self, rel: &Path, tree: &mut Tree, hasher: &mut Sha256) -> Result<()> {
        let path = self.root.join(rel);
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("unable to stat {}", path.display()))?;
        let ft = meta.file_type();
        let owner = self.owners.get(rel).copied().unwrap_or(Owner {
            uid: 0,
            gid: 0,
            mode: 0o777,
        });
        let name = rel.as_os_str().as_encoded_bytes();
        hasher.update((name.len() as u64).to_le_bytes());
        hasher.update(name);
        hasher.update(owner.mode.to_le_bytes());
        hasher.update(owner.uid.to_le_bytes());
        hasher.update(owner.gid.to_le_bytes());
        if meta.nlink() > 1 && !ft.is_dir() {
            if let Some(first) = self.seen.get(&meta.ino()) {
                let first = first.as_os_str().as_encoded_bytes();
                hasher.update(b"L");
                hasher.update((first.len() as u64).to_le_bytes());
                hasher.update(first);
                return Ok(());
            }
            self.seen.insert(meta.ino(), rel.to_path_buf());
        }
        tree.inodes += 1;
        if ft.is_dir() {
            tree.directories += 1;
            tree.blocks += 1;
            let mut names = fs::read_dir(&path)
                .and_then(|it| {
                    it.map(|e| e.map(|e| e.file_name()))
                        .collect::<io::Result<Vec<_>>>()
                })
                .with_context(|| format!("unable to list {}", path.display()))?;
            names.sort();
            tree.blocks += names.iter().map(|n| n.len() as u64 + 8).sum::<u64>() / BLOCK_SIZE;
            hasher.update(b"D");
            hasher.update((names.len() as u64).to_le_bytes());
            for n in names {
                self.visit(&rel.join(n), tree, hasher)?;
            }
        } else if ft.is_symlink() {
            tree.symlinks += 1;
            let target = fs::read_link(&path)
                .with_context(|| format!("unable to read symlink {}", path.display()))?;
            let target = target.as_os_str().as_encoded_bytes();
            if target.len() >= 60 {
                tree.blocks += 1;
            }
            hasher.update(b"S");
            hasher.update((target.len() as u64).to_le_bytes());
            hasher.update(target);
        } else if ft.is_file() {
            tree.files += 1;
            tree.content_bytes += meta.len();
            tree.blocks += meta.len().div_ceil(BLOCK_SIZE);
            hasher.update(b"F");
            hasher.update(meta.len().to_le_bytes());
            let mut file =
                File::open(&path).with_context(|| format!("unable to open {}", path.display()))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = file
                    .read(&mut buf)
                    .with_context(|| format!("unable to read {}", path.display()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        } else {
            tree.other += 1;
            hasher.update(if ft.is_fifo() {
                b"P"
            } else if ft.is_char_device() {
                b"C"
            } else {
                b"B"
            });
            hasher.update(meta.rdev().to_le_bytes());
        }
        Ok(())
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        File::open(path).with_context(|| format!("unable to open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("unable to read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A version-4-shaped UUID from a digest, so it is stable for stable input.
fn uuid_from(digest: &[u8; 32], domain: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(domain);
    h.update(digest);
    let d: [u8; 32] = h.finalize().into();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

fn format_uuid(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn parse_uuid(s: &str) -> Result<String> {
    let hexpart: String = s.chars().filter(|c| *c != '-').collect();
    let bytes = hex::decode(&hexpart)
        .ok()
        .filter(|b| b.len() == 16 && s.len() == 36);
    let bytes: [u8; 16] = bytes.and_then(|b| b.try_into().ok()).ok_or_else(|| {
        anyhow!("invalid UUID {s:?} (expected the form 01234567-89ab-cdef-0123-456789abcdef)")
    })?;
    let canonical = format_uuid(&bytes);
    if canonical != s.to_ascii_lowercase() {
        bail!("invalid UUID {s:?} (expected the form 01234567-89ab-cdef-0123-456789abcdef)");
    }
    Ok(canonical)
}

// ---------------------------------------------------------------- tools

/// Runs a tool, returning its stdout; a failure carries its stderr.
fn run(cmd: &mut Command, tool: &str, target: &Path) -> Result<String> {
    let output = cmd
        .output()
        .with_context(|| format!("unable to run {tool} for {}", target.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let msg = [stderr.trim(), stdout.trim()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "{tool} failed for {} ({}): {msg}",
            target.display(),
            output.status
        );
    }
    Ok(stdout)
}

/// A clean environment for the mkfs tools: no locale, no SOURCE_DATE_EPOCH,
/// no MKE2FS_* or E2FSPROGS_* overrides from the caller.
fn tool_command(tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("MKE2FS_")
            || k.starts_with("E2FSPROGS_")
            || k.starts_with("LC_")
            || k == "LANG"
            || k == "SOURCE_DATE_EPOCH"
            || k == "TZ"
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("LC_ALL", "C").env("TZ", "UTC");
    cmd
}

const MKE2FS_CONF: &str = "\
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
";

/// Size mke2fs will give the journal for a filesystem of `blocks` 4 KiB blocks
/// (ext2fs_default_journal_size).
fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..2048 => 0,
        2048..32768 => 1024,
        32768..262144 => 4096,
        262144..524288 => 8192,
        524288..4194304 => 16384,
        4194304..8388608 => 32768,
        8388608..16777216 => 65536,
        16777216..33554432 => 131072,
        _ => 262144,
    }
}

/// Inodes the tree needs, with room for a few files created at runtime.
fn ext4_inodes(tree: &Tree) -> u64 {
    (tree.inodes + 16) + (tree.inodes + 16) / 4 + 64
}

/// Content plus 20 % and the metadata mke2fs adds, rounded up to 1 MiB.
fn ext4_auto_size(tree: &Tree) -> u64 {
    let inodes = ext4_inodes(tree);
    let data = tree.blocks * BLOCK_SIZE;
    let mut size = data + data / 5 + inodes * INODE_SIZE + 4 * MIB;
    size += journal_blocks(size / BLOCK_SIZE) * BLOCK_SIZE;
    // 5 % reserved for root, and the group descriptors/bitmaps.
    size += size / 16;
    size.div_ceil(MIB) * MIB
}

fn make_ext4(
    root: &Path,
    out: &Path,
    opts: &RootfsOptions,
    tree: &Tree,
    uuid: &str,
    work: &Path,
    all_root: bool,
) -> Result<()> {
    let conf = work.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).with_context(|| format!("unable to write {}", conf.display()))?;
    let size = match opts.size {
        Some(s) => s,
        None => ext4_auto_size(tree),
    };
    if size < MIB || size % 1024 != 0 {
        bail!("ext4 size {size} bytes is too small or not a multiple of 1 KiB");
    }
    let uuid_digest: [u8; 32] = Sha256::digest(uuid.as_bytes()).into();
    let hash_seed = uuid_from(&uuid_digest, b"kernex-rootfs-ext4-hash-seed");
    let inodes = ext4_inodes(tree);
    let default_inodes = size / 16384;
    let mut cmd = tool_command("mkfs.ext4");
    cmd.env("MKE2FS_CONFIG", &conf);
    cmd.env("E2FSPROGS_FAKE_TIME", fake_time(opts.timestamp));
    cmd.args([
        "-q", "-F", "-t", "ext4", "-T", "default", "-b", "4096", "-I", "256", "-U", uuid,
    ])
    .arg("-E")
    .arg(format!(
        "hash_seed={hash_seed},root_owner=0:0,nodiscard,lazy_itable_init=0,lazy_journal_init=0"
    ));
    if inodes > default_inodes {
        cmd.arg("-N").arg(inodes.to_string());
    }
    if let Some(label) = &opts.label {
        cmd.arg("-L").arg(label);
    }
    cmd.arg("-d")
        .arg(root)
        .arg(out)
        .arg(format!("{}k", size / 1024));
    run(&mut cmd, "mkfs.ext4", out).with_context(|| {
        if opts.size.is_some() {
            format!(
                "{size} bytes may be too small for {} bytes of content",
                tree.content_bytes
            )
        } else {
            format!("building a {size}-byte ext4 image")
        }
    })?;
    fix_ext4_times(out, opts.timestamp, work, all_root)
}

/// Pins what mke2fs 1.47.0 takes from the staged files or the clock: every
/// used inode's atime/ctime/mtime/crtime (and owner, when staging could not
/// chown) and the superblock's mkfs/write/check times.
fn fix_ext4_times(image: &Path, timestamp: u64, work: &Path, all_root: bool) -> Result<()> {
    let dump = run(tool_command("dumpe2fs").arg(image), "dumpe2fs", image)?;
    let inodes = used_inodes(&dump)
        .with_context(|| format!("unable to read the inode bitmap of {}", image.display()))?;
    let features = dump
        .lines()
        .find_map(|l| l.strip_prefix("Filesystem features:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>();
    let first_ino = header_value(&dump, "First inode:").unwrap_or(11);
    let t = format!("@{timestamp}");
    let mut script = String::new();
    for field in ["mkfs_time", "wtime", "lastcheck"] {
        script.push_str(&format!("ssv {field} {t}\n"));
    }
    for ino in inodes {
        let wanted = ino == 2
            || (ino == 7 && features.contains(&"resize_inode"))
            || (ino == 8 && features.contains(&"has_journal"))
            || ino >= first_ino;
        if !wanted {
            continue;
        }
        for field in ["atime", "ctime", "mtime", "crtime"] {
            script.push_str(&format!("sif <{ino}> {field} {t}\n"));
        }
        if all_root && ino >= first_ino {
            script.push_str(&format!("sif <{ino}> uid 0\nsif <{ino}> gid 0\n"));
        }
    }
    let path = work.join("debugfs.cmds");
    fs::write(&path, script).with_context(|| format!("unable to write {}", path.display()))?;
    let output = tool_command("debugfs")
        .env("E2FSPROGS_FAKE_TIME", fake_time(timestamp))
        .arg("-w")
        .arg("-f")
        .arg(&path)
        .arg(image)
        .output()
        .with_context(|| format!("unable to run debugfs for {}", image.display()))?;
    // debugfs exits 0 even when a command fails; anything but its banner on
    // stderr is an error.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !output.status.success() || !errors.is_empty() {
        bail!(
            "debugfs failed for {} ({}): {}",
            image.display(),
            output.status,
            errors.join("\n")
        );
    }
    Ok(())
}

/// `E2FSPROGS_FAKE_TIME` for `timestamp`. libext2fs reads 0 as "unset" and
/// uses the clock, so 0 is written as 2^40: its low 40 bits, all the
/// superblock and inode time fields keep, are zero.
fn fake_time(timestamp: u64) -> String {
    if timestamp == 0 {
        (1u64 << 40).to_string()
    } else {
        timestamp.to_string()
    }
}

fn header_value(dump: &str, key: &str) -> Option<u64> {
    dump.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// Inode numbers marked used in the bitmap, from `dumpe2fs` group listings.
fn used_inodes(dump: &str) -> Result<Vec<u64>> {
    let per_group =
        header_value(dump, "Inodes per group:").ok_or_else(|| anyhow!("no 'Inodes per group'"))?;
    let mut used = Vec::new();
    let mut group = 0u64;
    for line in dump.lines() {
        let Some(list) = line.trim_start().strip_prefix("Free inodes:") else {
            continue;
        };
        if !line.starts_with(' ') {
            continue; // the superblock's total, not a group
        }
        let first = group * per_group + 1;
        let last = first + per_group - 1;
        let mut free = Vec::new();
        for range in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            let a: u64 = a
                .parse()
                .with_context(|| format!("bad free inode range {range:?}"))?;
            let b: u64 = b
                .parse()
                .with_context(|| format!("bad free inode range {range:?}"))?;
            free.push((a, b));
        }
        let mut ino = first;
        for (a, b) in free {
            used.extend(ino..a.max(ino));
            ino = ino.max(b + 1);
        }
        used.extend(ino..=last);
        group += 1;
    }
    if group == 0 {
        bail!("no group listing");
    }
    Ok(used)
}

fn make_squashfs(root: &Path, out: &Path, opts: &RootfsOptions, all_root: bool) -> Result<()> {
    let t = opts.timestamp.to_string();
    let mut cmd = tool_command("mksquashfs");
    cmd.arg(root)
        .arg(out)
        .args([
            "-noappend",
            "-reproducible",
            "-no-xattrs",
            "-no-progress",
            "-quiet",
        ])
        .args(["-all-time", &t, "-mkfs-time", &t]);
    if all_root {
        cmd.arg("-all-root");
    }
    run(&mut cmd, "mksquashfs", out)?;
    Ok(())
}

fn make_erofs(
    root: &Path,
    out: &Path,
    opts: &RootfsOptions,
    uuid: &str,
    all_root: bool,
) -> Result<()> {
    let mut cmd = tool_command("mkfs.erofs");
    cmd.arg("--quiet")
        .arg(format!("-T{}", opts.timestamp))
        .arg(format!("-U{uuid}"))
        .arg("-x-1");
    if all_root {
        cmd.arg("--all-root");
    }
    cmd.arg(out).arg(root);
    run(&mut cmd, "mkfs.erofs", out)?;
    Ok(())
}

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
