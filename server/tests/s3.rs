//! The S3 blob store against a real S3-compatible server (moto in server
//! mode, installed by scripts/setup): bundles are stored in the bucket and
//! downloads redirect to presigned URLs that serve `Range`. (moto does not
//! check signatures, so expiry and forgery are the bucket's business, not
//! tested here.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::{Db, Harness, golden};
use serde_json::json;

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Moto, String) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // KERNEX_MOTO_SERVER, else the venv scripts/setup makes, else PATH.
    let cache = std::env::var("KERNEX_CACHE").unwrap_or_else(|_| "/var/cache/kernex-ci".into());
    let venv = format!("{cache}/moto/bin/moto_server");
    let bin = std::env::var("KERNEX_MOTO_SERVER").unwrap_or_else(|_| {
        if std::path::Path::new(&venv).exists() {
            venv
        } else {
            "moto_server".into()
        }
    });
    let child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{bin} must be installed (scripts/setup): {e}"));
    let moto = Moto(child);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (moto, addr)
}

/// A minimal HTTP/1.1 request; returns status, headers text and body.
fn http(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head[9..12].parse().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    (status, head, raw[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_live_in_s3_and_downloads_redirect_to_presigned_ranges() {
    let (_moto, addr) = start_moto();
    let (status, head, _) = http(&addr, "PUT", "/kernex-test", &[]);
    assert_eq!(status, 200, "{head}");
    let endpoint = format!("http://{addr}");
    let h = Harness::with_config(Db::Sqlite, |c| {
        c.blob_store = Some("s3://kernex-test".into());
        c.s3_endpoint = Some(endpoint.clone());
        c.s3_region = Some("us-east-1".into());
        c.s3_access_key_id = Some("testing".into());
        c.s3_secret_access_key = Some("testing".into());
        c.s3_allow_http = true;
    })
    .await;
    let bundle = std::fs::read(golden("valid.kxb")).unwrap();
    let (s, rel) = h.upload(&h.admin, bundle.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{rel}");
    assert_eq!(h.blob_files(), 0, "nothing on local disk");
    let key = format!(
        "/kernex-test/bundles/{}.kxb",
        rel["sha256"].as_str().unwrap()
    );
    let (status, _, stored) = http(&addr, "GET", &key, &[]);
    assert_eq!(status, 200);
    assert_eq!(stored, bundle, "the bucket holds the bundle");

    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (device, cred) = h.enroll(&token, "s3-dev", "qemu-aarch64").await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&h.admin),
            Some(json!({"release_id": rel["id"], "devices": [device]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, want) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&cred), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, headers, _) = h
        .raw(
            Method::GET,
            want["url"].as_str().unwrap(),
            Some(&cred),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::TEMPORARY_REDIRECT);
    let location = headers["location"].to_str().unwrap().to_string();
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let target = location.strip_prefix(&endpoint).unwrap();
    let (status, head, bytes) = http(&addr, "GET", target, &[("Range", "bytes=1000-5095")]);
    assert_eq!(status, 206, "{head}");
    assert_eq!(bytes, bundle[1000..5096]);
    // The URL expires (presign-ttl-secs, default one hour).
    assert!(location.contains("X-Amz-Expires=3600"), "{location}");
    h.finish().await;
}
