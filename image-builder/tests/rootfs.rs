//! `build_rootfs` against the real Debian tools: mkfs.ext4/e2fsck/debugfs,
//! mksquashfs/unsquashfs, mkfs.erofs/fsck.erofs. A missing tool fails the
//! test; nothing is skipped.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kernex_image::rootfs::{Filesystem, RootfsOptions, RootfsReport, build_rootfs};

/// The files of the test tree: (path, mode, content).
fn files() -> Vec<(String, u32, Vec<u8>)> {
    let mut files = vec![
        ("etc/hostname".to_string(), 0o644, b"kernex\n".to_vec()),
        (
            "etc/shadow".to_string(),
            0o600,
            b"root:*:19000::::::\n".to_vec(),
        ),
        (
            "usr/bin/tool".to_string(),
            0o755,
            b"#!/bin/sh\necho tool\n".to_vec(),
        ),
        ("usr/bin/su".to_string(), 0o4755, b"setuid\n".to_vec()),
        // Not a multiple of the block size, pseudo-random so it does not compress away.
        (
            "usr/lib/blob.bin".to_string(),
            0o644,
            (0..300_001u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
    ];
    // Enough entries that ext4 indexes the directory (htree).
    for i in 0..300 {
        files.push((
            format!("usr/share/many/file-{i:03}"),
            0o644,
            format!("{i}\n").into_bytes(),
        ));
    }
    files
}

const SYMLINKS: [(&str, &str); 3] = [
    ("usr/hostname", "../etc/hostname"),
    ("bin", "usr/bin"),
    ("usr/dangling", "/nowhere/at/all"),
];
const PRIVATE_DIR: &str = "root";

/// Writes the test tree into `dir`, creating entries forwards or backwards
/// (so readdir order differs) and giving every entry a different mtime.
fn write_tree(dir: &Path, reverse: bool, mtime_base: i64) -> Result<()> {
    let mut files = files();
    if reverse {
        files.reverse();
    }
    fs::create_dir_all(dir)?;
    for (i, (path, mode, content)) in files.iter().enumerate() {
        let p = dir.join(path);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, content)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
        let t = filetime::FileTime::from_unix_time(mtime_base + i as i64 * 7, 0);
        filetime::set_file_times(&p, t, t)?;
    }
    for (link, target) in SYMLINKS {
        symlink(target, dir.join(link))?;
    }
    fs::create_dir_all(dir.join(PRIVATE_DIR))?;
    fs::set_permissions(dir.join(PRIVATE_DIR), fs::Permissions::from_mode(0o700))?;
    let t = filetime::FileTime::from_unix_time(mtime_base + 1, 0);
    filetime::set_file_times(dir.join("etc"), t, t)?;
    Ok(())
}

/// A tarball of `dir` with every entry owned by `uid:gid`, compressed by
/// file extension (.tar, .tar.gz, .tar.zst).
fn write_tarball(dir: &Path, out: &Path, uid: u64) -> Result<()> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut entries = Vec::new();
    collect(dir, Path::new(""), &mut entries)?;
    for rel in entries {
        let path = dir.join(&rel);
        let meta = fs::symlink_metadata(&path)?;
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(meta.mtime() as u64);
        if meta.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            builder.append_data(&mut h, &rel, std::io::empty())?;
        } else if meta.file_type().is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            builder.append_link(&mut h, &rel, fs::read_link(&path)?)?;
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            builder.append_data(&mut h, &rel, File::open(&path)?)?;
        }
    }
    let data = builder.into_inner()?;
    let name = out.to_string_lossy();
    let bytes = if name.ends_with(".gz") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data)?;
        enc.finish()?
    } else if name.ends_with(".zst") {
        zstd::encode_all(&data[..], 3)?
    } else {
        data
    };
    fs::write(out, bytes)?;
    Ok(())
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for n in names {
        let r = rel.join(n);
        out.push(r.clone());
        if fs::symlink_metadata(root.join(&r))?.is_dir() {
            collect(root, &r, out)?;
        }
    }
    Ok(())
}

