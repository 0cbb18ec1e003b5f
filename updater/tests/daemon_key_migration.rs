//! Migration (issue #20): a device enrolled before device keys holds a
//! long-lived bearer credential (`credential.json`, as the old updater
//! wrote it). The real `kernex-updater daemon`, against a real
//! kernex-server, makes its key on its next contact (mode 0600, never
//! sent), registers it with the old credential once, and from then on
//! signs server nonces for access tokens that expire within seconds here;
//! the old credential stops working and the device keeps heartbeating
//! through several token lifetimes, as the same device.
//!
//! And a device with a `[tpm]` (a real swtpm): its key is made in the TPM
//! (P-256, not exportable), no key file is written, and it enrolls and
//! signs for its access tokens with the TPM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../attest/tests/common/mod.rs"]
mod swtpm;

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{image, keys};
use serde_json::{Value, json};

/// Access tokens live 3 s: the daemon must sign for new ones to go on.
const TOKEN_SECS: u64 = 3;

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
    let resp = if method == "GET" {
        let mut r = agent.get(&url);
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        r.call()
    } else {
        let mut r = agent.post(&url).header("Content-Type", "application/json");
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        r.send(serde_json::to_vec(&body.unwrap_or(json!({}))).unwrap())
    }
    .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().read_to_vec().unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A kernex-server (SQLite) on 127.0.0.1, on its own thread; its URL and
