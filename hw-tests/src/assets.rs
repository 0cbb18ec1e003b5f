//! What the guest is made of, found on the build host.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// U-Boot for QEMU's `pc` machine (Debian's u-boot-qemu). The 32-bit build: the
/// 64-bit one (qemu-x86_64) resets the board in zboot before the kernel
/// prints anything; the 32-bit one boots the same x86_64 bzImage.
pub const UBOOT_ROM: &str = "/usr/lib/u-boot/qemu-x86/u-boot.rom";

/// The tpm2-tss TCTI for the kernel's TPM device (`device:/dev/tpmrm0`).
pub const TCTI_DEVICE: &str = "/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0";

/// Kernel modules the guest loads, in dependency order (the Debian amd64
/// kernel builds virtio, virtio-net, ext4 and vfat as modules).
pub const MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/block/virtio_blk.ko",
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
    // The NIC on QEMU's user network (the daemon scenario).
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
];

/// The kernel, modules and BusyBox unpacked by scripts/setup.d/70-hw-tests.sh.
#[derive(Debug, Clone)]
pub struct Assets {
    pub root: PathBuf,
    pub kernel_release: String,
    /// The `kernex-updater` binary and the shared libraries it needs
    /// (guest path, host path), the dynamic loader included.
    pub updater: PathBuf,
    pub libraries: Vec<(String, PathBuf)>,
}

impl Assets {
    /// Finds everything; a missing piece is an error naming how to get it.
    pub fn find(updater: PathBuf) -> Result<Self> {
        let dir = std::env::var_os("KERNEX_HW_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(
                    std::env::var_os("KERNEX_CACHE")
                        .unwrap_or_else(|| "/var/cache/kernex-ci".into()),
                )
                .join("hw-tests")
            });
        let pinned = std::fs::read_to_string(dir.join("PINNED")).with_context(|| {
            format!(
                "{}/PINNED is missing: run scripts/setup (scripts/setup.d/70-hw-tests.sh fetches the kernel and BusyBox)",
                dir.display()
            )
        })?;
        let kernel_release = pinned
            .lines()
            .find_map(|l| l.strip_prefix("kernel-release "))
            .context("PINNED names no kernel-release")?
            .trim()
            .to_owned();
        for tool in [
            "qemu-system-x86_64",
            "mkimage",
            "sfdisk",
            "mkfs.vfat",
            "mcopy",
            "mke2fs",
            // Scenario 6: the board's TPM and the independent quote check.
            "swtpm",
            "tpm2_checkquote",
        ] {
            which(tool)?;
        }
        if !Path::new(UBOOT_ROM).exists() {
            bail!("{UBOOT_ROM} is missing: install u-boot-qemu (scripts/setup)");
        }
        // tpm2-tss loads its TCTI (`device:` → libtss2-tcti-device.so.0)
        // with dlopen at run time: ldd of the updater does not list it.
        let mut libraries = shared_libraries(&updater)?;
        let tcti = Path::new(TCTI_DEVICE);
        if !tcti.exists() {
            bail!("{TCTI_DEVICE} is missing: install libtss2-dev (scripts/setup.d/60-tpm.sh)");
        }
        for lib in std::iter::once((TCTI_DEVICE.to_owned(), std::fs::canonicalize(tcti)?))
            .chain(shared_libraries(tcti)?)
        {
            if !libraries.iter().any(|(guest, _)| *guest == lib.0) {
                libraries.push(lib);
            }
        }
        let assets = Assets {
            root: dir.join("root"),
            kernel_release,
            updater,
            libraries,
        };
        for p in [assets.kernel(), assets.busybox()] {
            if !p.exists() {
                bail!("{} is missing: run scripts/setup", p.display());
            }
        }
        Ok(assets)
    }

    pub fn kernel(&self) -> PathBuf {
        self.root
            .join(format!("boot/vmlinuz-{}", self.kernel_release))
    }

    pub fn busybox(&self) -> PathBuf {
        self.root.join("bin/busybox")
    }

    pub fn module(&self, rel: &str) -> PathBuf {
        self.root
            .join(format!("lib/modules/{}", self.kernel_release))
            .join(rel)
    }
}

/// Absolute path of `tool` on PATH.
pub fn which(tool: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let p = dir.join(tool);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{tool} not found: run scripts/setup (scripts/setup.d/70-hw-tests.sh)")
}

/// The shared libraries `binary` loads (from `ldd`), as (path in the
/// guest, path on the host): the guest gets the host's own copies.
fn shared_libraries(binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = run(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        // "libssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
        let (guest, host) = match line.split_once(" => ") {
            Some((_, rest)) => {
                let host = rest.split_whitespace().next().unwrap_or_default();
                (host.to_owned(), host.to_owned())
            }
            None => {
                let p = line.split_whitespace().next().unwrap_or_default();
                (p.to_owned(), p.to_owned())
            }
        };
        if !guest.starts_with('/') {
            continue;
        }
        let host = std::fs::canonicalize(&host).with_context(|| format!("ldd names {host}"))?;
        libs.push((guest, host));
    }
    if libs.is_empty() {
        bail!("ldd {} listed no libraries", binary.display());
    }
    Ok(libs)
}

/// Builds `kernex-updater` (debug profile, with the `tpm` feature: scenario 6;
/// without the default `llm` feature: the guest runs no llm check, and
/// llama.cpp would make the binary and its build much bigger) and returns
/// its path. Building it here, rather than trusting whatever binary is in
/// the target directory, makes sure the guest runs this checkout's updater.
pub fn build_updater() -> Result<PathBuf> {
    build_binary("kernex-updater", Features::Only(&["tpm"]))
}

/// Builds `kernex-server` (debug profile), the control plane the guest's
/// daemon talks to, and returns its path.
pub fn build_server() -> Result<PathBuf> {
    build_binary("kernex-server", Features::Default)
}

/// The cargo features a binary is built with.
#[derive(Debug, Clone, Copy)]
enum Features {
    /// The package's default features.
    Default,
    /// These and no others (`--no-default-features --features …`).
    Only(&'static [&'static str]),
}

/// `cargo build -p NAME --bin NAME` with the cargo that runs the tests, into
/// `<target>/hw-tests-bin`.
fn build_binary(name: &str, features: Features) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // <target>/debug/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary is not in <target>/<profile>/deps")?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .context("no target directory above the profile directory")?;
    // A target dir of its own: building into the tests' one would replace
    // the `kernex-updater` other test binaries run (built with other
    // features) while they run.
    let own_dir = target_dir.join("hw-tests-bin");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", name, "--bin", name])
        .arg("--manifest-path")
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &own_dir);
    if let Features::Only(features) = features {
        cmd.arg("--no-default-features");
        if !features.is_empty() {
            cmd.arg("--features").arg(features.join(","));
        }
    }
    run(&mut cmd)?;
    let bin = own_dir.join("debug").join(name);
    if !bin.is_file() {
        bail!("cargo build did not produce {}", bin.display());
    }
    Ok(bin)
}
