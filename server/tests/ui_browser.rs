//! The web UI in a real browser: Debian's headless Chromium driven through
//! chromedriver (W3C WebDriver over HTTP on 127.0.0.1), against the real
//! `kernex-server` binary on 127.0.0.1:0 with SQLite. Simulated devices
//! talk to the device API over HTTP. A missing chromium or chromedriver is
//! a failure (scripts/setup.d/50-ui.sh installs them).
//!
//! Screenshots of every page land in `$CARGO_TARGET_TMPDIR/ui-screenshots/`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod browser;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use browser::*;
use serde_json::{Value, json};

#[test]
fn operator_flows_in_a_real_browser() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (_server, origin, password) = start_server(&dir.path().join("data"));
    assert!(origin.starts_with("http://127.0.0.1:"), "{origin}");
    let api = |path: &str| format!("{origin}/api/v1{path}");
    let http = agent();

    // The fleet, through the real API: keyring, a read-only user, three
    // devices with heartbeats and logs, one of them degraded.
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
    let (s, _) = request(
        &http,
        "POST",
        &api("/users"),
        Some(&admin),
        Some(
            json!({"email": "viewer@localhost", "password": "viewer password 1", "role": "read_only"}),
        ),
    );
    assert_eq!(s, 201);
    let (s, v) = request(
        &http,
        "POST",
        &api("/enrollment-tokens"),
        Some(&admin),
        Some(json!({"label": "factory", "tags": ["site-a"], "expires_in_secs": 86_400})),
    );
    assert_eq!(s, 201);
    let enrollment = v["token"].as_str().unwrap().to_string();
    let mut devices = Vec::new();
    for (i, class) in ["qemu-aarch64", "qemu-aarch64", "raspberrypi4-64"]
        .iter()
        .enumerate()
    {
        let (s, v) = request(
            &http,
            "POST",
            &api("/device/enroll"),
            None,
            Some(json!({
            "enrollment_token": enrollment, "device_id": format!("edge-{i:02}"), "hardware_class": class})),
        );
        assert_eq!(s, 201, "{v}");
        devices.push((
            v["id"].as_str().unwrap().to_string(),
            v["credential"].as_str().unwrap().to_string(),
        ));
    }
    for (cpu, mem) in [(12.0, 410), (48.0, 520), (30.0, 480), (22.0, 450)] {
        let (s, _) = request(
            &http,
            "POST",
            &api("/device/heartbeat"),
            Some(&devices[0].1),
            Some(json!({
            "cpu_percent": cpu, "memory_used_bytes": mem, "memory_total_bytes": 1000,
            "version": "1.0.0", "booted_slot": "A", "primary_slot": "A", "uptime_secs": 3600})),
        );
        assert_eq!(s, 204);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, _) = request(
        &http,
        "POST",
        &api("/device/heartbeat"),
        Some(&devices[1].1),
        Some(json!({"cpu_percent": 5.0, "version": "1.0.0"})),
    );
    assert_eq!(s, 204);
    let (s, _) = request(
        &http,
        "POST",
        &api("/device/heartbeat"),
        Some(&devices[2].1),
        Some(json!({"memory_used_bytes": 960, "memory_total_bytes": 1000})),
    );
    assert_eq!(s, 204);
    let (s, _) = request(
        &http,
        "POST",
        &api("/device/logs"),
        Some(&devices[0].1),
        Some(json!({"entries": [
        {"level": "info", "message": "llm service ready"},
        {"level": "error", "message": "tool call timed out"}]})),
    );
    assert_eq!(s, 204);

    let b = Browser::start(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));
    let _ = b.requested_urls();

    // Keyboard-only login: focus moves by Tab, text is typed, Enter submits.
    b.goto(&format!("{origin}/ui/"));
    b.wait_url("/ui/login?next=/ui/");
    b.screenshot("01-login");
    for _ in 0..10 {
        if b.focused_id() == "email" {
            break;
        }
        b.keys(TAB);
    }
    assert_eq!(b.focused_id(), "email", "Tab reaches the email field");
    b.keys("admin@localhost");
    b.keys(TAB);
    assert_eq!(b.focused_id(), "password");
    b.keys(&password);
    b.keys(ENTER);
    b.wait_url("/ui/");
    b.wait_for("[data-count=total]");

    // The overview's counts are the API's.
    let (_, list) = request(&http, "GET", &api("/devices"), Some(&admin), None);
    let list = list.as_array().unwrap().clone();
    let shown = b.js("var o = {}; document.querySelectorAll('[data-count]').forEach(function (e) { o[e.getAttribute('data-count')] = parseInt(e.querySelector('.big').textContent, 10); }); return o;");
    assert_eq!(shown["total"], list.len(), "{shown}");
    for status in [
        "online", "degraded", "offline", "updating", "reverted", "error",
    ] {
        let n = list.iter().filter(|d| d["status"] == status).count();
        assert_eq!(shown[status], n, "{status}: {shown}");
    }
    assert_eq!(shown["degraded"], 1);
    // Every bar is drawn (SVG elements must be closed in HTML to stay
    // siblings, not nest).
    let bars = b.js("return document.querySelectorAll('figure.chart svg > rect.bar').length");
    assert_eq!(bars, 6 + 2 + 2, "status, version and class bars");
    assert!(
        b.text("main").contains("edge-02"),
        "the degraded device needs attention"
    );
    b.screenshot("02-overview");

    // Device list with a filter, then a device's detail.
    b.goto(&format!("{origin}/ui/devices?hardware_class=qemu-aarch64"));
    let rows = b.js("return document.querySelectorAll('main tbody tr').length");
    assert_eq!(rows, 2);
    b.screenshot("03-devices");
    b.click("main tbody tr a");
    b.wait_for("svg > polyline.s1");
    b.wait_for("svg > polyline.s2");
    let page = b.text("main");
    assert!(
        page.contains("llm service ready") && page.contains("tool call timed out"),
        "{page}"
    );
    assert!(page.contains("unattested") && page.contains("Booted slot"));
    let points = b.js(
        "return document.querySelector('svg polyline.s1').getAttribute('points').split(' ').length",
    );
    assert_eq!(points, 4, "one CPU point per heartbeat");
    b.screenshot("04-device");
    // The level filter, by keyboard and click.
    let el = b.find("#level");
    b.cmd(
        "POST",
        &format!("/element/{el}/value"),
        Some(json!({"text": "error"})),
    );
    // The device page has several forms (tags, link): the log's own.
    b.click("form:has(#level) button[type=submit]");
    b.wait_url("level=error");
    let page = b.text("main");
    assert!(
        page.contains("tool call timed out") && !page.contains("llm service ready"),
        "{page}"
    );

    // A CSRF-less post from the page's own origin is refused.
    let status = b.js_async("var done = arguments[0]; fetch('/ui/enrollment-tokens', {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'label=no-csrf'}).then(function (r) { done(r.status); });");
    assert_eq!(status, 403);

    // Upload a release through the page: progress, verification, result.
    b.goto(&format!("{origin}/ui/releases"));
    let file = b.find("#bundle");
    b.cmd(
        "POST",
        &format!("/element/{file}/value"),
        Some(json!({"text": golden("valid.kxb").canonicalize().unwrap().display().to_string()})),
    );
    b.click("#upload button[type=submit]");
    b.wait_for("#uploaded-release");
    let progress = b.js(
        "var p = document.getElementById('upload-progress'); return [p.value, p.max, p.hidden];",
    );
    assert_eq!(progress[0], progress[1], "{progress}");
    assert_eq!(progress[2], false);
    let (_, releases) = request(&http, "GET", &api("/releases"), Some(&admin), None);
    assert_eq!(releases.as_array().unwrap().len(), 1);
    let release = releases[0]["id"].as_str().unwrap().to_string();
    b.screenshot("05-releases");
    // The page moves on to the new release.
    b.wait_url(&format!("/ui/releases/{release}"));
    b.wait_for("details pre");
    assert!(
        b.text("main")
            .contains(releases[0]["version"].as_str().unwrap())
    );
    b.screenshot("06-release");

    // An enrollment token: created, shown once, and it enrolls a device.
    b.goto(&format!("{origin}/ui/enrollment-tokens"));
    b.type_into("#label", "line 3");
    b.type_into("#tags", "site-b metered");
    b.click("form[action='/ui/enrollment-tokens'] button[type=submit]");
    // The next page, not the form still on screen (a loaded machine is slow).
    b.wait_for("#new-token");
    let token = b.text("#new-token");
    assert!(token.starts_with("kxe_"), "{token}");
    let (s, v) = request(
        &http,
        "POST",
        &api("/device/enroll"),
        None,
        Some(json!({
        "enrollment_token": token, "device_id": "edge-10", "hardware_class": "qemu-aarch64"})),
    );
    assert_eq!(s, 201, "{v}");
    b.screenshot("07-enrollment");
    // Revoke the first token, through the confirmation dialog.
    b.goto(&format!("{origin}/ui/enrollment-tokens"));
    assert!(
        !b.text("main").contains(&token),
        "a token is shown only once"
    );
    b.click("form[data-confirm] button");
    b.accept_dialog();
    b.wait_for("main .badge.bad");
    let (_, tokens) = request(&http, "GET", &api("/enrollment-tokens"), Some(&admin), None);
    assert_eq!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["revoked"] == true)
            .count(),
        1
    );

    // A deployment: choose, review, confirm; the page follows its progress.
    b.goto(&format!("{origin}/ui/deployments?release={release}"));
    b.click(&format!("input[value='{}']", devices[0].0));
    b.type_into("#description", "canary");
    b.click("form[action='/ui/deployments/confirm'] button[type=submit]");
    b.wait_for("form[action='/ui/deployments'] button.primary");
    b.screenshot("08-deploy-confirm");
    b.click("form[action='/ui/deployments'] button.primary");
    b.wait_for("[data-refresh]");
    assert!(b.text("main").contains("assigned"));
    let (s, _) = request(
        &http,
        "POST",
        &api("/device/report"),
        Some(&devices[0].1),
        Some(json!({
        "state": "downloading", "release_id": release, "bytes_done": 300, "bytes_total": 1000})),
    );
    assert_eq!(s, 204);
    // The live fragment picks the progress up without a reload.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !b.text("main").contains("downloading") {
        assert!(
            Instant::now() < deadline,
            "the deployment page did not update live"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    b.screenshot("09-deployment");

    for (path, name) in [
        ("/ui/audit", "10-audit"),
        ("/ui/users", "11-users"),
        ("/ui/keyring", "12-keyring"),
    ] {
        b.goto(&format!("{origin}{path}"));
        b.wait_for("main h1");
        b.screenshot(name);
    }
    assert!(b.text("main").contains("SHA-256 fingerprint"));
    b.goto(&format!("{origin}/ui/audit?action=release"));
    let audit = b.text("main");
    assert!(
        audit.contains("release.upload") && !audit.contains("enrollment_token.create"),
        "{audit}"
    );

    // Tablet width: nothing overflows sideways.
    b.window(820, 1180);
    for (path, name) in [
        ("/ui/".to_string(), "13-tablet-overview"),
        (format!("/ui/devices/{}", devices[0].0), "14-tablet-device"),
    ] {
        b.goto(&format!("{origin}{path}"));
        b.wait_for("main h1");
        let overflow = b.js(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
        );
        assert_eq!(overflow, 0, "{path} scrolls sideways at tablet width");
        b.screenshot(name);
    }
    b.window(1280, 900);

    // Log out; a read-only operator sees no mutating control and a forged
    // post is refused.
    b.click("form[action='/ui/logout'] button");
    b.wait_url("/ui/login");
    b.type_into("#email", "viewer@localhost");
    b.type_into("#password", "viewer password 1");
    b.click("form[action='/ui/login'] button[type=submit]");
    b.wait_for("[data-count=total]");
    for path in [
        "/ui/".to_string(),
        "/ui/devices".to_string(),
        format!("/ui/devices/{}", devices[0].0),
        "/ui/releases".to_string(),
        format!("/ui/releases/{release}"),
        "/ui/deployments".to_string(),
        "/ui/enrollment-tokens".to_string(),
        "/ui/audit".to_string(),
        "/ui/keyring".to_string(),
    ] {
        b.goto(&format!("{origin}{path}"));
        b.wait_for("main h1");
        let forms = b.js("return Array.from(document.querySelectorAll('form')).filter(function (f) { return f.method === 'post'; }).map(function (f) { return f.getAttribute('action'); })");
        assert_eq!(forms, json!(["/ui/logout"]), "{path}: only the logout form");
        assert_eq!(b.js("return document.querySelectorAll('input[type=file], button.danger, button.primary').length"), 0, "{path}");
    }
    b.screenshot("15-read-only-releases");
    let before = request(&http, "GET", &api("/enrollment-tokens"), Some(&admin), None)
        .1
        .as_array()
        .unwrap()
        .len();
    let status = b.js_async("var done = arguments[0]; var csrf = document.querySelector('input[name=csrf]').value; fetch('/ui/enrollment-tokens', {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'label=forged&csrf=' + encodeURIComponent(csrf)}).then(function (r) { done(r.status); });");
    assert_eq!(status, 403, "the role check refuses a forged post");
    let after = request(&http, "GET", &api("/enrollment-tokens"), Some(&admin), None)
        .1
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after);
    b.goto(&format!("{origin}/ui/users"));
    assert!(b.text("main").contains("403"));

    // No request left 127.0.0.1: every network URL the browser asked for
    // was this server's. (Chromium's own chrome:// pages and inline data
    // never touch the network.)
    let urls = b.requested_urls();
    let network: Vec<&String> = urls
        .iter()
        .filter(|u| {
            !u.starts_with("chrome://") && !u.starts_with("data:") && !u.starts_with("about:")
        })
        .collect();
    assert!(
        network.len() > 30,
        "the performance log recorded the session: {urls:?}"
    );
    for url in &network {
        assert!(
            url.starts_with(&format!("{origin}/")),
            "the browser requested {url}"
        );
    }
    let own = b.js("return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource')).map(function (e) { return e.name; })");
    for url in own.as_array().unwrap() {
        assert!(
            url.as_str().unwrap().starts_with(&format!("{origin}/")),
            "resource {url}"
        );
    }
    eprintln!(
        "browser flows took {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        b.shots.display()
    );
}

