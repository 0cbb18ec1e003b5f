//! Anti-rollback at the server: each device's floor (the highest release
//! security version it committed, from its heartbeats) is stored and
//! shown, and a deployment, a rollout or a rollout's rollback that would
//! send a device below it is refused with a 409 that names the device and
//! writes nothing. Every test runs on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::{Db, Harness};
use kernex_image::bundle::{BundleBuilder, Image};
use kernex_image::keys::{Usage, Validity, create_ca, create_leaf};
use kernex_protocol::FsType;
use kernex_protocol::signature::Signer;
use serde_json::{Value, json};

macro_rules! both_clock {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Db::Sqlite, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Db::Postgres, super::$name).await;
                }
            )*
        }
    };
}

both_clock!(
    the_floor_is_stored_and_shown,
    a_deployment_below_a_floor_is_refused,
    a_rollout_below_a_floor_is_refused,
    a_rollback_across_a_floor_is_refused,
);

async fn run<F, Fut>(db: Db, body: F)
where
    F: FnOnce(Arc<Harness>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    common::run_with(
        db,
        |c| {
            c.test_clock = true;
            c.device_requests_per_minute = 0;
            c.user_requests_per_minute = 0;
            c.scheduler_interval_ms = 0;
        },
        body,
    )
    .await
}

const CLASS: &str = "qemu-aarch64";

