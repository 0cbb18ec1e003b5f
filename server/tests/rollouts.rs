//! Rollouts end to end: the operator API through `http::app`, and the
//! fleet simulator (`kernex-sim`, real HTTP on loopback) driving hundreds
//! of devices against a real server whose test clock it steps. Every test
//! runs on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::{Db, Harness};
use kernex_protocol::bundle::Bundle;
use kernex_server::AppState;
use kernex_sim::fleet::{Fleet, FleetOptions, LinkProfile, Summary};
use kernex_sim::releases::{LocalRelease, MadeReleases};
use serde_json::{Value, json};
use sqlx::Row;

macro_rules! both_sim {
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

both_sim!(
    api_preview_lifecycle_and_contract,
    canary_crash_loops_pause_the_rollout,
    healthy_rollout_completes_in_order_within_caps_then_rolls_back,
    metered_budget_splits_a_download_over_two_days,
    server_restart_mid_rollout_loses_nothing,
    a_completed_rollout_watches_for_a_rollback_without_holding_its_devices,
    a_device_offline_until_after_the_rollout_completed_is_updated_when_it_returns,
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
            // The simulated devices fetch by the protocol's plan without
            // offers: no server-made patches (tests/planner.rs has them).
            c.server_patches = false;
        },
        body,
    )
    .await
}

fn releases(h: &Harness) -> MadeReleases {
    common::sim_releases(h)
}

async fn serve(state: AppState) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = kernex_server::http::app(state);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), task)
}

fn profile(class: &str, rate: u64, drop: f64, budget: Option<u64>) -> LinkProfile {
    LinkProfile {
        class: class.into(),
        rate,
        drop_probability: drop,
        budget_per_day: budget,
        cost_per_gb: if budget.is_some() { 5.0 } else { 0.0 },
    }
}

fn options(
    h: &Harness,
    url: &str,
    made: &MadeReleases,
    devices: usize,
    spec: Value,
) -> FleetOptions {
    FleetOptions {
        server: url.to_string(),
        organization: "default".into(),
        email: String::new(),
        password: String::new(),
        token: Some(h.admin.clone()),
        start_at_ms: None,
        ca_pem: made.ca_pem.clone(),
        from_bundle: made.bundles[0].clone(),
        to_bundle: made.bundles[1].clone(),
        devices,
        profiles: vec![(profile("ethernet", 2_000_000, 0.0, None), 1.0)],
        sites: 25,
        time_zones: vec!["UTC".into(), "Europe/Berlin".into(), "Asia/Tokyo".into()],
        crash_probability: 0.0,
        offline_fraction: 0.0,
        offline_after_secs: 60,
        offline_secs: 600,
        poll_secs: 15,
        install_secs: 10,
        health_secs: 15,
        rollback_secs: 8,
        report_every_secs: 5,
        spec,
        max_sim_secs: 4 * 3600,
        seed: 3,
        print_timeline: false,
        prefix: "dev".into(),
        hardware_class: None,
        real_time: false,
    }
}

fn gates(promote: f64, rollback: f64) -> Value {
    json!({"promote_max_error_rate": promote, "rollback_error_rate": rollback, "promote_min_committed": 0.9})
}

/// Polls; the status and the `Kernex-Poll-After` hint.
async fn poll_hint(h: &Harness, credential: &str) -> (StatusCode, Option<String>) {
    let (s, headers, _) = h
        .raw(
            Method::GET,
            "/api/v1/device/poll",
            Some(credential),
            &[],
            axum::body::Body::empty(),
        )
        .await;
    let hint = headers
        .get("kernex-poll-after")
        .map(|v| v.to_str().unwrap().to_string());
    (s, hint)
}