/// Runs a tool; a missing tool or a failure is an error.
fn tool(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .output()
        .with_context(|| format!("unable to run {cmd} (is it installed?)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            stdout
        );
    }
    Ok(stdout)
}

fn build(fs: Filesystem, input: &Path, out: &Path) -> Result<RootfsReport> {
    let mut opts = RootfsOptions::new(fs);
    opts.timestamp = 1_600_000_000;
    build_rootfs(input, out, &opts)
}

/// Two copies of the same tree, created in opposite orders (so readdir order
/// differs), with different mtimes, more than a second apart (different
/// ctimes, which mke2fs copies) and built at different times of day, give
/// byte-identical images.
fn reproducible(fs: Filesystem) -> Result<(tempfile::TempDir, RootfsReport)> {
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("tree-a"), tmp.path().join("tree-b"));
    write_tree(&a, false, 1_000_000)?;
    let ra = build(fs, &a, &tmp.path().join("a.img"))?;
    std::thread::sleep(Duration::from_millis(1100));
    write_tree(&b, true, 1_700_000_000)?;
    let rb = build(fs, &b, &tmp.path().join("b.img"))?;
    ensure!(
        ra.sha256 == rb.sha256,
        "{fs}: images differ: {} vs {}",
        ra.sha256,
        rb.sha256
    );
    ensure!(
        fs::read(&ra.path)? == fs::read(&rb.path)?,
        "{fs}: image bytes differ"
    );
    ensure!(ra.content_sha256 == rb.content_sha256);
    ensure!(
        ra.files == files().len() as u64,
        "{fs}: {} files reported",
        ra.files
    );
    ensure!(ra.symlinks == 3);
    ensure!(ra.size_bytes == fs::metadata(&ra.path)?.len());
    Ok((tmp, ra))
}

/// A directory and the equivalent tarball give the same image.
fn tarball_matches(fs: Filesystem, tmp: &Path, dir_image: &RootfsReport, ext: &str) -> Result<()> {
    let tarball = tmp.join(format!("tree.{ext}"));
    write_tarball(&tmp.join("tree-a"), &tarball, 0)?;
    let r = build(fs, &tarball, &tmp.join(format!("from-{ext}.img")))?;
    ensure!(
        r.sha256 == dir_image.sha256,
        "{fs}: image from {ext} differs from the directory's"
    );
    Ok(())
}

#[test]
fn ext4_is_reproducible_and_reads_back() -> Result<()> {
    let (tmp, report) = reproducible(Filesystem::Ext4)?;
    let img = report.path.to_string_lossy().into_owned();
    tool("e2fsck", &["-fn", &img])?;
    ensure!(tool("debugfs", &["-R", "cat /etc/hostname", &img])? == "kernex\n");
    let blob = tmp.path().join("blob.bin");
    tool(
        "debugfs",
        &[
            "-R",
            &format!("dump /usr/lib/blob.bin {}", blob.display()),
            &img,
        ],
    )?;
    ensure!(fs::read(&blob)? == files()[4].2, "blob content differs");
    let ls = tool("debugfs", &["-R", "ls -l /", &img])?;
    for name in ["etc", "usr", "bin", "root", "lost+found"] {
        ensure!(ls.contains(name), "{name} missing from ls -l /: {ls}");
    }
    let stat = |p: &str| tool("debugfs", &["-R", &format!("stat {p}"), &img]);
    let link = stat("/usr/hostname")?;
    ensure!(
        link.contains("Type: symlink") && link.contains("../etc/hostname"),
        "{link}"
    );
    ensure!(
        stat("/usr/bin/su")?.contains("Mode:  04755"),
        "setuid bit lost"
    );
    ensure!(stat("/usr/bin/tool")?.contains("Mode:  0755"));
    ensure!(stat("/root")?.contains("Mode:  0700"));
    let shadow = stat("/etc/shadow")?;
    ensure!(
        shadow.contains("Mode:  0600") && shadow.contains("User:     0   Group:     0"),
        "{shadow}"
    );
    // Every time in the image is the requested timestamp (0x5f5e1000).
    for line in shadow.lines().filter(|l| l.contains("time:")) {
        ensure!(
            line.contains("0x5f5e1000:00000000"),
            "unexpected time: {line}"
        );
    }
    let super_block = tool("dumpe2fs", &["-h", &img])?;
    ensure!(
        super_block.contains(report.uuid.as_deref().unwrap_or("?")),
        "UUID not in superblock"
    );
    tarball_matches(Filesystem::Ext4, tmp.path(), &report, "tar.zst")
}

