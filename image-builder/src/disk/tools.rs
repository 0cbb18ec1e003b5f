//! The filesystem tools `disk create` and `provision` run on offsets inside
//! an image file: `mkfs.vfat --offset` and `mcopy -i FILE@@OFFSET`
//! (dosfstools, mtools) for the FAT boot partition, `mkfs.ext4 -E offset=`
//! and `debugfs FILE?offset=` (e2fsprogs) for the data partition.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs `cmd`; on failure the error names the program, its package and
/// what it printed.
pub fn run(cmd: &mut Command, package: &str) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .with_context(|| {
            format!("unable to run {program} (package {package}; scripts/setup installs it)")
        })?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `disk.img@@OFFSET`, mtools' way of naming a filesystem inside a file.
pub fn mtools_image(disk: &Path, offset: u64) -> String {
    format!("{}@@{offset}", disk.display())
}

/// `disk.img?offset=OFFSET`, e2fsprogs' way of naming one.
pub fn e2fs_image(disk: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", disk.display())
}

/// Makes a FAT filesystem of `size` bytes at `offset` in `disk`.
pub fn mkfs_vfat(
    disk: &Path,
    offset: u64,
    size: u64,
    bits: u8,
    label: &str,
    volume_id: u32,
) -> Result<()> {
    let mut cmd = Command::new("mkfs.vfat");
    let sectors = size / 512;
    let per_cluster = if bits == 32 {
        // FAT32 needs at least 65525 clusters (readers such as mtools and
        // some firmware insist): the largest cluster up to 4 KiB that
        // leaves enough, with room for the FATs and reserved sectors.
        let mut n = 8;
        while n > 1 && sectors / n < 66_000 {
            n /= 2;
        }
        n
    } else {
        // FAT16: 4085 to 65524 clusters; the smallest cluster that stays
        // below the maximum.
        let mut n = 1;
        while n < 64 && sectors / n > 65_000 {
            n *= 2;
        }
        n
    };
    cmd.arg("-s").arg(per_cluster.to_string());
    run(
        cmd.arg("-F")
            .arg(bits.to_string())
            .arg("-n")
            .arg(label)
            .arg("-i")
            .arg(format!("{volume_id:08X}"))
            .arg("-h")
            .arg((offset / 512).to_string())
            .arg("--offset")
            .arg((offset / 512).to_string())
            .arg(disk)
            .arg((size / 1024).to_string()),
        "dosfstools",
    )
    .with_context(|| format!("unable to make the FAT boot filesystem at byte {offset}"))?;
    Ok(())
}

/// Copies the entries of `dir` (recursively) to the root of the FAT at
/// `offset` in `disk`.
pub fn mcopy_tree(disk: &Path, offset: u64, dir: &Path) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("unable to read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("unable to read {}", dir.display()))?;
    if entries.is_empty() {
        return Ok(());
    }
    entries.sort();
    run(
        Command::new("mcopy")
            .args(["-s", "-o", "-i"])
            .arg(mtools_image(disk, offset))
            .args(&entries)
            .arg("::"),
        "mtools",
    )
    .context("unable to copy the boot files onto the FAT boot partition")?;
    Ok(())
}

/// Makes an ext4 filesystem of `size` bytes at `offset` in `disk`, holding
/// the tree `dir` (owned by root).
pub fn mkfs_ext4(disk: &Path, offset: u64, size: u64, label: &str, dir: &Path) -> Result<()> {
    run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-d"])
            .arg(dir)
            .arg("-E")
            .arg(format!("offset={offset},root_owner=0:0,nodiscard"))
            .arg(disk)
            .arg(format!("{}k", size / 1024)),
        "e2fsprogs",
    )
    .with_context(|| format!("unable to make the ext4 data filesystem at byte {offset}"))?;
    Ok(())
}

/// Runs debugfs `requests` (one per line) against the ext4 filesystem at
/// `offset` in `disk`; `write` opens it read-write.
pub fn debugfs(disk: &Path, offset: u64, requests: &str, write: bool) -> Result<String> {
    let dir = tempfile::tempdir().context("unable to create a temporary directory")?;
    let cmds = dir.path().join("requests");
    std::fs::write(&cmds, requests).context("unable to write the debugfs requests")?;
    let mut cmd = Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    cmd.arg("-f").arg(&cmds).arg(e2fs_image(disk, offset));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("unable to run debugfs (package e2fsprogs; scripts/setup installs it)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // debugfs exits 0 even when a request fails; it reports on stderr
    // after its banner line.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !out.status.success() || !errors.is_empty() {
        bail!("debugfs failed ({}): {}", out.status, errors.join("; "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Reads the file `path` of the ext4 filesystem at `offset` in `disk`, or
/// `None` when it does not exist.
pub fn ext4_read(disk: &Path, offset: u64, path: &str) -> Result<Option<Vec<u8>>> {
    let dir = tempfile::tempdir().context("unable to create a temporary directory")?;
    let out = dir.path().join("file");
    let requests = format!("dump -p {path} {}\n", out.display());
    match debugfs(disk, offset, &requests, false) {
        Ok(_) if out.exists() => Ok(Some(
            std::fs::read(&out).with_context(|| format!("unable to read {path} back"))?,
        )),
        Ok(_) => Ok(None),
        Err(e) if e.to_string().contains("File not found") => Ok(None),
        Err(e) => Err(e),
    }
}
