//! Attack: a device downloads any release of its organisation, not only
//! the one it was given. A device now downloads only its current
//! deployment's release or the release of a rollout that selected it; any
//! other release answers exactly as one that does not exist (404). On
//! SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::Harness;
use serde_json::json;

both!(a_device_downloads_only_what_it_is_assigned);

/// GET the first 16 bytes of `release`'s bundle as device `cred`: status
/// and body.
async fn fetch(h: &Harness, cred: &str, release: &str) -> (StatusCode, Vec<u8>) {
    let (s, _, body) = h
        .raw(
            Method::GET,
            &format!("/api/v1/device/releases/{release}/bundle"),
            Some(cred),
            &[("range", "bytes=0-15")],
            Body::empty(),
        )
        .await;
    (s, body)
}

async fn a_device_downloads_only_what_it_is_assigned(h: Arc<Harness>) {
    let ids = common::upload_sim_releases(&h).await;
    let (old, new) = (ids[0].clone(), ids[1].clone());
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            Some(json!({"label": "fleet", "allowed_tags": ["wave"], "expires_in_secs": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let mut devices = Vec::new();
    for (name, tags) in [
        ("deployed", json!([])),
        ("in-rollout", json!(["wave"])),
        ("idle", json!([])),
    ] {
        let (s, v) = h
            .call(
                Method::POST,
                "/api/v1/device/enroll",
                None,
                Some(json!({"enrollment_token": token, "device_id": name, "hardware_class": "sim-x86", "tags": tags})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let (pk, cred) = (
            v["id"].as_str().unwrap().to_string(),
            v["credential"].as_str().unwrap().to_string(),
        );
        let (s, _) = h
            .call(
                Method::POST,
                "/api/v1/device/heartbeat",
                Some(&cred),
                Some(json!({"version": "1.0.0", "booted_slot": "A", "primary_slot": "A"})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        devices.push((pk, cred));
    }
    let [(deployed_pk, deployed), (_, in_rollout), (_, idle)] = &devices[..] else {
        unreachable!()
    };

    // Nothing assigned yet: nobody downloads anything.
    for (cred, release) in [(deployed, &new), (in_rollout, &new), (idle, &old)] {
        assert_eq!(fetch(&h, cred, release).await.0, StatusCode::NOT_FOUND);
    }

    // A deployment of 1.1.0 to one device; a rollout of 1.1.0 to the
    // devices tagged `wave`.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&h.admin),
            Some(json!({"release_id": new, "devices": [deployed_pk]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, r) = h
        .call(
            Method::POST,
            "/api/v1/rollouts",
            Some(&h.admin),
            Some(json!({"release_id": new, "selector": {"tags": ["wave"]},
                "waves": [{"percent": 100, "soak_secs": 0}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{r}");
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{}/start", r["id"].as_str().unwrap()),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // What each was given downloads.
    for cred in [deployed, in_rollout] {
        let (s, body) = fetch(&h, cred, &new).await;
        assert_eq!(s, StatusCode::PARTIAL_CONTENT);
        assert_eq!(body.len(), 16);
    }
    // Nothing else does, and the refusal is the answer for a release that
    // does not exist.
    let (_, missing) = fetch(&h, idle, "no-such-release").await;
    for (cred, release) in [
        (idle, &new),
        (idle, &old),
        (deployed, &old),
        (in_rollout, &old),
    ] {
        let (s, body) = fetch(&h, cred, release).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{release}");
        assert_eq!(body, missing, "the refusal tells nothing");
    }
}
