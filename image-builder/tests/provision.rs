//! `kernex-image provision` against a file target, a real swtpm as the
//! board's TPM (tpm2-tools cross-checks the EK), and a small HTTP server on
//! 127.0.0.1:0 that speaks the pre-authorisation contract (POST
//! /api/v1/tpm/preauthorizations: 201 new, 200 same device and EK, 409
//! another EK, 401 bad token), makes and revokes enrollment tokens, and
//! records what it was sent. The data
//! partition it writes is read back with debugfs and e2fsck. Block device
//! targets are real loop devices (losetup, as root); a device that fails
//! mid-write is a loop device over a file on a full tmpfs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, post};
use common::*;
use kernex_protocol::api;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const API_TOKEN: &str = "kxo_operator_token";

#[derive(Default)]
struct Seen {
    /// device id -> ek_public
    devices: HashMap<String, Option<String>>,
    requests: Vec<(Option<String>, Value)>,
    /// Enrollment tokens made: what was asked, the answer, revoked.
    tokens: Vec<(api::NewEnrollmentToken, api::EnrollmentToken, bool)>,
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {API_TOKEN}"))
}

async fn create_token(
    State(seen): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if !authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid API token"})),
        );
    }
    // As strict as the server: the contract's request, nothing else.
    let request: api::NewEnrollmentToken = match serde_json::from_value(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            );
        }
    };
    let mut seen = seen.lock().unwrap();
    let n = seen.tokens.len();
    let token = api::EnrollmentToken {
        id: format!("t-board-{n}"),
        label: request.label.clone(),
        tags: request.tags.clone(),
        allowed_tags: request.allowed_tags.clone(),
        created_at: 1_700_000_000_000,
        expires_at: request.expires_at,
        revoked: false,
        require_preauthorization: request.require_preauthorization,
        require_tpm: request.require_tpm,
        max_uses: request.max_uses,
        uses: 0,
        link_class: request.link_class.clone(),
        site: request.site.clone(),
        time_zone: request.time_zone.clone(),
        token: Some(format!("kxe_board_{n}")),
    };
    seen.tokens.push((request, token.clone(), false));
    (
        StatusCode::CREATED,
        Json(serde_json::to_value(token).unwrap()),
    )
}

async fn revoke_token(
    State(seen): State<Shared>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> StatusCode {
    if !authorized(&headers) {
        return StatusCode::UNAUTHORIZED;
    }
    let mut seen = seen.lock().unwrap();
    match seen.tokens.iter_mut().find(|(_, t, _)| t.id == id) {
        Some(entry) => {
            entry.2 = true;
            StatusCode::NO_CONTENT
        }
        None => StatusCode::NOT_FOUND,
    }
}

type Shared = Arc<Mutex<Seen>>;

async fn preauthorize(
    State(seen): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut seen = seen.lock().unwrap();
    seen.requests.push((auth.clone(), body.clone()));
    if auth.as_deref() != Some(&format!("Bearer {API_TOKEN}")) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid API token"})),
        );
    }
    // As strict as the server: the contract's request, nothing else.
    let request: api::NewPreauthorization = match serde_json::from_value(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            );
        }
    };
    // The fingerprint as the server computes it, not through the client's
    // code.
    let fingerprint = request
        .ek_public
        .as_ref()
        .map(|e| hex::encode(Sha256::digest(hex::decode(e).unwrap())));
    let answer = api::Preauthorization {
        id: format!("pre-{}", request.device_id),
        device_id: request.device_id.clone(),
        ek_fingerprint: fingerprint,
        ek_certificate: request.ek_certificate.is_some(),
        created_at: 1_700_000_000_000,
    };
    let answer = serde_json::to_value(answer).unwrap();
    let (device, ek) = (request.device_id, request.ek_public);
    match seen.devices.get(&device) {
        Some(known) if *known == ek => (StatusCode::OK, Json(answer)),
        Some(_) => (
            StatusCode::CONFLICT,
            Json(json!({"error": "device is pre-authorised with another EK"})),
        ),
        None => {
            seen.devices.insert(device, ek);
            (StatusCode::CREATED, Json(answer))
        }
    }
}

