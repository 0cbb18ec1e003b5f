//! `kernex-updater daemon` against a real control plane: the kernex-server
//! library serving its HTTP API on 127.0.0.1 (SQLite), operated over HTTP
//! like an operator would, and the real updater binary as a simulated
//! device (slot files, boot-state file, simulated boots). The device
//! enrolls, heartbeats, installs what it is assigned by delta, reboots,
//! commits, ships its logs; a second install fetches only what changed;
//! reassigning the release in the other slot switches back without a
//! download; a device cut off from the server keeps its assignment pending
//! and finishes when the link is back; queued reports arrive in order.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../attest/tests/common/mod.rs"]
mod swtpm;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Keys, bundle, bundle_secure, edit, image, keys};
use kernex_protocol::api;
use serde_json::{Value, json};

/// A kernex-server on 127.0.0.1:PORT, run by a tokio runtime on its own
/// thread for the life of the test process.
struct ControlPlane {
    url: String,
    /// The same API over HTTPS, when started with a certificate.
    https_url: Option<String>,
    admin: String,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    fn start(keys: &Keys) -> ControlPlane {
        Self::start_with(keys, |_| {})
    }

    fn start_with(
        keys: &Keys,
        edit: impl FnOnce(&mut kernex_server::config::Config) + Send + 'static,
    ) -> ControlPlane {
        Self::start_full(keys, edit, None)
    }