/// The org's keyring set to a new CA, and one signed bundle per
/// (version, security version) uploaded: their release ids.
async fn releases(h: &Harness, list: &[(&str, u64)]) -> Vec<String> {
    let ca = create_ca("Kernex test", Validity::days_from_now(365)).unwrap();
    let leaf = create_leaf(
        &ca,
        "Kernex test",
        "Kernex test signing",
        Usage::CodeSigning,
        Validity::days_from_now(365),
    )
    .unwrap();
    let (s, _) = h
        .call(
            Method::PUT,
            "/api/v1/org/keyring",
            Some(&h.admin),
            Some(json!({"pem": String::from_utf8(ca.cert.to_pem().unwrap()).unwrap()})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let signer = Signer::from_pem(
        &leaf.key.private_key_to_pem_pkcs8().unwrap(),
        &leaf.cert.to_pem().unwrap(),
    )
    .unwrap();
    let mut ids = Vec::new();
    for (i, (version, security_version)) in list.iter().enumerate() {
        let image: Vec<u8> = (0..64 * 1024).map(|n| (n * 7 + i * 13) as u8).collect();
        let mut out = Vec::new();
        BundleBuilder::new(
            CLASS,
            semver::Version::parse(version).unwrap(),
            Image::bytes(&image).filesystem(FsType::Raw),
            &signer,
        )
        .security_version(*security_version)
        .write(&mut out)
        .unwrap();
        let (s, r) = h.upload(&h.admin, out).await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        assert_eq!(r["security_version"], *security_version, "{r}");
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    ids
}

/// Enrolls `device_id` and sends a heartbeat with `version` and `floor`.
async fn device(
    h: &Harness,
    enrollment: &str,
    device_id: &str,
    version: &str,
    floor: Option<u64>,
) -> (String, String) {
    let (pk, cred) = h.enroll(enrollment, device_id, CLASS).await;
    heartbeat(h, &cred, version, floor).await;
    (pk, cred)
}

async fn heartbeat(h: &Harness, cred: &str, version: &str, floor: Option<u64>) {
    let mut body = json!({"version": version});
    if let Some(f) = floor {
        body["security_floor"] = json!(f);
    }
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(cred),
            Some(body),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
}

fn assert_floor_refusal(s: StatusCode, v: &Value, names: &[&str], spared: &[&str]) {
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let detail = v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("no detail: {v}"));
    assert!(detail.contains("anti-rollback floor"), "{detail}");
    for n in names {
        assert!(
            detail.contains(&format!("{n} (floor")),
            "{n} not named: {detail}"
        );
    }
    for n in spared {
        assert!(
            !detail.contains(&format!("{n} (floor")),
            "{n} named: {detail}"
        );
    }
}

async fn the_floor_is_stored_and_shown(h: Arc<Harness>) {
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let (pk, cred) = device(&h, &enrollment, "f1", "1.0.0", None).await;
    let (s, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{pk}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(d["security_floor"], Value::Null, "not reported yet: {d}");
    heartbeat(&h, &cred, "1.0.0", Some(4)).await;
    // A heartbeat without it keeps the last one.
    heartbeat(&h, &cred, "1.0.0", None).await;
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{pk}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(d["security_floor"], 4, "{d}");
    let (_, list) = h
        .call(Method::GET, "/api/v1/devices", Some(&h.admin), None)
        .await;
    assert_eq!(list[0]["security_floor"], 4, "{list}");
    // Out of range is a 400.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({"security_floor": u64::MAX})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // The device page shows it.
    let (s, _, page) = h
        .raw(
            Method::GET,
            &format!("/ui/devices/{pk}"),
            None,
            &[("cookie", &format!("kernex_session={}", h.admin))],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("Security floor"), "{page}");
    assert!(page.contains("<dd>4 "), "{page}");
}

async fn a_deployment_below_a_floor_is_refused(h: Arc<Harness>) {
    let ids = releases(&h, &[("1.0.0", 1), ("1.1.0", 2), ("1.0.5", 2)]).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let (high, _) = device(&h, &enrollment, "high", "1.1.0", Some(2)).await;
    let (low, _) = device(&h, &enrollment, "low", "1.0.0", Some(1)).await;
    let (new, _) = device(&h, &enrollment, "new", "1.0.0", None).await;
    let deploy = |release: String, devices: Vec<String>| {
        let h = h.clone();
        async move {
            h.call(
                Method::POST,
                "/api/v1/deployments",
                Some(&h.admin),
                Some(json!({"release_id": release, "devices": devices})),
            )
            .await
        }
    };
    // 1.0.0 (security version 1) to a device whose floor is 2: refused,
    // and nothing is written, not even for the devices that would take it.
    let (s, v) = deploy(ids[0].clone(), vec![low.clone(), high.clone(), new.clone()]).await;
    assert_floor_refusal(s, &v, &["high"], &["low", "new"]);
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("1.0.0 has security version 1"),
        "{v}"
    );
    assert_eq!(h.count("deployments").await, 0);
    assert_eq!(h.count("deployment_devices").await, 0);
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{low}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(d["desired_release_id"], Value::Null, "{d}");
    // Without that device it goes through.
    let (s, v) = deploy(ids[0].clone(), vec![low.clone(), new.clone()]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // A lower version with the same security version is the device's
    // call (allow-downgrade), not the floor's.
    let (s, v) = deploy(ids[2].clone(), vec![high.clone()]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

async fn a_rollout_below_a_floor_is_refused(h: Arc<Harness>) {
    let ids = releases(&h, &[("1.0.0", 1), ("1.1.0", 2), ("1.2.0", 3)]).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    device(&h, &enrollment, "r-low", "0.9.0", Some(1)).await;
    let (_, high) = device(&h, &enrollment, "r-high", "0.9.0", Some(1)).await;
    let rollout = |release: String| {
        let h = h.clone();
        async move {
            h.call(
                Method::POST,
                "/api/v1/rollouts",
                Some(&h.admin),
                Some(json!({"release_id": release, "waves": [{"percent": 100, "soak_secs": 0}]})),
            )
            .await
        }
    };
    // Both at floor 1: a rollout of 1.0.0 is a draft; r-high then commits
    // something of security version 3 before it starts.
    let (s, draft) = rollout(ids[0].clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{draft}");
    heartbeat(&h, &high, "1.2.0", Some(3)).await;
    // A new rollout of 1.1.0 (security version 2) is refused at create.
    let (s, v) = rollout(ids[1].clone()).await;
    assert_floor_refusal(s, &v, &["r-high"], &["r-low"]);
    assert_eq!(h.count("rollouts").await, 1);
    // The preview says so too.
    let (s, p) = h
        .call(
            Method::POST,
            "/api/v1/rollouts/preview",
            Some(&h.admin),
            Some(json!({"release_id": ids[1], "waves": [{"percent": 100}]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert!(p["warnings"].to_string().contains("r-high (floor 3"), "{p}");
    // The draft made before the floor rose is refused at start.
    let id = draft["id"].as_str().unwrap();
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/start"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_floor_refusal(s, &v, &["r-high"], &["r-low"]);
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(d["status"], "draft", "{d}");
    assert_eq!(h.count("rollout_devices").await, 0);
    // 1.2.0 (security version 3) is fine for both.
    let (s, v) = rollout(ids[2].clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

async fn a_rollback_across_a_floor_is_refused(h: Arc<Harness>) {
    // 1.0.0 is security version 1; 1.1.0 fixes a vulnerability (2).
    let ids = releases(&h, &[("1.0.0", 1), ("1.1.0", 2)]).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let (_, a) = device(&h, &enrollment, "b-a", "1.0.0", Some(1)).await;
    let (_, b) = device(&h, &enrollment, "b-b", "1.0.0", Some(1)).await;
    let (s, r) = h
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&h.admin),
            Some(json!({"release_id": ids[1], "waves": [{"percent": 100, "soak_secs": 0}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/start"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    advance(&h, 1000).await;
    for cred in [&a, &b] {
        report_through_commit(&h, cred, &ids[1]).await;
    }
    // Committed 1.1.0: b-a's watchdog raised its floor to 2, b-b's report
    // of it has not arrived yet.
    heartbeat(&h, &a, "1.1.0", Some(2)).await;
    advance(&h, 1000).await;
    let rollback = || {
        let h = h.clone();
        let id = id.clone();
        async move {
            h.call(
                Method::POST,
                &format!("/api/v1/rollouts/{id}/rollback"),
                Some(&h.admin),
                None,
            )
            .await
        }
    };
    let (s, v) = rollback().await;
    assert_floor_refusal(s, &v, &["b-a"], &["b-b"]);
    assert!(
        v["detail"].as_str().unwrap().contains("roll back rollout"),
        "{v}"
    );
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_ne!(d["status"], "rolled_back", "{d}");
    // No device was told to roll back.
    let (s, poll) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&b), None)
        .await;
    assert!(poll["action"] != "rollback", "{s}: {poll}");
    // With every floor at 1 a rollback goes ahead (the check is the floor).
    heartbeat(&h, &a, "1.1.0", Some(1)).await;
    let (s, v) = rollback().await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "rolled_back", "{v}");
}

async fn advance(h: &Harness, ms: i64) {
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/test/clock",
            Some(&h.admin),
            Some(json!({"advance_ms": ms})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

/// A device reports an install of `release` through to committed on B.
async fn report_through_commit(h: &Harness, cred: &str, release: &str) {
    for (state, extra) in [
        ("downloading", json!({"bytes_done": 10, "bytes_total": 10})),
        ("installed", json!({})),
        ("rebooted", json!({"booted_slot": "B"})),
        ("committed", json!({"version": "1.1.0", "booted_slot": "B"})),
    ] {
        let mut body = json!({"state": state, "release_id": release});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (s, v) = h
            .call(
                Method::POST,
                "/api/v1/device/report",
                Some(cred),
                Some(body),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{state}: {v}");
    }
}
