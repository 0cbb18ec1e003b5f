//! `Idempotency-Key`: each leak the issue found is a test. Keys are scoped
//! by (organisation, principal) after authentication; 401/403/429 and
//! answers with secrets are never stored; a dropped request or a stale
//! in-progress key does not leave the key stuck at 409.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use common::Harness;
use serde_json::{Value, json};
use sqlx::Row;

both!(
    a_cookie_sessions_answer_goes_to_no_one_else,
    an_anonymous_401_is_not_replayed_to_the_user,
    a_devices_429_is_not_stored,
    a_dropped_request_releases_its_key,
    a_stale_in_progress_key_is_taken_over,
    enrollment_token_answers_are_never_stored,
);

/// A JSON POST with the session cookie (as the web UI's scripts send it).
async fn cookie_post(
    h: &Harness,
    path: &str,
    session: Option<&str>,
    key: &str,
    body: &Value,
) -> (StatusCode, HeaderMap, Value) {
    let cookie = session.map(|s| format!("kernex_session={s}"));
    let mut headers = vec![
        ("content-type", "application/json"),
        ("idempotency-key", key),
    ];
    if let Some(c) = &cookie {
        headers.push(("cookie", c.as_str()));
    }
    let (s, hd, bytes) = h
        .raw(
            Method::POST,
            path,
            None,
            &headers,
            Body::from(body.to_string()),
        )
        .await;
    (s, hd, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A second organisation with its own admin; the admin's session token.
async fn org_b(h: &Harness) -> String {
    let org = kernex_server::create_organization(&h.state.store, "org-b")
        .await
        .unwrap();
    kernex_server::auth::create_user(
        &h.state.store,
        &org,
        "admin@b.example",
        "correct horse battery",
        kernex_server::auth::Role::Admin,
    )
    .await
    .unwrap();
    h.login("org-b", "admin@b.example", "correct horse battery")
        .await
}

async fn stored_keys(h: &Harness, key: &str) -> Vec<(i64, String)> {
    sqlx::query("SELECT status, body FROM idempotency_keys WHERE idem_key = $1")
        .bind(key)
        .fetch_all(h.state.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| (r.try_get("status").unwrap(), r.try_get("body").unwrap()))
        .collect()
}

async fn a_cookie_sessions_answer_goes_to_no_one_else(h: Arc<Harness>) {
    let body =
        json!({"email": "a-only@example.com", "password": "correct horse battery", "role": "ops"});
    let (s, hd, created) = cookie_post(&h, "/api/v1/users", Some(&h.admin), "k-1", &body).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert!(hd.get("idempotent-replayed").is_none());
    // The same session's retry is replayed.
    let (s, hd, again) = cookie_post(&h, "/api/v1/users", Some(&h.admin), "k-1", &body).await;
    assert_eq!((s, &again), (StatusCode::CREATED, &created));
    assert_eq!(hd["idempotent-replayed"], "true");
    // No credentials: refused, not handed org A's answer.
    let (s, hd, anon) = cookie_post(&h, "/api/v1/users", None, "k-1", &body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{anon}");
    assert!(hd.get("idempotent-replayed").is_none());
    assert!(!anon.to_string().contains("a-only@example.com"));
    // Org B's session: its own request runs in its own organisation.
    let b = org_b(&h).await;
    let (s, hd, theirs) = cookie_post(&h, "/api/v1/users", Some(&b), "k-1", &body).await;
    assert_eq!(s, StatusCode::CREATED, "{theirs}");
    assert!(hd.get("idempotent-replayed").is_none());
    assert_ne!(theirs["id"], created["id"], "org B got org A's answer");
    let (_, users) = h.call(Method::GET, "/api/v1/users", Some(&b), None).await;
    assert!(users.to_string().contains("a-only@example.com"));
}

async fn an_anonymous_401_is_not_replayed_to_the_user(h: Arc<Harness>) {
    let body =
        json!({"email": "planted@example.com", "password": "correct horse battery", "role": "ops"});
    let (s, _, _) = cookie_post(&h, "/api/v1/users", None, "plant", &body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A bad credential is no better.
    let (s, _, _) = cookie_post(&h, "/api/v1/users", Some("kxo_forged"), "plant", &body).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(
        stored_keys(&h, "plant").await.is_empty(),
        "a 401 was stored"
    );
    let (s, hd, created) = cookie_post(&h, "/api/v1/users", Some(&h.admin), "plant", &body).await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "the planted 401 was replayed: {created}"
    );
    assert!(hd.get("idempotent-replayed").is_none());
}

async fn a_devices_429_is_not_stored(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (_, cred) = h.enroll(&token, "hammer", "qemu-aarch64").await;
    let logs = || Body::from(json!({"entries": [{"level": "info", "message": "x"}]}).to_string());
    let send = |key: String| {
        let h = h.clone();
        let cred = cred.clone();
        async move {
            let headers = [
                ("content-type", "application/json"),
                ("idempotency-key", key.as_str()),
            ];
            h.raw(
                Method::POST,
                "/api/v1/device/logs",
                Some(&cred),
                &headers,
                logs(),
            )
            .await
            .0
        }
    };
    // Exhaust the bucket (100 a minute: a burst of 100, 1.7 a second).
    let mut limited = false;
    for i in 0..200 {
        if send(format!("fill-{i}")).await == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
    }
    assert!(limited, "the device was never rate-limited");
    assert_eq!(send("late".into()).await, StatusCode::TOO_MANY_REQUESTS);
    assert!(stored_keys(&h, "late").await.is_empty(), "a 429 was stored");
    // Refilled: the same key runs.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(send("late".into()).await, StatusCode::NO_CONTENT);
    assert_eq!(stored_keys(&h, "late").await.len(), 1);
}

async fn a_dropped_request_releases_its_key(h: Arc<Harness>) {
    // Creating a user hashes its password (argon2) between the claim of
    // the key and the answer: the request is cut off there.
    for attempt in 0..20 {
        let key = format!("cut-{attempt}");
        let email = format!("cut-{attempt}@example.com");
        let body = json!({"email": email, "password": "correct horse battery", "role": "ops"});
        let request = {
            let h = h.clone();
            let key = key.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let headers = [
                    ("content-type", "application/json"),
                    ("idempotency-key", key.as_str()),
                ];
                h.raw(
                    Method::POST,
                    "/api/v1/users",
                    Some(&h.admin),
                    &headers,
                    Body::from(body.to_string()),
                )
                .await
            })
        };
        let mut in_progress = false;
        for _ in 0..5000 {
            let rows = stored_keys(&h, &key).await;
            if rows.iter().any(|(status, _)| *status == 0) {
                in_progress = true;
                break;
            }
            if request.is_finished() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
        if !in_progress || request.is_finished() {
            // Finished before it could be cut off: try again.
            let _ = request.await;
            continue;
        }
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        // The key is released (in the background, at once; up to 10 s on a
        // loaded machine, where the aborted task waits for a worker).
        let mut released = false;
        for _ in 0..1000 {
            if stored_keys(&h, &key).await.is_empty() {
                released = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(released, "the dropped request's key stayed in progress");
        // The client's retry runs, instead of a 409 forever.
        let headers = [
            ("content-type", "application/json"),
            ("idempotency-key", key.as_str()),
        ];
        let (s, _, answer) = h
            .raw(
                Method::POST,
                "/api/v1/users",
                Some(&h.admin),
                &headers,
                Body::from(body.to_string()),
            )
            .await;
        assert_eq!(
            s,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&answer)
        );
        return;
    }
    panic!("no request could be cut off mid-handler in 20 attempts");
}

async fn a_stale_in_progress_key_is_taken_over(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (_, cred) = h.enroll(&token, "crashed", "qemu-aarch64").await;
    let send = || {
        let h = h.clone();
        let cred = cred.clone();
        async move {
            let headers = [
                ("content-type", "application/json"),
                ("idempotency-key", "report-9"),
            ];
            let body = json!({"entries": [{"level": "info", "message": "once"}]});
            h.raw(
                Method::POST,
                "/api/v1/device/logs",
                Some(&cred),
                &headers,
                Body::from(body.to_string()),
            )
            .await
        }
    };
    assert_eq!(send().await.0, StatusCode::NO_CONTENT);
    // The server died mid-request: the key is left in progress...
    sqlx::query("UPDATE idempotency_keys SET status = 0, body = '' WHERE idem_key = 'report-9'")
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let (s, hd, _) = send().await;
    assert_eq!(s, StatusCode::CONFLICT, "a fresh in-progress key is 409");
    assert!(
        hd.get("retry-after").is_some(),
        "409 in progress says when to retry"
    );
    // ... and an hour on (restarts included) it is not stuck.
    sqlx::query(
        "UPDATE idempotency_keys SET created_at = created_at - 3600000 WHERE idem_key = 'report-9'",
    )
    .execute(h.state.store.pool())
    .await
    .unwrap();
    let (s, hd, _) = send().await;
    assert_eq!(
        s,
        StatusCode::NO_CONTENT,
        "a stale in-progress key stayed stuck"
    );
    assert!(hd.get("idempotent-replayed").is_none());
    assert_eq!(h.count("device_logs").await, 2);
    let rows = stored_keys(&h, "report-9").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, 204);
}

async fn enrollment_token_answers_are_never_stored(h: Arc<Harness>) {
    // The web UI's form, with a key (a browser extension, a proxy).
    let csrf = kernex_server::ui::csrf_token(&h.admin);
    let cookie = format!("kernex_session={}", h.admin);
    let form = format!("csrf={csrf}&label=batch&expires_days=30");
    let headers = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("cookie", cookie.as_str()),
        ("idempotency-key", "tok-1"),
    ];
    let (s, _, page) = h
        .raw(
            Method::POST,
            "/ui/enrollment-tokens",
            None,
            &headers,
            Body::from(form.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&page));
    assert!(String::from_utf8_lossy(&page).contains("kxe_"));
    // The API, with a key.
    let headers = [
        ("content-type", "application/json"),
        ("idempotency-key", "tok-2"),
    ];
    let (s, _, body) = h
        .raw(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            &headers,
            Body::from(json!({"label": "api", "expires_in_secs": 3600}).to_string()),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(String::from_utf8_lossy(&body).contains("kxe_"));
    let all: Vec<String> = sqlx::query("SELECT body FROM idempotency_keys")
        .fetch_all(h.state.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("body").unwrap())
        .collect();
    assert!(
        all.iter().all(|b| !b.contains("kxe_")),
        "an enrollment token's secret was stored: {all:?}"
    );
    assert!(stored_keys(&h, "tok-1").await.is_empty());
    assert!(stored_keys(&h, "tok-2").await.is_empty());
}