/// an admin token.
fn control_plane(dir: &std::path::Path) -> (String, String) {
    let data_dir = dir.join("server");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let config = kernex_server::config::Config {
                data_dir,
                device_requests_per_minute: 0,
                device_token_secs: TOKEN_SECS,
                ..kernex_server::config::Config::default()
            };
            let state = kernex_server::AppState::open(config).await.unwrap();
            let admin = kernex_server::bootstrap(&state).await.unwrap().unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send((listener.local_addr().unwrap(), admin.email, admin.password))
                .unwrap();
            axum::serve(listener, kernex_server::http::app(state))
                .await
                .unwrap();
        });
    });
    let (addr, email, password) = rx.recv_timeout(Duration::from_secs(60)).unwrap();
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
        Some(json!({"current_password": password, "new_password": "migration test admin"})),
    );
    assert_eq!(s, 204, "{v}");
    (url, admin)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_daemon_with_a_bearer_credential_migrates_to_its_key_and_keeps_working() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let (url, admin) = control_plane(dir.path());
    let (s, v) = call(
        &url,
        "POST",
        "/api/v1/enrollment-tokens",
        Some(&admin),
        Some(json!({"label": "old batch", "expires_in_secs": 3600})),
    );
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();

    // Enrolled by an updater older than device keys: a bearer credential.
    let (s, old) = call(
        &url,
        "POST",
        "/api/v1/device/enroll",
        None,
        Some(
            json!({"enrollment_token": token, "device_id": "veteran", "hardware_class": "qemu-aarch64"}),
        ),
    );
    assert_eq!(s, 201, "{old}");
    let pk = old["id"].as_str().unwrap().to_string();
    let bearer = old["credential"].as_str().unwrap().to_string();
    assert!(bearer.starts_with("kxd_"));
    assert!(old.get("expires_in_secs").is_none(), "{old}");

    let dev = common::Device::new(&keys, &image(1024 * 1024, 3));
    let data = dev.path("data");
    std::fs::create_dir_all(&data).unwrap();
    // credential.json exactly as the old updater wrote it.
    std::fs::write(
        data.join("credential.json"),
        serde_json::to_vec_pretty(
            &json!({"server": url, "device-id": "veteran", "id": pk, "credential": bearer}),
        )
        .unwrap(),
    )
    .unwrap();
    let p = |n: &str| dev.path(n).display().to_string();
    std::fs::write(
        &dev.config,
        format!(
            "compatible = \"qemu-aarch64\"\ndata-dir = \"{}\"\nkeyring = \"{}\"\nreboot-command = [\"true\"]\n\
             [slots.rootfs]\nA = \"{}\"\nB = \"{}\"\n\
             [bootloader]\nbackend = \"file\"\npath = \"{}\"\ncmdline = \"{}\"\n\
             [server]\nurl = \"{url}\"\nenrollment-token = \"{token}\"\ndevice-id = \"veteran\"\npoll-interval = 1\n\
             [health]\ndeadline = 20\nstability-window = 0\n",
            p("data"),
            p("keyring.pem"),
            p("slot-a.img"),
            p("slot-b.img"),
            p("boot-state"),
            p("cmdline"),
        ),
    )
    .unwrap();
    let log = dev.path("daemon.log");
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
            .arg("--config")
            .arg(&dev.config)
            .args(["daemon", "--simulate-boot"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let credential = || -> Value {
        std::fs::read(data.join("credential.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };

    // Its next contact: a key, registered with the old credential.
    let start = Instant::now();
    while credential()["keyed"] != true {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no key registered; daemon log:\n{}",
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let key = data.join("device-key.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the private key is the device's alone");
    let c = credential();
    assert_eq!(c["id"], pk.as_str(), "the same device");
    assert!(c["credential"].as_str().unwrap().starts_with("kxa_"), "{c}");

    // The old bearer credential is retired.
    let (s, _) = call(&url, "GET", "/api/v1/device/poll", Some(&bearer), None);
    assert_eq!(s, 401, "the old credential still works");

    // The device keeps working through several token lifetimes: its
    // heartbeats keep arriving, with ever new tokens.
    let (_, before) = call(
        &url,
        "GET",
        &format!("/api/v1/devices/{pk}"),
        Some(&admin),
        None,
    );
    let seen_before = before["last_seen_at"].as_i64().unwrap_or(0);
    let mut tokens = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3 * TOKEN_SECS + 2) {
        if let Some(t) = credential()["credential"].as_str() {
            tokens.insert(t.to_string());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        tokens.len() >= 3,
        "the daemon signed for new tokens: {} seen; log:\n{}",
        tokens.len(),
        daemon_log()
    );
    let (s, after) = call(
        &url,
        "GET",
        &format!("/api/v1/devices/{pk}"),
        Some(&admin),
        None,
    );
    assert_eq!(s, 200, "{after}");
    assert_eq!(after["status"], "online", "{after}");
    assert!(
        after["last_seen_at"].as_i64().unwrap_or(0) > seen_before,
        "heartbeats kept arriving: {after}"
    );
    // Still one device, and the registration is in the audit log.
    let (_, devices) = call(&url, "GET", "/api/v1/devices", Some(&admin), None);
    assert_eq!(devices.as_array().unwrap().len(), 1, "{devices}");
    let (_, audit) = call(&url, "GET", "/api/v1/audit", Some(&admin), None);
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "device.key-register"
                && e["target"] == format!("device:{pk}").as_str()),
        "{audit}"
    );
    // No refused request on the way but the expected ones.
    assert!(
        !daemon_log().contains("enrolling again"),
        "{}",
        daemon_log()
    );
}

/// `[tpm]` configured from the start: the daemon makes its key in the TPM
/// and enrolls with it (the server also binds the TPM by credential
/// activation); every access token after that (3 s each) is bought with a
/// TPM signature over a fresh nonce. No key file is ever written, and the
/// stored key is a TPM blob whose public part is the P-256 key the
/// signatures verify with.
#[test]
fn a_daemon_with_a_tpm_keeps_its_key_in_the_tpm() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let (url, admin) = control_plane(dir.path());
    let (s, v) = call(
        &url,
        "POST",
        "/api/v1/enrollment-tokens",
        Some(&admin),
        Some(json!({"label": "tpm batch", "expires_in_secs": 3600})),
    );
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let tpm = swtpm::Swtpm::start();

    let dev = common::Device::new(&keys, &image(1024 * 1024, 3));
    let data = dev.path("data");
    let p = |n: &str| dev.path(n).display().to_string();
    std::fs::write(
        &dev.config,
        format!(
            "compatible = \"qemu-aarch64\"\ndata-dir = \"{}\"\nkeyring = \"{}\"\nreboot-command = [\"true\"]\n\
             [slots.rootfs]\nA = \"{}\"\nB = \"{}\"\n\
             [bootloader]\nbackend = \"file\"\npath = \"{}\"\ncmdline = \"{}\"\n\
             [server]\nurl = \"{url}\"\nenrollment-token = \"{token}\"\ndevice-id = \"tpm-keyed\"\npoll-interval = 1\n\
             [health]\ndeadline = 20\nstability-window = 0\n\
             [tpm]\ntcti = \"{}\"\n",
            p("data"),
            p("keyring.pem"),
            p("slot-a.img"),
            p("slot-b.img"),
            p("boot-state"),
            p("cmdline"),
            tpm.tcti(),
        ),
    )
    .unwrap();
    let log = dev.path("daemon.log");
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
            .arg("--config")
            .arg(&dev.config)
            .args(["daemon", "--simulate-boot"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let daemon_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let credential = || -> Value {
        std::fs::read(data.join("credential.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    };
    let start = Instant::now();
    while credential()["keyed"] != true {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not enrolled; daemon log:\n{}",
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pk = credential()["id"].as_str().unwrap().to_string();
    assert!(
        daemon_log().contains("device key created in the TPM"),
        "{}",
        daemon_log()
    );

    // The stored key is a TPM blob: a P-256 public key and a private part
    // only this TPM can load.
    let blob: kernex_attest::SigningKeyBlob =
        serde_json::from_slice(&std::fs::read(data.join("attest/device-key.json")).unwrap())
            .unwrap();
    let spki = hex::encode(blob.spki_der().unwrap());
    // What the server takes: Ed25519 or P-256 only; this one is EC.
    let public = kernex_protocol::device_key::public_key(&spki).unwrap();
    assert!(public.ec_key().is_ok(), "a P-256 key");

    // Several token lifetimes: each new token is a TPM signature.
    let mut tokens = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3 * TOKEN_SECS + 2) {
        if let Some(t) = credential()["credential"].as_str() {
            tokens.insert(t.to_string());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        tokens.len() >= 3,
        "the daemon signed for new tokens with the TPM: {} seen; log:\n{}",
        tokens.len(),
        daemon_log()
    );
    let (s, after) = call(
        &url,
        "GET",
        &format!("/api/v1/devices/{pk}"),
        Some(&admin),
        None,
    );
    assert_eq!(s, 200, "{after}");
    assert_eq!(after["status"], "online", "{after}");
    assert!(
        !daemon_log().contains("enrolling again"),
        "{}",
        daemon_log()
    );
    // No key file, ever.
    assert!(!data.join("device-key.pem").exists());
    let files: Vec<_> = walk(&data);
    assert!(
        !files.iter().any(|f| f.ends_with(".pem")),
        "a key file in the data dir: {files:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}
