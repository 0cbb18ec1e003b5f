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

mod console;
mod lab;
mod qemu;

use console::*;
pub use lab::{DEFAULT_BUNDLE_DIR, LAB_ENV, Lab, SshTarget};
use qemu::Swtpm;
pub use qemu::{Hardware, qemu_args};

/// How long one boot (U-Boot + kernel + userland) may take. Generous: the
/// board is emulated (TCG) on a shared, loaded machine.
pub fn boot_timeout() -> Duration {
    let secs = std::env::var("KERNEX_HW_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(240);
    Duration::from_secs(secs)
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
        Self::spawn(cmd, swtpm, log)
    }

    /// Powers on a board whose QEMU command line the caller wrote (a
    /// vendor board, `crate::vendor`): `cmd`'s stdin is typed into, its
    /// stdout and stderr are the console.
    pub fn start_command(cmd: Command, log: &Path) -> Result<Self> {
        Self::spawn(cmd, None, log)
    }

    fn spawn(mut cmd: Command, swtpm: Option<Swtpm>, log: &Path) -> Result<Self> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {program} (scripts/setup)"))?;
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
