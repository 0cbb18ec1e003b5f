//! The emulated board: QEMU's command line and the swtpm beside it.

use super::*;

/// What is plugged into the board besides its disk.
#[derive(Debug, Clone, Default)]
pub struct Hardware {
    /// Which board.
    pub arch: Arch,
    /// The first virtio disk: the factory disk image.
    pub disk: PathBuf,
    /// A second virtio disk (read-only) carrying bundles.
    pub bundles: Option<PathBuf>,
    /// A TPM 2.0 on the TIS interface (`tpm-tis`), emulated by swtpm with
    /// its state in this directory (x86_64 only: Debian's arm64 kernel has
    /// no driver for QEMU's `tpm-tis-device`). Like a real TPM it loses its volatile
    /// state (PCRs) at every power cut: swtpm is started at every power-on
    /// and killed with QEMU.
    pub tpm: Option<PathBuf>,
    /// A virtio NIC on QEMU's user network: the guest reaches the host's
    /// loopback at 10.0.2.2.
    pub network: bool,
    /// With `network`: the host's `127.0.0.1:PORT` forwarded to the guest's
    /// port 22 (its ssh server), for a QEMU board run as a lab board.
    pub ssh_forward: Option<u16>,
}

/// QEMU's arguments for the board `hw`, without its console (`-nographic`
/// for [`Machine::start`], a `-chardev` for a QEMU lab board) and without a
/// TPM (swtpm is started per power-on by [`Machine::start`]).
pub fn qemu_args(hw: &Hardware) -> Vec<String> {
    let mut a: Vec<String> = hw
        .arch
        .machine_args()
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["-smp", "1", "-bios", hw.arch.firmware()].map(String::from));
    a.push("-drive".into());
    a.push(format!("if=virtio,format=raw,file={}", hw.disk.display()));
    if hw.network {
        // No option ROM (`romfile=`): U-Boot is the firmware, and QEMU
        // without SeaBIOS/iPXE installed has none to load.
        let mut netdev = "user,id=n0".to_owned();
        if let Some(port) = hw.ssh_forward {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-:22"));
        }
        a.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-pci,netdev=n0,romfile=".into(),
        ]);
    } else {
        a.extend(["-nic", "none"].map(String::from));
    }
    if let Some(b) = &hw.bundles {
        a.push("-drive".into());
        a.push(format!(
            "if=virtio,format=raw,readonly=on,file={}",
            b.display()
        ));
    }
    a
}

/// The swtpm process behind the board's TPM.
#[derive(Debug)]
pub(super) struct Swtpm {
    pub(super) child: Child,
    pub(super) socket: PathBuf,
}

impl Swtpm {
    /// Starts swtpm on a control socket in `dir` (QEMU's `tpmdev emulator`
    /// talks to it there) and waits for the socket.
    pub(super) fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let socket = dir.join("swtpm.sock");
        // sun_path holds 108 bytes.
        if socket.as_os_str().len() > 100 {
            bail!(
                "the swtpm socket path {} is too long for a Unix socket: set KERNEX_HW_ARTEFACTS to a shorter directory",
                socket.display()
            );
        }
        let _ = std::fs::remove_file(&socket);
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2"])
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", socket.display()))
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.display()))
            .arg("--log")
            .arg(format!("file={},level=1", dir.join("swtpm.log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start swtpm (swtpm package; scripts/setup.d/60-tpm.sh)")?;
        let mut swtpm = Swtpm { child, socket };
        let started = Instant::now();
        while !swtpm.socket.exists() {
            if let Ok(Some(status)) = swtpm.child.try_wait() {
                bail!(
                    "swtpm exited ({status}) before creating {}; see {}",
                    swtpm.socket.display(),
                    dir.join("swtpm.log").display()
                );
            }
            if started.elapsed() > Duration::from_secs(20) {
                swtpm.stop();
                bail!(
                    "swtpm did not create {} within 20 s",
                    swtpm.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(swtpm)
    }

    pub(super) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
