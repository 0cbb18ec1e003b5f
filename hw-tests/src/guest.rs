//! A release for the guest: a slot image holding `/boot/vmlinuz` (the
//! board's Debian kernel: an arm64 `Image` or an amd64 bzImage) and
//! `/boot/initrd.img` (the whole userland: BusyBox,
//! `kernex-updater` with its libraries, the kernel modules, an init and a
//! tiny "agent"), built with `kernex-image`, and its signed bundle.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Parser;
use kernex_image::bundle::{BundleBuilder, Image, load_signer};
use kernex_image::rootfs::{Filesystem, RootfsOptions, build_rootfs};
use kernex_protocol::archive::ArchiveOptions;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::manifest::VerifiedManifest;
use kernex_protocol::{Keyring, VerifyOptions};

use crate::assets::Assets;
use crate::cpio::{self, Entry};
pub use crate::layout::{GuestLayout, manifest_health};
use crate::layout::{PANIC_INIT, SYSTEMCTL_SHIM};
use crate::run;

/// Disk layout as the guest sees it (virtio-blk, MBR).
pub const BOOT_DEV: &str = "/dev/vda1";
pub const SLOT_A_DEV: &str = "/dev/vda2";
pub const SLOT_B_DEV: &str = "/dev/vda3";
pub const DATA_DEV: &str = "/dev/vda4";
/// The second disk carrying bundles (ext4, read-only).
pub const BUNDLES_DEV: &str = "/dev/vdb";

/// How a release behaves once booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Comes up; its agent keeps running.
    Healthy,
    /// Comes up; its agent exits with status 1 a second after every start.
    AgentCrashLoops,
    /// The kernel never reaches userspace: the initramfs has no /init and
    /// there is no root filesystem, so the kernel panics (and, with
    /// `panic=5`, resets the board).
    KernelPanics,
}

/// One release.
#[derive(Debug, Clone)]
pub struct Release {
    pub version: String,
    pub behaviour: Behaviour,
}

/// The files of one release.
#[derive(Debug, Clone)]
pub struct Built {
    pub release: Release,
    /// The slot (rootfs) image.
    pub image: PathBuf,
    /// The signed bundle.
    pub bundle: PathBuf,
}

impl Built {
    /// The bundle's manifest, its signature checked against `keys`' CA (what
    /// the server and the device trust).
    pub fn manifest(&self, keys: &Keys) -> Result<VerifiedManifest> {
        let file = std::fs::File::open(&self.bundle)
            .with_context(|| format!("open {}", self.bundle.display()))?;
        let bundle = Bundle::open(std::io::BufReader::new(file))
            .with_context(|| format!("read {}", self.bundle.display()))?;
        let keyring = Keyring::from_pem(&std::fs::read(keys.ca())?)?;
        bundle
            .verify(&keyring, VerifyOptions::default())
            .with_context(|| format!("verify {}", self.bundle.display()))
    }
}

/// Development keys (kernex-image keys create).
#[derive(Debug, Clone)]
pub struct Keys {
    pub dir: PathBuf,
}