async fn withdraw(
    State(seen): State<Shared>,
    headers: HeaderMap,
    UrlPath(device): UrlPath<String>,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut seen = seen.lock().unwrap();
    seen.requests
        .push((auth.clone(), json!({"withdraw": device.clone()})));
    if auth.as_deref() != Some(&format!("Bearer {API_TOKEN}")) {
        return StatusCode::UNAUTHORIZED;
    }
    match seen.devices.remove(&device) {
        Some(_) => StatusCode::NO_CONTENT,
        None => StatusCode::NOT_FOUND,
    }
}

async fn check_token(
    headers: HeaderMap,
    Json(body): Json<api::TokenCheck>,
) -> (StatusCode, Json<Value>) {
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {API_TOKEN}"))
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid API token"})),
        );
    }
    if body.token == "kxe_factory_token" {
        let token = api::EnrollmentToken {
            id: "t1".into(),
            label: "line 2".into(),
            tags: vec!["line-2".into()],
            allowed_tags: Vec::new(),
            created_at: 1_700_000_000_000,
            expires_at: None,
            max_uses: None,
            uses: 0,
            link_class: None,
            site: None,
            time_zone: None,
            revoked: false,
            require_preauthorization: true,
            require_tpm: false,
            token: None,
        };
        (StatusCode::OK, Json(serde_json::to_value(token).unwrap()))
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "not found", "detail": "no such enrollment token"})),
        )
    }
}

/// The contract's server on its own thread.
struct Server {
    url: String,
    seen: Shared,
}

impl Server {
    fn start() -> Self {
        let seen: Shared = Arc::default();
        let state = seen.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new()
                    .route(api::paths::PREAUTHORIZATIONS, post(preauthorize))
                    .route(
                        &api::paths::preauthorization("{device_id}"),
                        delete(withdraw),
                    )
                    .route(api::paths::ENROLLMENT_TOKEN_CHECK, post(check_token))
                    .route(api::paths::ENROLLMENT_TOKENS, post(create_token))
                    .route(&api::paths::enrollment_token("{id}"), delete(revoke_token))
                    .with_state(state);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Server {
            url: format!("http://{addr}"),
            seen,
        }
    }

    fn requests(&self) -> Vec<(Option<String>, Value)> {
        self.seen.lock().unwrap().requests.clone()
    }

    /// The enrollment tokens made: (request, answer, revoked).
    fn tokens(&self) -> Vec<(api::NewEnrollmentToken, api::EnrollmentToken, bool)> {
        self.seen.lock().unwrap().tokens.clone()
    }

    fn preauthorized(&self, device: &str) -> bool {
        self.seen.lock().unwrap().devices.contains_key(device)
    }
}

/// A real swtpm with an EK certificate (as a manufacturer provisions it),
/// stopped by PID on drop.
struct Swtpm {
    child: Child,
    _state: tempfile::TempDir,
    port: u16,
}

impl Swtpm {
    fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        run(peer("swtpm_setup")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir://{}", state.path().display()))
            .args(["--create-ek-cert", "--overwrite"]));
        for _ in 0..5 {
            let port = free_port_pair();
            let mut child = peer("swtpm")
                .args(["socket", "--tpm2", "--server"])
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", state.path().display()))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Swtpm {
                        child,
                        _state: state,
                        port,
                    };
                }
                assert!(Instant::now() < deadline, "swtpm did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("swtpm could not start");
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of TCP ports");
}

/// A small disk image (the qemu-aarch64 profile with small partitions).
fn small_disk(r: &Release) -> (PathBuf, Value) {
    let qemu = fs::read_to_string(repo().join("image-builder/boards/qemu-aarch64.toml")).unwrap();
    let small = qemu
        .replace(
            "size = \"64MiB\"\nfat-bits = 32",
            "size = \"8MiB\"\nfat-bits = 16",
        )
        .replace("size = \"256MiB\"", "size = \"16MiB\"")
        .replace("size = \"128MiB\"", "size = \"16MiB\"");
    let profile = r.path("small.toml");
    fs::write(&profile, small).unwrap();
    let disk = r.path("disk.img");
    let report = run_json(
        kernex_image()
            .args(["disk", "create", "--board"])
            .arg(&profile)
            .arg("--bundle")
            .arg(r.bundle_for("qemu-aarch64", "1.2.3"))
            .arg("--keyring")
            .arg(r.path("keys/ca.crt"))
            .arg("--output")
            .arg(&disk)
            .arg("--json"),
    );
    (disk, report)
}

