//! Attack (issue #20): a device credential that leaks (a log, a backup,
//! a proxy) worked forever. Now a device's credential is an access token
//! that expires within minutes (`device-token-secs`, default 900): here
//! 2 s, and every device endpoint refuses it afterwards, whether the
//! server's caches hold it or not. The device's key signs for a new one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::Harness;
use kernex_server::config::Config;
use serde_json::json;

mod two_second_tokens {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leaked_access_token_expires_sqlite() {
        common::run_with(
            common::Db::Sqlite,
            |c| c.device_token_secs = 2,
            leaked_token,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leaked_access_token_expires_postgres() {
        common::run_with(
            common::Db::Postgres,
            |c| c.device_token_secs = 2,
            leaked_token,
        )
        .await;
    }
}

#[test]
fn access_tokens_live_minutes_by_default_and_the_setting_is_bounded() {
    assert_eq!(Config::default().device_token_secs, 15 * 60);
    assert_eq!(Config::from_toml("").unwrap().device_token_secs, 15 * 60);
    assert_eq!(
        Config::from_toml("device-token-secs = 60")
            .unwrap()
            .device_token_secs,
        60
    );
    for bad in ["device-token-secs = 0", "device-token-secs = 86401"] {
        let e = Config::from_toml(bad).unwrap_err();
        assert!(format!("{e:#}").contains("device-token-secs"), "{e:#}");
    }
}

/// Every device endpoint with `token`: the statuses.
async fn statuses(h: &Harness, token: &str) -> Vec<(String, StatusCode)> {
    let mut out = Vec::new();
    for (method, path, body) in [
        (Method::GET, "/api/v1/device/poll", None),
        (
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(json!({"version": "1.0.0"})),
        ),
        (
            Method::POST,
            "/api/v1/device/report",
            Some(json!({"state": "downloading"})),
        ),
        (
            Method::POST,
            "/api/v1/device/logs",
            Some(json!({"entries": [{"level": "info", "message": "hello"}]})),
        ),
    ] {
        let (s, _) = h.call(method.clone(), path, Some(token), body).await;
        out.push((format!("{method} {path}"), s));
    }
    let (s, _, _) = h
        .raw(
            Method::GET,
            "/api/v1/device/releases/none/bundle",
            Some(token),
            &[],
            Body::empty(),
        )
        .await;
    out.push(("GET bundle".into(), s));
    out
}

async fn leaked_token(h: Arc<Harness>) {
    let (_, enrollment) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, leaked) = h.enroll(&enrollment, "leaky", "qemu-aarch64").await;
    assert!(leaked.starts_with("kxa_"), "an access token: {leaked}");
    // Fresh, it works everywhere (and is now in the server's caches).
    for (what, s) in statuses(&h, &leaked).await {
        assert!(
            s.is_success() || s == StatusCode::NOT_FOUND,
            "{what}: {s} with a fresh token"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    for (what, s) in statuses(&h, &leaked).await {
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{what} with the expired token");
    }
    // The device signs for a new one with its key; the old stays dead.
    let (s, fresh) = h.authenticate(&h.device_key("leaky"), &pk).await;
    assert_eq!(s, StatusCode::OK, "{fresh}");
    assert_eq!(fresh["expires_in_secs"], 2);
    let token = fresh["token"].as_str().unwrap();
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(token), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&leaked), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Only hashes are stored, and expired tokens are pruned as new ones
    // are issued.
    use sqlx::Row;
    let rows = sqlx::query("SELECT token_hash FROM device_access_tokens WHERE device_pk = $1")
        .bind(&pk)
        .fetch_all(h.state.store.pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "the expired token was pruned");
    let stored: String = rows[0].try_get("token_hash").unwrap();
    assert_ne!(stored, token);
    assert_eq!(stored, kernex_server::store::secret_hash(token));
}
