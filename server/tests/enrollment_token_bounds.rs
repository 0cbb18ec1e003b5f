//! Attack: a batch enrollment token that never expires and enrolls any
//! number of devices. An expiry is now required (at most
//! `enrollment-token-max-ttl-days` away), `max_uses` caps the devices a
//! token enrolls, and both hold at enrollment; the use count is shown. On
//! SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::Harness;
use serde_json::{Value, json};

both!(
    an_expiry_is_required_and_bounded,
    the_use_cap_holds,
    an_expired_token_enrolls_nobody,
);

async fn create(h: &Harness, body: Value) -> (StatusCode, Value) {
    h.call(
        Method::POST,
        "/api/v1/enrollment-tokens",
        Some(&h.admin),
        Some(body),
    )
    .await
}

/// Enrolls `device_id` with its own device key (the same key on a retry,
/// as a real device would).
async fn enroll(h: &Harness, token: &str, device_id: &str) -> (StatusCode, Value) {
    let key = h.device_key(device_id);
    let proof = h.proof(&key, device_id).await;
    h.call(
        Method::POST,
        "/api/v1/device/enroll",
        None,
        Some(json!({"enrollment_token": token, "device_id": device_id,
            "hardware_class": "qemu-aarch64", "key": proof})),
    )
    .await
}

async fn an_expiry_is_required_and_bounded(h: Arc<Harness>) {
    let now = kernex_server::store::now_ms();
    let max_days = i64::from(h.state.config.limits.enrollment_token_max_ttl_days);
    for (body, needle) in [
        (json!({"label": "forever"}), "an expiry is required"),
        (
            json!({"label": "zero", "expires_in_secs": 0}),
            "must be positive",
        ),
        (
            json!({"label": "negative", "expires_in_secs": -60}),
            "must be positive",
        ),
        (
            json!({"label": "past", "expires_at": now - 1000}),
            "in the future",
        ),
        (
            json!({"label": "too long", "expires_in_secs": (max_days + 1) * 86_400}),
            "enrollment-token-max-ttl-days",
        ),
        (
            json!({"label": "too long", "expires_at": now + (max_days + 1) * 86_400_000}),
            "enrollment-token-max-ttl-days",
        ),
        (
            json!({"label": "both", "expires_at": now + 60_000, "expires_in_secs": 60}),
            "not both",
        ),
        (
            json!({"label": "no uses", "expires_in_secs": 60, "max_uses": 0}),
            "max_uses",
        ),
    ] {
        let (s, v) = create(&h, body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains(needle),
            "{body}: {v}"
        );
    }
    assert_eq!(h.count("enrollment_tokens").await, 0);
    let (s, v) = create(&h, json!({"label": "ok", "expires_in_secs": 3600})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let at = v["expires_at"].as_i64().unwrap();
    assert!((now + 3_599_000..=now + 3_700_000).contains(&at), "{v}");
    let (s, v) = create(
        &h,
        json!({"label": "max", "expires_at": now + max_days * 86_400_000 - 60_000}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

async fn the_use_cap_holds(h: Arc<Harness>) {
    let (s, v) = create(
        &h,
        json!({"label": "two boards", "expires_in_secs": 3600, "max_uses": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(
        (v["max_uses"].as_i64(), v["uses"].as_i64()),
        (Some(2), Some(0))
    );
    // Concurrent enrollments of five new devices: exactly two get in.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (h, token) = (h.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            enroll(&h, &token, &format!("board-{i}")).await
        }));
    }
    let mut created = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let (s, v) = t.await.unwrap();
        match s {
            StatusCode::CREATED => created.push(format!("board-{i}")),
            StatusCode::FORBIDDEN => {
                assert!(v["detail"].as_str().unwrap().contains("used up"), "{v}")
            }
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(created.len(), 2, "{created:?}");
    assert_eq!(h.count("devices").await, 2);
    // The use count is shown; the check the factory line runs says the
    // token is done.
    let (_, list) = h
        .call(
            Method::GET,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(list[0]["uses"], 2, "{list}");
    assert_eq!(list[0]["max_uses"], 2, "{list}");
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens/check",
            Some(&h.admin),
            Some(json!({"token": token})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // A device that did enroll may enroll again (its answer was lost):
    // not a new use.
    let (s, v) = enroll(&h, &token, &created[0]).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = enroll(&h, &token, "board-late").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (_, list) = h
        .call(
            Method::GET,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(list[0]["uses"], 2, "{list}");
    // The web UI shows the count.
    let cookie = format!("{}={}", kernex_server::auth::SESSION_COOKIE, h.admin);
    let (_, _, page) = h
        .raw(
            Method::GET,
            "/ui/enrollment-tokens",
            None,
            &[("cookie", &cookie)],
            axum::body::Body::empty(),
        )
        .await;
    let page = String::from_utf8_lossy(&page);
    assert!(page.contains("2 of 2"), "{page}");
}

async fn an_expired_token_enrolls_nobody(h: Arc<Harness>) {
    let (s, v) = create(&h, json!({"label": "short", "expires_in_secs": 1})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let (s, v) = enroll(&h, &token, "early").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (s, v) = enroll(&h, &token, "late").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(h.count("devices").await, 1);
    // A token made before expiries were required (none stored) expires
    // enrollment-token-max-ttl-days after it was made.
    let (s, v) = create(&h, json!({"label": "legacy", "expires_in_secs": 3600})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let legacy = v["token"].as_str().unwrap().to_string();
    let max = h.state.config.limits.enrollment_token_max_ttl_ms();
    sqlx::query("UPDATE enrollment_tokens SET expires_at = NULL, created_at = $1 WHERE id = $2")
        .bind(kernex_server::store::now_ms() - max - 1000)
        .bind(v["id"].as_str().unwrap())
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let (s, v) = enroll(&h, &legacy, "legacy-board").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
}
