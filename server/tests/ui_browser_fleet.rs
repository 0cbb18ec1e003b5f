//! The web UI at fleet scale in a real browser (headless Chromium through
//! chromedriver, the real `kernex-server` on SQLite): 5,001 devices
//! counted and searched, a live page that keeps the operator's place
//! through ten refreshes, and action buttons that follow the rollout's
//! state without a reload.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod browser;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use browser::*;
use serde_json::json;

/// Inserts `n` devices `dev-0000000`.. (class `qemu-aarch64`, the golden
/// release's, running 0.9.0, seen now) straight into the server's SQLite
/// file: enrolling thousands through the API takes minutes.
fn seed(data_dir: &Path, n: usize) {
    let url = format!("sqlite://{}", data_dir.join("kernex.db").display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        let (org,): (String,) = sqlx::query_as("SELECT id FROM organizations WHERE name = 'default'")
            .fetch_one(&pool)
            .await
            .unwrap();
        let now = kernex_server::store::now_ms();
        let mut tx = pool.begin().await.unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
            let rows: Vec<String> = chunk
                .iter()
                .map(|i| {
                    format!(
                        "('pk{i:07}', '{org}', 'dev-{i:07}', 'qemu-aarch64', '{{\"hostname\":\"host-{i}\"}}', '0.9.0', 'online', 'cred{i}', 0, 0, {now})"
                    )
                })
                .collect();
            sqlx::query(&format!(
                "INSERT INTO devices (id, org_id, device_id, hardware_class, hardware_metadata, current_version, status, credential_hash, revoked, registered_at, last_seen_at) VALUES {}",
                rows.join(", ")
            ))
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        pool.close().await;
    });
}

fn login(b: &Browser, origin: &str, password: &str) {
    b.goto(&format!("{origin}/ui/login"));
    b.type_into("#email", "admin@localhost");
    b.type_into("#password", password);
    b.click("form[action='/ui/login'] button[type=submit]");
    b.wait_for("[data-count=total]");
}

#[test]
fn a_fleet_of_5001_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_server, origin, password) = start_server(&data);
    seed(&data, 5001);
    let b = Browser::start(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));
    login(&b, &origin, &password);
    let total = b.text("[data-count=total] .big");
    assert_eq!(total, "5001", "the overview counts every device");
    b.screenshot("fleet-01-overview-5001");

    // Search, typed as an operator would, finds device 4,999 and one
    // beyond the first 5,000.
    b.goto(&format!("{origin}/ui/devices"));
    assert_eq!(b.text("#device-count").split(' ').next().unwrap(), "5001");
    for (q, want) in [("dev-0004999", "dev-0004999"), ("host-5000", "dev-0005000")] {
        b.type_into("#q", q);
        b.keys(ENTER);
        b.wait_for(&format!("tr[data-device='{want}']"));
        assert!(b.text("#device-count").starts_with("1 device"), "{q}");
    }
    b.screenshot("fleet-02-search");
    // Pages: the next link leads on, keyset.
    b.goto(&format!("{origin}/ui/devices"));
    b.click("#next-page");
    b.wait_for("tr[data-device='dev-0000100']");
}

#[test]
fn live_pages_keep_the_operators_place() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_server, origin, password) = start_server(&data);
    let http = agent();
    let api = |p: &str| format!("{origin}/api/v1{p}");
    let (s, v) = request(
        &http,
        "POST",
        &api("/login"),
        None,
        Some(json!({"email": "admin@localhost", "password": password})),
    );
    assert_eq!(s, 200, "{v}");
    let admin = v["token"].as_str().unwrap().to_string();
    let ca = std::fs::read_to_string(golden("ca.crt")).unwrap();
    let (s, _) = request(
        &http,
        "PUT",
        &api("/org/keyring"),
        Some(&admin),
        Some(json!({"pem": ca})),
    );
    assert_eq!(s, 204);
    let bundle = std::fs::read(golden("valid.kxb")).unwrap();
    let mut r = http
        .post(&api("/releases"))
        .header("authorization", &format!("Bearer {admin}"))
        .header("content-type", "application/octet-stream")
        .send(bundle)
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let release: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let release = release["id"].as_str().unwrap().to_string();
    seed(&data, 40);
    let (s, v) = request(
        &http,
        "POST",
        &api("/rollouts"),
        Some(&admin),
        Some(
            json!({"name": "keep my place", "release_id": release, "waves": [{"percent": 100, "soak_secs": 0}]}),
        ),
    );
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_string();

    let b = Browser::start(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));
    b.window(1280, 600);
    login(&b, &origin, &password);
    b.goto(&format!("{origin}/ui/rollouts/{id}"));
    b.wait_for("#live [data-action=start]");
    // The operator's place: the policy editor open, a value typed in it,
    // the page scrolled, and a mark on a live node (a node the refresh
    // replaced would lose it).
    b.click("#edit summary");
    b.type_into("#edit #soak_minutes", "17");
    b.js("window.scrollTo(0, document.body.scrollHeight); document.querySelector('#live [data-status]').kernexMark = 'kept'; return 0;");
    let scrolled = b.js("return window.scrollY;").as_f64().unwrap();
    assert!(scrolled > 100.0, "the page scrolls: {scrolled}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = b.js("return parseInt(document.getElementById('live').getAttribute('data-refreshed') || '0', 10);");
        if n.as_i64().unwrap() >= 10 {
            break;
        }
        assert!(Instant::now() < deadline, "10 refreshes did not happen");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(b.js("return document.getElementById('edit').open;"), true);
    assert_eq!(
        b.js("return document.querySelector('#edit #soak_minutes').value;"),
        "17"
    );
    assert_eq!(b.js("return window.scrollY;").as_f64().unwrap(), scrolled);
    assert_eq!(
        b.js("return document.querySelector('#live [data-status]').kernexMark || null;"),
        "kept",
        "the refresh changed nodes in place"
    );
    // The buttons follow the state, without a reload: abort it elsewhere.
    b.js("window.kernexNoReload = true; return 0;");
    let (s, _) = request(
        &http,
        "POST",
        &api(&format!("/rollouts/{id}/abort")),
        Some(&admin),
        None,
    );
    assert_eq!(s, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.exists("#live [data-action=start]") {
        assert!(Instant::now() < deadline, "the Start button stayed");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(b.exists("#live [data-action=rollback]"));
    assert!(!b.exists("[data-action=abort]") && !b.exists("[data-action=pause]"));
    assert_eq!(
        b.js("return window.kernexNoReload === true;"),
        true,
        "no reload"
    );
    b.screenshot("fleet-03-rollout-after-abort");
}
