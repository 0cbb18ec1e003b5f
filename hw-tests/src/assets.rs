//! What the guest is made of, found on the build host.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::arch::Arch;
use crate::guest::GuestLayout;
use crate::run;

/// The tpm2-tss TCTI for the kernel's TPM device (`device:/dev/tpmrm0`), on
/// the x86_64 board (the only one with a TPM).
pub const TCTI_DEVICE: &str = "/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0";

/// Where the arm64 board's glibc (libc6-arm64-cross) lives on the host.
const ARM64_CROSS_LIBS: &str = "/usr/aarch64-linux-gnu/lib";

/// The kernel, modules and BusyBox unpacked by scripts/setup.d/70-hw-tests.sh
/// (x86_64) or 71-hw-tests-arm64.sh (arm64).
#[derive(Debug, Clone)]
pub struct Assets {
    pub arch: Arch,
    pub root: PathBuf,
    pub kernel_release: String,
    /// The `kernex-updater` binary and the shared libraries it needs
    /// (guest path, host path), the dynamic loader included.
    pub updater: PathBuf,
    pub libraries: Vec<(String, PathBuf)>,
    /// An ssh server in the guest, for a QEMU board run as a lab board
    /// ([`Assets::with_ssh`]).
    pub ssh: Option<GuestSsh>,
    /// The disk layout and config of a vendor board's guest (`None`: the
    /// QEMU board's, [`GuestLayout::virt`]).
    pub layout: Option<GuestLayout>,
}

/// The guest's ssh server: Debian's dropbear (the host's `dropbear-bin`),
/// a host key made at build time with `dropbearkey`, and one key allowed
/// to log in as root.
#[derive(Debug, Clone)]
pub struct GuestSsh {
    pub dropbear: PathBuf,
    pub host_key: PathBuf,
    /// One `authorized_keys` line (`ssh-ed25519 AAAA… comment`).
    pub authorized_key: String,
}

