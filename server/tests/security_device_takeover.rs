//! Attack (issue #20): a holder of the batch enrollment token enrolls an
//! enrolled device id again. Before device keys that returned 200 and a
//! new credential, and the real device's credential got 401. Now the
//! request gets no credential: it waits for an operator (202), the real
//! device keeps working, and operators approve or reject it (audited).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::Harness;
use kernex_protocol::device_key::{DeviceKey, fingerprint};
use serde_json::{Value, json};

both!(
    a_token_holder_gets_no_credential_and_the_device_keeps_working,
    operators_approve_or_reject_a_pending_re_enrollment,
);

async fn enroll_with(
    h: &Harness,
    token: &str,
    device_id: &str,
    key: &DeviceKey,
) -> (StatusCode, Value) {
    let proof = h.proof(key, device_id).await;
    h.call(
        Method::POST,
        "/api/v1/device/enroll",
        None,
        Some(json!({"enrollment_token": token, "device_id": device_id, "hardware_class": "qemu-aarch64", "key": proof})),
    )
    .await
}

async fn report(h: &Harness, credential: &str, state: &str) -> StatusCode {
    h.call(
        Method::POST,
        "/api/v1/device/report",
        Some(credential),
        Some(json!({"state": state})),
    )
    .await
    .0
}

async fn poll(h: &Harness, credential: &str) -> StatusCode {
    h.call(Method::GET, "/api/v1/device/poll", Some(credential), None)
        .await
        .0
}

async fn requests(h: &Harness, status: &str) -> Vec<Value> {
    let (s, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/enrollment-requests?status={status}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v.as_array().unwrap().clone()
}

async fn a_token_holder_gets_no_credential_and_the_device_keeps_working(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, credential) = h.enroll(&token, "sn-7", "qemu-aarch64").await;
    assert_eq!(poll(&h, &credential).await, StatusCode::NO_CONTENT);

    // The attacker: the same batch token, the same device id, its own key.
    let attacker = DeviceKey::generate().unwrap();
    for _ in 0..3 {
        let (s, v) = enroll_with(&h, &token, "sn-7", &attacker).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        assert!(v.get("credential").is_none(), "{v}");
        assert!(v["request_id"].as_str().is_some(), "{v}");
    }
    // Without a key, as before device keys: refused, no credential either.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": token, "device_id": "sn-7", "hardware_class": "qemu-aarch64"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v.get("credential").is_none(), "{v}");
    // Nor can it sign for the device's id with its own key.
    let (s, v) = h.authenticate(&attacker, &pk).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    // A proof made for another device id is refused outright.
    let stolen = h.proof(&attacker, "sn-8").await;
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": token, "device_id": "sn-7", "hardware_class": "qemu-aarch64", "key": stolen})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");

    // The real device keeps working: its token, and a fresh one from its
    // key.
    assert_eq!(poll(&h, &credential).await, StatusCode::NO_CONTENT);
    assert_eq!(
        report(&h, &credential, "downloading").await,
        StatusCode::NO_CONTENT
    );
    let (s, fresh) = h.authenticate(&h.device_key("sn-7"), &pk).await;
    assert_eq!(s, StatusCode::OK, "{fresh}");
    assert_eq!(fresh["id"], pk.as_str());
    assert_eq!(
        poll(&h, fresh["token"].as_str().unwrap()).await,
        StatusCode::NO_CONTENT
    );
    // The device re-enrolling with its own key is renewed (200).
    let (pk2, renewed) = h.enroll(&token, "sn-7", "qemu-aarch64").await;
    assert_eq!(pk2, pk);
    assert_eq!(poll(&h, &renewed).await, StatusCode::NO_CONTENT);

    // One device; one pending request, which operators see.
    assert_eq!(h.count("devices").await, 1);
    let waiting = requests(&h, "pending").await;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["device_id"], "sn-7");
    assert_eq!(waiting[0]["device_pk"], pk.as_str());
    assert_eq!(
        waiting[0]["key_fingerprint"],
        fingerprint(&attacker.public_key_hex().unwrap()).as_str()
    );
    let (_, audit) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "device.re-enroll-pending"),
        "{audit}"
    );
    // The devices page lists it for a decision.
    let (s, _, page) = h
        .raw(
            Method::GET,
            "/ui/devices",
            None,
            &[("cookie", &format!("kernex_session={}", h.admin))],
            axum::body::Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let page = String::from_utf8(page).unwrap();
    assert!(page.contains("Enrollment requests"), "{page}");
    assert!(page.contains(waiting[0]["id"].as_str().unwrap()), "{page}");
}

async fn operators_approve_or_reject_a_pending_re_enrollment(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, credential) = h.enroll(&token, "sn-9", "qemu-aarch64").await;
    let stranger = DeviceKey::generate().unwrap();
    let (s, v) = enroll_with(&h, &token, "sn-9", &stranger).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let stranger_request = v["request_id"].as_str().unwrap().to_string();

    // Read-only operators see, but cannot decide.
    let viewer = h.user("viewer@example.com", "read_only").await;
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/enrollment-requests/{stranger_request}/approve"),
            Some(&viewer),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Rejected: the same key is refused from now on, with the reason.
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/enrollment-requests/{stranger_request}/reject"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v) = enroll_with(&h, &token, "sn-9", &stranger).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v.get("credential").is_none());
    assert_eq!(requests(&h, "rejected").await.len(), 1);
    assert_eq!(poll(&h, &credential).await, StatusCode::NO_CONTENT);

    // The board was re-flashed (a new key, same id): approved, its key
    // becomes the device's and the old key's tokens stop at once.
    let reflashed = DeviceKey::generate().unwrap();
    let (s, v) = enroll_with(&h, &token, "sn-9", &reflashed).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let request = v["request_id"].as_str().unwrap().to_string();
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/enrollment-requests/{request}/approve"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    // Decided once.
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/enrollment-requests/{request}/reject"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(poll(&h, &credential).await, StatusCode::UNAUTHORIZED);
    let (s, _) = h.authenticate(&h.device_key("sn-9"), &pk).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, v) = enroll_with(&h, &token, "sn-9", &reflashed).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], pk.as_str());
    let token2 = v["credential"].as_str().unwrap();
    assert_eq!(poll(&h, token2).await, StatusCode::NO_CONTENT);
    assert!(requests(&h, "pending").await.is_empty());
    let (_, audit) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"device.enrollment-approve"),
        "{actions:?}"
    );
    assert!(actions.contains(&"device.enrollment-reject"), "{actions:?}");
}