impl Keys {
    pub fn create(dir: &Path) -> Result<Self> {
        kernex_image_cli(&["keys", "create", "--out", &dir.display().to_string()])?;
        Ok(Keys {
            dir: dir.to_path_buf(),
        })
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

/// Runs one `kernex-image` command line in this process (the CLI's own code).
pub fn kernex_image_cli(args: &[&str]) -> Result<()> {
    let cli = kernex_image::cli::Cli::try_parse_from(
        std::iter::once("kernex-image").chain(args.iter().copied()),
    )
    .map_err(|e| anyhow::anyhow!("kernex-image {args:?}: {e}"))?;
    kernex_image::cli::run(cli).with_context(|| format!("kernex-image {args:?}"))
}

/// The device's config (the same for every release of a board).
fn system_toml(compatible: &str) -> String {
    format!(
        r#"compatible = "{compatible}"
data-dir = "/data/kernex"
keyring = "/etc/kernex/keyring.pem"
reboot-command = ["reboot", "-f"]

[slots.rootfs]
A = "{SLOT_A_DEV}"
B = "{SLOT_B_DEV}"

[bootloader]
backend = "u-boot"
fw-env-config = "/etc/fw_env.config"

[health]
deadline = 120
stability-window = 5

[[health.checks]]
type = "service"
name = "agent"
mode = "supervise"
command = ["/usr/bin/agent"]
max-restarts = 3
window = 120
backoff-ms = 200
"#
    )
}

/// /init of the guest: mounts, runs the health watchdog (which commits the
/// slot on trial or reverts it and reboots), then a shell on the console
/// for the test runner.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# The board's disk layout (GuestLayout): KX_BOOT_DEV, KX_BOOT_MOUNT, ...
. /etc/kernex-hw.env
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
# A board without a battery-backed clock (a Pi) starts in 1970, when no
# signing certificate is valid yet. Like systemd (its build time) and
# fake-hwclock, never run with a clock earlier than the release's build.
if [ "$(date +%s)" -lt "$(cat /etc/kernex-hw-epoch)" ]; then
    date -s "@$(cat /etc/kernex-hw-epoch)" >/dev/null && echo "KERNEX-HW: clock set to the release's build time"
fi
for m in $(cat /etc/modules.list); do
    insmod "/lib/modules/$m" || echo "KERNEX-HW: insmod $m failed"
done
i=0
while [ ! -b "$KX_DATA_DEV" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
# `sync`: the env file's rename must reach the disk before a power cut.
# The updater fsyncs the new file but cannot fsync a vfat directory; without
# this mount option a cut within the writeback window (30 s) loses the
# commit (seen here: the counter U-Boot read back was the old one).
mkdir -p "$KX_BOOT_MOUNT"
mount -t vfat -o sync "$KX_BOOT_DEV" "$KX_BOOT_MOUNT" || echo "KERNEX-HW: cannot mount the boot partition"
mount -t ext4 "$KX_DATA_DEV" /data || echo "KERNEX-HW: cannot mount the data partition"
mkdir -p /data/kernex
if [ -n "$KX_BUNDLES_DEV" ] && [ -b "$KX_BUNDLES_DEV" ]; then
    mount -t ext4 -o ro "$KX_BUNDLES_DEV" /bundles || echo "KERNEX-HW: cannot mount the bundles disk"
fi
# A board with one disk (a Pi's SD card) keeps the bundles on its data partition.
if [ -n "$KX_BUNDLES_DIR" ]; then
    rmdir /bundles && ln -s "$KX_BUNDLES_DIR" /bundles
fi
# A factory image made by `kernex-image disk create` keeps the updater's
# config on the data partition; the root filesystem links to it.
if [ -n "$KX_CONFIG" ]; then
    ln -sf "$KX_CONFIG" /etc/kernex/system.toml
fi
echo "KERNEX-HW: up version=$(cat /etc/kernex-release) cmdline=$(cat /proc/cmdline)"
# A board with a TPM: configure it and measure the booted slot into PCR 14
# before anything else runs (U-Boot cannot here: Debian's x86 U-Boot has no
# TPM support, see hw-tests/README.md). /tmp/measure.json is what the
# updater printed; its exit status follows it.
if [ -e /dev/tpmrm0 ]; then
    printf '\n[tpm]\ntcti = "device:/dev/tpmrm0"\npcr = 14\n' >>/etc/kernex/system.toml
    kernex-updater attest measure --json >/tmp/measure.json 2>&1
    echo "KERNEX-HW: measure exited $?"
fi
# The watchdog's verdict from the previous boot (status --json shows only
# the latest one, and this boot's run replaces it).
if [ -f /data/kernex/health.json ]; then
    echo "KERNEX-HW: previous health verdict: $(tr -d '\n' </data/kernex/health.json)"
fi
# QEMU's user network, when the board has a NIC: fixed addresses (the host's
# loopback is 10.0.2.2).
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
        || echo "KERNEX-HW: cannot configure eth0"
fi
# A device provisioned for a control plane ([server] in /data/kernex-hw/server.toml)
# runs the daemon, which runs the watchdog itself; otherwise the watchdog runs here.
if [ -f /data/kernex-hw/server.toml ]; then
    kernex-hw-daemon
else
    kernex-updater health run
    echo "KERNEX-HW: health run exited $?"
fi
# A release built for a lab board (Assets::with_ssh) has an ssh server,
# started once the watchdog has decided: the runner, which waits for ssh to
# answer, then sees the verdict of this boot.
if [ -x /usr/sbin/dropbear ]; then
    mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
    if dropbear -r /etc/dropbear/dropbear_ed25519_host_key -s -p 22 -E 2>>/tmp/dropbear.log; then
        echo "KERNEX-HW: ssh server started"
    else
        echo "KERNEX-HW: dropbear failed: $(cat /tmp/dropbear.log)"
    fi
fi
echo "KERNEX-HW: shell ready"
exec /bin/sh
"#;

/// Starts `kernex-updater daemon` with the `[server]` table kept on the data
/// partition (the test writes it once, over the console, after the factory
/// boot); its log goes to the data partition too.
const START_DAEMON: &str = r#"#!/bin/sh
if ! grep -q '^\[server\]' /etc/kernex/system.toml; then
    cat /data/kernex-hw/server.toml >>/etc/kernex/system.toml
fi
echo "===== boot $(cat /proc/sys/kernel/random/boot_id)" >>/data/kernex-hw/daemon.log
RUST_LOG=info kernex-updater daemon >>/data/kernex-hw/daemon.log 2>&1 &
echo "KERNEX-HW: daemon started"
"#;

fn agent(behaviour: Behaviour) -> &'static str {
    match behaviour {
        Behaviour::AgentCrashLoops => {
            "#!/bin/sh\necho \"agent: cannot load the model\"\nsleep 1\nexit 1\n"
        }
        _ => "#!/bin/sh\nwhile true; do sleep 10; done\n",
    }
}

const BUSYBOX_APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "cat",
    "echo",
    "sleep",
    "mkdir",
    "insmod",
    "reboot",
    "ls",
    "sync",
    "dd",
    "sha256sum",
    "grep",
    "ps",
    "kill",
    "rm",
    "cp",
    "true",
    "false",
    "test",
    "[",
    "uname",
    "head",
    "tail",
    "wc",
    "tr",
    "hexdump",
    "od",
    "sed",
    "awk",
    "dmesg",
    "poweroff",
    "printf",
    "ip",
    "ifconfig",
    "route",
    "ping",
    "wget",
    "date",
    "setsid",
];

/// The initramfs (gzip-compressed newc cpio) of a release.
pub fn initramfs(assets: &Assets, keys: &Keys, release: &Release) -> Result<Vec<u8>> {
    let layout = assets.layout();
    let mut e = Vec::new();
    let dir = |p: &str| Entry::Dir {
        path: p.to_owned(),
        mode: 0o755,
    };
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "etc/kernex",
        "dev",
        "proc",
        "sys",
        "boot",
        "data",
        "bundles",
        "tmp",
        "lib",
        "lib64",
        "lib/modules",
        "root",
    ] {
        e.push(dir(d));
    }
    e.push(dir(&format!("lib/{}", assets.arch.multiarch())));
    e.push(Entry::CharDev {
        path: "dev/console".into(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    e.push(Entry::File {
        path: "etc/kernex-release".into(),
        mode: 0o644,
        data: format!("{}\n", release.version).into_bytes(),
    });
    if release.behaviour != Behaviour::KernelPanics {
        e.push(Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: INIT.as_bytes().to_vec(),
        });
    } else if layout.panic_after_modules {
        e.push(Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: PANIC_INIT.as_bytes().to_vec(),
        });
    }
    e.push(Entry::File {
        path: "bin/busybox".into(),
        mode: 0o755,
        data: std::fs::read(assets.busybox())?,
    });
    for applet in BUSYBOX_APPLETS {
        e.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    e.push(Entry::File {
        path: "usr/bin/kernex-updater".into(),
        mode: 0o755,
        data: stripped(assets.arch.strip(), &assets.updater)?,
    });
    e.push(Entry::File {
        path: "usr/bin/kernex-hw-daemon".into(),
        mode: 0o755,
        data: START_DAEMON.as_bytes().to_vec(),
    });
    let built = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    e.push(Entry::File {
        path: "etc/kernex-hw-epoch".into(),
        mode: 0o644,
        data: format!("{built}\n").into_bytes(),
    });
    e.push(Entry::File {
        path: "etc/kernex-hw.env".into(),
        mode: 0o644,
        data: layout.env().into_bytes(),
    });
    if layout.config_link.is_some() {
        e.push(Entry::File {
            path: "usr/bin/systemctl".into(),
            mode: 0o755,
            data: SYSTEMCTL_SHIM.as_bytes().to_vec(),
        });
    }
    e.push(Entry::File {
        path: "usr/bin/agent".into(),
        mode: 0o755,
        data: agent(release.behaviour).as_bytes().to_vec(),
    });
    for (guest, host) in &assets.libraries {
        e.push(Entry::File {
            path: guest.trim_start_matches('/').to_owned(),
            mode: 0o755,
            data: std::fs::read(host).with_context(|| format!("read {}", host.display()))?,
        });
    }
    let mut list = String::new();
    let mut loaded: Vec<String> = Vec::new();
    for (i, m) in layout.modules.iter().enumerate() {
        let file = m.rsplit('/').next().unwrap_or(m);
        let name = format!("{i:02}-{file}");
        let data = std::fs::read(assets.module(m))
            .with_context(|| format!("read module {}", assets.module(m).display()))?;
        // The module's .modinfo names what must be loaded before it.
        for dep in module_depends(&data) {
            if !loaded
                .iter()
                .any(|l| l.replace('-', "_") == dep.replace('-', "_"))
            {
                anyhow::bail!(
                    "module {file} needs {dep}, which is not loaded before it (Arch::modules)"
                );
            }
        }
        loaded.push(file.trim_end_matches(".ko").to_owned());
        e.push(Entry::File {
            path: format!("lib/modules/{name}"),
            mode: 0o644,
            data,
        });
        list.push_str(&name);
        list.push('\n');
    }
    e.push(Entry::File {
        path: "etc/modules.list".into(),
        mode: 0o644,
        data: list.into_bytes(),
    });
    if layout.config_link.is_none() {
        e.push(Entry::File {
            path: "etc/kernex/system.toml".into(),
            mode: 0o644,
            data: system_toml(&layout.compatible).into_bytes(),
        });
    }
    e.push(Entry::File {
        path: "etc/kernex/keyring.pem".into(),
        mode: 0o644,
        data: std::fs::read(keys.ca())?,
    });
    e.push(Entry::File {
        path: "etc/fw_env.config".into(),
        mode: 0o644,
        data: format!(
            "/boot/{} 0x0 {:#x}\n",
            crate::disk::ENV_FILE,
            crate::disk::ENV_SIZE
        )
        .into_bytes(),
    });
    if let Some(ssh) = &assets.ssh {
        e.push(dir("etc/dropbear"));
        e.push(Entry::Dir {
            path: "root/.ssh".into(),
            mode: 0o700,
        });
        e.push(Entry::File {
            path: "usr/sbin/dropbear".into(),
            mode: 0o755,
            data: std::fs::read(&ssh.dropbear)
                .with_context(|| format!("read {}", ssh.dropbear.display()))?,
        });
        e.push(Entry::File {
            path: "etc/dropbear/dropbear_ed25519_host_key".into(),
            mode: 0o600,
            data: std::fs::read(&ssh.host_key)?,
        });
        e.push(Entry::File {
            path: "root/.ssh/authorized_keys".into(),
            mode: 0o600,
            data: format!("{}\n", ssh.authorized_key.trim()).into_bytes(),
        });
        for (path, data) in [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
            ("etc/shells", "/bin/sh\n"),
        ] {
            e.push(Entry::File {
                path: path.into(),
                mode: 0o644,
                data: data.as_bytes().to_vec(),
            });
        }
    }
    let archive = cpio::write(&e);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&archive)?;
    Ok(gz.finish()?)
}

/// The `depends=` list of a kernel module's .modinfo.
fn module_depends(module: &[u8]) -> Vec<String> {
    let key = b"depends=";
    module
        .split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(key))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The binary without its debug info (a debug build is >100 MB with it),
/// stripped by `strip` (one that reads the binary's architecture).
fn stripped(strip: &str, bin: &Path) -> Result<Vec<u8>> {
    let out = tempfile_path(bin, "stripped");
    run(std::process::Command::new(strip)
        .arg("-o")
        .arg(&out)
        .arg(bin))?;
    let data = std::fs::read(&out).with_context(|| format!("read {}", out.display()))?;
    let _ = std::fs::remove_file(&out);
    if data.len() < 4 || &data[..4] != b"\x7fELF" {
        anyhow::bail!(
            "{strip} -o {} {} gave no ELF binary",
            out.display(),
            bin.display()
        );
    }
    Ok(data)
}

/// A scratch path unique in this process: two boards' releases may be built
/// at the same time (the x86_64 and arm64 fixtures both strip a
/// `kernex-updater`), and a shared path let one build read the other's
/// half-written file (seen: a 0-byte updater in the guest).
fn tempfile_path(near: &Path, suffix: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "kernex-hw-{}-{}-{}-{suffix}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        near.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ))
}

/// Builds the slot image and the signed bundle of `release` into `dir`.
pub fn build(assets: &Assets, keys: &Keys, release: &Release, dir: &Path) -> Result<Built> {
    let stage = dir.join(format!("rootfs-{}", release.version));
    std::fs::create_dir_all(stage.join("boot"))?;
    let layout = assets.layout();
    std::fs::copy(assets.kernel(), stage.join(&layout.kernel_path))?;
    std::fs::write(
        stage.join("boot/initrd.img"),
        initramfs(assets, keys, release)?,
    )?;
    let image = dir.join(format!("rootfs-{}.ext4", release.version));
    let mut opts = RootfsOptions::new(Filesystem::Ext4);
    opts.label = Some("kernex-rootfs".into());
    build_rootfs(&stage, &image, &opts)
        .with_context(|| format!("rootfs image of {}", release.version))?;
    let bundle = dir.join(format!("release-{}.kxb", release.version));
    let version = semver::Version::parse(&release.version)
        .with_context(|| format!("release version {}", release.version))?;
    let signer = load_signer(&keys.dir.join("signing.key"), &keys.dir.join("signing.crt"))?;
    let mut builder = BundleBuilder::new(&layout.compatible, version, Image::file(&image), &signer)
        .archive_options(ArchiveOptions {
            threads: 2,
            ..ArchiveOptions::default()
        });
    if layout.config_link.is_some() {
        builder = builder.health(manifest_health());
    }
    builder
        .build(&bundle)
        .with_context(|| format!("bundle of {}", release.version))?;
    Ok(Built {
        release: release.clone(),
        image,
        bundle,
    })
}
