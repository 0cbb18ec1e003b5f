//! QEMU (arm64 `virt` or x86_64 `pc`, see [`Arch`]) with U-Boot as its
//! firmware, driven over the serial console: every byte the board prints
//! goes to a log file (the test's artefact) and to a buffer the runner
//! waits on.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::arch::Arch;

/// How long one boot (U-Boot + kernel + userland) may take. Generous: the
/// board is emulated (TCG) on a shared, loaded machine.
pub fn boot_timeout() -> Duration {
    let secs = std::env::var("KERNEX_HW_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(240);
    Duration::from_secs(secs)
}

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
}

/// The swtpm process behind the board's TPM.
#[derive(Debug)]
struct Swtpm {
    child: Child,
    socket: PathBuf,
}

impl Swtpm {
    /// Starts swtpm on a control socket in `dir` (QEMU's `tpmdev emulator`
    /// talks to it there) and waits for the socket.
    fn start(dir: &Path) -> Result<Self> {
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

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running board.
#[derive(Debug)]
pub struct Machine {
    child: Child,
    stdin: ChildStdin,
    console: Arc<Mutex<Vec<u8>>>,
    /// Console bytes before this offset have been consumed by `wait_for`.
    cursor: usize,
    log: PathBuf,
    swtpm: Option<Swtpm>,
}

impl Machine {
    /// Powers the board on (and its TPM, if it has one), the console
    /// appended to `log`.
    pub fn start(hw: &Hardware, log: &Path) -> Result<Self> {
        if hw.tpm.is_some() && !hw.arch.has_tpm() {
            bail!(
                "the {} board has no TPM the guest kernel can drive (Debian's arm64 kernel is built without tpm_tis)",
                hw.arch.name()
            );
        }
        let swtpm = hw.tpm.as_deref().map(Swtpm::start).transpose()?;
        let mut cmd = Command::new(hw.arch.qemu());
        cmd.args(hw.arch.machine_args())
            .args(["-smp", "1", "-nographic"])
            .args(["-bios", hw.arch.firmware()])
            .arg("-drive")
            .arg(format!("if=virtio,format=raw,file={}", hw.disk.display()));
        if hw.network {
            // No option ROM (`romfile=`): U-Boot is the firmware, and QEMU
            // without SeaBIOS/iPXE installed has none to load.
            cmd.args([
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0,romfile=",
            ]);
        } else {
            cmd.args(["-nic", "none"]);
        }
        if let Some(b) = &hw.bundles {
            cmd.arg("-drive").arg(format!(
                "if=virtio,format=raw,readonly=on,file={}",
                b.display()
            ));
        }
        if let Some(t) = &swtpm {
            cmd.arg("-chardev")
                .arg(format!("socket,id=chrtpm,path={}", t.socket.display()))
                .args([
                    "-tpmdev",
                    "emulator,id=tpm0,chardev=chrtpm",
                    "-device",
                    "tpm-tis,tpmdev=tpm0",
                ]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {} (scripts/setup)", hw.arch.qemu()))?;
        let stdin = child.stdin.take().context("qemu stdin")?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let mut logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let _ = writeln!(logf, "\n===== kernex-hw-tests: power on =====");
        for stream in [
            Box::new(child.stdout.take().context("qemu stdout")?) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().context("qemu stderr")?),
        ] {
            let console = Arc::clone(&console);
            let mut logf = logf.try_clone()?;
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let _ = logf.write_all(&buf[..n]);
                            if let Ok(mut c) = console.lock() {
                                c.extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                }
            });
        }
        Ok(Machine {
            child,
            stdin,
            console,
            cursor: 0,
            log: log.to_path_buf(),
            swtpm,
        })
    }

    fn text(&self) -> String {
        let c = self.console.lock().map(|c| c.clone()).unwrap_or_default();
        String::from_utf8_lossy(&c).into_owned()
    }

    /// The console output not yet consumed.
    pub fn pending(&self) -> String {
        let c = self.console.lock().map(|c| c.clone()).unwrap_or_default();
        String::from_utf8_lossy(&c[self.cursor.min(c.len())..]).into_owned()
    }

    /// Waits until the console prints `needle` (after what earlier waits
    /// consumed); returns the output up to and including it. Fails — after
    /// powering the board off — when `timeout` passes or QEMU exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let started = Instant::now();
        loop {
            {
                let c = self.console.lock().map(|c| c.clone()).unwrap_or_default();
                let tail = &c[self.cursor.min(c.len())..];
                if let Some(pos) = find(tail, needle.as_bytes()) {
                    let end = self.cursor + pos + needle.len();
                    let out = String::from_utf8_lossy(&c[self.cursor..end]).into_owned();
                    self.cursor = end;
                    return Ok(out);
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                bail!(
                    "QEMU exited ({status}) before the console printed {needle:?}; log: {}\n{}",
                    self.log.display(),
                    last_lines(&self.pending(), 40)
                );
            }
            if started.elapsed() > timeout {
                let pending = self.pending();
                self.power_off();
                bail!(
                    "the console did not print {needle:?} within {timeout:?}; log: {}\n{}",
                    self.log.display(),
                    last_lines(&pending, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for whichever of `needles` the console prints first; returns its index.
    pub fn wait_for_any(&mut self, needles: &[&str], timeout: Duration) -> Result<usize> {
        let started = Instant::now();
        loop {
            {
                let c = self.console.lock().map(|c| c.clone()).unwrap_or_default();
                let tail = &c[self.cursor.min(c.len())..];
                let hit = needles
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| find(tail, n.as_bytes()).map(|p| (p, i, n.len())))
                    .min();
                if let Some((pos, i, len)) = hit {
                    self.cursor += pos + len;
                    return Ok(i);
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "QEMU exited ({status}) before the console printed any of {needles:?}; log: {}",
                    self.log.display()
                );
            }
            if started.elapsed() > timeout {
                let pending = self.pending();
                self.power_off();
                bail!(
                    "the console printed none of {needles:?} within {timeout:?}; log: {}\n{}",
                    self.log.display(),
                    last_lines(&pending, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the guest's shell after a boot.
    pub fn wait_for_shell(&mut self) -> Result<String> {
        let out = self.wait_for("KERNEX-HW: shell ready", boot_timeout())?;
        // Let the shell start reading before typing into it.
        std::thread::sleep(Duration::from_secs(1));
        Ok(out)
    }

    /// Types `line` into the console.
    pub fn send(&mut self, line: &str) -> Result<()> {
        // The UART has a small FIFO and the guest is emulated: type slowly.
        for chunk in line.as_bytes().chunks(16) {
            self.stdin.write_all(chunk)?;
            self.stdin.flush()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stdin.write_all(b"\n")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Runs a shell command in the guest; returns what it printed and its
    /// exit status. The markers are built by the shell (`"@@""B"`), so the
    /// echo of the typed command never matches them.
    pub fn sh(&mut self, command: &str, timeout: Duration) -> Result<(String, i32)> {
        self.send(&format!(
            "echo \"@@KX\"\"BEGIN\"; {command}; echo \"@@KX\"\"END $?\""
        ))?;
        self.wait_for("@@KXBEGIN", timeout)?;
        let out = self.wait_for("@@KXEND ", timeout)?;
        let status_line = self.wait_for("\n", timeout)?;
        let status = status_line.trim().parse().unwrap_or(-1);
        let out = out.trim_end_matches("@@KXEND ").replace('\r', "");
        Ok((out.trim().to_owned(), status))
    }

    /// `kernex-updater status --json` in the guest.
    pub fn status(&mut self) -> Result<serde_json::Value> {
        let (out, code) = self.sh("kernex-updater status --json", Duration::from_secs(120))?;
        if code != 0 {
            bail!("kernex-updater status --json exited {code}:\n{out}");
        }
        let start = out.find('{').context("status printed no JSON")?;
        serde_json::from_str(&out[start..])
            .with_context(|| format!("status --json is not JSON:\n{out}"))
    }

    /// Cuts the power (SIGKILL to QEMU: no sync, no shutdown).
    pub fn power_off(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = &mut self.swtpm {
            t.stop();
        }
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "\n===== kernex-hw-tests: power cut =====");
        }
    }

    /// The whole console output of this power cycle so far.
    pub fn console(&self) -> String {
        self.text()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = &mut self.swtpm {
            t.stop();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
