//! The audit log an auditor can check: `kernex-server audit verify` finds
//! an edited row, a deleted tail and a chain re-hashed without the
//! instance's key; the export round-trips through verify; page views
//! verify incrementally; devices' repeated entries are coalesced.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use common::{Db, Harness};
use kernex_server::audit::offline;
use kernex_server::audit::{StoredEntry, checkpoint};
use serde_json::json;
use sqlx::Row;

/// Checkpoints every 3 entries; device entries coalesced over 3 s.
fn config(c: &mut kernex_server::config::Config) {
    c.audit_checkpoint_entries = 3;
    c.audit_device_coalesce_secs = 3;
}

macro_rules! both_configured {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::run_with($crate::common::Db::Sqlite, super::config, super::$name).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::common::run_with($crate::common::Db::Postgres, super::config, super::$name).await;
                }
            )*
        }
    };
}

both_configured!(
    an_edited_row_is_found_by_the_binary,
    a_deleted_tail_is_found,
    a_chain_rehashed_without_the_key_is_found,
    the_export_round_trips_through_verify,
    page_views_verify_incrementally,
    device_entries_are_coalesced,
);

async fn org_id(h: &Harness) -> String {
    sqlx::query("SELECT id FROM organizations")
        .fetch_one(h.state.store.pool())
        .await
        .unwrap()
        .try_get("id")
        .unwrap()
}

/// `n` audited operator actions (enrollment tokens).
async fn actions(h: &Harness, n: usize) {
    for _ in 0..n {
        h.enrollment_token(&h.admin, &[]).await;
    }
}

fn key_file(h: &Harness) -> PathBuf {
    h.state.config.data_dir.join(checkpoint::KEY_FILE)
}

fn trusted(h: &Harness) -> Option<std::collections::HashSet<String>> {
    Some([checkpoint::read_public_key(&key_file(h)).unwrap()].into())
}

/// A copy of the database for offline tools: a consistent SQLite file
/// (`VACUUM INTO`), or on PostgreSQL the database itself (read-only use).
async fn db_copy(h: &Harness) -> String {
    match h.db {
        Db::Sqlite => {
            let path = h.dir.path().join(format!(
                "copy-{}.db",
                kernex_server::store::new_id().unwrap()
            ));
            sqlx::query(&format!("VACUUM INTO '{}'", path.display()))
                .execute(h.state.store.pool())
                .await
                .unwrap();
            path.display().to_string()
        }
        Db::Postgres => h.state.config.database_url(),
    }
}

async fn verify(h: &Harness) -> offline::VerifyReport {
    let pool = offline::open(&db_copy(h).await).await.unwrap();
    let report = offline::verify_database(&pool, trusted(h), 3)
        .await
        .unwrap();
    pool.close().await;
    report
}

/// Runs the real binary; (success, stdout + stderr).
fn binary(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kernex-server"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn entries(h: &Harness, org: &str) -> Vec<StoredEntry> {
    sqlx::query(&format!(
        "SELECT {} FROM audit_log WHERE org_id = $1 ORDER BY seq",
        kernex_server::audit::chain::COLUMNS
    ))
    .bind(org)
    .fetch_all(h.state.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| StoredEntry::from_row(r).unwrap())
    .collect()
}

async fn an_edited_row_is_found_by_the_binary(h: Arc<Harness>) {
    actions(&h, 5).await;
    let key = key_file(&h).display().to_string();
    let (ok, out) = binary(
        h.dir.path(),
        &["audit", "verify", "--public-key", &key, &db_copy(&h).await],
    );
    assert!(ok, "{out}");
    assert!(out.contains("OK"), "{out}");
    sqlx::query("UPDATE audit_log SET actor = 'user:someone-else' WHERE seq = 4")
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let (ok, out) = binary(
        h.dir.path(),
        &["audit", "verify", "--public-key", &key, &db_copy(&h).await],
    );
    assert!(!ok, "an edited row verified: {out}");
    assert!(out.contains("entry 4"), "{out}");
}

async fn a_deleted_tail_is_found(h: Arc<Harness>) {
    // 2 entries at start + 7: checkpoints at 1, 4, 7.
    actions(&h, 5).await;
    assert!(verify(&h).await.ok());
    let org = org_id(&h).await;
    sqlx::query("DELETE FROM audit_log WHERE org_id = $1 AND seq >= 6")
        .bind(&org)
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let report = verify(&h).await;
    assert!(!report.ok(), "{}", report.render());
    assert!(
        report.render().contains("entry 7, which is missing"),
        "{}",
        report.render()
    );
    // The page view sees it too (the latest checkpoint's entry is gone).
    let (_, page) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    assert_eq!(page["chain_broken_at"], 7);
}