/// A simulated device answering its poll the way kernex-updater does:
/// install (downloading → installed → rebooted → committed) or roll back.
/// Returns what it did.
fn device_step(http: &ureq::Agent, api: &dyn Fn(&str) -> String, cred: &str) -> Option<String> {
    let (s, d) = request(http, "GET", &api("/device/poll"), Some(cred), None);
    if s == 204 {
        return None;
    }
    assert_eq!(s, 200, "poll: {d}");
    let release = d["release_id"].as_str().unwrap();
    let version = d["version"].as_str().unwrap();
    let report = |body: Value| {
        let (s, v) = request(http, "POST", &api("/device/report"), Some(cred), Some(body));
        assert_eq!(s, 204, "report: {v}");
    };
    if d["action"] == "rollback" {
        report(
            json!({"state": "rolled_back", "release_id": release, "version": version, "booted_slot": "A"}),
        );
        return Some("rolled_back".into());
    }
    let size = d["size"].as_i64().unwrap();
    report(
        json!({"state": "downloading", "release_id": release, "bytes_done": size / 2, "bytes_total": size}),
    );
    report(
        json!({"state": "downloading", "release_id": release, "bytes_done": size, "bytes_total": size}),
    );
    report(json!({"state": "installed", "release_id": release}));
    report(json!({"state": "rebooted", "release_id": release, "booted_slot": "B"}));
    report(
        json!({"state": "committed", "release_id": release, "version": version, "booted_slot": "B"}),
    );
    Some("committed".into())
}

