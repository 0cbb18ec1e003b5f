//! A real board in a lab: its serial console, the operator's power
//! commands, and ssh to reach it.

use super::*;

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
    pub(super) fn check_tools(&self) -> Result<()> {
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

    pub(super) fn run_raw(
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
