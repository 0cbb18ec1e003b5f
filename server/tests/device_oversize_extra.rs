//! Attack: a device stores 256 KiB of free-form `extra` with every
//! heartbeat (and as much `hardware_metadata` at enrollment). Both are now
//! bounded (`[limits] max-heartbeat-extra-bytes`,
//! `max-hardware-metadata-bytes`, 4 KiB by default): over it, a 413 that
//! names the field and the limit, and nothing is stored. On SQLite and
//! PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::Harness;
use serde_json::json;

both!(oversize_extra_and_metadata_are_refused);

async fn oversize_extra_and_metadata_are_refused(h: Arc<Harness>) {
    let limit = h.state.config.limits.max_heartbeat_extra_bytes;
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (_, cred) = h.enroll(&token, "chatty", "qemu-aarch64").await;
    let heartbeat = |extra: serde_json::Value| {
        let h = h.clone();
        let cred = cred.clone();
        async move {
            h.call(
                Method::POST,
                "/api/v1/device/heartbeat",
                Some(&cred),
                Some(json!({"version": "1.0.0", "extra": extra})),
            )
            .await
        }
    };
    // Within the limit: stored.
    let (s, v) = heartbeat(json!({"ab": {"slot": "A"}, "note": "x".repeat(limit / 2)})).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(h.count("heartbeats").await, 1);
    // 64 KiB (well under the JSON body limit): refused, clearly.
    let (s, v) = heartbeat(json!({"blob": "x".repeat(64 << 10)})).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(
        detail.contains("extra")
            && detail.contains(&limit.to_string())
            && detail.contains("max-heartbeat-extra-bytes"),
        "{detail}"
    );
    // Just over, in many small keys: refused too.
    let many: serde_json::Map<String, serde_json::Value> = (0..limit / 8)
        .map(|i| (format!("k{i:05}"), json!(i)))
        .collect();
    let (s, _) = heartbeat(serde_json::Value::Object(many)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(h.count("heartbeats").await, 1, "nothing refused is stored");

    // Enrollment's hardware_metadata.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": token, "device_id": "bloated", "hardware_class": "qemu-aarch64",
                "hardware_metadata": {"dump": "y".repeat(64 << 10)}})),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("max-hardware-metadata-bytes"),
        "{v}"
    );
    assert_eq!(h.count("devices").await, 1);
}