fn provision(image: &Path, target: &Path, server: &str, extra: &[&str]) -> Command {
    let mut cmd = kernex_image();
    cmd.arg("provision")
        .arg("--image")
        .arg(image)
        .arg("--target")
        .arg(target)
        .args(["--server", server, "--enroll-token", "kxe_factory_token"])
        .env("KERNEX_API_TOKEN", API_TOKEN)
        .args(extra);
    cmd
}

fn data_offset(report: &Value) -> u64 {
    report["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "data")
        .unwrap()["start"]
        .as_u64()
        .unwrap()
}

fn failing(cmd: &mut Command) -> String {
    let out: Output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{cmd:?}: {stderr}");
    stderr
}

#[test]
fn provision_by_serial_writes_verifies_and_is_idempotent() {
    let r = Release::new();
    let server = Server::start();
    let (disk, disk_report) = small_disk(&r);
    let target = r.path("target.img");
    let report = run_json(&mut provision(
        &disk,
        &target,
        &server.url,
        &["--device-id", "SN-0001", "--json"],
    ));
    let image = fs::read(&disk).unwrap();
    assert_eq!(report["device-id"], "SN-0001");
    assert!(report["ek-fingerprint"].is_null());
    assert_eq!(report["image-version"], "1.2.3");
    assert_eq!(report["image-sha256"].as_str().unwrap(), sha256_hex(&image));
    assert_eq!(report["slot-a-sha256"], disk_report["slot-a-sha256"]);
    assert_eq!(report["preauthorization-outcome"], "created");
    assert_eq!(report["preauthorization"]["id"], "pre-SN-0001");
    assert!(report["time"].as_str().unwrap().ends_with('Z'), "{report}");

    // What the server was sent: the contract's body, the operator's token.
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].0.as_deref(), Some(&*format!("Bearer {API_TOKEN}")));
    // Serial only: no `ek_public`, no `ek_certificate`.
    assert_eq!(reqs[0].1, json!({"device_id": "SN-0001"}));

    // The target holds the image, apart from the identity on its data partition.
    let written = fs::read(&target).unwrap();
    assert_eq!(written.len(), image.len());
    let off = data_offset(&disk_report) as usize;
    assert_eq!(
        written[..off],
        image[..off],
        "everything before the data partition"
    );
    run(peer("e2fsck")
        .arg("-fn")
        .arg(format!("{}?offset={off}", target.display())));
    let system: toml::Table = toml::from_str(
        &String::from_utf8(debugfs_cat(&target, off as u64, "/etc/kernex/system.toml")).unwrap(),
    )
    .unwrap();
    let s = &system["server"];
    assert_eq!(s["url"].as_str(), Some(server.url.as_str()));
    assert_eq!(s["device-id"].as_str(), Some("SN-0001"));
    assert_eq!(
        s["enrollment-token-file"].as_str(),
        Some("/data/etc/kernex/enrollment-token")
    );
    assert_eq!(system["compatible"].as_str(), Some("qemu-aarch64"));
    // The board carries its own single-use token, made from the batch's,
    // never the batch's.
    let tokens = server.tokens();
    assert_eq!(tokens.len(), 1);
    let (asked, made, revoked) = &tokens[0];
    assert_eq!(asked.label, "line 2 / SN-0001");
    assert_eq!(asked.max_uses, Some(1));
    assert_eq!(asked.tags, vec!["line-2".to_string()]);
    assert!(asked.require_preauthorization && !asked.require_tpm);
    assert_eq!(
        (asked.expires_at, asked.expires_in_secs),
        (None, Some(30 * 86_400)),
        "the batch token has no expiry: the board's gets 30 days"
    );
    assert!(!revoked);
    assert_eq!(report["enrollment-token-id"], made.id.as_str());
    assert_eq!(
        debugfs_cat(&target, off as u64, "/etc/kernex/enrollment-token"),
        format!("{}\n", made.token.as_deref().unwrap()).into_bytes()
    );
    let stat = String::from_utf8(
        run(peer("debugfs")
            .arg("-R")
            .arg("stat /etc/kernex/enrollment-token")
            .arg(format!("{}?offset={off}", target.display())))
        .stdout,
    )
    .unwrap();
    assert!(stat.contains("Mode:  0600"), "{stat}");
    assert!(stat.contains("User:     0"), "{stat}");
    let kept: Value = serde_json::from_slice(&debugfs_cat(
        &target,
        off as u64,
        "/etc/kernex/provisioning.json",
    ))
    .unwrap();
    assert_eq!(kept["device-id"], "SN-0001");

    // Again: the server already has it (200), the target ends the same.
    let again = run_json(&mut provision(
        &disk,
        &target,
        &server.url,
        &["--device-id", "SN-0001", "--json"],
    ));
    assert_eq!(again["preauthorization-outcome"], "already-present");
    let system2 =
        String::from_utf8(debugfs_cat(&target, off as u64, "/etc/kernex/system.toml")).unwrap();
    assert_eq!(system2.matches("[server]").count(), 1, "{system2}");
    run(peer("e2fsck")
        .arg("-fn")
        .arg(format!("{}?offset={off}", target.display())));

    // The one-line human summary.
    let out = run(&mut provision(
        &disk,
        &target,
        &server.url,
        &["--device-id", "SN-0001"],
    ));
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with("provisioned SN-0001: qemu-aarch64 1.2.3"),
        "{line}"
    );
}

