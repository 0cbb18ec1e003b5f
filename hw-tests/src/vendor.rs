//! Vendor boards: the factory image `kernex-image disk create --board
//! <profile>` makes for a real board's profile, booted through that board's
//! real boot path on an emulated machine.
//!
//! - [`VendorBoard::RaspberryPi4OnRaspi3b`]: the `raspberrypi4-64` image on
//!   QEMU's `raspi3b` (the scenarios run here). QEMU does what the Pi's
//!   VideoCore firmware does with the image's `config.txt`
//!   (`kernel=u-boot.bin`, `arm_64bit=1`): it loads the boot partition's
//!   `u-boot.bin` (Debian's `u-boot-rpi`) as the kernel at 0x80000 and
//!   passes the board's device tree from the boot partition. U-Boot loads
//!   `uboot.env` from FAT, runs `boot.scr`, saves the env back to FAT and
//!   `booti`s the slot's kernel with that device tree; Linux finds the SD
//!   card as `/dev/mmcblk0` and the updater writes the env through the
//!   `fw_env.config` `disk create` put on the data partition.
//! - [`VendorBoard::RaspberryPi4OnRaspi4b`]: the same image on `raspi4b`,
//!   where Debian's kernel cannot boot yet (its test is ignored).
//!
//! Everything that differs from the QEMU `virt` board lives here; the
//! scenarios, the console driver and the releases are the same code.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::arch::Arch;
use crate::assets::Assets;
use crate::guest::{GuestLayout, kernex_image_cli};
use crate::run;

/// Where bundles are put on a vendor board's data partition (one disk: a
/// Pi has no second one QEMU could plug in), as the guest sees it.
pub const BUNDLES_DIR: &str = "/data/kernex-hw/bundles";

/// A vendor board and the QEMU machine it is emulated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VendorBoard {
    /// The `raspberrypi4-64` image on QEMU's `raspi3b`: the image's
    /// `u-boot.bin` is Debian's `rpi_arm64` build (one U-Boot for the Pi 3
    /// and the Pi 4) and the firmware's device tree for this board,
    /// `bcm2837-rpi-3-b.dtb` (Debian's arm64 kernel), sits beside
    /// `bcm2711-rpi-4-b.dtb` on the boot partition, as on a card made for
    /// both. Linux cannot boot on `raspi4b` (below), so this is the machine
    /// the scenarios run on.
    RaspberryPi4OnRaspi3b,
    /// The same profile on QEMU's `raspi4b` with the `rpi_4` U-Boot and
    /// `bcm2711-rpi-4-b.dtb`. U-Boot runs the whole Kernex boot path there,
    /// but Debian's kernel dies early: QEMU 10 does not emulate the BCM2711's
    /// `brcm,l2-intc` interrupt controllers (`brcmstb_l2_intc_of_init`
    /// faults, "Attempted to kill init"; hw-tests/README.md has the console).
    /// Its test is `#[ignore]`d until QEMU does.
    RaspberryPi4OnRaspi4b,
}

