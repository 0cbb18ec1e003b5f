//! The factory disk image (MBR, in a plain file: no root, no loop devices):
//!
//! | # | what | filesystem | size |
//! | - | --- | --- | --- |
//! | 1 | boot (bootable flag): `boot.scr`, `uboot.env` | FAT | 16 MiB |
//! | 2 | slot A: the factory release | ext4 (a `kernex-image` rootfs image) | 96 MiB |
//! | 3 | slot B: empty | — | 96 MiB |
//! | 4 | data: `/data/kernex`, the updater's state | ext4 | 32 MiB |
//!
//! The same on both boards (the arm64 kernel `Image`, uncompressed, is
//! 33 MB: the slots are sized for it).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use u_boot_env::{Config, DeviceConfig, Env, Store};

use crate::arch::Arch;
use crate::{run, write_at};

/// The env file on the boot partition (see bootloader/uboot/boot-x86.cmd).
pub const ENV_FILE: &str = "uboot.env";
/// Its size (the script's `kernex_envsize`).
pub const ENV_SIZE: usize = 0x4000;

const MIB: u64 = 1024 * 1024;
/// Partition (start, size) in bytes: boot, A, B, data.
pub const PARTITIONS: [(u64, u64); 4] = [
    (MIB, 16 * MIB),
    (17 * MIB, 96 * MIB),
    (113 * MIB, 96 * MIB),
    (209 * MIB, 32 * MIB),
];
pub const DISK_SIZE: u64 = 241 * MIB;

/// The boot-state variables written into the factory env.
#[derive(Debug, Clone)]
pub struct FactoryEnv {
    pub boot_order: String,
    pub a_left: u32,
    pub b_left: u32,
}

impl Default for FactoryEnv {
    /// Slot A only: slot B is empty, so it has no attempts.
    fn default() -> Self {
        FactoryEnv {
            boot_order: "A B".into(),
            a_left: 3,
            b_left: 0,
        }
    }
}

/// Builds the U-Boot script from `bootloader/uboot/boot-x86.cmd` for
/// `arch` (the env-file script: neither board's U-Boot keeps its env where
/// Linux can write it; see the script's header).
pub fn boot_scr(arch: Arch, work: &Path) -> Result<PathBuf> {
    let cmd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bootloader/uboot/boot-x86.cmd");
    let scr = work.join("boot.scr");
    run(Command::new("mkimage")
        .args([
            "-A",
            arch.mkimage_arch(),
            "-O",
            "linux",
            "-T",
            "script",
            "-C",
            "none",
            "-n",
            "kernex-boot",
        ])
        .arg("-d")
        .arg(&cmd)
        .arg(&scr))?;
    Ok(scr)
}

/// An env file as U-Boot's `env export -c` and fw_setenv write it.
pub fn env_file(path: &Path, env: &FactoryEnv) -> Result<()> {
    std::fs::write(path, vec![0u8; ENV_SIZE])?;
    let mut store = Store::open(&Config::single(DeviceConfig::new(path, 0, ENV_SIZE)))?;
    let mut e = Env::new();
    e.set("BOOT_ORDER", &env.boot_order)?;
    e.set("BOOT_A_LEFT", &env.a_left.to_string())?;
    e.set("BOOT_B_LEFT", &env.b_left.to_string())?;
    store.write(&e)?;
    Ok(())
}

/// Reads the boot-state variables out of a disk image's boot partition
/// (what U-Boot last saved, or what Linux wrote).
pub fn read_env(disk: &Path, work: &Path) -> Result<Env> {
    let out = work.join("uboot.env.read");
    let _ = std::fs::remove_file(&out);
    run(Command::new("mcopy")
        .arg("-n")
        .arg("-i")
        .arg(format!("{}@@{}", disk.display(), PARTITIONS[0].0))
        .arg(format!("::{ENV_FILE}"))
        .arg(&out))?;
    let mut store = Store::open_read_only(&Config::single(DeviceConfig::new(&out, 0, ENV_SIZE)))?;
    Ok(store.read()?)
}

