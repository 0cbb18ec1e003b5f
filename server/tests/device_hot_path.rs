//! What the device hot path keeps in memory stays correct: the last-seen
//! write-behind (readers see every poll; a flush never moves a time
//! backwards), the credential cache (revocation and re-enrollment take
//! effect at once), the poll cache (every write that changes an answer
//! drops it, on this replica and on the others), and the audit chain under
//! concurrent enrollment. Each test runs on SQLite and on PostgreSQL,
//! except the one about replicas (PostgreSQL only: a SQLite store is one
//! server's).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::Harness;
use kernex_server::store::secret_hash;
use serde_json::json;
use sqlx::Row;
use tower::ServiceExt;

both!(
    concurrent_enrollment_keeps_the_audit_chain,
    polls_are_seen_by_every_reader,
    pending_poll_times_never_move_last_seen_back,
    revocation_takes_effect_at_once,
    re_enrollment_retires_the_old_credential_at_once,
    cached_polls_follow_every_write,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_drop_what_another_replica_changed() {
    common::run(common::Db::Postgres, replicas_body).await;
}

async fn last_seen_in_store(h: &Harness, pk: &str) -> Option<i64> {
    sqlx::query("SELECT last_seen_at FROM devices WHERE id = $1")
        .bind(pk)
        .fetch_one(h.state.store.pool())
        .await
        .unwrap()
        .try_get("last_seen_at")
        .unwrap()
}

async fn poll(h: &Harness, cred: &str) -> StatusCode {
    h.call(Method::GET, "/api/v1/device/poll", Some(cred), None)
        .await
        .0
}

/// 50 devices enroll at once: every one succeeds (no 500 from the audit
/// chain), and the chain has one entry each and verifies.
async fn concurrent_enrollment_keeps_the_audit_chain(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let before = h.count("audit_log").await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let h = h.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            h.call(
                Method::POST,
                "/api/v1/device/enroll",
                None,
                Some(json!({"enrollment_token": token, "device_id": format!("rush-{i:02}"), "hardware_class": "qemu-aarch64"})),
            )
            .await
        }));
    }
    for task in tasks {
        let (s, body) = task.await.unwrap();
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    assert_eq!(h.count("devices").await, 50);
    assert_eq!(h.count("audit_log").await, before + 50);
    let org: String = sqlx::query("SELECT id FROM organizations")
        .fetch_one(h.state.store.pool())
        .await
        .unwrap()
        .try_get("id")
        .unwrap();
    assert_eq!(
        kernex_server::audit::verify_incremental(&h.state.store, &org)
            .await
            .unwrap(),
        None
    );
    let (_, page) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    assert_eq!(page["chain_broken_at"], serde_json::Value::Null);
}