impl Assets {
    /// Finds everything for `arch`'s board; a missing piece is an error
    /// naming how to get it. `updater` is the guest's `kernex-updater`
    /// ([`build_updater`]).
    pub fn find(arch: Arch, updater: PathBuf) -> Result<Self> {
        let dir = assets_dir(arch);
        let pinned = std::fs::read_to_string(dir.join("PINNED")).with_context(|| {
            format!(
                "{}/PINNED is missing: run scripts/setup (scripts/setup.d/70-hw-tests.sh and 71-hw-tests-arm64.sh fetch the kernels and BusyBox)",
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
            arch.qemu(),
            arch.strip(),
            "mkimage",
            "sfdisk",
            "mkfs.vfat",
            "mcopy",
            "mke2fs",
        ] {
            which(tool)?;
        }
        if arch.has_tpm() {
            // Scenario 6: the board's TPM and the independent quote check.
            which("swtpm")?;
            which("tpm2_checkquote")?;
        }
        if !Path::new(arch.firmware()).exists() {
            bail!(
                "{} is missing: install u-boot-qemu (scripts/setup)",
                arch.firmware()
            );
        }
        let libraries = match arch {
            Arch::X86_64 => {
                // tpm2-tss loads its TCTI (`device:` → libtss2-tcti-device.so.0)
                // with dlopen at run time: ldd of the updater does not list it.
                let mut libraries = shared_libraries(&updater)?;
                let tcti = Path::new(TCTI_DEVICE);
                if !tcti.exists() {
                    bail!(
                        "{TCTI_DEVICE} is missing: install libtss2-dev (scripts/setup.d/60-tpm.sh)"
                    );
                }
                for lib in std::iter::once((TCTI_DEVICE.to_owned(), std::fs::canonicalize(tcti)?))
                    .chain(shared_libraries(tcti)?)
                {
                    if !libraries.iter().any(|(guest, _)| *guest == lib.0) {
                        libraries.push(lib);
                    }
                }
                libraries
            }
            Arch::Arm64 => cross_libraries(
                &updater,
                &[
                    PathBuf::from(ARM64_CROSS_LIBS),
                    dir.join("sysroot/usr/lib/aarch64-linux-gnu"),
                ],
                arch.multiarch(),
            )?,
        };
        let assets = Assets {
            arch,
            root: dir.join("root"),
            kernel_release,
            updater,
            libraries,
            ssh: None,
            layout: None,
        };
        for p in [assets.kernel(), assets.busybox()] {
            if !p.exists() {
                bail!("{} is missing: run scripts/setup", p.display());
            }
        }
        Ok(assets)
    }

    /// Puts an ssh server into the guest's releases: dropbear and its
    /// libraries (the host's x86_64 copies, as for the updater), a host key
    /// created in `dir` (once: every release has the same one, as a board
    /// keeps its host key across updates) and `authorized_key` for root.
    /// The x86_64 board only: the arm64 guest would need Debian's arm64
    /// dropbear and its libraries fetched like its glibc.
    pub fn with_ssh(mut self, authorized_key: &str, dir: &Path) -> Result<Self> {
        if self.arch != Arch::X86_64 {
            bail!(
                "an ssh server in the guest is only built for the x86_64 board (the host's dropbear-bin is amd64)"
            );
        }
        let tool = |t: &str| {
            which(t).with_context(|| {
                format!("{t} is missing: install dropbear-bin (scripts/setup.d/72-hw-tests-lab.sh)")
            })
        };
        let dropbear = tool("dropbear")?;
        let dropbearkey = tool("dropbearkey")?;
        std::fs::create_dir_all(dir)?;
        let host_key = dir.join("dropbear_ed25519_host_key");
        if !host_key.exists() {
            run(Command::new(dropbearkey)
                .args(["-t", "ed25519", "-f"])
                .arg(&host_key))?;
        }
        for lib in shared_libraries(&dropbear)? {
            if !self.libraries.iter().any(|(guest, _)| *guest == lib.0) {
                self.libraries.push(lib);
            }
        }
        self.ssh = Some(GuestSsh {
            dropbear,
            host_key,
            authorized_key: authorized_key.to_owned(),
        });
        Ok(self)
    }

    /// The guest's disk layout and config.
    pub fn layout(&self) -> GuestLayout {
        self.layout
            .clone()
            .unwrap_or_else(|| GuestLayout::virt(self.arch))
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

/// `$KERNEX_CACHE/hw-tests` (x86_64) or `$KERNEX_CACHE/hw-tests-arm64`;
/// `KERNEX_HW_ASSETS` / `KERNEX_HW_ASSETS_ARM64` override them.
fn assets_dir(arch: Arch) -> PathBuf {
    let (var, name) = match arch {
        Arch::X86_64 => ("KERNEX_HW_ASSETS", "hw-tests"),
        Arch::Arm64 => ("KERNEX_HW_ASSETS_ARM64", "hw-tests-arm64"),
    };
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(
            std::env::var_os("KERNEX_CACHE").unwrap_or_else(|| "/var/cache/kernex-ci".into()),
        )
        .join(name)
    })
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

/// The shared libraries a binary of another architecture loads, as (path in
/// the guest, path on the host): `ldd` cannot run it, so this follows its
/// `DT_NEEDED` entries (`readelf -d`) through `search`, and adds its
/// program interpreter (`readelf -l`). Libraries go to `/lib/<multiarch>/`
/// in the guest, where Debian's dynamic loader looks.
fn cross_libraries(
    binary: &Path,
    search: &[PathBuf],
    multiarch: &str,
) -> Result<Vec<(String, PathBuf)>> {
    let headers = run(Command::new("readelf").arg("-lW").arg(binary))?;
    let interp = String::from_utf8_lossy(&headers.stdout)
        .lines()
        .find_map(|l| {
            l.split_once("[Requesting program interpreter: ")
                .and_then(|(_, rest)| rest.strip_suffix(']'))
                .map(str::to_owned)
        })
        .with_context(|| format!("{} names no program interpreter", binary.display()))?;
    let find = |name: &str| -> Result<PathBuf> {
        search
            .iter()
            .map(|d| d.join(name))
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "{name} (needed by {}) is in none of {search:?}: run scripts/setup (71-hw-tests-arm64.sh)",
                    binary.display()
                )
            })
    };
    let interp_name = Path::new(&interp)
        .file_name()
        .context("empty program interpreter")?
        .to_string_lossy()
        .into_owned();
    let mut libs = vec![(interp.clone(), std::fs::canonicalize(find(&interp_name)?)?)];
    let mut todo = vec![binary.to_path_buf()];
    while let Some(next) = todo.pop() {
        let dynamic = run(Command::new("readelf").arg("-dW").arg(&next))?;
        for line in String::from_utf8_lossy(&dynamic.stdout).lines() {
            // " 0x0000000000000001 (NEEDED)  Shared library: [libssl.so.3]"
            let Some(name) = line
                .split_once("(NEEDED)")
                .and_then(|(_, rest)| rest.split_once('['))
                .and_then(|(_, rest)| rest.strip_suffix(']'))
            else {
                continue;
            };
            if name == interp_name {
                continue;
            }
            let guest = format!("/lib/{multiarch}/{name}");
            if libs.iter().any(|(g, _)| *g == guest) {
                continue;
            }
            let host = std::fs::canonicalize(find(name)?)?;
            todo.push(host.clone());
            libs.push((guest, host));
        }
    }
    Ok(libs)
}

