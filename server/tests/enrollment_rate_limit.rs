//! Attack: one token enrolled 300 fake devices in 1.4 s. Enrollment is now
//! rate-limited per token (`[limits] enrollments-per-token-per-minute`)
//! and per source address (`enrollments-per-address-per-minute`, also
//! before any token lookup, so guessing tokens is as slow): over either, a
//! 429 with `Retry-After`, and nothing stored. On SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use common::{Db, Harness};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// `both!` with the enrollment limits set low.
macro_rules! both_limited {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::run(super::Db::Sqlite, super::$name).await; }
        )* }
        mod on_postgres { $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::run(super::Db::Postgres, super::$name).await; }
        )* }
    };
}

both_limited!(
    each_token_is_rate_limited,
    each_source_address_is_rate_limited,
    the_server_limits_by_the_connection_s_address,
);

const PER_TOKEN: u32 = 3;
const PER_ADDRESS: u32 = 4;

async fn run<F, Fut>(db: Db, body: F)
where
    F: FnOnce(Arc<Harness>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    common::run_with(
        db,
        |c| {
            c.limits.enrollments_per_token_per_minute = PER_TOKEN;
            c.limits.enrollments_per_address_per_minute = PER_ADDRESS;
        },
        body,
    )
    .await
}

/// Enrolls `device_id` with `token`, from `source` when given.
async fn enroll(
    h: &Harness,
    token: &str,
    device_id: &str,
    source: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let body = json!({"enrollment_token": token, "device_id": device_id, "hardware_class": "qemu-aarch64"});
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/device/enroll")
        .header("content-type", "application/json");
    if let Some(addr) = source {
        req = req.extension(ConnectInfo(addr.parse::<SocketAddr>().unwrap()));
    }
    let response = h
        .app
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn retry_after(headers: &HeaderMap) -> u64 {
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After: {headers:?}"))
}

async fn each_token_is_rate_limited(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (_, other) = h.enrollment_token(&h.admin, &[]).await;
    for i in 0..PER_TOKEN {
        let (s, _, v) = enroll(&h, &token, &format!("dev-{i}"), None).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, headers, v) = enroll(&h, &token, "one-too-many", None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    let wait = retry_after(&headers);
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(v["detail"]["retry_after_secs"], wait);
    assert_eq!(h.count("devices").await, i64::from(PER_TOKEN));
    // Re-enrolling counts too: the limit is on requests.
    let (s, _, _) = enroll(&h, &token, "dev-0", None).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    // Another token has its own budget.
    let (s, _, v) = enroll(&h, &other, "dev-other", None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

async fn each_source_address_is_rate_limited(h: Arc<Harness>) {
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(h.enrollment_token(&h.admin, &[]).await.1);
    }
    let attacker = "198.51.100.7:40000";
    // Spread over tokens (so no token's limit is reached), and guesses.
    for i in 0..PER_ADDRESS {
        let token = if i == 1 {
            "kxe_guessed".to_string()
        } else {
            tokens[i as usize % 3].clone()
        };
        let (s, _, v) = enroll(&h, &token, &format!("fake-{i}"), Some(attacker)).await;
        assert!(
            s == StatusCode::CREATED || s == StatusCode::UNAUTHORIZED,
            "{s}: {v}"
        );
    }
    // Over: a valid token and a guess alike, from another port too.
    for (token, from) in [
        (tokens[2].as_str(), attacker),
        ("kxe_guessed_again", "198.51.100.7:40001"),
    ] {
        let (s, headers, v) = enroll(&h, token, "fake-more", Some(from)).await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
        assert!(retry_after(&headers) >= 1);
    }
    assert_eq!(h.count("devices").await, i64::from(PER_ADDRESS) - 1);
    // Another address is not held back.
    let (s, _, v) = enroll(&h, &tokens[2], "real-board", Some("203.0.113.9:5000")).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    // An IPv6 host is one /64 (tokens 3 and 4 stay under their own limit).
    for i in 0..PER_ADDRESS {
        let from = format!("[2001:db8:1:2::{:x}]:443", i + 1);
        let token = &tokens[3 + i as usize % 2];
        let (s, _, v) = enroll(&h, token, &format!("v6-{i}"), Some(&from)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, _, _) = enroll(&h, &tokens[0], "v6-more", Some("[2001:db8:1:2::ff]:443")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
}

/// Through a real socket, as `kernex-server` serves: the address is the
/// connection's.
async fn the_server_limits_by_the_connection_s_address(h: Arc<Harness>) {
    let mut tokens = Vec::new();
    for _ in 0..2 {
        tokens.push(h.enrollment_token(&h.admin, &[]).await.1);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/api/v1/device/enroll",
        listener.local_addr().unwrap()
    );
    let app = kernex_server::http::app(h.state.clone());
    let limits = kernex_server::serve::Limits::from(&h.state.config.limits);
    let server = tokio::spawn(async move {
        let _ =
            kernex_server::serve::run(listener, None, app, limits, std::future::pending()).await;
    });
    let statuses = tokio::task::spawn_blocking(move || {
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build(),
        );
        (0..=PER_ADDRESS)
            .map(|i| {
                let body = json!({"enrollment_token": tokens[i as usize % 2],
                    "device_id": format!("tcp-{i}"), "hardware_class": "qemu-aarch64"});
                let response = agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .send(body.to_string())
                    .unwrap();
                (
                    response.status().as_u16(),
                    response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap_or("").to_string()),
                )
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    server.abort();
    let (last, earlier) = statuses.split_last().unwrap();
    assert!(earlier.iter().all(|(s, _)| *s == 201), "{statuses:?}");
    assert_eq!(last.0, 429, "{statuses:?}");
    assert!(last.1.is_some(), "{statuses:?}");
}