/// A poll is written behind, yet the device list, the device detail and
/// the scheduler see it, and a flush writes it; polls closer together than
/// the resolution are written once.
async fn polls_are_seen_by_every_reader(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, cred) = h.enroll(&token, "poller", "qemu-aarch64").await;
    let res = h.state.last_seen.resolution_ms();
    assert_eq!(res, kernex_server::last_seen::MAX_RESOLUTION_MS);
    assert_eq!(last_seen_in_store(&h, &pk).await, None);
    assert_eq!(poll(&h, &cred).await, StatusCode::NO_CONTENT);
    // Written behind: not in the store yet, pending in memory.
    assert_eq!(h.state.last_seen.pending(), 1);
    assert_eq!(last_seen_in_store(&h, &pk).await, None);
    // The device list sees it (it flushes first): seen, so not offline.
    let (s, list) = h
        .call(
            Method::GET,
            "/api/v1/devices?status=offline",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list, json!([]));
    let seen = last_seen_in_store(&h, &pk).await.expect("flushed");
    assert_eq!(h.state.last_seen.pending(), 0);
    // Another poll within the resolution: nothing to write.
    assert_eq!(poll(&h, &cred).await, StatusCode::NO_CONTENT);
    assert_eq!(h.state.last_seen.pending(), 0);
    assert!(h.state.last_seen.record(&pk, seen + res - 1));
    assert_eq!(h.state.last_seen.pending(), 0);
    // One a resolution later is pending, and the detail shows it.
    assert!(h.state.last_seen.record(&pk, seen + res));
    assert_eq!(h.state.last_seen.pending(), 1);
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{pk}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(d["last_seen_at"].as_i64(), Some(seen + res));
    // The scheduler's pass flushes too.
    assert!(h.state.last_seen.record(&pk, seen + 2 * res));
    assert_eq!(h.state.last_seen.pending(), 1);
    kernex_server::service::rollouts::scheduler::tick(&h.state)
        .await
        .unwrap();
    assert_eq!(h.state.last_seen.pending(), 0);
    assert_eq!(last_seen_in_store(&h, &pk).await, Some(seen + 2 * res));
    // Many devices in one flush (more than one statement's worth).
    let many: Vec<String> = (0..1234).map(|i| format!("{pk}-{i}")).collect();
    for (i, p) in many.iter().enumerate() {
        assert!(h.state.last_seen.record(p, i as i64));
    }
    assert!(h.state.last_seen.record(&pk, i64::MAX / 2));
    assert_eq!(h.state.last_seen.flush(&h.state.store).await.unwrap(), 1235);
    assert_eq!(last_seen_in_store(&h, &pk).await, Some(i64::MAX / 2));
    // Devices written long before the newest time no longer hold a poll
    // back: a time just after theirs is written again.
    assert!(h.state.last_seen.record(&many[0], 1));
    assert_eq!(h.state.last_seen.pending(), 1);
}

/// Heartbeats write last_seen_at directly; an older poll time still
/// pending does not overwrite a newer one.
async fn pending_poll_times_never_move_last_seen_back(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, cred) = h.enroll(&token, "beater", "qemu-aarch64").await;
    assert!(h.state.last_seen.record(&pk, 1000));
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let after_heartbeat = last_seen_in_store(&h, &pk).await.unwrap();
    assert!(after_heartbeat > 1000);
    h.state.last_seen.flush(&h.state.store).await.unwrap();
    assert_eq!(last_seen_in_store(&h, &pk).await, Some(after_heartbeat));
}

/// A device whose credential is cached is refused as soon as it is
/// revoked, on every device endpoint.
async fn revocation_takes_effect_at_once(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, cred) = h.enroll(&token, "doomed", "qemu-aarch64").await;
    let (_, other) = h.enroll(&token, "bystander", "qemu-aarch64").await;
    assert_eq!(poll(&h, &cred).await, StatusCode::NO_CONTENT);
    assert_eq!(poll(&h, &other).await, StatusCode::NO_CONTENT);
    assert!(h.state.credentials.len() >= 2, "cached");
    revoke(&h, &pk).await;
    assert_eq!(poll(&h, &cred).await, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Other devices are not affected.
    assert_eq!(poll(&h, &other).await, StatusCode::NO_CONTENT);
}

/// Re-enrolling rotates the credential: the old one, cached, stops
/// working at once; the new one works.
async fn re_enrollment_retires_the_old_credential_at_once(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, old) = h.enroll(&token, "reborn", "qemu-aarch64").await;
    assert_eq!(poll(&h, &old).await, StatusCode::NO_CONTENT);
    let (pk2, new) = h.enroll(&token, "reborn", "qemu-aarch64").await;
    assert_eq!(pk, pk2);
    assert_ne!(old, new);
    assert_eq!(poll(&h, &old).await, StatusCode::UNAUTHORIZED);
    assert_eq!(poll(&h, &new).await, StatusCode::NO_CONTENT);
}

async fn revoke(h: &Harness, pk: &str) {
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/devices/{pk}/revoke"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
}