/// Builds the guest's `kernex-updater` for `arch`'s board (debug profile;
/// without the default `llm` feature: the guest runs no llm check, and
/// llama.cpp would make the binary and its build much bigger; with `tpm` on
/// the x86_64 board, whose TPM scenario 6 uses; with the test hooks,
/// `failpoints`, which the power-cut scenario uses) and returns its path.
/// Building it here, rather than trusting whatever binary is in the target
/// directory, makes sure the guest runs this checkout's updater.
///
/// For arm64 it cross-compiles with Debian's rustc-web and its aarch64
/// standard library (scripts/setup.d/71-hw-tests-arm64.sh unpacks them),
/// linked by Debian's aarch64-linux-gnu-gcc against arm64 OpenSSL.
pub fn build_updater(arch: Arch) -> Result<PathBuf> {
    match arch {
        Arch::X86_64 => build_binary(
            "kernex-updater",
            Features::Only(&["tpm", "failpoints"]),
            None,
        ),
        Arch::Arm64 => {
            let dir = assets_dir(arch);
            let rust = dir.join("rust/usr");
            let rustc = rust.join("bin/rustc");
            if !rustc.exists() {
                bail!(
                    "{} is missing: run scripts/setup (71-hw-tests-arm64.sh unpacks Debian's rustc-web)",
                    rustc.display()
                );
            }
            let sysroot = dir.join("sysroot/usr");
            let target = arch.rust_target().context("arm64 has a Rust target")?;
            let cross = Cross {
                target,
                env: vec![
                    ("RUSTC".into(), rustc.into_os_string()),
                    // rustc-web's own libraries (librustc_driver, libLLVM).
                    (
                        "LD_LIBRARY_PATH".into(),
                        rust.join("lib/x86_64-linux-gnu").into_os_string(),
                    ),
                    (
                        "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER".into(),
                        "aarch64-linux-gnu-gcc".into(),
                    ),
                    (
                        "CC_aarch64_unknown_linux_gnu".into(),
                        "aarch64-linux-gnu-gcc".into(),
                    ),
                    (
                        "AR_aarch64_unknown_linux_gnu".into(),
                        "aarch64-linux-gnu-ar".into(),
                    ),
                    (
                        "AARCH64_UNKNOWN_LINUX_GNU_OPENSSL_LIB_DIR".into(),
                        sysroot.join("lib/aarch64-linux-gnu").into_os_string(),
                    ),
                    (
                        "AARCH64_UNKNOWN_LINUX_GNU_OPENSSL_INCLUDE_DIR".into(),
                        sysroot.join("include").into_os_string(),
                    ),
                    // openssl/configuration.h is in the multiarch include dir.
                    (
                        "CFLAGS_aarch64_unknown_linux_gnu".into(),
                        format!("-I{}", sysroot.join("include/aarch64-linux-gnu").display()).into(),
                    ),
                ],
            };
            build_binary(
                "kernex-updater",
                Features::Only(&["failpoints"]),
                Some(&cross),
            )
        }
    }
}

/// Builds `kernex-server` (debug profile), the control plane the guest's
/// daemon talks to, and returns its path.
pub fn build_server() -> Result<PathBuf> {
    build_binary("kernex-server", Features::Default, None)
}

/// The cargo features a binary is built with.
#[derive(Debug, Clone, Copy)]
enum Features {
    /// The package's default features.
    Default,
    /// These and no others (`--no-default-features --features …`).
    Only(&'static [&'static str]),
}

/// A cross build: the target and the environment cargo runs in.
struct Cross {
    target: &'static str,
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
}

/// `cargo build -p NAME --bin NAME` with the cargo that runs the tests, into
/// `<target>/hw-tests-bin` (`hw-tests-bin-<target>` for a cross build).
fn build_binary(name: &str, features: Features, cross: Option<&Cross>) -> Result<PathBuf> {
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
    // features) while they run. A cross build (another rustc) gets another.
    let own_dir = match cross {
        None => target_dir.join("hw-tests-bin"),
        Some(c) => target_dir.join(format!("hw-tests-bin-{}", c.target)),
    };
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
    let bin = match cross {
        None => own_dir.join("debug").join(name),
        Some(c) => {
            cmd.args(["--target", c.target])
                // Flags meant for the host's rustc (the tests' own build).
                .env_remove("RUSTFLAGS")
                .env_remove("RUSTC_WRAPPER")
                .env_remove("RUSTC_WORKSPACE_WRAPPER");
            for (k, v) in &c.env {
                cmd.env(k, v);
            }
            own_dir.join(c.target).join("debug").join(name)
        }
    };
    run(&mut cmd)?;
    if !bin.is_file() {
        bail!("cargo build did not produce {}", bin.display());
    }
    Ok(bin)
}