#[test]
fn squashfs_is_reproducible_and_reads_back() -> Result<()> {
    let (tmp, report) = reproducible(Filesystem::Squashfs)?;
    let img = report.path.to_string_lossy().into_owned();
    ensure!(tool("unsquashfs", &["-cat", &img, "etc/hostname"])? == "kernex\n");
    let list = tool("unsquashfs", &["-lln", &img])?;
    let line = |name: &str| {
        list.lines()
            .find(|l| l.ends_with(name))
            .unwrap_or_default()
            .to_string()
    };
    ensure!(
        line("/usr/hostname -> ../etc/hostname").starts_with("lrwxrwxrwx 0/0"),
        "{list}"
    );
    ensure!(line("/usr/bin/su").starts_with("-rwsr-xr-x 0/0"), "{list}");
    ensure!(line("/etc/shadow").starts_with("-rw------- 0/0"), "{list}");
    ensure!(line("/root").starts_with("drwx------ 0/0"), "{list}");
    ensure!(line("/usr/lib/blob.bin").contains(" 300001 "), "{list}");
    ensure!(
        line("/etc/shadow").contains("2020-09-13 12:26"),
        "timestamp not applied: {list}"
    );
    tarball_matches(Filesystem::Squashfs, tmp.path(), &report, "tar.gz")
}

#[test]
fn erofs_is_reproducible_and_reads_back() -> Result<()> {
    let (tmp, report) = reproducible(Filesystem::Erofs)?;
    let img = report.path.to_string_lossy().into_owned();
    let out = tmp.path().join("extracted");
    tool(
        "fsck.erofs",
        &[&format!("--extract={}", out.display()), &img],
    )?;
    ensure!(fs::read(out.join("etc/hostname"))? == b"kernex\n");
    ensure!(
        fs::read(out.join("usr/lib/blob.bin"))? == files()[4].2,
        "blob content differs"
    );
    ensure!(fs::read_link(out.join("usr/hostname"))? == Path::new("../etc/hostname"));
    ensure!(fs::read_link(out.join("usr/dangling"))? == Path::new("/nowhere/at/all"));
    let mode = |p: &str| -> Result<u32> { Ok(fs::symlink_metadata(out.join(p))?.mode() & 0o7777) };
    ensure!(mode("usr/bin/su")? & 0o777 == 0o755);
    // fsck.erofs/dump.erofs 1.5 drop the setuid bit when showing or
    // extracting, so read the on-disk inode.
    ensure!(
        erofs_mode(&img, "/usr/bin/su")? == 0o104755,
        "setuid bit lost"
    );
    ensure!(mode("etc/shadow")? == 0o600);
    ensure!(mode("root")? == 0o700);
    ensure!(fs::read_dir(out.join("usr/share/many"))?.count() == 300);
    let sb = tool("dump.erofs", &["-s", &img])?;
    ensure!(
        sb.contains(report.uuid.as_deref().unwrap_or("?")),
        "UUID not in superblock: {sb}"
    );
    tarball_matches(Filesystem::Erofs, tmp.path(), &report, "tar")
}

