//! Staging: the input tree (a directory or a tarball) copied into a private
//! directory with known owners, modes and timestamps, and described for
//! the mkfs tools.

use super::*;

// ---------------------------------------------------------------- staging

/// Copies a directory tree into `root`, in sorted order. Everything is owned
/// by root; modes, symlinks, hard links and special files are kept.
pub(super) fn stage_directory(src: &Path, root: &Path) -> Result<BTreeMap<PathBuf, Owner>> {
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

pub(super) fn copy_dir(
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

pub(super) fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let mut reader =
        File::open(src).with_context(|| format!("unable to open {}", src.display()))?;
    let mut writer =
        File::create(dst).with_context(|| format!("unable to create {}", dst.display()))?;
    io::copy(&mut reader, &mut writer)
        .with_context(|| format!("unable to copy {} to {}", src.display(), dst.display()))?;
    Ok(())
}

pub(super) fn split_dev(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    (major, minor)
}

/// Creates a fifo or device node with coreutils' `mknod` (no unsafe code here).
pub(super) fn make_node(path: &Path, kind: &str, dev: Option<(u64, u64)>) -> Result<()> {
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
pub(super) fn stage_tarball(tarball: &Path, root: &Path) -> Result<BTreeMap<PathBuf, Owner>> {
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
pub(super) fn safe_relative(path: &Path) -> Result<PathBuf> {
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
pub(super) fn prepare_parents(
    root: &Path,
    rel: &Path,
    owners: &mut BTreeMap<PathBuf, Owner>,
) -> Result<()> {
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
pub(super) fn check_parents(root: &Path, rel: &Path) -> Result<()> {
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

pub(super) fn display_rel(root: &Path, path: &Path) -> String {
    format!("/{}", path.strip_prefix(root).unwrap_or(path).display())
}

pub(super) fn remove_entry(path: &Path) -> Result<()> {
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
pub(super) fn apply_metadata(
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
pub(super) struct Tree {
    pub(super) digest: [u8; 32],
    pub(super) files: u64,
    pub(super) directories: u64,
    pub(super) symlinks: u64,
    pub(super) other: u64,
    pub(super) content_bytes: u64,
    /// Blocks the content needs at 4 KiB (files, directories, long symlinks).
    pub(super) blocks: u64,
    pub(super) inodes: u64,
}

pub(super) fn describe_tree(root: &Path, owners: &BTreeMap<PathBuf, Owner>) -> Result<Tree> {
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
pub(super) struct Walk<'a> {
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

pub(super) fn sha256_file(path: &Path) -> Result<String> {
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
pub(super) fn uuid_from(digest: &[u8; 32], domain: &[u8]) -> String {
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

pub(super) fn format_uuid(b: &[u8; 16]) -> String {
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

pub(super) fn parse_uuid(s: &str) -> Result<String> {
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
