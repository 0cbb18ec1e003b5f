//! Attack: a device chooses its own site, time zone and link class (which
//! decide when a rollout reaches it, and whether it is spread among
//! others). They now come from the enrollment token or an operator; what
//! the device claims, at enrollment or in a heartbeat, is kept apart as a
//! hint that an operator may accept. On SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::Harness;
use serde_json::{Value, json};

both!(a_device_claim_is_only_a_hint);

async fn link(h: &Harness, pk: &str) -> Value {
    let (s, v) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{pk}/link"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

async fn a_device_claim_is_only_a_hint(h: Arc<Harness>) {
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            Some(json!({"label": "plant 7", "expires_in_secs": 3600,
                "site": "plant-7", "time_zone": "Europe/Berlin", "link_class": "metered-4g"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["site"], "plant-7");
    let token = v["token"].as_str().unwrap().to_string();
    // A bad link on a token is refused, naming the field.
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            Some(json!({"label": "x", "expires_in_secs": 3600, "time_zone": "Mars/Olympus"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["detail"].as_str().unwrap().contains("time_zone"), "{v}");

    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": token, "device_id": "claims-a-lot", "hardware_class": "qemu-aarch64",
                "site": "canary-site", "time_zone": "Pacific/Kiritimati", "link_class": "ethernet"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (pk, cred) = (
        v["id"].as_str().unwrap().to_string(),
        v["credential"].as_str().unwrap().to_string(),
    );
    let seen = link(&h, &pk).await;
    assert_eq!(
        seen["link"],
        json!({"link_class": "metered-4g", "site": "plant-7", "time_zone": "Europe/Berlin"}),
        "the token's"
    );
    assert_eq!(
        seen["hint"],
        json!({"link_class": "ethernet", "site": "canary-site", "time_zone": "Pacific/Kiritimati"})
    );

    // A heartbeat's claim moves the hint, not the link.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({"site": "elsewhere", "time_zone": "Asia/Tokyo"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let seen = link(&h, &pk).await;
    assert_eq!(seen["link"]["site"], "plant-7");
    assert_eq!(seen["hint"]["site"], "elsewhere");

    // The device page shows the claim; read-only cannot accept it.
    let cookie = format!("{}={}", kernex_server::auth::SESSION_COOKIE, h.admin);
    let (_, _, page) = h
        .raw(
            Method::GET,
            &format!("/ui/devices/{pk}"),
            None,
            &[("cookie", &cookie)],
            Body::empty(),
        )
        .await;
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("The device claims")
            && page.contains("elsewhere")
            && page.contains("plant-7"),
        "{page}"
    );
    let ro = h.user("ro@example.com", "read_only").await;
    let accept = format!("/api/v1/devices/{pk}/link/accept");
    let (s, _) = h.call(Method::POST, &accept, Some(&ro), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(link(&h, &pk).await["link"]["site"], "plant-7");

    // The operator accepts: the claimed fields replace the link's.
    let (s, v) = h.call(Method::POST, &accept, Some(&h.admin), None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        link(&h, &pk).await["link"],
        json!({"link_class": "metered-4g", "site": "elsewhere", "time_zone": "Asia/Tokyo"})
    );

    // A device that claimed nothing has nothing to accept.
    let (other, _) = h.enroll(&token, "quiet", "qemu-aarch64").await;
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/devices/{other}/link/accept"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(link(&h, &other).await["hint"].is_null());
}