impl VendorBoard {
    /// A short name for artefact directories.
    pub fn name(self) -> &'static str {
        match self {
            VendorBoard::RaspberryPi4OnRaspi3b => "rpi4-image-raspi3b",
            VendorBoard::RaspberryPi4OnRaspi4b => "rpi4-image-raspi4b",
        }
    }

    /// QEMU's machine, the U-Boot build (Debian's `u-boot-rpi`) and the
    /// device tree the firmware would pick for it.
    fn pi(self) -> (&'static str, &'static str, &'static str) {
        match self {
            VendorBoard::RaspberryPi4OnRaspi3b => ("raspi3b", "rpi_arm64", "bcm2837-rpi-3-b.dtb"),
            VendorBoard::RaspberryPi4OnRaspi4b => ("raspi4b", "rpi_4", "bcm2711-rpi-4-b.dtb"),
        }
    }

    /// The built-in `kernex-image` board profile the factory image is made for.
    pub fn profile(self) -> &'static str {
        "raspberrypi4-64"
    }

    /// The architecture of the guest's kernel, BusyBox and updater.
    pub fn arch(self) -> Arch {
        Arch::Arm64
    }

    /// The disk size given to `disk create --size`: QEMU's SD card must be
    /// a power of two (a real card is whatever it is; the profile's data
    /// partition grows into the rest).
    pub fn disk_size(self) -> &'static str {
        "8GiB"
    }

    /// How the guest sees the image: the profile's devices and mounts,
    /// the kernel where the profile's boot script loads it from, and the
    /// config `disk create` wrote on the data partition.
    pub fn layout(self) -> GuestLayout {
        GuestLayout {
            compatible: self.profile().into(),
            boot_dev: "/dev/mmcblk0p1".into(),
            boot_mount: "/boot/firmware".into(),
            data_dev: "/dev/mmcblk0p4".into(),
            bundles_dev: None,
            bundles_dir: Some(BUNDLES_DIR.into()),
            kernel_path: "boot/Image".into(),
            modules: PI_MODULES.iter().map(|m| m.to_string()).collect(),
            config_link: Some("/data/etc/kernex/system.toml".into()),
            panic_after_modules: true,
        }
    }

    /// The vendor's boot files (`disk create --boot-files`), laid out in `dir`
    /// as the profile's `vendor-boot-files` name them.
    ///
    /// Pi 4: `u-boot.bin` is Debian's `u-boot-rpi` `rpi_4` build and
    /// `bcm2711-rpi-4-b.dtb` the device tree of Debian's arm64 kernel (both
    /// pinned by scripts/setup). `start4.elf` and `fixup4.dat`, the
    /// VideoCore GPU firmware, are not in Debian's main archive
    /// (`raspi-firmware` is in non-free-firmware): they are stand-in files
    /// here, which QEMU never reads (it does their job itself). A vendor
    /// puts Raspberry Pi's own files there.
    pub fn boot_files(self, assets: &Assets, dir: &Path) -> Result<()> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let (_, uboot, dtb) = self.pi();
        let uboot = rpi_dir().join(format!("root/usr/lib/u-boot/{uboot}/u-boot.bin"));
        let dtbs = assets.root.join(format!(
            "usr/lib/linux-image-{}/broadcom",
            assets.kernel_release
        ));
        let mut files = vec![(uboot, "u-boot.bin".to_owned())];
        for name in ["bcm2711-rpi-4-b.dtb", dtb] {
            files.push((dtbs.join(name), name.to_owned()));
        }
        for (src, name) in &files {
            std::fs::copy(src, dir.join(name)).with_context(|| {
                format!(
                    "copy {} (run scripts/setup: 73-hw-tests-rpi.sh, 71-hw-tests-arm64.sh)",
                    src.display()
                )
            })?;
        }
        for name in ["start4.elf", "fixup4.dat"] {
            std::fs::write(
                dir.join(name),
                format!(
                    "kernex hw-tests stand-in for the Raspberry Pi GPU firmware's {name}: \
                     QEMU does the firmware's job; a real card needs the file \
                     from github.com/raspberrypi/firmware\n"
                ),
            )?;
        }
        Ok(())
    }

    /// The QEMU command that powers the board on with `disk` as its only
    /// disk. `work` receives the files QEMU is given besides the disk, taken
    /// from the disk's own boot partition, as the board's firmware takes them.
    pub fn command(self, disk: &Path, work: &Path) -> Result<Command> {
        std::fs::create_dir_all(work)?;
        let (machine, _, dtb) = self.pi();
        // What the firmware reads: config.txt says kernel=u-boot.bin; the
        // device tree is the board's own, from the boot partition.
        let config = boot_file(disk, "config.txt", work)?;
        let config = String::from_utf8_lossy(&std::fs::read(&config)?).into_owned();
        let kernel = config_txt_kernel(&config)
            .context("the image's config.txt names no kernel= for the firmware")?;
        let uboot = boot_file(disk, &kernel, work)?;
        let dtb = boot_file(disk, dtb, work)?;
        let mut cmd = Command::new("qemu-system-aarch64");
        // One host thread for the board's four cores: on a shared 2-core
        // machine this boots faster (U-Boot read the 33 MB kernel in 15 s,
        // against 32 s with a thread per core) and leaves a core free.
        cmd.args(["-M", machine, "-accel", "tcg,thread=single", "-kernel"])
            .arg(&uboot)
            .arg("-dtb")
            .arg(&dtb)
            .arg("-drive")
            .arg(format!("if=sd,format=raw,file={}", disk.display()))
            // UART0 (the PL011, Bluetooth's on a Pi) is not the console; the
            // mini UART (enable_uart=1, the device tree's serial1) is:
            // U-Boot's and Linux's.
            .args(["-display", "none", "-monitor", "none"])
            .args(["-serial", "null", "-serial", "stdio"]);
        Ok(cmd)
    }
}

/// The Pi's watchdog, its SD controllers (the Pi 3's `sdhost`; `mmc@7e300000`,
/// `brcm,bcm2835-sdhci`, driven by `sdhci-iproc`) and the filesystems, in
/// dependency order. Debian builds them as modules; the MMC core and block
/// driver are built in.
const PI_MODULES: &[&str] = &[
    // The Pi's only restart handler in Debian's kernel (the PM watchdog):
    // without it `reboot -f` and `panic=` halt the board instead.
    "kernel/drivers/watchdog/bcm2835_wdt.ko",
    // The Pi 3's SD card controller (sdhost; QEMU switches the card to it
    // when Linux muxes the pins to it).
    "kernel/drivers/mmc/host/bcm2835.ko",
    "kernel/drivers/mmc/host/sdhci.ko",
    "kernel/drivers/mmc/host/sdhci-pltfm.ko",
    "kernel/drivers/mmc/host/sdhci-iproc.ko",
    "kernel/lib/crc16.ko",
    "kernel/fs/mbcache.ko",
    "kernel/fs/jbd2/jbd2.ko",
    "kernel/crypto/crc32c_generic.ko",
    "kernel/fs/ext4/ext4.ko",
    "kernel/fs/fat/fat.ko",
    "kernel/fs/fat/vfat.ko",
    "kernel/fs/nls/nls_cp437.ko",
    "kernel/fs/nls/nls_utf8.ko",
    "kernel/fs/nls/nls_ascii.ko",
];