/// `i_mode` of `path` straight from the image: dump.erofs gives the inode's
/// NID and the metadata start block; the mode is the u16 at byte 4 of the inode.
fn erofs_mode(img: &str, path: &str) -> Result<u32> {
    let field = |text: &str, key: &str| -> Result<u64> {
        let rest = text
            .split(key)
            .nth(1)
            .with_context(|| format!("no {key:?} in {text}"))?;
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Ok(digits.parse()?)
    };
    let nid = field(
        &tool("dump.erofs", &[&format!("--path={path}"), img])?,
        "NID:",
    )?;
    let meta = field(
        &tool("dump.erofs", &["-s", img])?,
        "inode metadata start block:",
    )?;
    let bytes = fs::read(img)?;
    let at = usize::try_from(meta * 4096 + nid * 32 + 4)?;
    let raw = bytes.get(at..at + 2).context("inode beyond the image")?;
    Ok(u32::from(u16::from_le_bytes([raw[0], raw[1]])))
}

#[test]
fn tarball_owners_are_kept() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    fs::create_dir_all(tree.join("home/user"))?;
    fs::write(tree.join("home/user/notes"), "hi\n")?;
    let tarball = tmp.path().join("owned.tar");
    write_tarball(&tree, &tarball, 1000)?;
    let out = tmp.path().join("owned.img");
    let result = build(Filesystem::Ext4, &tarball, &out);
    if fs::metadata("/proc/self")?.uid() != 0 {
        let err = format!(
            "{:#}",
            result
                .err()
                .context("non-root build with uid 1000 succeeded")?
        );
        ensure!(
            err.contains("owned by 1000:1000") && err.contains("root"),
            "{err}"
        );
        return Ok(());
    }
    result?;
    let stat = tool(
        "debugfs",
        &["-R", "stat /home/user/notes", &out.to_string_lossy()],
    )?;
    ensure!(stat.contains("User:  1000   Group:  1000"), "{stat}");
    Ok(())
}

/// A tar entry: raw name, type, link target.
type RawEntry<'a> = (&'a str, tar::EntryType, &'a str);

/// A tarball whose entries have the raw names given (bypassing the tar
/// crate's own path checks).
fn evil_tarball(out: &Path, entries: &[RawEntry<'_>]) -> Result<()> {
    let mut builder = tar::Builder::new(File::create(out)?);
    for (name, kind, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_mut_bytes()[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(if *kind == tar::EntryType::Regular {
            4
        } else {
            0
        });
        if !link.is_empty() {
            h.set_link_name(link)?;
        }
        h.set_cksum();
        let data: &[u8] = if *kind == tar::EntryType::Regular {
            b"pwn\n"
        } else {
            b""
        };
        builder.append(&h, data)?;
    }
    builder.finish()?;
    Ok(())
}

#[test]
fn escaping_tarballs_are_rejected() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cases: [(&str, Vec<RawEntry<'_>>, &str); 5] = [
        (
            "dotdot.tar",
            vec![("../evil", tar::EntryType::Regular, "")],
            "../evil contains '..'",
        ),
        (
            "nested.tar",
            vec![("etc/../../evil", tar::EntryType::Regular, "")],
            "contains '..'",
        ),
        (
            "absolute.tar",
            vec![("/tmp/evil", tar::EntryType::Regular, "")],
            "/tmp/evil is absolute",
        ),
        (
            "through-symlink.tar",
            vec![
                ("escape", tar::EntryType::Symlink, "/tmp"),
                ("escape/evil", tar::EntryType::Regular, ""),
            ],
            "parent /escape is a symlink",
        ),
        (
            "hardlink-through-symlink.tar",
            vec![
                ("escape", tar::EntryType::Symlink, "/etc"),
                ("copy", tar::EntryType::Link, "escape/hostname"),
            ],
            "parent /escape is not a directory",
        ),
    ];
    for (name, entries, expected) in cases {
        let tarball = tmp.path().join(name);
        evil_tarball(&tarball, &entries)?;
        let out = tmp.path().join(format!("{name}.img"));
        let result = build(Filesystem::Squashfs, &tarball, &out);
        let err = format!(
            "{:#}",
            result
                .err()
                .with_context(|| format!("{name} was accepted"))?
        );
        ensure!(
            err.contains(expected) && err.contains(name),
            "{name}: unclear error: {err}"
        );
        ensure!(!out.exists(), "{name}: an image was written");
    }
    ensure!(
        !Path::new("/tmp/evil").exists() && !tmp.path().join("evil").exists(),
        "a file escaped"
    );
    Ok(())
}

#[test]
fn too_small_ext4_size_is_a_clear_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree)?;
    fs::write(tree.join("big"), vec![7u8; 3 << 20])?;
    let mut opts = RootfsOptions::new(Filesystem::Ext4);
    opts.size = Some(2 << 20);
    let out = tmp.path().join("small.img");
    let err = format!(
        "{:#}",
        build_rootfs(&tree, &out, &opts)
            .err()
            .context("2 MiB image held 3 MiB")?
    );
    ensure!(
        err.contains("mkfs.ext4 failed for") && err.contains("too small"),
        "{err}"
    );
    ensure!(
        err.contains("Could not allocate") || err.contains("No space"),
        "no mkfs output in: {err}"
    );
    ensure!(!out.exists());
    // The automatic size fits the same content.
    opts.size = None;
    let report = build_rootfs(&tree, &out, &opts)?;
    tool("e2fsck", &["-fn", &out.to_string_lossy()])?;
    ensure!(report.size_bytes > 3 << 20);
    Ok(())
}