/// What someone with write access to the database but not the key can do:
/// change an entry and recompute every hash after it.
async fn rehash(h: &Harness, org: &str, from: i64) -> Vec<StoredEntry> {
    let mut all = entries(h, org).await;
    let mut prev = kernex_server::audit::GENESIS.to_string();
    for e in &mut all {
        if e.seq == from {
            e.result = "ok (nothing happened here)".into();
        }
        if e.seq >= from {
            e.prev_hash = prev.clone();
            e.hash = e.computed_hash(&prev);
            sqlx::query("UPDATE audit_log SET result = $1, prev_hash = $2, hash = $3 WHERE org_id = $4 AND seq = $5")
                .bind(&e.result)
                .bind(&e.prev_hash)
                .bind(&e.hash)
                .bind(org)
                .bind(e.seq)
                .execute(h.state.store.pool())
                .await
                .unwrap();
        }
        prev = e.hash.clone();
    }
    all
}

async fn a_chain_rehashed_without_the_key_is_found(h: Arc<Harness>) {
    actions(&h, 5).await;
    let org = org_id(&h).await;
    let all = rehash(&h, &org, 3).await;
    // The hash chain alone is fooled...
    let pool = offline::open(&db_copy(&h).await).await.unwrap();
    let chain_only = offline::verify_database(&pool, None, 3).await.unwrap();
    pool.close().await;
    assert!(chain_only.ok(), "{}", chain_only.render());
    // ... the signed checkpoints are not.
    let report = verify(&h).await;
    assert!(!report.ok());
    assert!(
        report
            .render()
            .contains("differs from the signed checkpoint"),
        "{}",
        report.render()
    );

    // Nor when the checkpoints' hashes are rewritten to fit...
    for e in &all {
        sqlx::query("UPDATE audit_checkpoints SET hash = $1 WHERE org_id = $2 AND seq = $3")
            .bind(&e.hash)
            .bind(&org)
            .bind(e.seq)
            .execute(h.state.store.pool())
            .await
            .unwrap();
    }
    let report = verify(&h).await;
    assert!(
        report.render().contains("signature does not match"),
        "{}",
        report.render()
    );
    // ... or re-signed with another key ...
    let dir = tempfile::tempdir().unwrap();
    let forger = checkpoint::Signer::load_or_create(dir.path(), 3, 0).unwrap();
    let cps = sqlx::query(&format!(
        "SELECT {} FROM audit_checkpoints WHERE org_id = $1",
        checkpoint::COLUMNS
    ))
    .bind(&org)
    .fetch_all(h.state.store.pool())
    .await
    .unwrap();
    for row in &cps {
        let cp = checkpoint::Checkpoint::from_row(row).unwrap();
        let forged = forger.sign(&org, cp.seq, &cp.hash, cp.at).unwrap();
        sqlx::query("UPDATE audit_checkpoints SET public_key = $1, signature = $2 WHERE org_id = $3 AND seq = $4")
            .bind(&forged.public_key)
            .bind(&forged.signature)
            .bind(&org)
            .bind(cp.seq)
            .execute(h.state.store.pool())
            .await
            .unwrap();
    }
    let report = verify(&h).await;
    assert!(
        report.render().contains("untrusted key"),
        "{}",
        report.render()
    );
    // ... or deleted altogether.
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let report = verify(&h).await;
    assert!(!report.ok());
    assert!(
        report.render().contains("no entry is covered"),
        "{}",
        report.render()
    );
    // Deleting only the ones after the edit leaves a gap.
    let _ = all;
}

async fn the_export_round_trips_through_verify(h: Arc<Harness>) {
    let base = head_seq(&h).await;
    actions(&h, 4).await;
    let org = org_id(&h).await;
    let pool = offline::open(&db_copy(&h).await).await.unwrap();
    let mut out = Vec::new();
    let n = offline::export(&pool, &mut out).await.unwrap();
    pool.close().await;
    assert_eq!(n, base as u64 + 4);
    let text = String::from_utf8(out.clone()).unwrap();
    // A checkpoint at entry 1 and every 3 entries after it.
    let entries = base + 4;
    let checkpoints = (entries - 1) / 3 + 1;
    assert_eq!(
        text.lines().count() as i64,
        1 + checkpoints + entries,
        "header, checkpoints at 1, 4, ..., entries"
    );
    let report = offline::verify_export(&out[..], trusted(&h), 3).unwrap();
    assert!(report.ok(), "{}", report.render());
    assert_eq!(report.orgs[&org].signed_through, 1 + 3 * (checkpoints - 1));
    assert_eq!(report.orgs[&org].verified_through, base + 4);
    // An edited line is found.
    let edited = text.replacen("\"result\":\"ok\"", "\"result\":\"denied\"", 1);
    assert_ne!(edited, text);
    let report = offline::verify_export(edited.as_bytes(), trusted(&h), 3).unwrap();
    assert!(!report.ok(), "{}", report.render());

    // Through the binary: export a copy to a file, verify the file.
    if matches!(h.db, Db::Sqlite) {
        let copy = db_copy(&h).await;
        let file = h.dir.path().join("audit.jsonl").display().to_string();
        let (ok, out) = binary(h.dir.path(), &["audit", "export", &copy, "--output", &file]);
        assert!(ok, "{out}");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap().lines().count() as i64,
            1 + checkpoints + entries
        );
        let key = key_file(&h).display().to_string();
        let (ok, out) = binary(
            h.dir.path(),
            &["audit", "verify", "--public-key", &key, "--export", &file],
        );
        assert!(ok, "{out}");
        std::fs::write(&file, edited).unwrap();
        let (ok, out) = binary(
            h.dir.path(),
            &["audit", "verify", "--public-key", &key, "--export", &file],
        );
        assert!(!ok, "{out}");
    }
}

