//! The mkfs tools, each run with every source of variation pinned (see
//! the module documentation of `rootfs`).

use super::*;

// ---------------------------------------------------------------- tools

/// Runs a tool, returning its stdout; a failure carries its stderr.
pub(super) fn run(cmd: &mut Command, tool: &str, target: &Path) -> Result<String> {
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
pub(super) fn tool_command(tool: &str) -> Command {
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

pub(super) const MKE2FS_CONF: &str = "\
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
pub(super) fn journal_blocks(blocks: u64) -> u64 {
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
pub(super) fn ext4_inodes(tree: &Tree) -> u64 {
    (tree.inodes + 16) + (tree.inodes + 16) / 4 + 64
}

/// Content plus 20 % and the metadata mke2fs adds, rounded up to 1 MiB.
pub(super) fn ext4_auto_size(tree: &Tree) -> u64 {
    let inodes = ext4_inodes(tree);
    let data = tree.blocks * BLOCK_SIZE;
    let mut size = data + data / 5 + inodes * INODE_SIZE + 4 * MIB;
    size += journal_blocks(size / BLOCK_SIZE) * BLOCK_SIZE;
    // 5 % reserved for root, and the group descriptors/bitmaps.
    size += size / 16;
    size.div_ceil(MIB) * MIB
}

pub(super) fn make_ext4(
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
pub(super) fn fix_ext4_times(
    image: &Path,
    timestamp: u64,
    work: &Path,
    all_root: bool,
) -> Result<()> {
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
pub(super) fn fake_time(timestamp: u64) -> String {
    if timestamp == 0 {
        (1u64 << 40).to_string()
    } else {
        timestamp.to_string()
    }
}

pub(super) fn header_value(dump: &str, key: &str) -> Option<u64> {
    dump.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// Inode numbers marked used in the bitmap, from `dumpe2fs` group listings.
pub(super) fn used_inodes(dump: &str) -> Result<Vec<u64>> {
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

pub(super) fn make_squashfs(
    root: &Path,
    out: &Path,
    opts: &RootfsOptions,
    all_root: bool,
) -> Result<()> {
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

pub(super) fn make_erofs(
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