    /// Also serving HTTPS with `tls` (certificate chain, key; PEM files).
    fn start_full(
        keys: &Keys,
        edit: impl FnOnce(&mut kernex_server::config::Config) + Send + 'static,
        tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    ) -> ControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("server");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut config = kernex_server::config::Config {
                    data_dir,
                    // A simulated device polls every second.
                    device_requests_per_minute: 0,
                    uploads_per_minute: 0,
                    scheduler_interval_ms: 300,
                    ..kernex_server::config::Config::default()
                };
                edit(&mut config);
                let state = kernex_server::AppState::open(config).await.unwrap();
                tokio::spawn(kernex_server::service::rollouts::scheduler::run(
                    state.clone(),
                ));
                let admin = kernex_server::bootstrap(&state).await.unwrap().unwrap();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let https = match tls {
                    Some((cert, key)) => {
                        let acceptor = kernex_server::tls::acceptor(&cert, &key).unwrap();
                        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                        let https = tcp.local_addr().unwrap();
                        let app = kernex_server::http::app(state.clone());
                        let limits = kernex_server::serve::Limits::from(&state.config.limits);
                        tokio::spawn(kernex_server::serve::run(
                            tcp,
                            Some(acceptor),
                            app,
                            limits,
                            std::future::pending(),
                        ));
                        Some(https)
                    }
                    None => None,
                };
                tx.send((addr, https, admin.email, admin.password)).unwrap();
                axum::serve(listener, kernex_server::http::app(state))
                    .await
                    .unwrap();
            });
        });
        let (addr, https, email, password) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        let url = format!("http://{addr}");
        let (s, v) = call(
            &url,
            "POST",
            "/api/v1/login",
            None,
            Some(json!({"organization": "default", "email": email, "password": password})),
        );
        assert_eq!(s, 200, "{v}");
        let admin = v["token"].as_str().unwrap().to_string();
        // The bootstrap password must be changed before anything else.
        let (s, v) = call(
            &url,
            "POST",
            "/api/v1/account/password",
            Some(&admin),
            Some(json!({"current_password": password, "new_password": "daemon test admin"})),
        );
        assert_eq!(s, 204, "{v}");
        let cp = ControlPlane {
            url,
            https_url: https.map(|a| format!("https://{a}")),
            admin,
            _dir: dir,
        };
        let pem = String::from_utf8(keys.ca_pem.clone()).unwrap();
        let (s, v) = cp.op("PUT", "/api/v1/org/keyring", Some(json!({ "pem": pem })));
        assert_eq!(s, 204, "{v}");
        cp
    }

    fn op(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call(&self.url, method, path, Some(&self.admin), body)
    }

    fn upload(&self, bundle: &[u8]) -> String {
        let resp = ureq::post(format!("{}/api/v1/releases", self.url))
            .header("Authorization", format!("Bearer {}", self.admin))
            .header("Content-Type", "application/octet-stream")
            .config()
            .http_status_as_error(false)
            .build()
            .send(bundle)
            .unwrap();
        let status = resp.status().as_u16();
        let v: Value =
            serde_json::from_slice(&resp.into_body().read_to_vec().unwrap()).unwrap_or(Value::Null);
        assert_eq!(status, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    fn enrollment_token(&self) -> String {
        let (s, v) = self.op(
            "POST",
            "/api/v1/enrollment-tokens",
            Some(json!({"label": "test line", "tags": ["site-lab"], "expires_in_secs": 86_400})),
        );
        assert_eq!(s, 201, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    fn device(&self, device_id: &str) -> Option<Value> {
        let (s, v) = self.op("GET", "/api/v1/devices", None);
        assert_eq!(s, 200, "{v}");
        v.as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == device_id)
            .cloned()
    }

    fn deploy(&self, release: &str, device: &str) -> String {
        let (s, v) = self.op(
            "POST",
            "/api/v1/deployments",
            Some(json!({"release_id": release, "devices": [device]})),
        );
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    }

    fn deployment(&self, id: &str) -> Value {
        let (s, v) = self.op("GET", &format!("/api/v1/deployments/{id}"), None);
        assert_eq!(s, 200, "{v}");
        v
    }
}

fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build(),
    );
    let url = format!("{base}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match (method, body) {
        ("GET", _) => {
            let mut r = agent.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
        (m, body) => {
            let mut r = match m {
                "POST" => agent.post(&url),
                "PUT" => agent.put(&url),
                _ => panic!("method {m}"),
            }
            .header("Content-Type", "application/json");
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(serde_json::to_vec(&body.unwrap_or(json!({}))).unwrap())
        }
    }
    .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().read_to_vec().unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A simulated device running `kernex-updater daemon --simulate-boot`.
struct SimDevice {
    dev: common::Device,
    child: Option<Child>,
}

impl SimDevice {
    fn new(keys: &Keys, factory: &[u8], server: &str, token: &str, device_id: &str) -> SimDevice {
        let dev = common::Device::new(keys, factory);
        let p = |n: &str| dev.path(n).display().to_string();
        let text = format!(
            "compatible = \"qemu-aarch64\"\ndata-dir = \"{}\"\nkeyring = \"{}\"\nreboot-command = [\"true\"]\n\
             [slots.rootfs]\nA = \"{}\"\nB = \"{}\"\n\
             [bootloader]\nbackend = \"file\"\npath = \"{}\"\ncmdline = \"{}\"\n\
             [server]\nurl = \"{server}\"\nenrollment-token = \"{token}\"\ndevice-id = \"{device_id}\"\npoll-interval = 1\n\
             allow-downgrade = true\n\
             [health]\ndeadline = 20\nstability-window = 0\n",
            p("data"),
            p("keyring.pem"),
            p("slot-a.img"),
            p("slot-b.img"),
            p("boot-state"),
            p("cmdline"),
        );
        std::fs::write(&dev.config, text).unwrap();
        SimDevice { dev, child: None }
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dev.path("daemon.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
            .arg("--config")
            .arg(&self.dev.config)
            .args(["daemon", "--simulate-boot"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dev.path("daemon.log")).unwrap_or_default()
    }

    /// Stops the daemon (a power-off, as far as the daemon knows).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn status(&self) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
            .arg("--config")
            .arg(&self.dev.config)
            .args(["status", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for<T>(
    what: &str,
    device: &SimDevice,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out waiting for {what}; daemon log:\n{}",
                device.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const MIB: usize = 1024 * 1024;

#[test]
fn daemon_enrolls_installs_by_delta_commits_and_switches_back() {
    let keys = keys();
    let cp = ControlPlane::start(&keys);
    let v1_img = image(4 * MIB, 1);
    let v2_img = edit(&v1_img, MIB + 4096, 200);
    let v1 = bundle(&v1_img, "1.0.0", &keys.signer);
    let v2 = bundle(&v2_img, "1.0.1", &keys.signer);
    let r1 = cp.upload(&v1.bytes);
    let r2 = cp.upload(&v2.bytes);
    let token = cp.enrollment_token();

    // The factory image in slot A is v1's image, without a record.
    let mut dev = SimDevice::new(&keys, &image(4 * MIB, 9), &cp.url, &token, "sim-1");
    dev.start();
    let d = wait_for(
        "enrollment and a heartbeat",
        &dev,
        Duration::from_secs(60),
        || {
            cp.device("sim-1")
                .filter(|d| d["status"] == "online" && d["booted_slot"] == "A")
        },
    );
    let id = d["id"].as_str().unwrap().to_string();
    assert_eq!(d["hardware_class"], "qemu-aarch64");
    assert!(
        d["tags"].as_array().unwrap().contains(&json!("site-lab")),
        "{d}"
    );
    // The credential is private.
    let cred = dev.dev.path("data/credential.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cred).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // v1: the whole image is new (the factory image shares nothing).
    let dep1 = cp.deploy(&r1, &id);
    wait_for(
        "1.0.0 committed in slot B",
        &dev,
        Duration::from_secs(90),
        || {
            cp.device("sim-1").filter(|d| {
                d["current_version"] == "1.0.0"
                    && d["booted_slot"] == "B"
                    && d["status"] == "online"
            })
        },
    );
    let dep = wait_for(
        "deployment 1 success",
        &dev,
        Duration::from_secs(30),
        || Some(cp.deployment(&dep1)).filter(|d| d["status"] == "success"),
    );
    assert_eq!(dep["devices"][0]["state"], "committed", "{dep}");
    let st = dev.status();
    assert_eq!(st["booted-slot"], "B", "{st}");
    assert_eq!(st["committed"], true, "{st}");
    assert_eq!(st["server"]["enrolled-as"], json!(id), "{st}");
    assert_eq!(st["server"]["awaiting"], Value::Null, "{st}");
    assert_eq!(
        common::file_sha256(&dev.dev.path("slot-b.img")),
        common::sha256(&v1_img)
    );

    // v2: one small edit; only the changed chunks travel.
    let dep2 = cp.deploy(&r2, &id);
    wait_for(
        "1.0.1 committed in slot A",
        &dev,
        Duration::from_secs(90),
        || {
            cp.device("sim-1")
                .filter(|d| d["current_version"] == "1.0.1" && d["booted_slot"] == "A")
        },
    );
    let dep = wait_for(
        "deployment 2 success",
        &dev,
        Duration::from_secs(30),
        || Some(cp.deployment(&dep2)).filter(|d| d["status"] == "success"),
    );
    let fetched = dep["devices"][0]["bytes_done"].as_i64().unwrap();
    assert!(
        fetched > 0 && (fetched as usize) < v2.bytes.len() / 4,
        "a one-edit delta fetched {fetched} of a {} byte bundle",
        v2.bytes.len()
    );
    assert_eq!(
        common::file_sha256(&dev.dev.path("slot-a.img")),
        common::sha256(&v2_img)
    );
    // Slot B still holds 1.0.0, untouched.
    assert_eq!(
        common::file_sha256(&dev.dev.path("slot-b.img")),
        common::sha256(&v1_img)
    );

    // Back to 1.0.0: slot B holds it; it is re-verified, not downloaded.
    let dep3 = cp.deploy(&r1, &id);
    let started = Instant::now();
    wait_for(
        "1.0.0 again, in slot B",
        &dev,
        Duration::from_secs(60),
        || {
            cp.device("sim-1")
                .filter(|d| d["current_version"] == "1.0.0" && d["booted_slot"] == "B")
        },
    );
    let switch = started.elapsed();
    let dep = wait_for(
        "deployment 3 success",
        &dev,
        Duration::from_secs(30),
        || Some(cp.deployment(&dep3)).filter(|d| d["status"] == "success"),
    );
    let fetched = dep["devices"][0]["bytes_done"].as_i64().unwrap();
    assert!(
        fetched < 64 * 1024,
        "switching back fetched {fetched} bytes"
    );
    assert!(
        switch < Duration::from_secs(30),
        "switching back took {switch:?}"
    );

    // The daemon's log lines reached the server.
    let (s, logs) = cp.op("GET", &format!("/api/v1/devices/{id}/logs"), None);
    assert_eq!(s, 200, "{logs}");
    let text = logs.to_string();
    assert!(text.contains("enrolled"), "{text}");
    assert!(text.contains("installed; rebooting into it"), "{text}");
}

/// The device's `[server] link-class`, `site` and `time-zone` reach the
/// control plane: sent at enrollment and with every heartbeat, so a
/// changed config is seen at the next start without enrolling again. They
/// are the device's claim, a hint: the rollout scheduler sees them once an
/// operator accepted it (the preview places the device under its link
/// class, with its site and time zone).
#[test]
fn daemon_sends_its_link_class_site_and_time_zone() {
    let keys = keys();
    let cp = ControlPlane::start(&keys);
    let release = cp.upload(&bundle(&image(MIB, 1), "1.0.0", &keys.signer).bytes);
    let token = cp.enrollment_token();
    let mut dev = SimDevice::new(&keys, &image(MIB, 9), &cp.url, &token, "linked-1");
    let base = std::fs::read_to_string(&dev.dev.config).unwrap();
    let configure = |dev: &SimDevice, class: &str, site: &str, tz: &str| {
        let text = base.replace(
            "[server]\n",
            &format!(
                "[server]\nlink-class = \"{class}\"\nsite = \"{site}\"\ntime-zone = \"{tz}\"\n"
            ),
        );
        std::fs::write(&dev.dev.config, text).unwrap();
    };
    // What the rollout scheduler knows of the device.
    let seen = || {
        let (s, p) = cp.op(
            "POST",
            "/api/v1/rollouts/preview",
            Some(json!({"release_id": release, "selector": {"tags": ["site-lab"]}})),
        );
        assert_eq!(s, 200, "{p}");
        let d = p["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == "linked-1")
            .cloned()?;
        Some((
            d["link_class"].as_str()?.to_string(),
            d["site"].as_str().map(str::to_string),
            d["time_zone"].as_str().map(str::to_string),
            p["link_classes"].clone(),
        ))
    };

    // The device's claim, and the operator accepting it.
    let hint = |pk: &str| {
        let (s, v) = cp.op("GET", &format!("/api/v1/devices/{pk}/link"), None);
        assert_eq!(s, 200, "{v}");
        v["hint"].clone()
    };
    let accept = |pk: &str| {
        let (s, v) = cp.op("POST", &format!("/api/v1/devices/{pk}/link/accept"), None);
        assert_eq!(s, 200, "{v}");
    };

    configure(&dev, "metered-4g", "cell-7", "Europe/Berlin");
    dev.start();
    let pk = wait_for("enrollment", &dev, Duration::from_secs(60), || {
        cp.device("linked-1").filter(|d| d["status"] == "online")
    })["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (class, site, _, _) = seen().unwrap();
    assert_eq!(
        (class.as_str(), site.as_deref()),
        ("ethernet", None),
        "a claim is not taken before an operator accepts it"
    );
    assert_eq!(
        hint(&pk),
        json!({"link_class": "metered-4g", "site": "cell-7", "time_zone": "Europe/Berlin"})
    );
    accept(&pk);
    let (class, site, tz, classes) = seen().unwrap();
    assert_eq!(
        (class.as_str(), site.as_deref(), tz.as_deref()),
        ("metered-4g", Some("cell-7"), Some("Europe/Berlin"))
    );
    assert_eq!(classes["metered-4g"]["devices"], 1, "{classes}");
    let credential = std::fs::read(dev.dev.path("data/credential.json")).unwrap();

    // The device moves: its next heartbeats say so.
    dev.stop();
    configure(&dev, "wifi", "depot-2", "Asia/Tokyo");
    dev.start();
    wait_for(
        "the new claim in a heartbeat",
        &dev,
        Duration::from_secs(30),
        || Some(hint(&pk)).filter(|h| h["site"] == "depot-2"),
    );
    assert_eq!(seen().unwrap().1.as_deref(), Some("cell-7"), "still a hint");
    accept(&pk);
    let (class, site, tz, _) = seen().unwrap();
    assert_eq!(
        (class.as_str(), site.as_deref(), tz.as_deref()),
        ("wifi", Some("depot-2"), Some("Asia/Tokyo"))
    );
    assert_eq!(
        std::fs::read(dev.dev.path("data/credential.json")).unwrap(),
        credential,
        "the same enrollment: the heartbeat carried the change"
    );
}

/// While a download runs, the daemon reports its progress (the install's
/// progress callback, at most one report per PROGRESS_EVERY): over a slow
/// link the deployment shows the device downloading, with the bytes
/// downloaded so far, before it commits. (Without progress reports the
/// state goes from assigned to installed.)
#[test]
fn daemon_reports_download_progress() {
    let keys = keys();
    let cp = ControlPlane::start(&keys);
    let v1 = bundle(&image(4 * MIB, 21), "1.0.0", &keys.signer);
    let r1 = cp.upload(&v1.bytes);
    let token = cp.enrollment_token();
    let mut dev = SimDevice::new(&keys, &image(4 * MIB, 22), &cp.url, &token, "slow-1");
    // About 10 s for the download.
    let config =
        std::fs::read_to_string(&dev.dev.config).unwrap() + "[link]\nrate-limit = 200000\n";
    std::fs::write(&dev.dev.config, config).unwrap();
    dev.start();
    let d = wait_for("enrollment", &dev, Duration::from_secs(60), || {
        cp.device("slow-1").filter(|d| d["status"] == "online")
    });
    let dep = cp.deploy(&r1, d["id"].as_str().unwrap());
    let during = wait_for("a progress report", &dev, Duration::from_secs(60), || {
        let v = cp.deployment(&dep);
        (v["devices"][0]["state"] == "downloading").then_some(v)
    });
    // What the install counted when it saved its progress last: it
    // counts a request's bytes when the request is done.
    let done = during["devices"][0]["bytes_done"].as_i64().unwrap();
    assert!(
        done >= 0 && (done as usize) < v1.bytes.len(),
        "{done} of {} bytes: {during}",
        v1.bytes.len()
    );
    wait_for("1.0.0 committed", &dev, Duration::from_secs(90), || {
        Some(cp.deployment(&dep)).filter(|d| d["status"] == "success")
    });
}

/// Forwards 127.0.0.1 connections to `upstream` while `up` is set;
/// refuses (closes at once) otherwise: a link that drops.
struct Link {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
}

impl Link {
    fn start(upstream: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let flag = flag.clone();
                pump(client, server, flag);
            }
        });
        Link { addr, up }
    }
}

fn pump(a: TcpStream, b: TcpStream, up: Arc<AtomicBool>) {
    for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
        let up = up.clone();
        std::thread::spawn(move || {
            from.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut buf = [0u8; 16 * 1024];
            loop {
                if !up.load(Ordering::SeqCst) {
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    return;
                }
                match from.read(&mut buf) {
                    Ok(0) => {
                        let _ = to.shutdown(std::net::Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => return,
                }
            }
        });
    }
}

#[test]
fn offline_device_keeps_its_assignment_and_delivers_in_order() {
    let keys = keys();
    let cp = ControlPlane::start(&keys);
    let img = image(2 * MIB, 3);
    let v1 = bundle(&img, "2.0.0", &keys.signer);
    let r1 = cp.upload(&v1.bytes);
    let token = cp.enrollment_token();
    let upstream: SocketAddr = cp.url.trim_start_matches("http://").parse().unwrap();
    let link = Link::start(upstream);
    let mut dev = SimDevice::new(
        &keys,
        &image(2 * MIB, 8),
        &format!("http://{}", link.addr),
        &token,
        "sim-2",
    );
    dev.start();
    let d = wait_for("enrollment", &dev, Duration::from_secs(60), || {
        cp.device("sim-2").filter(|d| d["status"] == "online")
    });
    let id = d["id"].as_str().unwrap().to_string();

    // The link goes down; a deployment made meanwhile stays pending.
    link.up.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    let dep = cp.deploy(&r1, &id);
    std::thread::sleep(Duration::from_secs(4));
    let v = cp.deployment(&dep);
    assert_eq!(v["devices"][0]["state"], "assigned", "{v}");
    assert_eq!(dev.status()["booted-slot"], "A");
    assert!(dev.log().contains("cycle failed"), "{}", dev.log());

    // Back online: it installs, reboots, commits, and says so.
    link.up.store(true, Ordering::SeqCst);
    wait_for(
        "2.0.0 committed after the link came back",
        &dev,
        Duration::from_secs(90),
        || {
            cp.device("sim-2")
                .filter(|d| d["current_version"] == "2.0.0" && d["booted_slot"] == "B")
        },
    );
    wait_for("deployment success", &dev, Duration::from_secs(30), || {
        Some(cp.deployment(&dep)).filter(|d| d["status"] == "success")
    });
    drop(dev);

    // Messages queued while offline go out oldest first. The first was
    // queued by an updater before the typed outbox (a device upgraded
    // while offline): its file format is pinned here.
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("outbox")).unwrap();
    std::fs::write(
        data.path().join("outbox/0000000000000001.json"),
        r#"{"path":"/api/v1/device/logs","key":"0123abcd-1","queued-at":1700000000,"body":{"entries":[{"level":"info","message":"queued line 0","at":null}]}}"#,
    )
    .unwrap();
    let mut outbox = kernex_updater::daemon::outbox::Outbox::open(data.path()).unwrap();
    let line = |level, message: String| api::LogLine {
        level,
        message,
        at: None,
    };
    for i in 1..5 {
        outbox
            .push(api::LogBatch {
                entries: vec![line(api::LogLevel::Info, format!("queued line {i}"))],
            })
            .unwrap();
    }
    // A message the server can never accept (more lines than a batch may
    // hold) is set aside, not retried forever.
    outbox
        .push(api::LogBatch {
            entries: vec![line(api::LogLevel::Info, "x".into()); api::MAX_LOG_LINES + 1],
        })
        .unwrap();
    let down = kernex_updater::daemon::client::Client::new(
        &format!("http://{}", link.addr),
        kernex_updater::source::tls_config(None).unwrap(),
    );
    link.up.store(false, Ordering::SeqCst);
    let err = outbox.deliver(&down, "whatever").unwrap_err();
    assert!(
        matches!(err, kernex_updater::daemon::client::ClientError::Offline(_)),
        "{err}"
    );
    assert_eq!(outbox.len().unwrap(), 6);
    link.up.store(true, Ordering::SeqCst);
    let (s, t) = cp.op(
        "POST",
        "/api/v1/enrollment-tokens",
        Some(json!({"label": "second", "expires_in_secs": 86_400})),
    );
    assert_eq!(s, 201);
    let client = kernex_updater::daemon::client::Client::new(
        &cp.url,
        kernex_updater::source::tls_config(None).unwrap(),
    );
    // The enrollment request as it goes on the wire.
    let request: api::EnrollRequest = serde_json::from_value(json!({
        "enrollment_token": t["token"],
        "device_id": "sim-3",
        "hardware_class": "qemu-aarch64",
    }))
    .unwrap();
    let kernex_updater::daemon::client::Enrollment::Enrolled(enrolled) =
        client.enroll(&request).unwrap()
    else {
        panic!("a new device id is enrolled at once");
    };
    let done = outbox.deliver(&client, &enrolled.credential).unwrap();
    assert_eq!((done.sent, done.rejected, done.left), (5, 1, 0), "{done:?}");
    let (s, logs) = cp.op(
        "GET",
        &format!("/api/v1/devices/{}/logs", enrolled.id),
        None,
    );
    assert_eq!(s, 200);
    let mut messages: Vec<(i64, String)> = logs
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["at"].as_i64().unwrap(),
                l["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Stamped on receipt: delivered in queue order, so sorted by arrival
    // they read 0..5.
    messages.sort();
    let expected: Vec<String> = (0..5).map(|i| format!("queued line {i}")).collect();
    assert_eq!(
        messages.into_iter().map(|m| m.1).collect::<Vec<_>>(),
        expected
    );
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn pids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The agent keeps running after the watchdog's verdict, supervised by the
/// daemon (no systemd), and comes back when it dies. No server is needed
/// for that: the control plane here is unreachable.
#[test]
fn daemon_keeps_the_agent_running_after_the_commit() {
    let keys = keys();
    let mut dev = SimDevice::new(
        &keys,
        &image(MIB, 5),
        "http://127.0.0.1:9",
        "unused",
        "sim-4",
    );
    let pid_file = dev.dev.path("agent.pids");
    let mut text = std::fs::read_to_string(&dev.dev.config).unwrap();
    text.push_str(&format!(
        "[[health.checks]]\ntype = \"service\"\nname = \"agent\"\nmode = \"supervise\"\n\
         command = [\"sh\", \"-c\", \"echo $$ >> {}; exec sleep 600\"]\nbackoff-ms = 100\n",
        pid_file.display()
    ));
    std::fs::write(&dev.dev.config, text).unwrap();
    dev.start();
    // The watchdog starts the agent, commits, stops its probe; the daemon
    // starts it again and keeps it.
    wait_for(
        "the agent under the daemon",
        &dev,
        Duration::from_secs(60),
        || {
            let last = pids(&pid_file).last().cloned()?;
            alive(&last).then_some(last)
        },
    );
    // The watchdog's run is over (it stops its own instance at the verdict,
    // possibly before that one wrote its pid): the daemon's instance stays.
    std::thread::sleep(Duration::from_secs(3));
    let first = pids(&pid_file).last().cloned().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(alive(&first), "the agent stopped:\n{}", dev.log());
    assert_eq!(
        pids(&pid_file).last(),
        Some(&first),
        "the agent was restarted without dying"
    );
    assert!(
        dev.log().contains("committed") || dev.status()["committed"] == true,
        "{}",
        dev.log()
    );
    // It dies: the daemon starts it again.
    Command::new("kill")
        .args(["-KILL", &first])
        .status()
        .unwrap();
    let second = wait_for("the agent restarted", &dev, Duration::from_secs(30), || {
        let p = pids(&pid_file);
        let last = p.last().cloned()?;
        (last != first && alive(&last)).then_some(last)
    });
    drop(dev);
    // Killing the daemon (SIGKILL) orphans the agent's process group: clean up.
    let _ = Command::new("kill").args(["-KILL", &second]).status();
}

/// A rollout through the scheduler (download window in the poll), then its
/// rollback: the device gets `action: rollback`, boots its other slot after
/// re-verifying it, and reports `rolled_back`.
#[test]
fn rollout_then_rollback_through_the_scheduler() {
    let keys = keys();
    let cp = ControlPlane::start(&keys);
    let v1_img = image(2 * MIB, 11);
    let v2_img = edit(&v1_img, 4096, 100);
    let r1 = cp.upload(&bundle(&v1_img, "3.0.0", &keys.signer).bytes);
    let r2 = cp.upload(&bundle(&v2_img, "3.1.0", &keys.signer).bytes);
    let token = cp.enrollment_token();
    let mut dev = SimDevice::new(&keys, &image(2 * MIB, 12), &cp.url, &token, "sim-5");
    dev.start();
    let d = wait_for("enrollment", &dev, Duration::from_secs(60), || {
        cp.device("sim-5").filter(|d| d["status"] == "online")
    });
    let id = d["id"].as_str().unwrap().to_string();
    let dep = cp.deploy(&r1, &id);
    wait_for("3.0.0 committed", &dev, Duration::from_secs(60), || {
        Some(cp.deployment(&dep)).filter(|d| d["status"] == "success")
    });

    let rollout = |release: &str| {
        let (s, v) = cp.op(
            "POST",
            "/api/v1/rollouts",
            Some(json!({"name": "to 3.1.0", "release_id": release,
                        "selector": {"tags": ["site-lab"]},
                        "waves": [{"percent": 100, "soak_secs": 0}]})),
        );
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_string()
    };
    let ro = rollout(&r2);
    let (s, v) = cp.op("POST", &format!("/api/v1/rollouts/{ro}/start"), None);
    assert!(s == 200 || s == 204, "{s} {v}");
    wait_for("rollout completed", &dev, Duration::from_secs(90), || {
        let (_, v) = cp.op("GET", &format!("/api/v1/rollouts/{ro}"), None);
        (v["status"] == "completed").then_some(v)
    });
    let d = cp.device("sim-5").unwrap();
    assert_eq!(
        (d["current_version"].as_str(), d["booted_slot"].as_str()),
        (Some("3.1.0"), Some("A")),
        "{d}"
    );

    let (s, v) = cp.op("POST", &format!("/api/v1/rollouts/{ro}/rollback"), None);
    assert!(s == 200 || s == 204, "{s} {v}");
    let started = Instant::now();
    wait_for(
        "rolled back to 3.0.0 in slot B",
        &dev,
        Duration::from_secs(60),
        || {
            cp.device("sim-5")
                .filter(|d| d["current_version"] == "3.0.0" && d["booted_slot"] == "B")
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "rollback took {:?}",
        started.elapsed()
    );
    let v = wait_for(
        "rolled_back in the rollout record",
        &dev,
        Duration::from_secs(30),
        || {
            let (_, v) = cp.op("GET", &format!("/api/v1/rollouts/{ro}"), None);
            v.to_string().contains("rolled_back").then_some(v)
        },
    );
    assert!(
        dev.log().contains("rolling back: booting the other slot"),
        "{}",
        dev.log()
    );
    assert_eq!(dev.status()["booted-slot"], "B", "{v}");
}

/// `kernex-updater daemon` with a TPM (swtpm): it enrolls through
/// credential activation under a TPM-only token, measures the booted slot
/// at every (simulated) boot, and answers the server's nonces with quotes:
/// the committed release shows "committed · attested". Then the slot PCR is
/// made to hold another image's measurement (what a boot loader measuring
/// a swapped rootfs would extend): the next quote shows the mismatch.
/// An enrollment token for TPM devices only (`require_tpm`).
fn tpm_only_token(cp: &ControlPlane) -> String {
    let (s, v) = cp.op(
        "POST",
        "/api/v1/enrollment-tokens",
        Some(json!({"label": "tpm line", "require_tpm": true, "expires_in_secs": 86_400})),
    );
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

#[test]
fn daemon_with_a_tpm_is_committed_and_attested() {
    let keys = keys();
    // Quotes go stale after 4 s, so the device is asked again every 2 s.
    let cp = ControlPlane::start_with(&keys, |c| c.attestation_max_age_secs = 4);
    let v1_img = image(2 * MIB, 1);
    let r1 = cp.upload(&bundle(&v1_img, "1.0.0", &keys.signer).bytes);
    let token = tpm_only_token(&cp);

    let tpm = swtpm::Swtpm::start();
    let mut dev = SimDevice::new(&keys, &image(2 * MIB, 9), &cp.url, &token, "tpm-1");
    // A simulated reboot power-cycles the TPM: PCRs back to zero.
    let power_cycle = dev.dev.path("power-cycle.sh");
    std::fs::write(
        &power_cycle,
        format!(
            "#!/bin/sh\nset -e\nswtpm_ioctl --tcp 127.0.0.1:{} -i\nTPM2TOOLS_TCTI='{}' tpm2_startup -c\n",
            tpm.port + 1,
            tpm.tcti()
        ),
    )
    .unwrap();
    let config = std::fs::read_to_string(&dev.dev.config).unwrap().replace(
        "reboot-command = [\"true\"]",
        &format!("reboot-command = [\"sh\", \"{}\"]", power_cycle.display()),
    ) + &format!("[tpm]\ntcti = \"{}\"\n", tpm.tcti());
    std::fs::write(&dev.dev.config, config).unwrap();
    dev.start();

    let d = wait_for("TPM enrollment", &dev, Duration::from_secs(60), || {
        cp.device("tpm-1")
            .filter(|d| d["attestation"]["state"] == "pending")
    });
    let id = d["id"].as_str().unwrap().to_string();
    assert_eq!(
        d["attestation"]["ek_fingerprint"].as_str().unwrap().len(),
        64
    );

    cp.deploy(&r1, &id);
    let d = wait_for(
        "1.0.0 committed and attested",
        &dev,
        Duration::from_secs(90),
        || {
            cp.device("tpm-1").filter(|d| {
                d["current_version"] == "1.0.0"
                    && d["status"] == "online"
                    && d["attestation"]["state"] == "attested"
            })
        },
    );
    assert_eq!(d["attestation"]["version"], "1.0.0", "{d}");
    assert!(dev.log().contains("booted slot measured"), "{}", dev.log());

    // Another image's measurement in the slot PCR.
    tpm.tool(
        "tpm2_pcrextend",
        &[&format!("14:sha256={}", "5a".repeat(32))],
    );
    let d = wait_for("the mismatch", &dev, Duration::from_secs(30), || {
        cp.device("tpm-1")
            .filter(|d| d["attestation"]["state"] == "mismatch")
    });
    let reason = d["attestation"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("PCR 14 is "), "{reason}");
    assert!(reason.contains("release 1.0.0 expects"), "{reason}");
}

/// A device that enrolled without a TPM gets a `[tpm]` in its config
/// later: at the next start the daemon notices its enrollment is not bound
/// to the TPM, binds it (`POST /device/tpm`, credential activation) without
/// enrolling again, and the server shows it TPM-bound and then attested
/// after a quote. A further start does not bind again.
#[test]
fn daemon_binds_a_tpm_configured_after_enrollment() {
    let keys = keys();
    let cp = ControlPlane::start_with(&keys, |c| c.attestation_max_age_secs = 4);
    let r1 = cp.upload(&bundle(&image(2 * MIB, 1), "1.0.0", &keys.signer).bytes);
    let token = cp.enrollment_token();
    let mut dev = SimDevice::new(&keys, &image(2 * MIB, 9), &cp.url, &token, "late-tpm");
    dev.start();
    let d = wait_for("enrollment", &dev, Duration::from_secs(60), || {
        cp.device("late-tpm").filter(|d| d["status"] == "online")
    });
    let id = d["id"].as_str().unwrap().to_string();
    assert_eq!(d["attestation"]["state"], "unattested", "{d}");
    cp.deploy(&r1, &id);
    wait_for("1.0.0 committed", &dev, Duration::from_secs(90), || {
        cp.device("late-tpm")
            .filter(|d| d["current_version"] == "1.0.0" && d["status"] == "online")
    });
    let credential = std::fs::read(dev.dev.path("data/credential.json")).unwrap();

    // The TPM is added to the config; the daemon starts again.
    dev.stop();
    let tpm = swtpm::Swtpm::start();
    let mut config = std::fs::read_to_string(&dev.dev.config).unwrap();
    config.push_str(&format!("[tpm]\ntcti = \"{}\"\n", tpm.tcti()));
    std::fs::write(&dev.dev.config, config).unwrap();
    dev.start();
    let d = wait_for(
        "the TPM bound and 1.0.0 attested",
        &dev,
        Duration::from_secs(60),
        || {
            cp.device("late-tpm").filter(|d| {
                d["attestation"]["state"] == "attested" && d["attestation"]["version"] == "1.0.0"
            })
        },
    );
    assert_eq!(d["id"], id.as_str(), "the same device, not a new one");
    assert_eq!(
        d["attestation"]["ek_fingerprint"].as_str().unwrap().len(),
        64,
        "{d}"
    );
    let log = dev.log();
    assert!(
        log.contains("TPM bound to this device's enrollment"),
        "{log}"
    );
    // Bound with its credential: no re-enrollment, the credential is kept.
    assert_eq!(
        std::fs::read(dev.dev.path("data/credential.json")).unwrap(),
        credential
    );
    assert!(dev.dev.path("data/attest/binding.json").is_file());

    // Another start: the binding is known, nothing is asked again, and the
    // quotes keep verifying.
    dev.stop();
    dev.start();
    wait_for(
        "a quote after the restart",
        &dev,
        Duration::from_secs(30),
        || {
            dev.log()
                .contains("quote verified by the server")
                .then_some(())
        },
    );
    let log = dev.log();
    assert!(!log.contains("binding"), "{log}");
    let (s, audit) = cp.op("GET", "/api/v1/audit?limit=1000", None);
    assert_eq!(s, 200, "{audit}");
    let binds: Vec<_> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "device.tpm-bind")
        .collect();
    assert_eq!(binds.len(), 1, "{audit}");
    assert_eq!(binds[0]["result"], "ok", "{audit}");
}

/// A server that trusts only one TPM vendor's CA (`tpm-cert-store`) refuses
/// a device whose TPM's EK certificate another CA issued: the daemon's log
/// carries the server's reason, and the device is not enrolled.
#[test]
fn daemon_logs_why_the_server_refused_its_tpm() {
    let keys = keys();
    let vendor = swtpm::LocalCa::new();
    let _vendor_tpm = swtpm::Swtpm::start_with(swtpm::EkCert::From(&vendor));
    let store = vendor.store();
    let cp = ControlPlane::start_with(&keys, move |c| c.tpm_cert_store = vec![store]);
    let token = tpm_only_token(&cp);
    // Another CA's EK certificate (swtpm_setup's default local CA).
    let tpm = swtpm::Swtpm::start();
    let mut dev = SimDevice::new(&keys, &image(2 * MIB, 9), &cp.url, &token, "foreign-tpm");
    let config = std::fs::read_to_string(&dev.dev.config).unwrap()
        + &format!("[tpm]\ntcti = \"{}\"\n", tpm.tcti());
    std::fs::write(&dev.dev.config, config).unwrap();
    dev.start();
    let log = wait_for(
        "the refusal in the log",
        &dev,
        Duration::from_secs(30),
        || Some(dev.log()).filter(|l| l.contains("enrollment failed")),
    );
    assert!(
        log.contains("EK certificate not issued by a trusted TPM vendor CA"),
        "{log}"
    );
    assert!(!log.contains("refused the device credential"), "{log}");
    assert!(cp.device("foreign-tpm").is_none());
    assert!(!dev.dev.path("data/credential.json").exists());
}

/// Creates a private CA and a server certificate for 127.0.0.1 with the
/// openssl command line; returns (CA certificate, server chain, server key).
fn private_ca(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=Kernex test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// The device API over HTTPS: a device that pins the fleet's private CA
/// (`[server] ca`) enrolls, downloads by Range and commits over TLS; a
/// device that trusts only the system's CAs refuses the server.
#[test]
fn daemon_over_https_with_a_pinned_private_ca() {
    let keys = keys();
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(pki.path());
    let cp = ControlPlane::start_full(&keys, |_| {}, Some((cert, key)));
    let https = cp.https_url.clone().unwrap();
    let img = image(2 * MIB, 1);
    let r1 = cp.upload(&bundle(&img, "1.0.0", &keys.signer).bytes);
    let token = cp.enrollment_token();

    let mut pinned = SimDevice::new(&keys, &image(2 * MIB, 9), &https, &token, "tls-1");
    let config = std::fs::read_to_string(&pinned.dev.config)
        .unwrap()
        .replace(
            "[server]\n",
            &format!("[server]\nca = \"{}\"\n", ca.display()),
        );
    std::fs::write(&pinned.dev.config, config).unwrap();
    pinned.start();
    let mut unpinned = SimDevice::new(&keys, &image(2 * MIB, 9), &https, &token, "tls-2");
    unpinned.start();

    let d = wait_for(
        "enrollment over HTTPS",
        &pinned,
        Duration::from_secs(60),
        || cp.device("tls-1"),
    );
    cp.deploy(&r1, d["id"].as_str().unwrap());
    wait_for(
        "1.0.0 committed over HTTPS",
        &pinned,
        Duration::from_secs(90),
        || {
            cp.device("tls-1")
                .filter(|d| d["current_version"] == "1.0.0" && d["status"] == "online")
        },
    );
    assert_eq!(
        common::file_sha256(&pinned.dev.path("slot-b.img")),
        common::sha256(&img)
    );
    // The other device never gets through the TLS handshake.
    let log = wait_for(
        "the unpinned device's refusal",
        &unpinned,
        Duration::from_secs(30),
        || Some(unpinned.log()).filter(|l| l.contains("enrollment failed")),
    );
    assert!(log.to_lowercase().contains("certificate"), "{log}");
    assert!(cp.device("tls-2").is_none());
}

/// Deploys `r1`, then rolls out `r2` to the device through the scheduler,
/// waiting for each to be committed; returns the rollout id.
fn committed_then_rolled_out(
    cp: &ControlPlane,
    dev: &SimDevice,
    device_id: &str,
    r1: &str,
    r2: &str,
) -> String {
    let d = wait_for("enrollment", dev, Duration::from_secs(60), || {
        cp.device(device_id).filter(|d| d["status"] == "online")
    });
    let id = d["id"].as_str().unwrap().to_string();
    let dep = cp.deploy(r1, &id);
    wait_for(
        "the first release committed",
        dev,
        Duration::from_secs(60),
        || Some(cp.deployment(&dep)).filter(|d| d["status"] == "success"),
    );
    let (s, v) = cp.op(
        "POST",
        "/api/v1/rollouts",
        Some(
            json!({"name": "fix", "release_id": r2, "selector": {"tags": ["site-lab"]},
                    "waves": [{"percent": 100, "soak_secs": 0}]}),
        ),
    );
    assert_eq!(s, 201, "{v}");
    let ro = v["id"].as_str().unwrap().to_string();
    let (s, v) = cp.op("POST", &format!("/api/v1/rollouts/{ro}/start"), None);
    assert!(s == 200 || s == 204, "{s} {v}");
    wait_for("rollout completed", dev, Duration::from_secs(90), || {
        let (_, v) = cp.op("GET", &format!("/api/v1/rollouts/{ro}"), None);
        (v["status"] == "completed").then_some(v)
    });
    ro
}

/// Anti-rollback through the real daemon and server: 4.1.0 fixes a
/// vulnerability (security version 2 over 4.0.0's 1). Once the device
/// committed it, its watchdog raised its floor to 2 and its heartbeat told
/// the server; the rollout's rollback to 4.0.0 is then refused at the API
/// (409, naming the device and why), and the device stays on 4.1.0.
#[test]
fn a_rollback_across_the_floor_is_refused_at_the_api() {
    let keys = keys();
    let cp = ControlPlane::start(&keys);
    let v1_img = image(2 * MIB, 21);
    let v2_img = edit(&v1_img, 4096, 100);
    let r1 = cp.upload(&bundle_secure(&v1_img, "4.0.0", 1, &keys.signer).bytes);
    let r2 = cp.upload(&bundle_secure(&v2_img, "4.1.0", 2, &keys.signer).bytes);
    let token = cp.enrollment_token();
    let mut dev = SimDevice::new(&keys, &image(2 * MIB, 22), &cp.url, &token, "floor-1");
    dev.start();
    let ro = committed_then_rolled_out(&cp, &dev, "floor-1", &r1, &r2);
    let d = wait_for("the floor reported", &dev, Duration::from_secs(30), || {
        cp.device("floor-1").filter(|d| d["security_floor"] == 2)
    });
    assert_eq!(d["current_version"], "4.1.0", "{d}");
    let slot = d["booted_slot"].clone();

    let (s, v) = cp.op("POST", &format!("/api/v1/rollouts/{ro}/rollback"), None);
    assert_eq!(s, 409, "{v}");
    let reason = v["detail"].as_str().unwrap();
    assert!(reason.contains("anti-rollback floor"), "{reason}");
    assert!(
        reason.contains("floor-1 (floor 2, 4.0.0 has security version 1)"),
        "{reason}"
    );
    let (_, r) = cp.op("GET", &format!("/api/v1/rollouts/{ro}"), None);
    assert_eq!(r["status"], "completed", "{r}");
    // A deployment of 4.0.0 is refused the same way.
    let (s, v) = cp.op(
        "POST",
        "/api/v1/deployments",
        Some(json!({"release_id": r1, "devices": [d["id"]]})),
    );
    assert_eq!(s, 409, "{v}");
    // The device keeps running 4.1.0 in the same slot.
    std::thread::sleep(Duration::from_secs(3));
    let d = cp.device("floor-1").unwrap();
    assert_eq!(
        (&d["current_version"], &d["booted_slot"]),
        (&json!("4.1.0"), &slot),
        "{d}"
    );
    let status = dev.status();
    assert_eq!(status["security-floor"], 2, "{status}");
    assert!(!dev.log().contains("rolling back"), "{}", dev.log());
}

/// The daemon checks the floor itself: a rollback the server accepted
/// (its view of the floor is 1) while the device's floor is 2 is refused
/// by the daemon, reported as failed with the reason, and the boot order
/// is left alone. `allow-downgrade = true`, so the floor is the reason.
#[test]
fn the_daemon_refuses_a_server_rollback_below_its_floor() {
    let keys = keys();
    let cp = ControlPlane::start(&keys);
    let v1_img = image(2 * MIB, 31);
    let v2_img = edit(&v1_img, 4096, 100);
    let r1 = cp.upload(&bundle_secure(&v1_img, "5.0.0", 1, &keys.signer).bytes);
    let r2 = cp.upload(&bundle_secure(&v2_img, "5.1.0", 1, &keys.signer).bytes);
    let token = cp.enrollment_token();
    let mut dev = SimDevice::new(&keys, &image(2 * MIB, 32), &cp.url, &token, "floor-2");
    dev.start();
    let ro = committed_then_rolled_out(&cp, &dev, "floor-2", &r1, &r2);
    wait_for("the floor reported", &dev, Duration::from_secs(30), || {
        cp.device("floor-2").filter(|d| d["security_floor"] == 1)
    });
    // Powered off; its floor is 2 (what a commit the server has not heard
    // of yet leaves), the server still knows 1 and accepts the rollback.
    dev.stop();
    let data = kernex_updater::store::DataDir::new(dev.dev.path("data"));
    kernex_updater::floor::Floor::new(&data).raise(2).unwrap();
    let booted = dev.status()["booted-slot"].clone();
    let (s, v) = cp.op("POST", &format!("/api/v1/rollouts/{ro}/rollback"), None);
    assert!(s == 200 || s == 204, "{s} {v}");
    dev.start();
    let given_up = wait_for(
        "the rollback refused",
        &dev,
        Duration::from_secs(60),
        || {
            let s = dev.status();
            let g = s["server"]["given-up"].clone();
            (!g.is_null()).then_some(g)
        },
    );
    let reason = given_up["reason"].as_str().unwrap();
    assert!(
        reason.contains("refusing to roll back to 5.0.0")
            && reason.contains("anti-rollback floor 2"),
        "{reason}"
    );
    // Reported: the server shows the device's failure and why.
    wait_for(
        "the failure reported",
        &dev,
        Duration::from_secs(30),
        || {
            cp.device("floor-2").filter(|d| {
                d["status_reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("anti-rollback floor 2"))
            })
        },
    );
    let status = dev.status();
    assert_eq!(status["booted-slot"], booted, "{status}");
    assert_eq!(status["primary-slot"], booted, "{status}");
    assert!(status["server"]["awaiting"].is_null(), "{status}");
    assert!(dev.log().contains("rollback refused"), "{}", dev.log());
}