/// The file the firmware starts, from `config.txt` (`kernel=`; the last
/// one wins, as in the firmware).
pub fn config_txt_kernel(config: &str) -> Option<String> {
    config
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter_map(|l| l.strip_prefix("kernel="))
        .map(str::trim)
        .rfind(|v| !v.is_empty())
        .map(str::to_owned)
}

/// `$KERNEX_CACHE/hw-tests-rpi` (scripts/setup.d/73-hw-tests-rpi.sh);
/// `KERNEX_HW_ASSETS_RPI` overrides it.
pub fn rpi_dir() -> PathBuf {
    std::env::var_os("KERNEX_HW_ASSETS_RPI")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(
                std::env::var_os("KERNEX_CACHE").unwrap_or_else(|| "/var/cache/kernex-ci".into()),
            )
            .join("hw-tests-rpi")
        })
}

/// Writes the factory image of `board` to `out`: `kernex-image disk create`
/// (the CLI's own code, in this process) with slot A from the signed
/// `bundle`, checked against `ca`, and the vendor's `boot_files`.
pub fn factory_disk(
    board: VendorBoard,
    bundle: &Path,
    ca: &Path,
    boot_files: &Path,
    out: &Path,
) -> Result<()> {
    let s = |p: &Path| p.display().to_string();
    kernex_image_cli(&[
        "disk",
        "create",
        "--board",
        board.profile(),
        "--bundle",
        &s(bundle),
        "--keyring",
        &s(ca),
        "--boot-files",
        &s(boot_files),
        "--size",
        board.disk_size(),
        "--output",
        &s(out),
        "--json",
    ])
}

/// The byte offset of partition `number` (1-based) in `disk` (`sfdisk -J`).
pub fn partition_start(disk: &Path, number: usize) -> Result<u64> {
    let out = run(Command::new("sfdisk").arg("-J").arg(disk))?;
    let table: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("sfdisk -J printed no JSON")?;
    let parts = table["partitiontable"]["partitions"]
        .as_array()
        .context("sfdisk -J: no partitions")?;
    let p = parts
        .get(number.checked_sub(1).context("partitions count from 1")?)
        .with_context(|| format!("{} has no partition {number}", disk.display()))?;
    let start = p["start"].as_u64().context("sfdisk -J: no start")?;
    let sector = table["partitiontable"]["sectorsize"]
        .as_u64()
        .unwrap_or(512);
    Ok(start * sector)
}

/// Copies `files` into [`BUNDLES_DIR`] on the data partition (ext4, the
/// 4th) of the factory image `disk`, with `debugfs` at the partition's
/// offset (no root, no loop device): the Pi has one disk, and the test puts
/// the releases where a download would put them. The image is otherwise
/// the factory image, byte for byte.
pub fn add_bundles(disk: &Path, files: &[&Path]) -> Result<()> {
    let fs = format!("{}?offset={}", disk.display(), partition_start(disk, 4)?);
    let mut script =
        String::from("mkdir kernex-hw\nmkdir kernex-hw/bundles\ncd kernex-hw/bundles\n");
    for f in files {
        let name = f
            .file_name()
            .context("a bundle without a file name")?
            .to_string_lossy();
        script.push_str(&format!("write {} {name}\n", f.display()));
    }
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(&fs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("run debugfs (e2fsprogs)")?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("debugfs stdin")?
            .write_all(script.as_bytes())?;
    }
    let res = child.wait_with_output()?;
    let err = String::from_utf8_lossy(&res.stderr);
    // debugfs exits 0 even when a request fails; it says so on stderr.
    if !res.status.success() || err.lines().any(|l| !l.starts_with("debugfs ")) {
        bail!("debugfs on {fs} failed: {err}");
    }
    Ok(())
}

/// Copies the file `name` out of `disk`'s boot partition (FAT, the first)
/// into `work`.
pub fn boot_file(disk: &Path, name: &str, work: &Path) -> Result<PathBuf> {
    let out = work.join(name.replace('/', "_"));
    let _ = std::fs::remove_file(&out);
    run(Command::new("mcopy")
        .arg("-n")
        .arg("-i")
        .arg(format!("{}@@{}", disk.display(), partition_start(disk, 1)?))
        .arg(format!("::{name}"))
        .arg(&out))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_txt_kernel_is_the_last_uncommented_one() {
        assert_eq!(
            config_txt_kernel("arm_64bit=1\n#kernel=old.bin\nkernel=u-boot.bin # U-Boot\n"),
            Some("u-boot.bin".into())
        );
        assert_eq!(config_txt_kernel("kernel=a\nkernel=b\n"), Some("b".into()));
        assert_eq!(config_txt_kernel("arm_64bit=1\n"), None);
        assert_eq!(config_txt_kernel("kernel=\n"), None);
    }
}