/// Parses the contents of an env file (`uboot.env`, as read from a running
/// board); `work` holds a scratch copy.
pub fn parse_env(data: &[u8], work: &Path) -> Result<Env> {
    std::fs::create_dir_all(work)?;
    let out = work.join("uboot.env.read");
    std::fs::write(&out, data)?;
    let mut store = Store::open_read_only(&Config::single(DeviceConfig::new(&out, 0, ENV_SIZE)))?;
    Ok(store.read()?)
}

/// Writes the factory disk image: partition table, boot partition (script
/// and env), slot A = `slot_a`, slot B zeroed, an empty ext4 data partition.
pub fn factory_image(
    arch: Arch,
    out: &Path,
    work: &Path,
    slot_a: &Path,
    env: &FactoryEnv,
) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let f = std::fs::File::create(out)?;
    f.set_len(DISK_SIZE)?;
    drop(f);
    let sector = |b: u64| b / 512;
    let table = format!(
        "label: dos\nunit: sectors\n\
         start={}, size={}, type=c, bootable\n\
         start={}, size={}, type=83\n\
         start={}, size={}, type=83\n\
         start={}, size={}, type=83\n",
        sector(PARTITIONS[0].0),
        sector(PARTITIONS[0].1),
        sector(PARTITIONS[1].0),
        sector(PARTITIONS[1].1),
        sector(PARTITIONS[2].0),
        sector(PARTITIONS[2].1),
        sector(PARTITIONS[3].0),
        sector(PARTITIONS[3].1),
    );
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run sfdisk (fdisk package; scripts/setup)")?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("sfdisk stdin")?
            .write_all(table.as_bytes())?;
    }
    let res = child.wait_with_output()?;
    if !res.status.success() {
        bail!("sfdisk failed: {}", String::from_utf8_lossy(&res.stderr));
    }

    // Boot partition: FAT with boot.scr and uboot.env.
    let boot = work.join("boot.vfat");
    let _ = std::fs::remove_file(&boot);
    run(Command::new("mkfs.vfat")
        .args(["-n", "KXBOOT", "-C"])
        .arg(&boot)
        .arg((PARTITIONS[0].1 / 1024).to_string()))?;
    let scr = boot_scr(arch, work)?;
    let envf = work.join(ENV_FILE);
    env_file(&envf, env)?;
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&boot)
        .arg(&scr)
        .arg(&envf)
        .arg("::"))?;
    copy_into(out, PARTITIONS[0], &boot)?;

    // Slot A.
    copy_into(out, PARTITIONS[1], slot_a)?;

    // Data partition.
    let data = work.join("data.ext4");
    let _ = std::fs::remove_file(&data);
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "kxdata", "-F"])
        .arg(&data)
        .arg(format!("{}k", PARTITIONS[3].1 / 1024)))?;
    copy_into(out, PARTITIONS[3], &data)?;
    Ok(())
}

fn copy_into(disk: &Path, (start, size): (u64, u64), image: &Path) -> Result<()> {
    let data = std::fs::read(image).with_context(|| format!("read {}", image.display()))?;
    if data.len() as u64 > size {
        bail!(
            "{} is {} bytes, larger than its {size}-byte partition",
            image.display(),
            data.len()
        );
    }
    write_at(disk, start, &data)
}

/// A second disk (ext4, no partition table) holding `files` at its root:
/// the guest mounts it read-only at /bundles.
pub fn bundles_disk(out: &Path, work: &Path, files: &[&Path]) -> Result<()> {
    let dir = work.join("bundles-disk");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut total = 0;
    for f in files {
        let name = f.file_name().context("bundle has no file name")?;
        std::fs::copy(f, dir.join(name))?;
        total += std::fs::metadata(f)?.len();
    }
    let _ = std::fs::remove_file(out);
    let kib = total / 1024 + 8 * 1024 + total / 1024 / 5;
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "kxbundles", "-F", "-d"])
        .arg(&dir)
        .arg(out)
        .arg(format!("{kib}k")))?;
    Ok(())
}
