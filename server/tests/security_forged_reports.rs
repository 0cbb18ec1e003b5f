//! Attack (issue #20): reports forged as an enrolled device. Before device
//! keys, the batch token bought the device's credential (re-enrollment),
//! and one forged `report {"state":"failed"}` marked its release unstable
//! and its status `error`. Now every way in without the device's key is
//! refused and leaves the device's record as it was: the token holder
//! gets no credential, a made-up, expired or replayed token or signature
//! gets 401, and a signature made for one purpose is not one for another.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::Harness;
use kernex_protocol::api::{auth_message, enroll_message};
use kernex_protocol::device_key::DeviceKey;
use serde_json::{Value, json};

mod short_tokens {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forged_reports_need_the_device_key_sqlite() {
        common::run_with(
            common::Db::Sqlite,
            |c| c.device_token_secs = 1,
            forged_reports,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forged_reports_need_the_device_key_postgres() {
        common::run_with(
            common::Db::Postgres,
            |c| c.device_token_secs = 1,
            forged_reports,
        )
        .await;
    }
}

async fn report(h: &Harness, credential: &str) -> (StatusCode, Value) {
    h.call(
        Method::POST,
        "/api/v1/device/report",
        Some(credential),
        Some(json!({"state": "failed", "reason": "forged"})),
    )
    .await
}

async fn status_of(h: &Harness, pk: &str) -> String {
    let (s, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{pk}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{d}");
    d["status"].as_str().unwrap().to_string()
}

async fn forged_reports(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, expired) = h.enroll(&token, "edge-1", "qemu-aarch64").await;
    let before = status_of(&h, &pk).await;
    assert_ne!(before, "error");

    // 1. The batch token's holder: no credential to report with.
    let thief = DeviceKey::generate().unwrap();
    let proof = h.proof(&thief, "edge-1").await;
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": token, "device_id": "edge-1", "hardware_class": "qemu-aarch64", "key": proof})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert!(v.get("credential").is_none());

    // 2. A stolen access token, once expired (1 s here).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(report(&h, &expired).await.0, StatusCode::UNAUTHORIZED);

    // 3. Made-up tokens of either kind.
    for fake in [
        "kxa_".to_string() + &"0".repeat(64),
        "kxd_".to_string() + &"0".repeat(64),
        "nonsense".into(),
    ] {
        assert_eq!(
            report(&h, &fake).await.0,
            StatusCode::UNAUTHORIZED,
            "{fake}"
        );
    }

    // 4. Another key signing for the device's id.
    let (s, _) = h.authenticate(&thief, &pk).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // 5. The device's own signature, replayed: each nonce works once.
    let key = h.device_key("edge-1");
    let nonce = h.nonce().await;
    let auth = serde_json::to_value(key.auth(&pk, &nonce).unwrap()).unwrap();
    let (s, first) = h
        .call(
            Method::POST,
            "/api/v1/device/auth",
            None,
            Some(auth.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{first}");
    let (s, _) = h
        .call(Method::POST, "/api/v1/device/auth", None, Some(auth))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a replayed signature");

    // 6. A nonce the server never issued, signed by the right key.
    let made_up = "ab".repeat(32);
    let auth = serde_json::to_value(key.auth(&pk, &made_up).unwrap()).unwrap();
    let (s, _) = h
        .call(Method::POST, "/api/v1/device/auth", None, Some(auth))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "an unissued nonce");

    // 7. A signature made for enrollment is not one for authentication.
    let nonce = h.nonce().await;
    let public = key.public_key_hex().unwrap();
    let enroll_sig = key
        .sign(&enroll_message("edge-1", &nonce, &public))
        .unwrap();
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/auth",
            None,
            Some(json!({"id": pk, "nonce": nonce, "signature": enroll_sig})),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "a signature for another purpose"
    );
    // (and the message really differs)
    assert_ne!(
        enroll_message("edge-1", &nonce, &public),
        auth_message(&pk, &nonce)
    );

    // None of it reached the device's record.
    assert_eq!(
        status_of(&h, &pk).await,
        before,
        "no forged report was stored"
    );

    // The device itself reports with the token its key signed for.
    let genuine = first["token"].as_str().unwrap();
    let (s, v) = report(&h, genuine).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(status_of(&h, &pk).await, "error");
}
