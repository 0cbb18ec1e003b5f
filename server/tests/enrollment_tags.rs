//! Attack: a token holder enrolls devices with tags of its choice (e.g.
//! `canary`, to be picked for a rollout's first wave). A device may now
//! ask only for tags within the token's set (its `tags` and
//! `allowed_tags`); any other is refused, naming the tag, and nothing is
//! stored. On SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::Harness;
use serde_json::{Value, json};

both!(tags_outside_the_token_set_are_refused);

async fn enroll(h: &Harness, token: &str, device_id: &str, tags: &[&str]) -> (StatusCode, Value) {
    h.call(
        Method::POST,
        "/api/v1/device/enroll",
        None,
        Some(json!({"enrollment_token": token, "device_id": device_id,
            "hardware_class": "qemu-aarch64", "tags": tags})),
    )
    .await
}

async fn device_tags(h: &Harness, device_id: &str) -> Vec<String> {
    let (_, list) = h
        .call(Method::GET, "/api/v1/devices", Some(&h.admin), None)
        .await;
    let d = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device_id)
        .unwrap_or_else(|| panic!("{device_id} not listed: {list}"));
    serde_json::from_value(d["tags"].clone()).unwrap()
}

async fn tags_outside_the_token_set_are_refused(h: Arc<Harness>) {
    // A batch token: every device gets line-2, a device may ask for lab.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            Some(
                json!({"label": "line 2", "tags": ["line-2"], "allowed_tags": ["lab"],
                "expires_in_secs": 3600}),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["allowed_tags"], json!(["lab"]));
    let token = v["token"].as_str().unwrap().to_string();

    for (device, tags) in [
        ("fake-1", vec!["canary"]),
        ("fake-2", vec!["lab", "canary"]),
        ("fake-3", vec!["site-b"]),
    ] {
        let (s, v) = enroll(&h, &token, device, &tags).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{tags:?}: {v}");
        let detail = v["detail"].as_str().unwrap();
        let bad = tags.iter().find(|t| **t != "lab").unwrap();
        assert!(detail.contains(&format!("\"{bad}\"")), "{detail}");
    }
    assert_eq!(h.count("devices").await, 0, "nothing refused is stored");
    assert_eq!(h.count("device_tags").await, 0);

    // Within the set: granted.
    let (s, v) = enroll(&h, &token, "board-1", &["lab"]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(device_tags(&h, "board-1").await, vec!["lab", "line-2"]);
    let (s, v) = enroll(&h, &token, "board-2", &["line-2"]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(device_tags(&h, "board-2").await, vec!["line-2"]);

    // A token without allowed tags lets a device ask for none beyond its own.
    let (_, plain) = h.enrollment_token(&h.admin, &["site-a"]).await;
    let (s, v) = enroll(&h, &plain, "fake-4", &["canary"]).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("\"canary\""), "{v}");
    let (s, v) = enroll(&h, &plain, "board-3", &[]).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(device_tags(&h, "board-3").await, vec!["site-a"]);
}
