//! The board under test, driven over its serial console: every byte the
//! board prints goes to a log file (the test's artefact) and to a buffer
//! the runner waits on.
//!
//! Two ways to reach a board, behind the same [`Machine`] API (`wait_for`,
//! `send`, `sh`, `status`, `power_off`), so the scenarios are written once:
//!
//! - **QEMU** ([`Machine::start`]): the runner spawns QEMU (arm64 `virt` or
//!   x86_64 `pc`, see [`Arch`]) with U-Boot as its firmware; QEMU's stdio is
//!   the console, commands are typed into the guest's shell on it, and a
//!   power cut is SIGKILL;
//! - **a lab board** ([`Machine::start_lab`], [`Lab`]): a real board (or
//!   anything that behaves like one). The console is a serial device
//!   (`/dev/ttyUSB0`, set to 115200 8N1 raw with `stty`) or a Unix socket
//!   (ser2net, QEMU's `-chardev socket`), read for U-Boot's and the kernel's
//!   lines; the power is cut and restored by shell commands the operator
//!   gives (a USB relay, a PoE switch port); commands in Linux run over
//!   `ssh` (exit status and output captured), bundles are copied to the
//!   board over `ssh`.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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
pub struct Machine {
    link: Link,
    /// What is typed into the console.
    input: Box<dyn Write + Send>,
    console: Arc<Mutex<Vec<u8>>>,
    /// Console bytes before this offset have been consumed by `wait_for`.
    cursor: usize,
    log: PathBuf,
    /// Tells the console readers to stop (a serial device stays open).
    stop: Arc<AtomicBool>,
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
        cmd.args(qemu_args(hw)).arg("-nographic");
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
        let logf = open_log(log, "power on")?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        for stream in [
            Box::new(child.stdout.take().context("qemu stdout")?) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().context("qemu stderr")?),
        ] {
            spawn_reader(
                stream,
                &console,
                logf.try_clone()?,
                Arc::clone(&stop),
                false,
            );
        }
        Ok(Machine {
            link: Link::Qemu { child, swtpm },
            input: Box::new(stdin),
            console,
            cursor: 0,
            log: log.to_path_buf(),
            stop,
        })
    }

    /// Powers a lab board on (after cutting its power, so every power-on
    /// is a cold boot) and attaches to its console, appended to `log`;
    /// commands run over `lab.ssh` once Linux is up ([`Machine::sh`]).
    ///
    /// A serial device that exists is opened (115200 8N1 raw, with `stty`)
    /// before the power comes on, so nothing U-Boot prints is missed; a
    /// console that does not exist yet (a QEMU lab board's socket) is
    /// waited for after the power-on command (60 s) — a Unix socket is
    /// connected to, anything else opened as a serial device.
    pub fn start_lab(lab: &Lab, log: &Path) -> Result<Self> {
        lab.check_tools()?;
        run_power(&lab.power_off, "power-off", log)?;
        let mut logf = open_log(log, "power on (lab board)")?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let early = match std::fs::metadata(&lab.console) {
            Ok(m) if !m.file_type().is_socket() => Some(open_serial(&lab.console)?),
            _ => None,
        };
        run_power(&lab.power_on, "power-on", log)?;
        let (reader, writer, is_tty): (Box<dyn Read + Send>, Box<dyn Write + Send>, bool) =
            match early {
                Some(f) => (Box::new(f.try_clone()?), Box::new(f), true),
                None => attach_console(&lab.console)?,
            };
        let _ = logf.flush();
        spawn_reader(reader, &console, logf, Arc::clone(&stop), is_tty);
        Ok(Machine {
            link: Link::Lab(lab.clone()),
            input: writer,
            console,
            cursor: 0,
            log: log.to_path_buf(),
            stop,
        })
    }

    /// Whether this is a lab board (commands over ssh) rather than QEMU.
    pub fn is_lab(&self) -> bool {
        matches!(self.link, Link::Lab(_))
    }

    /// Fails when QEMU has exited (never for a lab board: its console
    /// says nothing about its power).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        match &mut self.link {
            Link::Qemu { child, .. } => child.try_wait().ok().flatten(),
            Link::Lab(_) => None,
        }
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
            if let Some(status) = self.exited() {
                std::thread::sleep(Duration::from_millis(200));
                bail!(
                    "QEMU exited ({status}) before the console printed {needle:?}; log: {}\n{}",
                    self.log.display(),
                    last_lines(&self.pending(), 40)
                );
            }
            if started.elapsed() > timeout {
                let pending = self.pending();
                let _ = self.power_off();
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
            if let Some(status) = self.exited() {
                bail!(
                    "QEMU exited ({status}) before the console printed any of {needles:?}; log: {}",
                    self.log.display()
                );
            }
            if started.elapsed() > timeout {
                let pending = self.pending();
                let _ = self.power_off();
                bail!(
                    "the console printed none of {needles:?} within {timeout:?}; log: {}\n{}",
                    self.log.display(),
                    last_lines(&pending, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest takes commands after a boot: on QEMU, its
    /// shell on the console (the init's "shell ready" line); on a lab
    /// board, its ssh server (polled with `ssh … true` every 2 s).
    pub fn wait_for_shell(&mut self) -> Result<String> {
        let lab = match &self.link {
            Link::Qemu { .. } => {
                let out = self.wait_for("KERNEX-HW: shell ready", boot_timeout())?;
                // Let the shell start reading before typing into it.
                std::thread::sleep(Duration::from_secs(1));
                return Ok(out);
            }
            Link::Lab(lab) => lab.clone(),
        };
        let started = Instant::now();
        loop {
            // A refused connection, a refused key, an ssh that hangs in a
            // half-started server: not yet.
            let last = match lab.ssh.run("true", Duration::from_secs(30), None) {
                Ok((_, 0)) => return Ok(String::new()),
                Ok((out, code)) => format!("exit status {code}: {}", out.trim()),
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() > boot_timeout() {
                let pending = self.pending();
                let _ = self.power_off();
                bail!(
                    "{} did not answer over ssh within {:?} (last: {last}); console log: {}\n{}",
                    lab.ssh,
                    boot_timeout(),
                    self.log.display(),
                    last_lines(&pending, 40)
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Types `line` into the console.
    pub fn send(&mut self, line: &str) -> Result<()> {
        // The UART has a small FIFO and the guest is emulated: type slowly.
        for chunk in line.as_bytes().chunks(16) {
            self.input.write_all(chunk)?;
            self.input.flush()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        self.input.write_all(b"\n")?;
        self.input.flush()?;
        Ok(())
    }

    /// Runs a shell command in the guest; returns what it printed (stdout,
    /// then stderr) and its exit status. On QEMU it is typed into the
    /// console's shell: the markers are built by the shell (`"@@""B"`), so
    /// the echo of the typed command never matches them. On a lab board it
    /// runs over ssh; an ssh failure (exit status 255: no connection, key
    /// refused) is an error.
    pub fn sh(&mut self, command: &str, timeout: Duration) -> Result<(String, i32)> {
        if let Link::Lab(lab) = &self.link {
            let (out, code) = lab.ssh.run(command, timeout, None)?;
            self.ssh_log(command, &out, code);
            if code == 255 {
                bail!("ssh to {} failed (exit status 255): {out}", lab.ssh);
            }
            return Ok((out.trim().to_owned(), code));
        }
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

    /// Reboots the guest (`reboot -f`: no clean shutdown, as the scenarios
    /// always did): typed into the console's shell on QEMU; over ssh on a
    /// lab board, detached so the dropped connection does not matter.
    pub fn reboot(&mut self) -> Result<()> {
        if self.is_lab() {
            // Its own session: the ssh server may signal the session's
            // processes when the connection closes.
            let (out, code) = self.sh(
                "setsid sh -c 'sleep 1; reboot -f' </dev/null >/dev/null 2>&1 &",
                Duration::from_secs(60),
            )?;
            if code != 0 {
                bail!("reboot over ssh exited {code}: {out}");
            }
            return Ok(());
        }
        self.send("reboot -f")
    }

    /// Makes the bundle `local` available to the guest; returns its path
    /// there. On QEMU the bundles disk must carry it (`/bundles/NAME`,
    /// [`Hardware::bundles`]); a lab board has no second disk the runner
    /// could plug in, so the bundle is copied over ssh (`cat >`, then
    /// `sync`) into [`Lab::bundle_dir`], unless a file of the same size is
    /// already there.
    pub fn bundle(&mut self, local: &Path) -> Result<String> {
        let name = local
            .file_name()
            .context("a bundle path without a file name")?
            .to_string_lossy()
            .into_owned();
        let Link::Lab(lab) = &self.link else {
            return Ok(format!("/bundles/{name}"));
        };
        let lab = lab.clone();
        let remote = format!("{}/{name}", lab.bundle_dir.trim_end_matches('/'));
        let size = std::fs::metadata(local)
            .with_context(|| format!("stat {}", local.display()))?
            .len();
        let (out, _) = self.sh(
            &format!("if [ -f '{remote}' ]; then wc -c <'{remote}'; else echo none; fi"),
            Duration::from_secs(60),
        )?;
        if out.trim() == size.to_string() {
            return Ok(remote);
        }
        let file =
            std::fs::File::open(local).with_context(|| format!("open {}", local.display()))?;
        let command = format!(
            "mkdir -p '{dir}' && cat >'{remote}.part' && mv '{remote}.part' '{remote}' && sync",
            dir = lab.bundle_dir
        );
        let (out, code) = lab
            .ssh
            .run(&command, Duration::from_secs(900), Some(file))?;
        self.ssh_log(&format!("{command} <{}", local.display()), &out, code);
        if code != 0 {
            bail!(
                "copying {} to {}:{remote} over ssh exited {code}: {out}",
                local.display(),
                lab.ssh
            );
        }
        Ok(remote)
    }

    /// The contents of `path` in the guest, read over ssh (lab boards only).
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        let Link::Lab(lab) = &self.link else {
            bail!("read_file is for lab boards (QEMU's disk image is read on the host)");
        };
        let lab = lab.clone();
        let command = format!("cat '{path}'");
        let data = lab.ssh.output(&command, Duration::from_secs(60))?;
        self.ssh_log(&command, &format!("({} bytes)", data.len()), 0);
        Ok(data)
    }

    /// `kernex-updater status --json` in the guest.
    pub fn status(&mut self) -> Result<serde_json::Value> {
        const STATUS: &str = "kernex-updater status --json";
        if let Link::Lab(lab) = &self.link {
            // Over ssh stdout is apart from stderr: parse stdout alone.
            let (stdout, stderr, code) = lab.ssh.run_raw(STATUS, Duration::from_secs(120), None)?;
            let stdout = String::from_utf8_lossy(&stdout).into_owned();
            let stderr = String::from_utf8_lossy(&stderr).into_owned();
            self.ssh_log(STATUS, &format!("{stdout}{stderr}"), code);
            if code != 0 {
                bail!("{STATUS} exited {code}:\n{stdout}{stderr}");
            }
            return serde_json::from_str(stdout.trim())
                .with_context(|| format!("status --json is not JSON:\n{stdout}"));
        }
        let (out, code) = self.sh(STATUS, Duration::from_secs(120))?;
        if code != 0 {
            bail!("kernex-updater status --json exited {code}:\n{out}");
        }
        let start = out.find('{').context("status printed no JSON")?;
        serde_json::from_str(&out[start..])
            .with_context(|| format!("status --json is not JSON:\n{out}"))
    }

    /// Cuts the power: SIGKILL to QEMU (no sync, no shutdown), or the lab's
    /// power-off command (an error if it fails: the board may still run).
    pub fn power_off(&mut self) -> Result<()> {
        let result = match &mut self.link {
            Link::Qemu { child, swtpm } => {
                let _ = child.kill();
                let _ = child.wait();
                if let Some(t) = swtpm {
                    t.stop();
                }
                Ok(())
            }
            Link::Lab(lab) => run_power(&lab.power_off, "power-off", &self.log),
        };
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(f, "\n===== kernex-hw-tests: power cut =====");
        }
        result
    }

    /// The whole console output of this power cycle so far.
    pub fn console(&self) -> String {
        self.text()
    }

    /// Appends an ssh command and what it printed to `ssh.log` beside the
    /// console log.
    fn ssh_log(&self, command: &str, out: &str, code: i32) {
        let path = self.log.with_file_name("ssh.log");
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "$ {command}\n{out}\n[exit {code}]");
        }
    }
}

impl Drop for Machine {
    /// QEMU is killed with its `Machine`. A lab board's power is left as
    /// it is: a later `Machine` for the same board may already have powered
    /// it on again (the owner of the board cuts it, see [`Lab::power_off`]).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Link::Qemu { child, swtpm } = &mut self.link {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(t) = swtpm {
                t.stop();
            }
        }
    }
}

/// How the runner reaches a lab board: everything a real board needs
/// instead of QEMU (hw-tests/README.md, "On a real Raspberry Pi 4").
#[derive(Debug, Clone)]
pub struct Lab {
    /// Where commands run once Linux is up.
    pub ssh: SshTarget,
    /// The serial console: a serial device (`/dev/ttyUSB0`) or a Unix
    /// socket (ser2net, QEMU's `-chardev socket`).
    pub console: PathBuf,
    /// Shell command (`sh -c`) that cuts the board's power; must succeed
    /// when the power is already off.
    pub power_off: String,
    /// Shell command that restores it; must return (not wait for the boot).
    pub power_on: String,
    /// Where bundles are copied to on the board (a directory on its data
    /// partition, big enough for one bundle).
    pub bundle_dir: String,
}

/// The environment variables [`Lab::from_env`] reads.
pub const LAB_ENV: [&str; 6] = [
    "KERNEX_HW_TARGET",
    "KERNEX_HW_CONSOLE",
    "KERNEX_HW_POWER_OFF",
    "KERNEX_HW_POWER_ON",
    "KERNEX_HW_SSH_IDENTITY",
    "KERNEX_HW_BUNDLE_DIR",
];

/// Where bundles go on a lab board unless `KERNEX_HW_BUNDLE_DIR` says otherwise.
pub const DEFAULT_BUNDLE_DIR: &str = "/data/kernex-hw/bundles";

impl Lab {
    /// The lab board the environment names: `KERNEX_HW_TARGET`
    /// (`ssh://root@board[:port]`), `KERNEX_HW_CONSOLE` (`/dev/ttyUSB0`),
    /// `KERNEX_HW_POWER_OFF` and `KERNEX_HW_POWER_ON` (shell commands), and
    /// optionally `KERNEX_HW_SSH_IDENTITY` (a private key file) and
    /// `KERNEX_HW_BUNDLE_DIR` (default [`DEFAULT_BUNDLE_DIR`]). A missing
    /// one is an error naming it.
    pub fn from_env() -> Result<Lab> {
        let var = |name: &str| -> Result<String> {
            std::env::var(name)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .with_context(|| {
                    format!(
                        "{name} is not set: a real-board run needs KERNEX_HW_TARGET=ssh://root@board[:port], \
                         KERNEX_HW_CONSOLE=/dev/ttyUSB0, KERNEX_HW_POWER_OFF=CMD and KERNEX_HW_POWER_ON=CMD \
                         (hw-tests/README.md, \"On a real Raspberry Pi 4\")"
                    )
                })
        };
        let mut ssh = SshTarget::parse(&var("KERNEX_HW_TARGET")?)?;
        ssh.identity = std::env::var_os("KERNEX_HW_SSH_IDENTITY")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        Ok(Lab {
            ssh,
            console: PathBuf::from(var("KERNEX_HW_CONSOLE")?),
            power_off: var("KERNEX_HW_POWER_OFF")?,
            power_on: var("KERNEX_HW_POWER_ON")?,
            bundle_dir: std::env::var("KERNEX_HW_BUNDLE_DIR")
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| DEFAULT_BUNDLE_DIR.to_owned()),
        })
    }

    /// The host tools a lab board needs; a missing one is an error.
    fn check_tools(&self) -> Result<()> {
        for tool in ["ssh", "sh", "stty"] {
            crate::assets::which(tool).with_context(|| {
                format!("{tool} is needed for a lab board (openssh-client, coreutils; scripts/setup.d/72-hw-tests-lab.sh)")
            })?;
        }
        if let Some(id) = &self.ssh.identity
            && !id.is_file()
        {
            bail!("the ssh identity {} does not exist", id.display());
        }
        Ok(())
    }

    /// Cuts the board's power (the lab's power-off command); for the owner
    /// of the board once a test is over.
    pub fn power_off(&self, log: &Path) -> Result<()> {
        run_power(&self.power_off, "power-off", log)
    }
}

/// `ssh://user@host[:port]`, plus an optional identity file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub user: String,
    pub host: String,
    pub port: Option<u16>,
    pub identity: Option<PathBuf>,
}

impl std::fmt::Display for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "ssh://{}@[{}]", self.user, self.host)?;
        } else {
            write!(f, "ssh://{}@{}", self.user, self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl SshTarget {
    /// Parses `ssh://user@host[:port]` (`ssh://` and `user@` optional: the
    /// user defaults to root). An IPv6 address goes in brackets.
    pub fn parse(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("ssh://").unwrap_or(url);
        let (user, hostport) = match rest.split_once('@') {
            Some((u, h)) => (u, h),
            None => ("root", rest),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .with_context(|| format!("{url}: unclosed '['"))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .with_context(|| format!("{url}: bad port {p:?}"))
            })
            .transpose()?;
        if user.is_empty() || host.is_empty() || host.contains('/') {
            bail!("{url} is not ssh://user@host[:port]");
        }
        Ok(SshTarget {
            user: user.to_owned(),
            host: host.to_owned(),
            port,
            identity: None,
        })
    }

    /// The `ssh` command line that runs `command` on the board: batch mode
    /// (no password prompt), no host key check (a lab board is reflashed,
    /// and its host key with it), a 10 s connect timeout and keepalives (a
    /// power cut must not leave ssh waiting).
    pub fn command(&self, command: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=3",
        ]);
        if let Some(p) = self.port {
            c.arg("-p").arg(p.to_string());
        }
        if let Some(id) = &self.identity {
            c.arg("-i").arg(id).args(["-o", "IdentitiesOnly=yes"]);
        }
        c.arg(format!("{}@{}", self.user, self.host))
            .arg("--")
            .arg(command);
        c
    }

    /// Runs `command` on the board, `stdin` fed from a file (or nothing);
    /// returns stdout then stderr, and the exit status (255: ssh itself
    /// failed). ssh is killed after `timeout`, which is an error.
    pub fn run(
        &self,
        command: &str,
        timeout: Duration,
        stdin: Option<std::fs::File>,
    ) -> Result<(String, i32)> {
        let (stdout, stderr, code) = self.run_raw(command, timeout, stdin)?;
        let mut out = String::from_utf8_lossy(&stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&stderr));
        Ok((out, code))
    }

    /// `command`'s stdout, bytes as they are; a non-zero exit is an error.
    pub fn output(&self, command: &str, timeout: Duration) -> Result<Vec<u8>> {
        let (stdout, stderr, code) = self.run_raw(command, timeout, None)?;
        if code != 0 {
            bail!(
                "{command:?} on {self} exited {code}: {}",
                String::from_utf8_lossy(&stderr)
            );
        }
        Ok(stdout)
    }

    fn run_raw(
        &self,
        command: &str,
        timeout: Duration,
        stdin: Option<std::fs::File>,
    ) -> Result<(Vec<u8>, Vec<u8>, i32)> {
        let mut cmd = self.command(command);
        cmd.stdin(stdin.map_or_else(Stdio::null, Stdio::from))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .context("run ssh (openssh-client; scripts/setup.d/72-hw-tests-lab.sh)")?;
        let collect = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = collect(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = collect(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{command:?} on {self} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        Ok((stdout, stderr, status.code().unwrap_or(-1)))
    }
}

/// The power-on/off link of a [`Machine`].
#[derive(Debug)]
enum Link {
    /// A QEMU child (and its TPM).
    Qemu { child: Child, swtpm: Option<Swtpm> },
    /// A lab board: power by commands, Linux over ssh.
    Lab(Lab),
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("link", &self.link)
            .field("cursor", &self.cursor)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// Opens `log` for appending and writes a `===== kernex-hw-tests: WHAT =====` line.
fn open_log(log: &Path, what: &str) -> Result<std::fs::File> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let _ = writeln!(f, "\n===== kernex-hw-tests: {what} =====");
    Ok(f)
}

/// Copies what `stream` yields into the console buffer and the log until
/// it ends or `stop` is set. A serial device is read with a 0.5 s timeout
/// (`stty … min 0 time 5`), so a read of 0 bytes there is not the end.
fn spawn_reader(
    mut stream: Box<dyn Read + Send>,
    console: &Arc<Mutex<Vec<u8>>>,
    mut logf: std::fs::File,
    stop: Arc<AtomicBool>,
    is_tty: bool,
) {
    let console = Arc::clone(console);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut buf) {
                Ok(0) if is_tty => continue,
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
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

/// Runs a lab power command (`sh -c`); its output goes to the console log.
fn run_power(command: &str, what: &str, log: &Path) -> Result<()> {
    let mut logf = open_log(log, &format!("{what}: {command}"))?;
    let out = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run the {what} command {command:?}"))?;
    let _ = logf.write_all(&out.stdout);
    let _ = logf.write_all(&out.stderr);
    if !out.status.success() {
        bail!(
            "the {what} command {command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A serial device opened for reading and writing, then set (on that open
/// file: `stty` with it as stdin, so no second open and close can hang
/// up a pty) to 115200 8N1, raw, no echo, no flow control, reads returning
/// after 0.5 s without data.
fn open_serial(dev: &Path) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .with_context(|| format!("open the serial console {}", dev.display()))?;
    crate::run(
        Command::new("stty")
            .args([
                "115200", "cs8", "-cstopb", "-parenb", "raw", "-echo", "-crtscts", "clocal", "min",
                "0", "time", "5",
            ])
            .stdin(Stdio::from(f.try_clone()?)),
    )
    .with_context(|| format!("set up the serial console {}", dev.display()))?;
    Ok(f)
}

/// Waits (60 s) for a console that appears with the power (a QEMU lab
/// board's socket, a USB-serial adapter powered by the board) and attaches
/// to it.
#[allow(clippy::type_complexity)]
fn attach_console(path: &Path) -> Result<(Box<dyn Read + Send>, Box<dyn Write + Send>, bool)> {
    let started = Instant::now();
    loop {
        let last_error = match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(s) => return Ok((Box::new(s.try_clone()?), Box::new(s), false)),
                Err(e) => format!("connect: {e}"),
            },
            Ok(_) => {
                let f = open_serial(path)?;
                return Ok((Box::new(f.try_clone()?), Box::new(f), true));
            }
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the console {} is not there 60 s after the power-on command: {last_error}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_targets_parse() -> Result<()> {
        let t = SshTarget::parse("ssh://root@board")?;
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("root", "board", None)
        );
        let t = SshTarget::parse("ssh://pi@192.168.7.20:2222")?;
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("pi", "192.168.7.20", Some(2222))
        );
        let t = SshTarget::parse("board.lab")?;
        assert_eq!((t.user.as_str(), t.host.as_str()), ("root", "board.lab"));
        let t = SshTarget::parse("ssh://root@[fe80::1%eth0]:22")?;
        assert_eq!((t.host.as_str(), t.port), ("fe80::1%eth0", Some(22)));
        assert_eq!(t.to_string(), "ssh://root@[fe80::1%eth0]:22");
        for bad in [
            "ssh://root@",
            "ssh://root@board:port",
            "ssh://@board",
            "ssh://root@a/b",
        ] {
            assert!(SshTarget::parse(bad).is_err(), "{bad}");
        }
        let cmd = SshTarget {
            identity: Some("/k".into()),
            ..SshTarget::parse("ssh://root@board:2222")?
        }
        .command("kernex-updater status --json");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.windows(2).any(|w| w == ["-p", "2222"]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["-i", "/k"]), "{args:?}");
        assert!(args.contains(&"BatchMode=yes".to_owned()), "{args:?}");
        assert_eq!(
            &args[args.len() - 3..],
            ["root@board", "--", "kernex-updater status --json"]
        );
        Ok(())
    }
}