#[test]
fn rollout_lifecycle_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "scheduler-interval-ms = 200\ndevice-requests-per-minute = 0\nuser-requests-per-minute = 0\n[limits]\nenrollments-per-address-per-minute = 0\nunauthenticated-per-address-per-minute = 0\n",
    )
    .unwrap();
    let (_server, origin, password) = start_server_with(&dir.path().join("data"), Some(&config));
    let api = |path: &str| format!("{origin}/api/v1{path}");
    let http = agent();
    // Two real signed releases whose second rewrites a tenth of the first.
    let made = kernex_sim::releases::make_releases(
        &dir.path().join("releases"),
        "qemu-aarch64",
        &[semver::Version::new(1, 0, 0), semver::Version::new(1, 1, 0)],
        2 * 1024 * 1024,
        0.1,
        7,
    )
    .unwrap();
    let (s, v) = request(
        &http,
        "POST",
        &api("/login"),
        None,
        Some(json!({"email": "admin@localhost", "password": password})),
    );
    assert_eq!(s, 200, "{v}");
    let admin = v["token"].as_str().unwrap().to_string();
    let ca = std::fs::read_to_string(&made.ca_pem).unwrap();
    let (s, _) = request(
        &http,
        "PUT",
        &api("/org/keyring"),
        Some(&admin),
        Some(json!({"pem": ca})),
    );
    assert_eq!(s, 204);
    let mut ids = Vec::new();
    for bundle in &made.bundles {
        let mut r = http
            .post(&api("/releases"))
            .header("authorization", &format!("Bearer {admin}"))
            .header("content-type", "application/octet-stream")
            .send(std::fs::read(bundle).unwrap())
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let (old, new) = (ids[0].clone(), ids[1].clone());
    let (s, v) = request(
        &http,
        "POST",
        &api("/enrollment-tokens"),
        Some(&admin),
        Some(json!({"label": "rollout fleet", "tags": ["site-a"], "expires_in_secs": 86_400})),
    );
    assert_eq!(s, 201);
    let enrollment = v["token"].as_str().unwrap().to_string();
    let mut creds = Vec::new();
    for i in 0..4 {
        let (s, v) = request(
            &http,
            "POST",
            &api("/device/enroll"),
            None,
            Some(json!({
            "enrollment_token": enrollment, "device_id": format!("pi-{i}"), "hardware_class": "qemu-aarch64"})),
        );
        assert_eq!(s, 201, "{v}");
        let cred = v["credential"].as_str().unwrap().to_string();
        let (s, _) = request(
            &http,
            "POST",
            &api("/device/heartbeat"),
            Some(&cred),
            Some(json!({
            "version": "1.0.0", "booted_slot": "A", "primary_slot": "A", "cpu_percent": 10.0})),
        );
        assert_eq!(s, 204);
        creds.push(cred);
    }

    let b = Browser::start(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));
    b.goto(&format!("{origin}/ui/login"));
    b.type_into("#email", "admin@localhost");
    b.type_into("#password", &password);
    b.click("form[action='/ui/login'] button[type=submit]");
    b.wait_for("[data-count=total]");

    // The delta between the two releases, from their chunk indexes.
    b.goto(&format!("{origin}/ui/releases/delta?from={old}&to={new}"));
    let delta: u64 = b
        .js("return document.querySelector('[data-delta-total]').getAttribute('data-delta-total')")
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let full = std::fs::metadata(&made.bundles[1]).unwrap().len();
    assert!(
        delta > 0 && delta < full / 2,
        "a tenth changed: {delta} of {full}"
    );
    b.screenshot("20-release-delta");

    // Create a rollout: the preview's numbers are the API's.
    b.goto(&format!("{origin}/ui/rollouts"));
    let select = b.find("#release_id");
    b.cmd(
        "POST",
        &format!("/element/{select}/value"),
        Some(json!({"text": "1.1.0"})),
    );
    b.type_into("#name", "spring update");
    b.type_into("#waves", "1, 100%");
    b.type_into("#soak_minutes", "0");
    b.click("form.rollout button[type=submit]");
    b.wait_for("[data-preview=bytes]");
    let (s, expected) = request(
        &http,
        "POST",
        &api("/rollouts/preview"),
        Some(&admin),
        Some(json!({
        "name": "spring update", "release_id": new,
        "waves": [{"count": 1, "soak_secs": 0}, {"percent": 100.0, "soak_secs": 0}],
        "bandwidth": {"egress_cap_bytes_per_sec": 125_000_000u64,
            "link_classes": {"metered-4g": {"rate_bytes_per_sec": 500_000, "budget_bytes_per_day": 50_000_000u64, "cost_per_gb": 5.0}}}})),
    );
    assert_eq!(s, 200, "{expected}");
    assert_eq!(expected["targets"], 4);
    let shown_bytes: u64 = b
        .js("return document.querySelector('[data-preview=bytes]').getAttribute('data-value')")
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(shown_bytes, expected["total_bytes"].as_u64().unwrap());
    for w in expected["waves"].as_array().unwrap() {
        let n = w["wave"].as_u64().unwrap();
        let cell: u64 = b.js(&format!("return document.querySelector('tr[data-wave=\"{n}\"] td[data-bytes]').getAttribute('data-bytes')"))
            .as_str().unwrap().parse().unwrap();
        assert_eq!(cell, w["bytes"].as_u64().unwrap(), "wave {n}");
    }
    assert_eq!(
        b.js("return document.querySelectorAll('figure.chart svg > rect.bar').length"),
        6,
        "bytes, cost and duration bars for two waves"
    );
    b.screenshot("21-rollout-preview");
    b.click("form[action='/ui/rollouts'] button.primary");
    b.wait_for("button[data-action=start]");
    b.screenshot("22-rollout-draft");

    // Start it (confirmed), and watch wave 1 complete live.
    b.click("button[data-action=start]");
    b.accept_dialog();
    b.wait_for("[data-status=running]");
    let rollout = b.url().rsplit('/').next().unwrap().to_string();
    // Only wave 1's devices act, so wave 2 is still running afterwards.
    let (_, r) = request(
        &http,
        "GET",
        &api(&format!("/rollouts/{rollout}")),
        Some(&admin),
        None,
    );
    let first: Vec<usize> = r["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["wave"] == 1)
        .map(|d| d["device_id"].as_str().unwrap()[3..].parse().unwrap())
        .collect();
    assert_eq!(first.len(), 1, "{r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.exists("tr[data-wave='1'][data-wave-status='done']") {
        for i in &first {
            device_step(&http, &api, &creds[*i]);
        }
        assert!(
            Instant::now() < deadline,
            "wave 1 did not complete: {}",
            b.text("#live")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    b.screenshot("23-rollout-wave-1-done");
    // The overview lists it; the committed device's page shows it.
    b.goto(&format!("{origin}/ui/"));
    assert!(
        b.text("main").contains("spring update"),
        "the overview lists the running rollout"
    );
    b.goto(&format!("{origin}/ui/rollouts/{rollout}"));
    b.wait_for("[data-status=running]");

    // Pause and resume, each confirmed.
    b.click("button[data-action=pause]");
    b.accept_dialog();
    b.wait_for("[data-status=paused]");
    let (_, r) = request(
        &http,
        "GET",
        &api(&format!("/rollouts/{rollout}")),
        Some(&admin),
        None,
    );
    assert_eq!(r["status"], "paused");
    b.click("button[data-action=resume]");
    b.accept_dialog();
    b.wait_for("button[data-action=pause]");
    // Every device commits; the rollout completes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for c in &creds {
            device_step(&http, &api, c);
        }
        let (_, r) = request(
            &http,
            "GET",
            &api(&format!("/rollouts/{rollout}")),
            Some(&admin),
            None,
        );
        if r["status"] == "completed" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not complete: {r}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    b.wait_for("[data-status=completed]");
    b.screenshot("24-rollout-completed");

    // Roll back (confirmed): every device boots its other slot.
    b.click("button[data-action=rollback]");
    b.accept_dialog();
    b.wait_for("[data-status=rolled_back]");
    let mut rolled = 0;
    for c in &creds {
        if device_step(&http, &api, c).as_deref() == Some("rolled_back") {
            rolled += 1;
        }
    }
    assert_eq!(rolled, 4, "every updated device was told to roll back");
    let deadline = Instant::now() + Duration::from_secs(15);
    // The page picks the devices' reports up live (per-wave states).
    while !(b.text("#live").contains("rolled_back: 1")
        && b.text("#live").contains("rolled_back: 3"))
    {
        assert!(
            Instant::now() < deadline,
            "the page did not show the rollback: {}",
            b.text("#live")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    b.screenshot("25-rollout-rolled-back");
    b.goto(&format!("{origin}/ui/audit?action=rollout"));
    let audit = b.text("main");
    for action in [
        "rollout.create",
        "rollout.start",
        "rollout.pause",
        "rollout.resume",
        "rollout.rollback",
    ] {
        assert!(audit.contains(action), "the audit log shows {action}");
    }
}

/// Waits until `f` holds, for up to 20 s.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn accounts_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    // A lockout after four failures, so that one is quick to cause.
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "[login]\nfree-attempts = 2\nlockout-after = 4\nbackoff-base-ms = 10\nlockout-secs = 600\n",
    )
    .unwrap();
    let (_server, origin, one_time) = start_server_fresh(&dir.path().join("data"), Some(&config));
    let api = |path: &str| format!("{origin}/api/v1{path}");
    let http = agent();
    let b = Browser::start(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));

    // First login with the one-time password: the UI sends the admin to
    // the password page, and nowhere else, until it is changed.
    b.goto(&format!("{origin}/ui/login"));
    b.type_into("#email", "admin@localhost");
    b.type_into("#password", &one_time);
    b.click("form button[type=submit]");
    b.wait_url("/ui/account/password");
    b.wait_for("#must-change");
    b.screenshot("20-forced-password-change");
    b.goto(&format!("{origin}/ui/devices"));
    b.wait_url("/ui/account/password");
    // The two new passwords must match.
    b.type_into("#current_password", &one_time);
    b.type_into("#new_password", "the admin's own password");
    b.type_into("#new_password_again", "a different password");
    b.click("#password-panel button[type=submit]");
    b.wait_for("#password-panel p.error");
    b.type_into("#current_password", &one_time);
    b.type_into("#new_password", "the admin's own password");
    b.type_into("#new_password_again", "the admin's own password");
    b.click("#password-panel button[type=submit]");
    b.wait_url("/ui/");
    b.wait_for("[data-count=total]");
    b.goto(&format!("{origin}/ui/devices"));
    b.wait_url("/ui/devices");
    // The one-time password is dead, the new one logs in.
    let (s, _) = request(
        &http,
        "POST",
        &api("/login"),
        None,
        Some(json!({"email": "admin@localhost", "password": one_time})),
    );
    assert_eq!(s, 401);
    let (s, v) = request(
        &http,
        "POST",
        &api("/login"),
        None,
        Some(json!({"email": "admin@localhost", "password": "the admin's own password"})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["must_change_password"], false);
    let admin = v["token"].as_str().unwrap().to_string();

    // The admin disables a user in the users page; their session stops.
    let (s, _) = request(
        &http,
        "POST",
        &api("/users"),
        Some(&admin),
        Some(json!({"email": "leaver@localhost", "password": "leaver password 1", "role": "ops"})),
    );
    assert_eq!(s, 201);
    let (s, v) = request(
        &http,
        "POST",
        &api("/login"),
        None,
        Some(json!({"email": "leaver@localhost", "password": "leaver password 1"})),
    );
    assert_eq!(s, 200, "{v}");
    let leaver = v["token"].as_str().unwrap().to_string();
    assert_eq!(
        request(&http, "GET", &api("/me"), Some(&leaver), None).0,
        200
    );
    b.goto(&format!("{origin}/ui/users"));
    b.click("tr[data-user='leaver@localhost'] a");
    b.wait_for("#disable-user");
    b.screenshot("21-user");
    b.click("#disable-user");
    b.accept_dialog();
    b.wait_for("#enable-user");
    assert_eq!(b.text("main h1"), "leaver@localhost");
    assert_eq!(
        request(&http, "GET", &api("/me"), Some(&leaver), None).0,
        401,
        "a disabled user's session is refused"
    );
    let (_, users) = request(&http, "GET", &api("/users"), Some(&admin), None);
    let row = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["email"] == "leaver@localhost")
        .unwrap()
        .clone();
    assert_eq!(row["disabled"], true);
    // The role, by the same page.
    b.js("document.getElementById('role').value = 'read_only'; return null;");
    b.click("#change-role");
    b.wait_for("#enable-user");
    eventually("the role changes to read_only", || {
        let (_, users) = request(&http, "GET", &api("/users"), Some(&admin), None);
        users
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["email"] == "leaver@localhost" && u["role"] == "read_only")
    });

    // An API token from "My account": shown once, works, then revoked.
    b.click("#my-account");
    b.wait_url("/ui/account");
    b.type_into("#token-name", "CI upload");
    let days = b.find("#token-days");
    b.cmd("POST", &format!("/element/{days}/clear"), Some(json!({})));
    b.cmd(
        "POST",
        &format!("/element/{days}/value"),
        Some(json!({"text": "30"})),
    );
    b.click("form[action='/ui/account/tokens'] button[type=submit]");
    b.wait_for("#new-token");
    let token = b.text("#new-token");
    assert!(token.starts_with("kxk_"), "{token}");
    b.screenshot("22-api-token");
    let (s, v) = request(&http, "GET", &api("/me"), Some(&token), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["email"], "admin@localhost");
    b.goto(&format!("{origin}/ui/account"));
    assert!(!b.text("main").contains(&token), "shown only once");
    b.click("tr[data-kind=api_token] form button");
    b.accept_dialog();
    eventually("the token row goes", || {
        !b.exists("tr[data-kind=api_token]")
    });
    assert_eq!(
        request(&http, "GET", &api("/me"), Some(&token), None).0,
        401,
        "a revoked token is refused"
    );
    b.screenshot("23-account");

    // A user locked out by wrong passwords: the admin clears the lockout
    // on the user's page, and the right password works at once.
    let (s, _) = request(
        &http,
        "POST",
        &api("/users"),
        Some(&admin),
        Some(json!({"email": "locked@localhost", "password": "locked password 1", "role": "ops"})),
    );
    assert_eq!(s, 201);
    let login = |password: &str| {
        request(
            &http,
            "POST",
            &api("/login"),
            None,
            Some(json!({"email": "locked@localhost", "password": password})),
        )
        .0
    };
    let mut failures = 0;
    while failures < 4 {
        match login("a wrong password") {
            401 => failures += 1,
            429 => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("{other}"),
        }
    }
    assert_eq!(login("locked password 1"), 429, "locked out");
    b.goto(&format!("{origin}/ui/users"));
    b.click("tr[data-user='locked@localhost'] a");
    b.wait_for("#clear-login-throttle");
    let state = b.text("#throttle-state");
    assert!(state.contains("locked out from 1 address"), "{state}");
    b.screenshot("24-login-throttle");
    b.click("#clear-login-throttle");
    b.wait_for("#throttle-state[data-failures='0']");
    assert_eq!(login("locked password 1"), 200, "the lockout is cleared");
    let (_, log) = request(&http, "GET", &api("/audit"), Some(&admin), None);
    assert!(
        log["entries"].as_array().unwrap().iter().any(|e| {
            e["action"] == "user.login_throttle.clear"
                && e["target"] == "user:locked@localhost"
                && e["result"] == "ok"
        }),
        "{log}"
    );
}