#[test]
fn options_that_a_filesystem_cannot_honour_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("x.img");
    let mut opts = RootfsOptions::new(Filesystem::Squashfs);
    opts.label = Some("root".into());
    let err = format!(
        "{:#}",
        build_rootfs(tmp.path(), &out, &opts)
            .err()
            .context("label accepted")?
    );
    ensure!(err.contains("squashfs has no volume label"), "{err}");
    let mut opts = RootfsOptions::new(Filesystem::Ext4);
    opts.uuid = Some("nope".into());
    let err = format!(
        "{:#}",
        build_rootfs(tmp.path(), &out, &opts)
            .err()
            .context("bad uuid accepted")?
    );
    ensure!(err.contains("invalid UUID"), "{err}");
    let err = format!(
        "{:#}",
        build(Filesystem::Erofs, &tmp.path().join("missing"), &out)
            .err()
            .context("missing input")?
    );
    ensure!(err.contains("missing"), "{err}");
    let inside = tmp.path().join("rootfs.img");
    let err = format!(
        "{:#}",
        build(Filesystem::Erofs, tmp.path(), &inside)
            .err()
            .context("output inside input")?
    );
    ensure!(err.contains("is inside the input directory"), "{err}");
    Ok(())
}

#[test]
fn given_uuid_and_label_are_used() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree)?;
    fs::write(tree.join("f"), "x")?;
    let mut opts = RootfsOptions::new(Filesystem::Ext4);
    opts.uuid = Some("0123abcd-0000-4000-8000-000000000001".into());
    opts.label = Some("kernex-root".into());
    let out = tmp.path().join("x.img");
    let report = build_rootfs(&tree, &out, &opts)?;
    let sb = tool("dumpe2fs", &["-h", &out.to_string_lossy()])?;
    ensure!(
        sb.contains("0123abcd-0000-4000-8000-000000000001") && sb.contains("kernex-root"),
        "{sb}"
    );
    ensure!(report.uuid.as_deref() == Some("0123abcd-0000-4000-8000-000000000001"));
    // Timestamp 0 (the default) is honoured too, though libext2fs reads
    // E2FSPROGS_FAKE_TIME=0 as unset.
    ensure!(
        !sb.contains("Filesystem created:"),
        "mkfs time is not 0: {sb}"
    );
    ensure!(
        sb.contains("Last write time:          Thu Jan  1 00:00:00 1970"),
        "{sb}"
    );
    let stat = tool("debugfs", &["-R", "stat /f", &out.to_string_lossy()])?;
    ensure!(
        stat.lines()
            .filter(|l| l.contains("time: 0x00000000:00000000"))
            .count()
            == 4,
        "{stat}"
    );
    Ok(())
}
