//! Test harness: one real swtpm per test, provisioned like a manufacturer
//! would (`swtpm_setup --create-ek-cert`), stopped by PID when dropped; and
//! the tpm2-tools peers. A missing tool fails the test.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm with its own state directory.
pub struct Swtpm {
    child: Option<Child>,
    state: tempfile::TempDir,
    pub port: u16,
}

/// Fails the test when `tool` is not on PATH (scripts/setup.d/60-tpm.sh
/// installs it).
pub fn require(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("{tool} is not installed: run scripts/setup (scripts/setup.d/60-tpm.sh)");
}

fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port == u16::MAX {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of TCP ports on 127.0.0.1");
}

/// A TPM vendor's CA as swtpm-localca makes it (a root CA and the signing
/// CA under it), with its own swtpm_setup.conf and swtpm-localca.conf in a
/// temporary directory: nothing global is read or written. The CA is
/// created by the first TPM provisioned with it.
pub struct LocalCa {
    dir: tempfile::TempDir,
}

impl LocalCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        let p = |name: &str| ca.join(name).display().to_string();
        std::fs::write(
            dir.path().join("swtpm-localca.conf"),
            format!(
                "statedir = {}\nsigningkey = {}\nissuercert = {}\ncertserial = {}\n",
                ca.display(),
                p("signkey.pem"),
                p("issuercert.pem"),
                p("certserial")
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("swtpm-localca.options"),
            "--platform-manufacturer Kernex\n--platform-version 2.1\n--platform-model test\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("swtpm_setup.conf"),
            format!(
                "create_certs_tool = {}\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                require("swtpm_localca").display(),
                dir.path().join("swtpm-localca.conf").display(),
                dir.path().join("swtpm-localca.options").display()
            ),
        )
        .unwrap();
        Self { dir }
    }

    pub fn setup_conf(&self) -> PathBuf {
        self.dir.path().join("swtpm_setup.conf")
    }

    /// The root CA certificate (PEM), once a TPM was provisioned.
    pub fn root(&self) -> PathBuf {
        self.existing("swtpm-localca-rootca-cert.pem")
    }

    /// The signing (intermediate) CA certificate (PEM).
    pub fn intermediate(&self) -> PathBuf {
        self.existing("issuercert.pem")
    }

    /// A directory with both, as a verifier's store of trusted EK CAs.
    pub fn store(&self) -> PathBuf {
        let store = self.dir.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::copy(self.root(), store.join("root.pem")).unwrap();
        std::fs::copy(self.intermediate(), store.join("intermediate.pem")).unwrap();
        store
    }

    fn existing(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join("ca").join(name);
        assert!(
            path.is_file(),
            "{} missing: provision a TPM with this CA first",
            path.display()
        );
        path
    }
}

/// How a test TPM is provisioned.
pub enum EkCert<'a> {
    /// `swtpm_setup --create-ek-cert` with the system's swtpm-localca.
    System,
    /// `--create-ek-cert --create-platform-cert`, issued by this CA.
    From(&'a LocalCa),
    /// No EK certificate in NV.
    None,
}

impl Swtpm {
    /// A fresh TPM with an RSA-2048 EK and its certificate in NV.
    pub fn start() -> Self {
        Self::start_with(EkCert::System)
    }

    /// A fresh TPM provisioned as `ek` says.
    pub fn start_with(ek: EkCert<'_>) -> Self {
        let state = tempfile::tempdir().unwrap();
        let mut setup = Command::new(require("swtpm_setup"));
        setup
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir://{}", state.path().display()))
            .arg("--overwrite");
        match ek {
            EkCert::System => {
                setup.arg("--create-ek-cert");
            }
            EkCert::From(ca) => {
                setup
                    .args(["--create-ek-cert", "--create-platform-cert", "--config"])
                    .arg(ca.setup_conf());
            }
            EkCert::None => {
                // A config of our own all the same (swtpm_setup reads one).
                let conf = state.path().join("swtpm_setup.conf");
                std::fs::write(&conf, "active_pcr_banks = sha256\n").unwrap();
                setup.arg("--config").arg(conf);
            }
        }
        let out = setup.output().unwrap();
        assert!(
            out.status.success(),
            "swtpm_setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut tpm = Self {
            child: None,
            state,
            port: 0,
        };
        tpm.boot();
        tpm
    }

    /// Starts swtpm on the state (`startup-clear`: a power-on, so PCRs 0–15
    /// are zero again).
    fn boot(&mut self) {
        let swtpm = require("swtpm");
        for _ in 0..5 {
            let port = free_port_pair();
            let mut child = Command::new(&swtpm)
                .args(["socket", "--tpm2"])
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", self.state.path().display()))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile: try another
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    self.child = Some(child);
                    self.port = port;
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("swtpm did not listen on 127.0.0.1:{port} within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("swtpm could not start");
    }

    /// Power cycle: stop swtpm, start it again on the same state.
    pub fn reboot(&mut self) {
        self.stop();
        self.boot();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The TCTI string for tss-esapi and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }

    /// Runs a tpm2-tools command against this TPM; fails the test on a
    /// non-zero exit.
    pub fn tool(&self, tool: &str, args: &[&str]) -> Output {
        let out = self.tool_status(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn tool_status(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(require(tool))
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}