async fn detail(h: &Harness, id: &str) -> Value {
    let (s, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

/// Invariants every simulated run must keep, from three sources: the
/// devices' own byte counts per simulated second, the server's HTTP-layer
/// egress counter, and the scheduler's reservation samples.
async fn check_caps(h: &Harness, s: &Summary, cap: u64) {
    for (sec, bytes) in &s.egress_per_second {
        assert!(
            *bytes <= cap,
            "devices counted {bytes} B in second {sec} > cap {cap}"
        );
    }
    let (st, egress) = h
        .call(Method::GET, "/api/v1/rollouts/egress", Some(&h.admin), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let served: u64 = egress["seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let b = p[1].as_u64().unwrap();
            assert!(
                b <= cap,
                "server served {b} B in second {} > cap {cap}",
                p[0]
            );
            b
        })
        .sum();
    assert_eq!(
        served, s.downloaded_total_bytes,
        "server and devices count the same bytes"
    );
    let (st, samples) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{}/samples", s.rollout_id),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let samples = samples.as_array().unwrap();
    assert!(!samples.is_empty());
    for sample in samples {
        let r = sample["reserved_bytes_per_sec"].as_u64().unwrap();
        assert!(r <= cap, "scheduler reserved {r} B/s > cap {cap}: {sample}");
    }
    for d in &s.per_device {
        if let Some(budget) = s.metered_budget_per_day
            && d.link_class == "metered-4g"
        {
            assert!(
                d.max_day_bytes <= budget,
                "{} used {} > {budget} in a day",
                d.device_id,
                d.max_day_bytes
            );
        }
    }
}

/// Preview bytes equal what each device downloaded, within one chunk.
fn check_bytes(s: &Summary) {
    let mut planned = 0i64;
    for d in &s.per_device {
        planned += d.planned_bytes;
        if d.downloaded_bytes > 0 {
            let diff = (d.downloaded_bytes as i64 - d.planned_bytes).unsigned_abs();
            assert!(
                diff <= s.max_chunk_bytes,
                "{}: planned {} downloaded {}",
                d.device_id,
                d.planned_bytes,
                d.downloaded_bytes
            );
        }
    }
    assert_eq!(planned as u64, s.preview_total_bytes);
}

/// What `kernex-updater install` of `to` fetches on a device running
/// `from` (None: nothing to seed from), by the protocol's request plan
/// (`updater/tests/preview.rs` checks a real install fetches exactly this).
fn fetched_bytes(from: Option<&std::path::Path>, to: &std::path::Path) -> u64 {
    let open = |p: &std::path::Path| Bundle::open(std::fs::File::open(p).unwrap()).unwrap();
    let mut new = open(to);
    match from {
        Some(f) => new.delta_from(Some(&mut open(f))),
        None => new.delta_from::<std::fs::File>(None),
    }
    .unwrap()
    .total_bytes
}

async fn api_preview_lifecycle_and_contract(h: Arc<Harness>) {
    let made = releases(&h);
    let delta = fetched_bytes(Some(&made.bundles[0]), &made.bundles[1]);
    let full = fetched_bytes(None, &made.bundles[1]);
    assert!(
        delta < full / 2,
        "a 25 % change costs less than half: {delta} vs {full}"
    );
    let ids = common::upload_releases(&h, &made).await;
    let (r1, r2) = (ids[0].clone(), ids[1].clone());
    let (_, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let mut devices = Vec::new();
    for (i, (link, tz)) in [
        ("ethernet", "UTC"),
        ("metered-4g", "Europe/Berlin"),
        ("wifi", "Asia/Tokyo"),
    ]
    .into_iter()
    .enumerate()
    {
        let (id, cred) = h.enroll(&enrollment, &format!("d{i}"), "sim-x86").await;
        let version = if i == 2 { "0.9.0" } else { "1.0.0" };
        let (s, v) = h
            .call(
                Method::POST,
                "/api/v1/device/heartbeat",
                Some(&cred),
                Some(json!({"version": version})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
        let (s, v) = h
            .call(
                Method::PUT,
                &format!("/api/v1/devices/{id}/link"),
                Some(&h.admin),
                Some(json!({"link_class": link, "site": format!("site-{i}"), "time_zone": tz})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        devices.push((id, cred));
    }
    // Bad link input names the field.
    let (s, v) = h
        .call(
            Method::PUT,
            &format!("/api/v1/devices/{}/link", devices[0].0),
            Some(&h.admin),
            Some(json!({"link_class": "ethernet", "site": null, "time_zone": "Mars/Olympus"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("time_zone"), "{v}");

    // Validation.
    for (bad, what) in [
        (
            json!({"release_id": r2, "waves": [{"count": 1}]}),
            "percent 100",
        ),
        (
            json!({"release_id": r2, "waves": [{"percent": 100}], "bandwidth": {"egress_cap_bytes_per_sec": 0}}),
            "egress_cap",
        ),
        (
            json!({"release_id": r2, "maintenance_windows": [{"start": "1am", "end": "05:00"}]}),
            "HH:MM",
        ),
        (json!({"release_id": r2, "surprise": 1}), "unknown field"),
    ] {
        let (s, v) = h
            .call(Method::POST, "/api/v1/rollouts", Some(&h.admin), Some(bad))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["detail"].as_str().unwrap().contains(what), "{what}: {v}");
    }
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&h.admin),
            Some(json!({"release_id": "nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&h.admin),
            Some(json!({"release_id": r2, "selector": {"hardware_class": "other-hw"}})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // Roles: read-only reads, cannot create nor preview a spec.
    let ro = h.user("ro@example.com", "read_only").await;
    let spec = json!({
        "name": "lab to 1.1.0",
        "release_id": r2,
        "selector": {"tags": ["lab"]},
        "waves": [{"count": 1, "soak_secs": 0}, {"percent": 100, "soak_secs": 0}],
        "bandwidth": {"egress_cap_bytes_per_sec": 1_000_000, "link_classes": {
            "metered-4g": {"rate_bytes_per_sec": 10_000, "budget_bytes_per_day": delta * 2, "cost_per_gb": 8.0}}}
    });
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&ro),
            Some(spec.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Previewing a spec is heavy work (every target's chunk indexes): ops
    // only, as in the web UI.
    let (s, p) = h
        .call(
            Method::POST,
            "/api/v1/rollouts/preview",
            Some(&ro),
            Some(spec.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{p}");
    let ops = h.user("ops@example.com", "ops").await;
    let (s, p) = h
        .call(
            Method::POST,
            "/api/v1/rollouts/preview",
            Some(&ops),
            Some(spec.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    // Exact bytes per device, the requests the updater makes: devices on
    // 1.0.0 fetch the delta, the one on an unknown version everything.
    assert_eq!(p["targets"], 3);
    let per: BTreeMap<String, u64> = p["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["device_id"].as_str().unwrap().to_string(),
                d["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(per["d0"], delta);
    assert_eq!(per["d1"], delta);
    assert_eq!(per["d2"], full);
    assert_eq!(p["total_bytes"], 2 * delta + full);
    assert_eq!(p["link_classes"]["metered-4g"]["bytes"], delta);
    let cost = p["metered_cost"].as_f64().unwrap();
    assert!((cost - delta as f64 / 1e9 * 8.0).abs() < 1e-9, "{cost}");
    assert_eq!(p["waves"].as_array().unwrap().len(), 2);
    assert_eq!(p["waves"][0]["devices"], 1);
    // 10 kB/s metered: the projection is at least that download.
    assert!(p["projected_duration_secs"].as_u64().unwrap() >= delta / 10_000);
    assert!(p["peak_reserved_bytes_per_sec"].as_u64().unwrap() <= 1_000_000);

    // Create (ops), idempotent start, audit.
    let (s, created) = h
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&ops),
            Some(spec.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert_eq!(created["status"], "draft");
    let id = created["id"].as_str().unwrap().to_string();
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/resume"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "a draft cannot resume");
    let start = |key: &'static str| {
        let h = h.clone();
        let ops = ops.clone();
        let id = id.clone();
        async move {
            let (s, _, body) = h
                .raw(
                    Method::POST,
                    &format!("/api/v1/rollouts/{id}/start"),
                    Some(&ops),
                    &[("idempotency-key", key)],
                    axum::body::Body::empty(),
                )
                .await;
            (s, serde_json::from_slice::<Value>(&body).unwrap())
        }
    };
    let (s1, b1) = start("start-1").await;
    let (s2, b2) = start("start-1").await;
    assert_eq!(s1, StatusCode::OK, "{b1}");
    assert_eq!((s2, &b2), (s1, &b1), "replayed, not run twice");
    assert_eq!(b1["status"], "running");
    assert_eq!(b1["devices_total"], 3);
    let audit: Vec<String> =
        sqlx::query("SELECT action FROM audit_log WHERE action LIKE 'rollout.%' ORDER BY seq")
            .fetch_all(h.state.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get("action").unwrap())
            .collect();
    assert_eq!(
        audit.iter().filter(|a| *a == "rollout.start").count(),
        1,
        "{audit:?}"
    );
    assert!(audit.contains(&"rollout.create".to_string()));

    // Org isolation: another organisation sees nothing.
    let other = kernex_server::create_organization(&h.state.store, "other")
        .await
        .unwrap();
    kernex_server::auth::create_user(
        &h.state.store,
        &other,
        "o@x",
        "correct horse battery",
        kernex_server::auth::Role::Admin,
    )
    .await
    .unwrap();
    let other = h.login("other", "o@x", "correct horse battery").await;
    let (s, _) = h
        .call(
            Method::GET,
            &format!("/api/v1/rollouts/{id}"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, list) = h
        .call(Method::GET, "/api/v1/rollouts", Some(&other), None)
        .await;
    assert_eq!((s, list.as_array().unwrap().len()), (StatusCode::OK, 0));
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/pause"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The canary (wave 1) gets a window at the next pass; the poll carries
    // the contract fields.
    let (s, clock) = h
        .call(
            Method::POST,
            "/api/v1/test/clock",
            Some(&h.admin),
            Some(json!({"advance_ms": 1000})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{clock}");
    assert_eq!(clock["scheduler_ran"], true);
    let d = detail(&h, &id).await;
    let canary = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["wave"] == 1)
        .unwrap()
        .clone();
    assert_eq!(canary["state"], "scheduled", "{d}");
    let cred = &devices
        .iter()
        .find(|(i, _)| *i == canary["id"].as_str().unwrap())
        .unwrap()
        .1;
    let (s, poll) = h
        .call(Method::GET, "/api/v1/device/poll", Some(cred), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{poll}");
    assert_eq!(poll["action"], "install");
    assert_eq!(poll["rollout_id"], id.as_str());
    assert_eq!(poll["release_id"], r2.as_str());
    let w = &poll["download_window"];
    let now = clock["now_ms"].as_i64().unwrap();
    assert!(
        w["not_before_ms"].as_i64().unwrap() <= now && now < w["not_after_ms"].as_i64().unwrap(),
        "{poll}"
    );
    // The rollout acts on it: poll again soon (rollout-poll-secs).
    assert_eq!(poll["poll_after_secs"], 5, "{poll}");
    assert_eq!(
        poll_hint(&h, cred).await,
        (StatusCode::OK, Some("5".into()))
    );
    // A device of the next wave has nothing to do yet, but it is next in
    // line: it polls soon and hears of the promotion within the hint.
    let later = devices
        .iter()
        .find(|(i, _)| *i != canary["id"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        poll_hint(&h, &later.1).await,
        (StatusCode::NO_CONTENT, Some("5".into()))
    );

    let report = |body: Value| {
        let h = h.clone();
        let cred = cred.clone();
        async move {
            let (s, v) = h
                .call(
                    Method::POST,
                    "/api/v1/device/report",
                    Some(&cred),
                    Some(body),
                )
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
        }
    };
    report(
        json!({"state": "downloading", "release_id": r2, "bytes_done": 100, "bytes_total": delta}),
    )
    .await;
    report(json!({"state": "installed", "release_id": r2})).await;
    report(json!({"state": "rebooted", "release_id": r2, "booted_slot": "B"})).await;
    report(json!({"state": "committed", "release_id": r2, "version": "1.1.0", "booted_slot": "B"}))
        .await;
    // A late progress report does not move it back.
    report(
        json!({"state": "downloading", "release_id": r2, "bytes_done": 50, "bytes_total": delta}),
    )
    .await;
    let d = detail(&h, &id).await;
    let c = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == canary["id"])
        .unwrap()
        .clone();
    assert_eq!(c["state"], "committed", "{c}");
    assert_eq!(c["bytes_done"], 100);
    // Committed in a live rollout: nothing to do, but a rollback may come
    // (twice the hint).
    assert_eq!(
        poll_hint(&h, cred).await,
        (StatusCode::NO_CONTENT, Some("10".into()))
    );

    // Roll back: the committed canary is told to boot its other slot.
    let (s, rb) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/rollback"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{rb}");
    assert_eq!(rb["status"], "rolled_back");
    let (s, poll) = h
        .call(Method::GET, "/api/v1/device/poll", Some(cred), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{poll}");
    assert_eq!(poll["action"], "rollback");
    assert_eq!(poll["version"], "1.0.0");
    assert_eq!(poll["release_id"], r1.as_str());
    report(
        json!({"state": "rolled_back", "release_id": r1, "version": "1.0.0", "booted_slot": "A"}),
    )
    .await;
    let d = detail(&h, &id).await;
    let c = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == canary["id"])
        .unwrap()
        .clone();
    assert_eq!(c["state"], "rolled_back", "{c}");
    let (_, dev) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{}", canary["id"].as_str().unwrap()),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(dev["current_version"], "1.0.0", "{dev}");
    // Rolled back: nothing left to do, no hint.
    assert_eq!(poll_hint(&h, cred).await, (StatusCode::NO_CONTENT, None));
    // Others were cancelled; a rolled-back rollout cannot be resumed.
    assert_eq!(d["states"]["cancelled"], 2, "{d}");
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{id}/resume"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    // The OpenAPI document lists the rollout API.
    let (_, doc) = h
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    for path in [
        "/api/v1/rollouts",
        "/api/v1/rollouts/{id}/preview",
        "/api/v1/rollouts/{id}/rollback",
        "/api/v1/devices/{id}/link",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from OpenAPI"
        );
    }
}

async fn canary_crash_loops_pause_the_rollout(h: Arc<Harness>) {
    let made = releases(&h);
    let (url, _server) = serve(h.state.clone()).await;
    let spec = json!({
        "waves": [
            {"percent": 10, "soak_secs": 60, "gates": gates(0.01, 0.5)},
            {"percent": 50, "soak_secs": 60, "gates": gates(0.01, 0.5)},
            {"percent": 100, "soak_secs": 60, "gates": gates(0.01, 0.5)}
        ],
        "bandwidth": {"egress_cap_bytes_per_sec": 20_000_000, "max_concurrent_downloads": 50, "max_concurrent_per_site": 4,
            "link_classes": {"ethernet": {"rate_bytes_per_sec": 2_000_000}}}
    });
    let mut o = options(&h, &url, &made, 200, spec);
    o.crash_probability = 0.1;
    let mut fleet = Fleet::setup(o).await.unwrap();
    fleet.start_rollout().await.unwrap();
    let done = fleet
        .run_until(|f| f.status() == "paused" && f.quiet())
        .await
        .unwrap();
    let s = fleet.summary().await.unwrap();
    assert!(done, "never paused: {} {:?}", s.status, s.status_reason);
    assert!(
        s.status_reason
            .as_deref()
            .unwrap()
            .starts_with("gate: wave 1"),
        "{:?}",
        s.status_reason
    );
    let d = detail(&h, &s.rollout_id).await;
    assert_eq!(d["current_wave"], 1);
    let wave1 = &d["waves"][0];
    assert_eq!(wave1["devices"], 20);
    assert_eq!(wave1["states"]["reverted"], 2, "{wave1}");
    assert_eq!(wave1["states"]["committed"], 18, "{wave1}");
    // Nothing beyond the canary wave was touched.
    let canaries: std::collections::HashSet<String> = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["wave"] == 1)
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect();
    for dev in &s.per_device {
        if !canaries.contains(&dev.id) {
            assert_eq!(
                dev.downloaded_bytes, 0,
                "{} outside wave 1 downloaded",
                dev.device_id
            );
            assert_eq!(dev.state, "pending");
        }
    }
    assert_eq!(s.versions.get("1.1.0"), Some(&18));
    let reverted = d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["state"] == "reverted")
        .count();
    assert_eq!(reverted, 2);
    assert!(
        d["devices"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["state"] == "reverted")
            .all(|x| x["reason"].as_str().unwrap().contains("crash loop"))
    );
    check_caps(&h, &s, 20_000_000).await;
    check_bytes(&s);
}

async fn healthy_rollout_completes_in_order_within_caps_then_rolls_back(h: Arc<Harness>) {
    let made = releases(&h);
    let (url, _server) = serve(h.state.clone()).await;
    let cap = 3_000_000u64;
    let budget = 2_000_000u64;
    let spec = json!({
        "waves": [
            {"count": 5, "soak_secs": 60, "gates": gates(0.01, 0.05)},
            {"percent": 10, "soak_secs": 60, "gates": gates(0.01, 0.05)},
            {"percent": 50, "soak_secs": 60, "gates": gates(0.01, 0.05)},
            {"percent": 100, "soak_secs": 60, "gates": gates(0.01, 0.05)}
        ],
        "bandwidth": {"egress_cap_bytes_per_sec": cap, "max_concurrent_downloads": 40, "max_concurrent_per_site": 3,
            "link_classes": {
                "ethernet": {"rate_bytes_per_sec": 1_000_000},
                "wifi": {"rate_bytes_per_sec": 400_000},
                "metered-4g": {"rate_bytes_per_sec": 60_000, "budget_bytes_per_day": budget, "cost_per_gb": 5.0}}}
    });
    let mut o = options(&h, &url, &made, 200, spec);
    o.profiles = vec![
        (profile("ethernet", 1_000_000, 0.0, None), 0.6),
        (profile("wifi", 400_000, 0.02, None), 0.3),
        (profile("metered-4g", 60_000, 0.05, Some(budget)), 0.1),
    ];
    let mut fleet = Fleet::setup(o).await.unwrap();
    let preview = fleet.start_rollout().await.unwrap();
    assert_eq!(preview["targets"], 200);
    let done = fleet
        .run_until(|f| f.status() == "completed" && f.quiet())
        .await
        .unwrap();
    let s = fleet.summary().await.unwrap();
    assert!(done, "did not complete: {} {:?}", s.status, s.status_reason);
    // Waves promoted in order.
    let promoted: Vec<i64> = s
        .waves_promoted_at_secs
        .iter()
        .map(|w| w.expect("every wave promoted"))
        .collect();
    assert!(promoted.windows(2).all(|w| w[0] <= w[1]), "{promoted:?}");
    assert_eq!(s.versions.get("1.1.0"), Some(&200), "{:?}", s.versions);
    assert!(s.per_device.iter().all(|d| d.state == "committed"));
    check_caps(&h, &s, cap).await;
    check_bytes(&s);
    // Every wave's devices committed before the next wave's first download.
    let d = detail(&h, &s.rollout_id).await;
    assert_eq!(d["status"], "completed");
    assert!(
        d["waves"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["status"] == "done")
    );

    // Roll back the completed rollout: every device reports the previous
    // version within one poll interval plus the reboot.
    fleet.rollback().await.unwrap();
    let done = fleet
        .run_until(|f| f.rolled_back() && f.quiet())
        .await
        .unwrap();
    let s = fleet.summary().await.unwrap();
    assert!(done);
    assert_eq!(s.versions.get("1.0.0"), Some(&200), "{:?}", s.versions);
    assert!(
        s.per_device.iter().all(|d| d.state == "rolled_back"),
        "{:?}",
        s.per_device.iter().map(|d| &d.state).collect::<Vec<_>>()
    );
    let limit = 15 + 8 + 2;
    assert!(
        s.rollback_secs.unwrap() <= limit,
        "rollback took {:?} s",
        s.rollback_secs
    );
}

async fn metered_budget_splits_a_download_over_two_days(h: Arc<Harness>) {
    let made = releases(&h);
    let from = LocalRelease::open(&made.bundles[0]).unwrap();
    let to = LocalRelease::open(&made.bundles[1]).unwrap();
    let delta: u64 = to
        .fetch_ranges(Some(&from))
        .iter()
        .map(|(s, e)| e - s)
        .sum();
    let budget = delta * 6 / 10;
    let (url, _server) = serve(h.state.clone()).await;
    let spec = json!({
        "waves": [{"percent": 100, "soak_secs": 0}],
        "bandwidth": {"egress_cap_bytes_per_sec": 100_000, "max_concurrent_downloads": 10,
            "link_classes": {"metered-4g": {"rate_bytes_per_sec": 50_000, "budget_bytes_per_day": budget, "cost_per_gb": 5.0}}}
    });
    let mut o = options(&h, &url, &made, 4, spec);
    o.profiles = vec![(profile("metered-4g", 50_000, 0.0, Some(budget)), 1.0)];
    // Start 20 minutes before a UTC midnight: each device can only fetch
    // 60 % today, the rest after midnight.
    let now = h.state.clock.now_ms();
    let day = 86_400_000;
    let mut start = (now.div_euclid(day) + 1) * day - 20 * 60_000;
    if start < now {
        start += day;
    }
    o.start_at_ms = Some(start);
    let mut fleet = Fleet::setup(o).await.unwrap();
    let preview = fleet.start_rollout().await.unwrap();
    for d in preview["devices"].as_array().unwrap() {
        assert_eq!(d["windows"], 2, "two windows on two days: {d}");
    }
    let done = fleet
        .run_until(|f| f.status() == "completed" && f.quiet())
        .await
        .unwrap();
    let s = fleet.summary().await.unwrap();
    assert!(done, "{} {:?}", s.status, s.status_reason);
    assert!(s.sim_secs > 20 * 60, "finished after midnight");
    for d in &s.per_device {
        assert!(
            d.max_day_bytes <= budget,
            "{}: {} > {budget}",
            d.device_id,
            d.max_day_bytes
        );
    }
    let windows: i64 = detail(&h, &s.rollout_id).await["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["windows_given"].as_i64().unwrap())
        .min()
        .unwrap();
    assert!(windows >= 2, "every device needed a second window");
    let used: Vec<(i64, i64)> = sqlx::query("SELECT day, reported FROM device_daily_bytes")
        .fetch_all(h.state.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.try_get("day").unwrap(), r.try_get("reported").unwrap()))
        .collect();
    assert!(used.iter().all(|(_, b)| *b as u64 <= budget), "{used:?}");
    check_caps(&h, &s, 100_000).await;
    check_bytes(&s);
}

async fn server_restart_mid_rollout_loses_nothing(h: Arc<Harness>) {
    let made = releases(&h);
    let (url, server_a) = serve(h.state.clone()).await;
    let spec = json!({
        "waves": [
            {"count": 5, "soak_secs": 30, "gates": gates(0.01, 0.05)},
            {"percent": 50, "soak_secs": 30, "gates": gates(0.01, 0.05)},
            {"percent": 100, "soak_secs": 30, "gates": gates(0.01, 0.05)}
        ],
        "bandwidth": {"egress_cap_bytes_per_sec": 2_000_000, "max_concurrent_downloads": 8, "max_concurrent_per_site": 2,
            "link_classes": {"ethernet": {"rate_bytes_per_sec": 500_000}}}
    });
    let mut o = options(&h, &url, &made, 60, spec);
    o.profiles = vec![(profile("ethernet", 500_000, 0.0, None), 1.0)];
    let mut fleet = Fleet::setup(o).await.unwrap();
    fleet.start_rollout().await.unwrap();
    // Into wave 2, with downloads under way.
    let mid = fleet
        .run_until(|f| {
            f.rollout["current_wave"] == 2
                && f.rollout["states"]["downloading"].as_i64().unwrap_or(0) > 0
        })
        .await
        .unwrap();
    assert!(mid);
    // Stop replica A; start replica B on the same database and blobs.
    server_a.abort();
    let _ = server_a.await;
    let b = AppState::open((*h.state.config).clone()).await.unwrap();
    let (url_b, _server_b) = serve(b.clone()).await;
    fleet.set_server(&url_b);
    let done = fleet
        .run_until(|f| f.status() == "completed" && f.quiet())
        .await
        .unwrap();
    let s = fleet.summary().await.unwrap();
    assert!(done, "{} {:?}", s.status, s.status_reason);
    // B took the lease over after A's expired.
    let holder: String = sqlx::query("SELECT holder FROM scheduler_lease")
        .fetch_one(h.state.store.pool())
        .await
        .unwrap()
        .try_get("holder")
        .unwrap();
    assert_eq!(holder, b.instance_id);
    // No device lost, none assigned twice, none downloaded twice.
    let rows: i64 = sqlx::query("SELECT COUNT(*) AS n FROM rollout_devices")
        .fetch_one(h.state.store.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(rows, 60);
    assert_eq!(s.versions.get("1.1.0"), Some(&60));
    assert!(s.per_device.iter().all(|d| d.state == "committed"));
    check_bytes(&s);
    let b_sum: u64 = s.per_device.iter().map(|d| d.downloaded_bytes).sum();
    assert_eq!(b_sum, s.downloaded_total_bytes);
    b.store.close().await;
}

#[tokio::test]
async fn test_clock_is_off_by_default() {
    let h = Harness::new(Db::Sqlite).await;
    let (s, _) = h
        .call(Method::GET, "/api/v1/test/clock", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/test/clock",
            Some(&h.admin),
            Some(json!({"advance_ms": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    h.finish().await;
}

/// After a rollout completed, its committed devices keep polling at the
/// rollback hint for `rollback-watch-secs`, but a plain deployment made
/// meanwhile still reaches them (the watch does not govern them).
async fn a_completed_rollout_watches_for_a_rollback_without_holding_its_devices(h: Arc<Harness>) {
    let ids = common::upload_sim_releases(&h).await;
    let (_, enrollment) = h.enrollment_token(&h.admin, &["watch"]).await;
    let (device, cred) = h.enroll(&enrollment, "w0", "sim-x86").await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({"version": "1.0.0"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
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
    let tick = |ms: i64| advance(&h, ms);
    tick(1000).await;
    report_through_commit(&h, &cred, &ids[1]).await;
    tick(1000).await;
    assert_eq!(detail(&h, &id).await["status"], "completed");
    // Watched: nothing to do, polls every 2 x rollout-poll-secs.
    assert_eq!(
        poll_hint(&h, &cred).await,
        (StatusCode::NO_CONTENT, Some("10".into()))
    );
    // A deployment of 1.0.0 meanwhile reaches it at once.
    let (s, dep) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&h.admin),
            Some(json!({"release_id": ids[0], "devices": [device]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{dep}");
    let (s, poll) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&cred), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{poll}");
    assert_eq!(poll["release_id"], ids[0].as_str(), "{poll}");
    assert_eq!(
        poll_hint(&h, &cred).await,
        (StatusCode::OK, Some("10".into()))
    );
    // After the watch (30 min), no hint.
    tick(31 * 60 * 1000).await;
    assert_eq!(poll_hint(&h, &cred).await, (StatusCode::OK, None));
}

async fn a_device_offline_until_after_the_rollout_completed_is_updated_when_it_returns(
    h: Arc<Harness>,
) {
    let ids = common::upload_sim_releases(&h).await;
    let tick = |ms: i64| advance(&h, ms);
    let heartbeat = |cred: String| {
        let h = h.clone();
        async move {
            let (s, _) = h
                .call(
                    Method::POST,
                    "/api/v1/device/heartbeat",
                    Some(&cred),
                    Some(json!({"version": "1.0.0"})),
                )
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT);
        }
    };
    let (_, enrollment) = h.enrollment_token(&h.admin, &["late"]).await;
    let (_, online) = h.enroll(&enrollment, "l0", "sim-x86").await;
    let (_, away) = h.enroll(&enrollment, "l1", "sim-x86").await;
    heartbeat(away.clone()).await;
    // l1 goes quiet for longer than offline-after-secs (30 min).
    tick(31 * 60 * 1000).await;
    heartbeat(online.clone()).await;
    let (s, r) = h
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&h.admin),
            // Half committed is enough to close the wave (a big fleet
            // closes its waves with a few devices offline the same way).
            Some(json!({"release_id": ids[1], "waves": [{"percent": 100, "soak_secs": 0,
                "gates": {"promote_max_error_rate": 0.01, "rollback_error_rate": 0.05, "promote_min_committed": 0.5}}]})),
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
    tick(1000).await;
    report_through_commit(&h, &online, &ids[1]).await;
    tick(1000).await;
    // l1 was offline and never started: the wave settled without it.
    let d = detail(&h, &id).await;
    assert_eq!(d["status"], "completed", "{d}");

    // Two hours later l1 comes back: its first poll has nothing yet but
    // asks it back soon; the next pass gives it a window, its next poll
    // the release, and it reports through to committed.
    tick(2 * 3600 * 1000).await;
    let (s, _) = poll_hint(&h, &away).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    tick(1000).await;
    let (s, poll) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&away), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{poll}");
    assert_eq!(poll["release_id"], ids[1].as_str(), "{poll}");
    assert_eq!(poll["action"], "install", "{poll}");
    report_through_commit(&h, &away, &ids[1]).await;
    let d = detail(&h, &id).await;
    assert_eq!(d["states"]["committed"], 2, "{d}");
    // Done: nothing open any more, so the rollout no longer governs l1.
    tick(1000).await;
    let (s, _) = poll_hint(&h, &away).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

/// Advances the test clock by `ms`; the scheduler runs a pass.
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
