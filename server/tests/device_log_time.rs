//! Attack: a device dates its log lines at `i64::MAX` (or the distant
//! past), so retention never prunes them, or the operator's view sorts
//! them first forever. A line's time is now clamped to `[limits]
//! log-clock-skew-secs` (a day) around the server's clock, and retention
//! prunes every line in time. On SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::Harness;
use serde_json::json;
use sqlx::Row;

both!(far_log_times_are_clamped_and_pruned);

async fn far_log_times_are_clamped_and_pruned(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (pk, cred) = h.enroll(&token, "time-traveller", "qemu-aarch64").await;
    let before = kernex_server::store::now_ms();
    let skew = h.state.config.limits.log_clock_skew_ms();
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred),
            Some(json!({"entries": [
                {"level": "error", "message": "from the end of time", "at": i64::MAX},
                {"level": "error", "message": "next year", "at": before + 365 * 86_400_000_i64},
                {"level": "info", "message": "before the epoch", "at": i64::MIN},
                {"level": "info", "message": "an hour ago", "at": before - 3_600_000},
                {"level": "info", "message": "no time"},
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let after = kernex_server::store::now_ms();
    let rows = sqlx::query("SELECT message, at FROM device_logs WHERE device_pk = $1")
        .bind(&pk)
        .fetch_all(h.state.store.pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    for row in &rows {
        let (message, at): (String, i64) = (row.get("message"), row.get("at"));
        assert!(
            (before - skew..=after + skew).contains(&at),
            "{message}: stored at {at}, now {before}"
        );
        if message == "an hour ago" {
            assert_eq!(at, before - 3_600_000, "a plausible time is kept");
        }
    }
    // Retention: past the log retention and the skew, every line is gone.
    let days = h.state.config.log_retention_days;
    let later = after + skew + i64::from(days) * 86_400_000 + 1000;
    let pruned = kernex_server::retention::prune(&h.state.store, later, 7, days)
        .await
        .unwrap();
    assert_eq!(pruned.logs, 5, "{pruned:?}");
    assert_eq!(h.count("device_logs").await, 0);
}