async fn deploy(h: &Harness, release: &str, device: &str) {
    let (s, dep) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&h.admin),
            Some(json!({"release_id": release, "devices": [device]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{dep}");
}

async fn heartbeat(h: &Harness, cred: &str, version: &str) {
    let (s, body) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(cred),
            Some(json!({"version": version})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
}

/// The golden release (hardware class qemu-aarch64): its id and version.
async fn upload_release(h: &Harness) -> (String, String) {
    let (s, rel) = h
        .upload(
            &h.admin,
            std::fs::read(common::golden("valid.kxb")).unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{rel}");
    (
        rel["id"].as_str().unwrap().into(),
        rel["version"].as_str().unwrap().into(),
    )
}

/// A poll's answer is cached, and each write that changes it drops it: an
/// operator's deployment, the device's heartbeat with another version.
/// A heartbeat that repeats the version keeps it.
async fn cached_polls_follow_every_write(h: Arc<Harness>) {
    let (release, version) = upload_release(&h).await;
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, cred) = h.enroll(&token, "cached", "qemu-aarch64").await;
    let hash = secret_hash(&cred);
    assert_eq!(poll(&h, &cred).await, StatusCode::NO_CONTENT);
    assert!(
        h.state.poll_cache.get(&hash).is_some(),
        "the poll is cached"
    );
    assert_eq!(poll(&h, &cred).await, StatusCode::NO_CONTENT);

    deploy(&h, &release, &pk).await;
    assert!(
        h.state.poll_cache.get(&hash).is_none(),
        "dropped by the deployment"
    );
    let (s, desired) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&cred), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(desired["version"], version.as_str());
    assert!(h.state.poll_cache.get(&hash).is_some(), "cached again");
    assert_eq!(poll(&h, &cred).await, StatusCode::OK);

    heartbeat(&h, &cred, &version).await;
    assert_eq!(
        poll(&h, &cred).await,
        StatusCode::NO_CONTENT,
        "it runs it now"
    );
    heartbeat(&h, &cred, &version).await;
    assert!(
        h.state.poll_cache.get(&hash).is_some(),
        "the same version again changes nothing"
    );
    // Rolled back by hand to something else: the release is wanted again.
    heartbeat(&h, &cred, "0.0.1").await;
    assert_eq!(poll(&h, &cred).await, StatusCode::OK);
    // Six polls: four read the store (the first, after the deployment,
    // after each version change), two did not.
    assert_eq!(h.state.metrics.poll_cache_misses.get(), 4);
    assert_eq!(h.state.metrics.poll_cache_hits.get(), 2);
}

async fn poll_on(app: &Router, cred: &str) -> StatusCode {
    let req = Request::builder()
        .uri("/api/v1/device/poll")
        .header("authorization", format!("Bearer {cred}"))
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

/// Waits until `what` holds, at most 10 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("not within 10 s: {what}");
}

/// Two replicas on one PostgreSQL database: what one writes reaches what
/// the other cached (NOTIFY), for a deployment and for a revocation.
async fn replicas_body(h: Arc<Harness>) {
    let second = kernex_server::AppState::open((*h.state.config).clone())
        .await
        .unwrap();
    let listener = common::start_poll_cache_listener(&second).await;
    let app2 = kernex_server::http::app(second.clone());

    let (release, _) = upload_release(&h).await;
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, cred) = h.enroll(&token, "roaming", "qemu-aarch64").await;
    let hash = secret_hash(&cred);
    // Replica 2 hears of replica 1's writes (the enrollment) a moment
    // later, and drops what it cached in between: poll until it keeps it.
    let mut cached = false;
    for _ in 0..20 {
        assert_eq!(poll_on(&app2, &cred).await, StatusCode::NO_CONTENT);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if second.poll_cache.get(&hash).is_some() {
            cached = true;
            break;
        }
    }
    assert!(cached, "cached on replica 2");

    deploy(&h, &release, &pk).await;
    eventually("replica 2 drops its poll cache", || {
        second.poll_cache.get(&hash).is_none()
    })
    .await;
    assert_eq!(poll_on(&app2, &cred).await, StatusCode::OK);
    assert!(second.poll_cache.get(&hash).is_some());
    assert!(second.credentials.get(&hash).is_some());

    revoke(&h, &pk).await;
    eventually("replica 2 forgets the revoked credential", || {
        second.poll_cache.get(&hash).is_none() && second.credentials.get(&hash).is_none()
    })
    .await;
    assert_eq!(poll_on(&app2, &cred).await, StatusCode::UNAUTHORIZED);

    listener.abort();
    second.store.close().await;
}