async fn page_views_verify_incrementally(h: Arc<Harness>) {
    // The harness's own entries (organisation, admin, password change).
    let base = head_seq(&h).await;
    actions(&h, 3).await;
    let org = org_id(&h).await;
    let mark = || {
        let h = h.clone();
        let org = org.clone();
        async move {
            sqlx::query("SELECT seq FROM audit_verified WHERE org_id = $1")
                .bind(&org)
                .fetch_optional(h.state.store.pool())
                .await
                .unwrap()
                .map(|r| r.try_get::<i64, _>("seq").unwrap())
        }
    };
    assert_eq!(mark().await, None);
    let (s, page) = h
        .call(Method::GET, "/api/v1/audit?limit=1", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["chain_broken_at"], serde_json::Value::Null);
    // The page held the head entry; the chain was verified to it and the
    // mark says so.
    assert_eq!(mark().await, Some(base + 3));
    actions(&h, 2).await;
    // An entry after the mark is changed: the next view finds it, though
    // it shows only the newest entry.
    sqlx::query("UPDATE audit_log SET target = 'nothing' WHERE org_id = $1 AND seq = $2")
        .bind(&org)
        .bind(base + 4)
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let (_, page) = h
        .call(Method::GET, "/api/v1/audit?limit=1", Some(&h.admin), None)
        .await;
    assert_eq!(page["chain_broken_at"], base + 4);
    assert_eq!(
        mark().await,
        Some(base + 3),
        "a broken chain does not move the mark"
    );
    // The public key is shown in the API.
    let (s, key) = h
        .call(Method::GET, "/api/v1/audit/key", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        key["public_key"].as_str().unwrap(),
        checkpoint::read_public_key(&key_file(&h)).unwrap()
    );
    assert!(
        key["public_key_pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN PUBLIC KEY")
    );
}

async fn device_entries_are_coalesced(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (_, cred) = h.enroll(&token, "chatty", "qemu-aarch64").await;
    let count = || {
        let h = h.clone();
        async move {
            sqlx::query(
                "SELECT detail FROM audit_log WHERE action = 'device.attestation' ORDER BY seq",
            )
            .fetch_all(h.state.store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String, _>("detail").unwrap())
            .collect::<Vec<_>>()
        }
    };
    let quote =
        json!({"version": "1.0.0", "quote": {"attest": "00", "signature": "00", "pcrs": {}}});
    for _ in 0..20 {
        let (s, _) = h
            .call(
                Method::POST,
                "/api/v1/device/attestation",
                Some(&cred),
                Some(quote.clone()),
            )
            .await;
        assert!(s.is_client_error(), "{s}");
    }
    let written = count().await;
    assert_eq!(written.len(), 1, "20 attestation calls wrote {written:?}");
    // Once the window has passed, the repeats are written as one summary.
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let flushed = kernex_server::audit::coalesce::flush(&h.state.store, &h.state.audit_coalescer)
        .await
        .unwrap();
    assert_eq!(flushed, 1);
    let written = count().await;
    assert_eq!(written.len(), 2);
    let summary: serde_json::Value = serde_json::from_str(&written[1]).unwrap();
    assert_eq!(summary["repeats"], 19);
    assert!(verify(&h).await.ok());
}

/// The organisation's newest audit `seq` (0: none yet).
async fn head_seq(h: &Harness) -> i64 {
    let org = org_id(h).await;
    sqlx::query("SELECT COALESCE(MAX(seq), 0) AS n FROM audit_log WHERE org_id = $1")
        .bind(&org)
        .fetch_one(h.state.store.pool())
        .await
        .unwrap()
        .try_get::<i64, _>("n")
        .unwrap()
}
