//! The browser-test harness shared by `ui_browser*.rs`: a minimal W3C
//! WebDriver client for Debian's headless Chromium (through chromedriver
//! on 127.0.0.1) and the real `kernex-server` binary on 127.0.0.1:0. A
//! missing chromium or chromedriver is a failure (scripts/setup.d/50-ui.sh
//! installs them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Kills a child process when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// A JSON request; (status, parsed body or Null).
pub fn request(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let mut response = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(url);
            if let Some(a) = &auth {
                r = r.header("authorization", a);
            }
            r.call()
        }
        ("DELETE", _) => {
            let mut r = agent.delete(url);
            if let Some(a) = &auth {
                r = r.header("authorization", a);
            }
            r.call()
        }
        (m, body) => {
            let mut r = if m == "PUT" {
                agent.put(url)
            } else {
                agent.post(url)
            };
            if let Some(a) = &auth {
                r = r.header("authorization", a);
            }
            r.header("content-type", "application/json")
                .send(body.unwrap_or(json!({})).to_string())
        }
    }
    .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_string()
        .unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A minimal W3C WebDriver client.
pub struct Browser {
    agent: ureq::Agent,
    base: String,
    pub shots: PathBuf,
    _driver: Proc,
    _profile: tempfile::TempDir,
}

pub const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
pub const TAB: &str = "\u{E004}";
pub const ENTER: &str = "\u{E007}";

impl Browser {
    pub fn start(shots: PathBuf) -> Browser {
        for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run scripts/setup (setup.d/50-ui.sh installs chromium and chromium-driver)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Proc(
            Command::new("/usr/bin/chromedriver")
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let agent = agent();
        let driver_url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut r) = agent.get(&format!("{driver_url}/status")).call() {
                let v: Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
                if v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"performance": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let (status, v) = request(
            &agent,
            "POST",
            &format!("{driver_url}/session"),
            None,
            Some(caps),
        );
        assert_eq!(status, 200, "new session: {v}");
        let id = v["value"]["sessionId"].as_str().unwrap().to_string();
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            agent,
            base: format!("{driver_url}/session/{id}"),
            shots,
            _driver: driver,
            _profile: profile,
        }
    }

    pub fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = request(
            &self.agent,
            method,
            &format!("{}{path}", self.base),
            None,
            body,
        );
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }

    pub fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT].as_str().unwrap().to_string()
    }

    pub fn exists(&self, css: &str) -> bool {
        let (status, _) = request(
            &self.agent,
            "POST",
            &format!("{}/element", self.base),
            None,
            Some(json!({"using": "css selector", "value": css})),
        );
        status == 200
    }

    pub fn wait_for(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.exists(css) {
            assert!(
                Instant::now() < deadline,
                "{css} did not appear on {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.find(css)
    }

    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.cmd("POST", &format!("/element/{el}/click"), Some(json!({})));
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.cmd("POST", &format!("/element/{el}/clear"), Some(json!({})));
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({"text": text})),
        );
    }

    pub fn text(&self, css: &str) -> String {
        let el = self.find(css);
        self.cmd("GET", &format!("/element/{el}/text"), None)
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    pub fn js_async(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Presses keys on whatever has the focus (no element targeted).
    pub fn keys(&self, text: &str) {
        let mut actions = Vec::new();
        for c in text.chars() {
            actions.push(json!({"type": "keyDown", "value": c.to_string()}));
            actions.push(json!({"type": "keyUp", "value": c.to_string()}));
        }
        self.cmd(
            "POST",
            "/actions",
            Some(json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})),
        );
    }

    pub fn focused_id(&self) -> String {
        self.js("return document.activeElement ? document.activeElement.id : ''")
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn wait_url(&self, suffix: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.url().ends_with(suffix) {
            assert!(
                Instant::now() < deadline,
                "expected a URL ending in {suffix}, at {}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn screenshot(&self, name: &str) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = openssl::base64::decode_block(b64.as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    pub fn window(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    /// URLs of every request the browser made since the last call.
    pub fn requested_urls(&self) -> Vec<String> {
        let (status, v) = request(
            &self.agent,
            "POST",
            &format!("{}/se/log", self.base),
            None,
            Some(json!({"type": "performance"})),
        );
        assert_eq!(status, 200, "performance log: {v}");
        let mut urls = Vec::new();
        for entry in v["value"].as_array().unwrap() {
            let message: Value =
                serde_json::from_str(entry["message"].as_str().unwrap_or("{}")).unwrap();
            let m = &message["message"];
            if m["method"] == "Network.requestWillBeSent" {
                urls.push(m["params"]["request"]["url"].as_str().unwrap().to_string());
            }
        }
        urls
    }

    pub fn accept_dialog(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _) = request(
                &self.agent,
                "POST",
                &format!("{}/alert/accept", self.base),
                None,
                Some(json!({})),
            );
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "no confirmation dialog");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.agent.delete(&self.base).call();
    }
}

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../protocol/tests/golden")
        .join(name)
}

/// Starts kernex-server; returns it, its origin and the admin password.
pub fn start_server(data_dir: &Path) -> (Proc, String, String) {
    start_server_with(data_dir, None)
}

/// The admin's password once [`start_server_with`] changed the one-time one.
pub const ADMIN_PASSWORD: &str = "ui test admin password";

/// Starts kernex-server with a configuration file, and changes the
/// bootstrap admin's one-time password to [`ADMIN_PASSWORD`] (returned).
pub fn start_server_with(data_dir: &Path, config: Option<&Path>) -> (Proc, String, String) {
    let (server, origin, one_time) = start_server_fresh(data_dir, config);
    let http = agent();
    let (s, v) = request(
        &http,
        "POST",
        &format!("{origin}/api/v1/login"),
        None,
        Some(json!({"email": "admin@localhost", "password": one_time})),
    );
    assert_eq!(s, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let (s, v) = request(
        &http,
        "POST",
        &format!("{origin}/api/v1/account/password"),
        Some(&token),
        Some(json!({"current_password": one_time, "new_password": ADMIN_PASSWORD})),
    );
    assert_eq!(s, 204, "{v}");
    (server, origin, ADMIN_PASSWORD.to_string())
}

/// Starts kernex-server; returns it, its origin and the admin's one-time
/// password (not changed yet).
pub fn start_server_fresh(data_dir: &Path, config: Option<&Path>) -> (Proc, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kernex-server"));
    if let Some(c) = config {
        command.arg("--config").arg(c);
    }
    let mut child = command
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("KERNEX_SERVER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let server = Proc(child);
    let mut password = None;
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "server exited");
        if let Some(p) = line
            .trim()
            .strip_prefix("One-time admin password (shown only now): ")
        {
            password = Some(p.to_string());
        }
        if let Some(addr) = line.trim().strip_prefix("kernex-server listening on ") {
            return (server, addr.to_string(), password.expect("admin password"));
        }
    }
}
