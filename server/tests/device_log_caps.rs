//! Attack: a device (or a stolen credential) floods its log until the
//! database is full. A device's stored log is now capped (`[limits]
//! device-log-max-lines`, `device-log-max-bytes`): a batch that would go
//! over deletes that device's oldest lines (its newest are kept, no other
//! device loses any), and a batch that alone is over a cap is a 413 naming
//! it. On SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::{Db, Harness};
use serde_json::{Value, json};
use sqlx::Row;

/// `both!` with small caps.
macro_rules! both_capped {
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

both_capped!(a_device_log_is_capped_in_lines_and_bytes);

const MAX_LINES: u64 = 50;
const MAX_BYTES: u64 = 4000;

async fn run<F, Fut>(db: Db, body: F)
where
    F: FnOnce(Arc<Harness>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    common::run_with(
        db,
        |c| {
            c.limits.device_log_max_lines = MAX_LINES;
            c.limits.device_log_max_bytes = MAX_BYTES;
        },
        body,
    )
    .await
}

/// Sends `messages` as one batch, each a millisecond after the one before
/// (the order the device logged them in).
async fn send(h: &Harness, cred: &str, messages: Vec<String>) -> (StatusCode, Value) {
    static CLOCK: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let start = kernex_server::store::now_ms() - 600_000;
    let entries: Vec<Value> = messages
        .into_iter()
        .map(|m| {
            let at = start + CLOCK.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            json!({"level": "info", "message": m, "at": at})
        })
        .collect();
    h.call(
        Method::POST,
        "/api/v1/device/logs",
        Some(cred),
        Some(json!({ "entries": entries })),
    )
    .await
}

/// (lines, message bytes, messages oldest first) of device `pk`.
async fn stored(h: &Harness, pk: &str) -> (u64, u64, Vec<String>) {
    let rows = sqlx::query("SELECT message FROM device_logs WHERE device_pk = $1 ORDER BY at, id")
        .bind(pk)
        .fetch_all(h.state.store.pool())
        .await
        .unwrap();
    let messages: Vec<String> = rows.iter().map(|r| r.get("message")).collect();
    let bytes = messages.iter().map(|m| m.len() as u64).sum();
    (messages.len() as u64, bytes, messages)
}

async fn a_device_log_is_capped_in_lines_and_bytes(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (flood_pk, flood) = h.enroll(&token, "flooder", "qemu-aarch64").await;
    let (quiet_pk, quiet) = h.enroll(&token, "quiet", "qemu-aarch64").await;
    let (s, _) = send(&h, &quiet, vec!["quiet line".into(); 10]).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // Lines: 3 batches of 30 short lines keep the newest 50.
    for batch in 0..3 {
        let lines = (0..30).map(|i| format!("b{batch}-{i:02}")).collect();
        let (s, v) = send(&h, &flood, lines).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
        let (n, _, _) = stored(&h, &flood_pk).await;
        assert!(n <= MAX_LINES, "{n} lines stored");
    }
    let (n, _, messages) = stored(&h, &flood_pk).await;
    assert_eq!(n, MAX_LINES);
    assert_eq!(messages.last().unwrap(), "b2-29", "the newest line is kept");
    assert!(
        !messages.iter().any(|m| m.starts_with("b0-")),
        "the oldest batch made room: {messages:?}"
    );
    // A batch alone over the cap: 413, naming it; nothing changes.
    let (s, v) = send(&h, &flood, vec!["x".into(); MAX_LINES as usize + 1]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("device-log-max-lines"),
        "{v}"
    );
    assert_eq!(stored(&h, &flood_pk).await.2, messages);

    // Bytes: 1000-byte lines keep at most 4000 bytes.
    for i in 0..6 {
        let (s, v) = send(&h, &flood, vec![format!("{i}{}", "z".repeat(999))]).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    }
    let (n, bytes, messages) = stored(&h, &flood_pk).await;
    assert!(bytes <= MAX_BYTES, "{bytes} bytes in {n} lines");
    assert!(messages.last().unwrap().starts_with('5'), "newest kept");
    let (s, v) = send(&h, &flood, vec!["w".repeat(2100), "v".repeat(2100)]).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("device-log-max-bytes"),
        "{v}"
    );

    // The other device lost nothing.
    assert_eq!(stored(&h, &quiet_pk).await.0, 10);
}