#[test]
fn provision_with_swtpm_sends_the_ek_and_reports_its_fingerprint() {
    let r = Release::new();
    let server = Server::start();
    let tpm = Swtpm::start();
    let (disk, _) = small_disk(&r);
    let target = r.path("target.img");
    let report = run_json(&mut provision(
        &disk,
        &target,
        &server.url,
        &["--tpm", &tpm.tcti(), "--json"],
    ));

    // tpm2-tools reads the same EK: its TPM2B_PUBLIC is a 2-byte size and
    // the TPMT_PUBLIC we hash.
    let ek_pub = r.path("ek.pub");
    run(peer("tpm2_createek")
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .args(["-c", "-", "-G", "rsa", "-u"])
        .arg(&ek_pub));
    let tss = fs::read(&ek_pub).unwrap();
    let fingerprint = sha256_hex(&tss[2..]);
    assert_eq!(
        report["ek-fingerprint"].as_str(),
        Some(fingerprint.as_str())
    );
    assert_eq!(
        report["device-id"].as_str().unwrap(),
        format!("ek-{}", &fingerprint[..16])
    );
    assert_eq!(report["ek-certificate"], true);
    assert_eq!(
        report["preauthorization"]["ek_fingerprint"].as_str(),
        Some(fingerprint.as_str())
    );

    let reqs = server.requests();
    let body = &reqs[0].1;
    assert_eq!(
        body["ek_public"].as_str(),
        Some(hex::encode(&tss[2..]).as_str())
    );
    // The certificate is the DER swtpm_setup put in NV: openssl reads it.
    let cert = r.path("ek.der");
    fs::write(
        &cert,
        hex::decode(body["ek_certificate"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    run(peer("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-in"])
        .arg(&cert));

    // Another board claiming the same serial with its own TPM: 409, and
    // its target is not written.
    let other = Swtpm::start();
    let device = report["device-id"].as_str().unwrap().to_owned();
    let target2 = r.path("target2.img");
    let err = failing(&mut provision(
        &disk,
        &target2,
        &server.url,
        &["--tpm", &other.tcti(), "--device-id", &device],
    ));
    assert!(
        err.contains("already pre-authorised with a different EK (HTTP 409)"),
        "{err}"
    );
    assert!(!target2.exists());
}

#[test]
fn rejections_fail_clearly_and_leave_the_target_untouched() {
    let r = Release::new();
    let server = Server::start();
    let (disk, _) = small_disk(&r);
    let target = r.path("target.img");

    let err = failing(
        provision(&disk, &target, &server.url, &["--device-id", "SN-2"])
            .env("KERNEX_API_TOKEN", "wrong"),
    );
    assert!(
        err.contains("the server rejected the API token (HTTP 401)"),
        "{err}"
    );
    assert!(!target.exists());

    // An enrollment token the server does not accept never reaches a board.
    let err = failing(
        kernex_image()
            .arg("provision")
            .arg("--image")
            .arg(&disk)
            .arg("--target")
            .arg(&target)
            .args(["--server", &server.url, "--enroll-token", "kxe_revoked"])
            .args(["--device-id", "SN-2"])
            .env("KERNEX_API_TOKEN", API_TOKEN),
    );
    assert!(
        err.contains("does not accept this enrollment token"),
        "{err}"
    );
    assert!(!target.exists());

    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let err = failing(&mut provision(
        &disk,
        &target,
        &closed,
        &["--device-id", "SN-2"],
    ));
    assert!(err.contains("unable to reach"), "{err}");
    assert!(!target.exists());

    let err = failing(&mut provision(&disk, &target, &server.url, &[]));
    assert!(err.contains("--device-id is required"), "{err}");

    let err = failing(&mut provision(
        &disk,
        &target,
        &server.url,
        &["--device-id", "bad id/with space"],
    ));
    assert!(err.contains("device id \"bad id/with space\""), "{err}");

    let err = failing(&mut provision(
        &disk,
        &target,
        &server.url,
        &[
            "--device-id",
            "SN-2",
            "--tpm",
            "swtpm:host=127.0.0.1,port=1",
        ],
    ));
    assert!(err.contains("swtpm:host=127.0.0.1,port=1"), "{err}");
    assert!(!target.exists());

    let err = failing(&mut provision(
        &disk,
        &disk,
        &server.url,
        &["--device-id", "SN-2"],
    ));
    assert!(err.contains("is the image itself"), "{err}");

    let not_a_disk = r.path("rootfs-1.img");
    let err = failing(&mut provision(
        &not_a_disk,
        &target,
        &server.url,
        &["--device-id", "SN-2"],
    ));
    assert!(
        err.contains("no partition table") || err.contains("not a Kernex disk image"),
        "{err}"
    );
    assert!(!target.exists());
    assert!(
        server
            .requests()
            .iter()
            .all(|(auth, _)| auth.as_deref() != Some(&*format!("Bearer {API_TOKEN}")))
    );
}

#[test]
fn provision_finds_the_data_partition_of_a_gpt_disk() {
    let r = Release::new();
    let server = Server::start();
    let x86 = fs::read_to_string(repo().join("image-builder/boards/x86-64-efi.toml")).unwrap();
    let small = x86
        .replace(
            "size = \"256MiB\"\nfat-bits = 32",
            "size = \"8MiB\"\nfat-bits = 16",
        )
        .replace("size = \"4GiB\"", "size = \"16MiB\"")
        .replace("size = \"2GiB\"", "size = \"16MiB\"");
    let profile = r.path("small-efi.toml");
    fs::write(&profile, small).unwrap();
    let vendor = r.path("vendor/EFI/BOOT");
    fs::create_dir_all(&vendor).unwrap();
    fs::write(vendor.join("BOOTX64.EFI"), "grub").unwrap();
    let disk = r.path("efi.img");
    let disk_report = run_json(
        kernex_image()
            .args(["disk", "create", "--board"])
            .arg(&profile)
            .arg("--bundle")
            .arg(r.bundle_for("x86-64-efi", "2.0.0"))
            .arg("--keyring")
            .arg(r.path("keys/ca.crt"))
            .arg("--boot-files")
            .arg(r.path("vendor"))
            .arg("--output")
            .arg(&disk)
            .arg("--json"),
    );
    assert_eq!(disk_report["partition-table"], "gpt");
    let target = r.path("efi-target.img");
    let report = run_json(&mut provision(
        &disk,
        &target,
        &server.url,
        &["--device-id", "X86-1", "--json"],
    ));
    assert_eq!(report["board"], "x86-64-efi");
    assert_eq!(report["image-version"], "2.0.0");
    let off = data_offset(&disk_report);
    let system: toml::Table = toml::from_str(
        &String::from_utf8(debugfs_cat(&target, off, "/etc/kernex/system.toml")).unwrap(),
    )
    .unwrap();
    assert_eq!(system["server"]["device-id"].as_str(), Some("X86-1"));
    assert_eq!(system["bootloader"]["backend"].as_str(), Some("grub"));
    assert_eq!(
        system["bootloader"]["grubenv"].as_str(),
        Some("/boot/efi/EFI/BOOT/grubenv")
    );
    assert!(
        system["slots"]["rootfs"]["A"]
            .as_str()
            .unwrap()
            .starts_with("/dev/disk/by-partuuid/")
    );
}

/// Block device tests run as root with util-linux's losetup; anywhere else
/// they fail saying so (scripts/test runs them as root in CI).
fn require_block_devices() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let losetup = Command::new("losetup").arg("--version").output().is_ok();
    assert!(
        root && losetup && Path::new("/dev/loop-control").exists(),
        "the block device tests need root, losetup (util-linux) and /dev/loop-control"
    );
}

/// A loop device over a file, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = run(Command::new("losetup").args(["-f", "--show"]).arg(file));
        Loop(PathBuf::from(
            String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path()));
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn provision_writes_a_block_device_and_reads_it_back_from_the_medium() {
    require_block_devices();
    let r = Release::new();
    let server = Server::start();
    let (disk, disk_report) = small_disk(&r);
    let image = fs::read(&disk).unwrap();
    let backing = r.path("card.img");
    // A used card: old bytes everywhere, 8 MiB larger than the image.
    fs::write(&backing, vec![0xa5u8; image.len() + (8 << 20)]).unwrap();
    let report = {
        let card = Loop::attach(&backing);
        let report = run_json(&mut provision(
            &disk,
            &card.0,
            &server.url,
            &["--device-id", "SN-CARD", "--json"],
        ));
        let off = data_offset(&disk_report);
        run(peer("e2fsck")
            .arg("-fn")
            .arg(format!("{}?offset={off}", card.0.display())));
        report
    };
    assert_eq!(report["image-sha256"].as_str().unwrap(), sha256_hex(&image));
    assert_eq!(report["preauthorization-outcome"], "created");
    let card = fs::read(&backing).unwrap();
    let off = data_offset(&disk_report) as usize;
    assert_eq!(card[..off], image[..off], "the image is on the card");
    assert!(
        card[image.len()..].iter().all(|b| *b == 0xa5),
        "nothing written past the image"
    );
}

#[test]
fn a_failed_write_withdraws_the_preauthorization_and_leaves_nothing_bootable() {
    require_block_devices();
    let r = Release::new();
    let server = Server::start();
    let (disk, _) = small_disk(&r);
    let image_len = fs::metadata(&disk).unwrap().len();

    // A card that fails after 12 MiB: a loop device over a file on a full
    // tmpfs (the file is sparse, so writes past the space fail).
    let space = Tmpfs::mount("12m");
    let backing = space.0.path().join("card.img");
    fs::File::create(&backing)
        .unwrap()
        .set_len(image_len + (1 << 20))
        .unwrap();
    {
        let card = Loop::attach(&backing);
        let err = failing(&mut provision(
            &disk,
            &card.0,
            &server.url,
            &["--device-id", "SN-BAD"],
        ));
        assert!(err.contains("was cleared"), "{err}");
        assert!(
            err.contains("the pre-authorisation of SN-BAD made by this run was withdrawn"),
            "{err}"
        );
        assert!(err.contains("made for SN-BAD was revoked"), "{err}");
    }
    let tokens = server.tokens();
    let (_, _, revoked) = tokens
        .iter()
        .find(|(asked, _, _)| asked.label.ends_with("/ SN-BAD"))
        .unwrap();
    assert!(revoked, "the failed board's token is revoked");
    let mut head = vec![0u8; 1 << 20];
    use std::io::Read;
    fs::File::open(&backing)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert!(
        head.iter().all(|b| *b == 0),
        "no partition table left on the failed card"
    );
    assert!(!server.preauthorized("SN-BAD"));

    // Not a block device under /dev: refused before any write, and the
    // pre-authorisation made for it is withdrawn.
    let err = failing(&mut provision(
        &disk,
        Path::new("/dev/full"),
        &server.url,
        &["--device-id", "SN-FULL"],
    ));
    assert!(err.contains("/dev/full is not a block device"), "{err}");
    assert!(err.contains("was withdrawn"), "{err}");
    assert!(!server.preauthorized("SN-FULL"));

    // A board pre-authorised by an earlier run keeps it.
    let target = r.path("ok.img");
    run_json(&mut provision(
        &disk,
        &target,
        &server.url,
        &["--device-id", "SN-KEEP", "--json"],
    ));
    let err = failing(&mut provision(
        &disk,
        Path::new("/dev/full"),
        &server.url,
        &["--device-id", "SN-KEEP"],
    ));
    assert!(!err.contains("withdrawn"), "{err}");
    assert!(server.preauthorized("SN-KEEP"));
}

#[test]
fn a_failed_write_to_a_file_removes_it() {
    require_block_devices();
    let r = Release::new();
    let server = Server::start();
    let (disk, _) = small_disk(&r);
    let space = Tmpfs::mount("4m");
    let target = space.0.path().join("board.img");
    let err = failing(&mut provision(
        &disk,
        &target,
        &server.url,
        &["--device-id", "SN-FILE"],
    ));
    assert!(err.contains("was removed"), "{err}");
    assert!(!target.exists());
    assert!(!server.preauthorized("SN-FILE"));
}
