//! A real control plane for the guest: the `kernex-server` binary of this
//! checkout on `127.0.0.1:0` (SQLite and blobs in a directory of the
//! scenario), operated over its HTTP API as an operator would. The guest
//! reaches it at `10.0.2.2:PORT` through QEMU's user network, which maps
//! that address to the host's loopback.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use kernex_protocol::api::{self, EnrollmentToken, NewEnrollmentToken};
use serde_json::{Value, json};

/// The address of the host's loopback as the guest sees it (QEMU user
/// networking).
pub const HOST_FROM_GUEST: &str = "10.0.2.2";

/// Server settings for a test: the guest polls every few seconds, and the
/// rollout scheduler looks often.
const SERVER_TOML: &str = "\
device-requests-per-minute = 0
uploads-per-minute = 0
scheduler-interval-ms = 500
[limits]
enrollments-per-address-per-minute = 0
unauthenticated-per-address-per-minute = 0
";

/// A running `kernex-server`, stopped (by its PID) when dropped.
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The port it listens on.
    pub port: u16,
    token: String,
    agent: ureq::Agent,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl ControlPlane {
    /// Starts `binary` with its data in `dir`, logs in as the bootstrap
    /// admin and installs `ca_pem` as the organisation's keyring.
    pub fn start(binary: &Path, dir: &Path, ca_pem: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let config = dir.join("server.toml");
        std::fs::write(&config, SERVER_TOML)?;
        let log = dir.join("server.log");
        let stderr = std::fs::File::create(&log)?;
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "kernex_server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let stdout = child.stdout.take().context("kernex-server stdout")?;
        let (tx, rx) = mpsc::channel();
        let mut copy = std::fs::OpenOptions::new().append(true).open(&log)?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(copy, "{line}");
                let _ = tx.send(line);
            }
        });
        // "Created organisation "default" and admin "admin@localhost".",
        // "One-time admin password (shown only now): …",
        // "kernex-server listening on http://127.0.0.1:PORT".
        let mut email = None;
        let mut password = None;
        let mut url = None;
        while url.is_none() {
            let line = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "kernex-server did not say where it listens within 60 s; log: {}",
                        log.display()
                    );
                }
            };
            if let Some(rest) = line.split_once(" and admin \"").map(|(_, r)| r) {
                email = rest.split('"').next().map(str::to_owned);
            } else if let Some(p) = line.strip_prefix("One-time admin password (shown only now): ")
            {
                password = Some(p.trim().to_owned());
            } else if let Some(u) = line.strip_prefix("kernex-server listening on ") {
                url = Some(u.trim().to_owned());
            }
        }
        let url = url.context("no listening URL")?;
        let port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no port in {url}"))?;
        let (Some(email), Some(password)) = (email, password) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("kernex-server printed no bootstrap admin (a reused data directory?)");
        };
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(120)))
                .build(),
        );
        let mut cp = ControlPlane {
            child,
            url,
            port,
            token: String::new(),
            agent,
            log,
        };
        let v = cp.call_expecting(
            200,
            "POST",
            "/api/v1/login",
            Some(json!({"organization": "default", "email": email, "password": password})),
        )?;
        cp.token = v["token"]
            .as_str()
            .context("login gave no token")?
            .to_owned();
        // The bootstrap password must be changed before anything else.
        let new_password = format!("hw-tests {password}");
        cp.call_expecting(
            204,
            "POST",
            "/api/v1/account/password",
            Some(json!({"current_password": password, "new_password": new_password})),
        )?;
        let pem = std::fs::read_to_string(ca_pem)
            .with_context(|| format!("read {}", ca_pem.display()))?;
        cp.call_expecting(
            204,
            "PUT",
            "/api/v1/org/keyring",
            Some(json!({ "pem": pem })),
        )?;
        Ok(cp)
    }

    /// The server's URL as the guest reaches it.
    pub fn guest_url(&self) -> String {
        format!("http://{HOST_FROM_GUEST}:{}", self.port)
    }

    /// One operator API call: (status, JSON body or null).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {}", self.token);
        let resp = match method {
            "GET" => self.agent.get(&url).header("Authorization", &auth).call(),
            "POST" | "PUT" => {
                let r = if method == "POST" {
                    self.agent.post(&url)
                } else {
                    self.agent.put(&url)
                };
                r.header("Authorization", &auth)
                    .header("Content-Type", "application/json")
                    .send(serde_json::to_vec(&body.unwrap_or_else(|| json!({})))?)
            }
            m => bail!("unsupported method {m}"),
        }
        .with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().read_to_vec()?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// A call that must answer `status`.
    pub fn call_expecting(
        &self,
        status: u16,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let (s, v) = self.call(method, path, body)?;
        if s != status {
            bail!("{method} {path} answered {s}, not {status}: {v}");
        }
        Ok(v)
    }

    /// Uploads a bundle; returns the release id.
    pub fn upload(&self, bundle: &Path) -> Result<String> {
        let data = std::fs::read(bundle).with_context(|| format!("read {}", bundle.display()))?;
        let resp = self
            .agent
            .post(format!("{}/api/v1/releases", self.url))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/octet-stream")
            .send(&data[..])
            .with_context(|| format!("upload {}", bundle.display()))?;
        let status = resp.status().as_u16();
        let v: Value = serde_json::from_slice(&resp.into_body().read_to_vec()?).unwrap_or_default();
        if status != 201 {
            bail!("uploading {} answered {status}: {v}", bundle.display());
        }
        Ok(v["id"].as_str().context("no release id")?.to_owned())
    }

    /// A new enrollment token; with `require_tpm`, devices must enroll
    /// with their TPM identity (credential activation).
    pub fn enrollment_token(&self, require_tpm: bool) -> Result<String> {
        let new = NewEnrollmentToken {
            label: "hw-tests".into(),
            tags: vec!["qemu".into()],
            allowed_tags: Vec::new(),
            expires_at: None,
            expires_in_secs: Some(86_400),
            max_uses: None,
            link_class: None,
            site: None,
            time_zone: None,
            require_preauthorization: false,
            require_tpm,
        };
        let v = self.call_expecting(
            201,
            "POST",
            api::paths::ENROLLMENT_TOKENS,
            Some(serde_json::to_value(new)?),
        )?;
        let token: EnrollmentToken = serde_json::from_value(v)
            .context("the enrollment token answer is not the contract's")?;
        token.token.context("no token")
    }

    /// The device that enrolled as `device_id`, if it has.
    pub fn device(&self, device_id: &str) -> Result<Option<Value>> {
        let v = self.call_expecting(200, "GET", "/api/v1/devices", None)?;
        Ok(v.as_array()
            .context("devices is not a list")?
            .iter()
            .find(|d| d["device_id"] == device_id)
            .cloned())
    }

    /// Assigns `release` to `device` (the server's id); returns the deployment id.
    pub fn deploy(&self, release: &str, device: &str) -> Result<String> {
        let v = self.call_expecting(
            201,
            "POST",
            "/api/v1/deployments",
            Some(json!({"release_id": release, "devices": [device]})),
        )?;
        Ok(v["id"].as_str().context("no deployment id")?.to_owned())
    }

    /// A deployment with its per-device state.
    pub fn deployment(&self, id: &str) -> Result<Value> {
        self.call_expecting(200, "GET", &format!("/api/v1/deployments/{id}"), None)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
