//! The HTTP API end to end (through `http::app` with `oneshot`), each test
//! run on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::{Harness, golden};
use serde_json::{Value, json};
use sqlx::Row;

both!(
    login_and_roles,
    auth_matrix,
    malformed_requests,
    bad_bundles_are_rejected_and_nothing_is_stored,
    duplicate_enrollment_is_one_device,
    sql_injection_in_filters_has_no_effect,
    device_update_lifecycle,
    degraded_when_memory_is_high,
    release_upload_conflict_and_delete,
    audit_log_is_a_hash_chain,
    openapi_and_metrics,
    device_logs_and_retention,
    idempotency_keys_replay_instead_of_repeating,
    session_cookie_and_logout,
    failed_install_marks_the_release_unstable,
    device_tags_are_replaced_and_filtered_on,
);

async fn login_and_roles(h: Arc<Harness>) {
    // Wrong password, unknown user, unknown org: all 401 with a JSON error.
    for body in [
        json!({"email": "admin@localhost", "password": "wrong"}),
        json!({"email": "nobody@localhost", "password": "wrong"}),
        json!({"organization": "other", "email": "admin@localhost", "password": "wrong"}),
    ] {
        let (s, v) = h
            .call(Method::POST, "/api/v1/login", None, Some(body))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        assert_eq!(v["error"], "unauthorized");
    }
    let ro = h.user("ro@example.com", "read_only").await;
    let ops = h.user("ops@example.com", "ops").await;
    let (s, me) = h.call(Method::GET, "/api/v1/me", Some(&ro), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me["role"], "read_only");
    // read-only reads, cannot mutate
    let (s, _) = h
        .call(Method::GET, "/api/v1/devices", Some(&ro), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&ro),
            Some(json!({"label": "x", "expires_in_secs": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // ops may create tokens, not users or keyrings
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&ops),
            Some(json!({"label": "x", "expires_in_secs": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&ops),
            Some(json!({"email": "e@x", "password": "long enough password", "role": "admin"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h
        .call(
            Method::PUT,
            "/api/v1/org/keyring",
            Some(&ops),
            Some(json!({"pem": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // duplicate user → 409
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/users",
            Some(&h.admin),
            Some(json!({"email": "ops@example.com", "password": "long enough password", "role": "ops"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // a garbage keyring is rejected
    let (s, _) = h
        .call(
            Method::PUT,
            "/api/v1/org/keyring",
            Some(&h.admin),
            Some(json!({"pem": "not pem"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
}

struct Fixture {
    release: String,
    device: String,
    credential: String,
    enrollment_id: String,
    enrollment: String,
    deployment: String,
}

async fn fixture(h: &Harness) -> Fixture {
    let (s, rel) = h
        .upload(&h.admin, std::fs::read(golden("valid.kxb")).unwrap())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{rel}");
    let (enrollment_id, enrollment) = h.enrollment_token(&h.admin, &["lab"]).await;
    let (device, credential) = h.enroll(&enrollment, "dev-1", "qemu-aarch64").await;
    let (s, dep) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&h.admin),
            Some(json!({"release_id": rel["id"], "devices": [device]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{dep}");
    Fixture {
        release: rel["id"].as_str().unwrap().into(),
        device,
        credential,
        enrollment_id,
        enrollment,
        deployment: dep["id"].as_str().unwrap().into(),
    }
}

/// Every operator endpoint: (method, path, body, mutating).
fn operator_endpoints(f: &Fixture) -> Vec<(Method, String, Option<Value>, bool)> {
    vec![
        (Method::GET, "/api/v1/me".into(), None, false),
        (Method::GET, "/api/v1/users".into(), None, false),
        (
            Method::POST,
            "/api/v1/users".into(),
            Some(json!({"email": "new@x", "password": "long enough password", "role": "ops"})),
            true,
        ),
        (Method::GET, "/api/v1/org/keyring".into(), None, false),
        (
            Method::PUT,
            "/api/v1/org/keyring".into(),
            Some(json!({"pem": "x"})),
            true,
        ),
        (Method::GET, "/api/v1/enrollment-tokens".into(), None, false),
        (
            Method::POST,
            "/api/v1/enrollment-tokens".into(),
            Some(json!({"label": "x", "expires_in_secs": 3600})),
            true,
        ),
        (
            Method::DELETE,
            format!("/api/v1/enrollment-tokens/{}", f.enrollment_id),
            None,
            true,
        ),
        (Method::GET, "/api/v1/releases".into(), None, false),
        (Method::POST, "/api/v1/releases".into(), None, true),
        (
            Method::GET,
            format!("/api/v1/releases/{}", f.release),
            None,
            false,
        ),
        (
            Method::DELETE,
            format!("/api/v1/releases/{}", f.release),
            None,
            true,
        ),
        (
            Method::GET,
            format!("/api/v1/releases/{}/bundle", f.release),
            None,
            false,
        ),
        (Method::GET, "/api/v1/devices".into(), None, false),
        (
            Method::GET,
            format!("/api/v1/devices/{}", f.device),
            None,
            false,
        ),
        (
            Method::POST,
            format!("/api/v1/devices/{}/revoke", f.device),
            None,
            true,
        ),
        (
            Method::PUT,
            format!("/api/v1/devices/{}/tags", f.device),
            Some(json!({"tags": ["lab", "site-b"]})),
            true,
        ),
        (Method::GET, "/api/v1/deployments".into(), None, false),
        (
            Method::POST,
            "/api/v1/deployments".into(),
            Some(json!({"release_id": f.release, "devices": [f.device]})),
            true,
        ),
        (
            Method::GET,
            format!("/api/v1/deployments/{}", f.deployment),
            None,
            false,
        ),
        (Method::GET, "/api/v1/audit".into(), None, false),
        (
            Method::GET,
            "/api/v1/tpm/preauthorizations".into(),
            None,
            false,
        ),
        (
            Method::POST,
            "/api/v1/tpm/preauthorizations".into(),
            Some(json!({"device_id": "sn-matrix"})),
            true,
        ),
        (
            Method::DELETE,
            "/api/v1/tpm/preauthorizations/sn-matrix".into(),
            None,
            true,
        ),
        (
            Method::POST,
            "/api/v1/enrollment-tokens/check".into(),
            Some(json!({"token": f.enrollment})),
            true,
        ),
        // Last: it ends the sessions used above.
        (Method::POST, "/api/v1/logout".into(), None, false),
    ]
}

/// Device endpoints of the TPM flow: they answer a device without a TPM
/// with 409, so only their authentication is in the matrix.
fn tpm_device_endpoints() -> Vec<(Method, String, Option<Value>)> {
    vec![
        (
            Method::POST,
            "/api/v1/device/activate".into(),
            Some(json!({"credential": "00".repeat(32)})),
        ),
        (
            Method::POST,
            "/api/v1/device/attestation".into(),
            Some(json!({"version": "1.0.0", "quote": {"attest": "", "signature": "", "pcrs": {}}})),
        ),
    ]
}

fn device_endpoints(f: &Fixture) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (Method::GET, "/api/v1/device/poll".into(), None),
        (
            Method::POST,
            "/api/v1/device/heartbeat".into(),
            Some(json!({"cpu_percent": 1.0})),
        ),
        (
            Method::POST,
            "/api/v1/device/report".into(),
            Some(json!({"state": "downloading"})),
        ),
        (
            Method::POST,
            "/api/v1/device/logs".into(),
            Some(json!({"entries": [{"level": "info", "message": "hi"}]})),
        ),
        (
            Method::GET,
            format!("/api/v1/device/releases/{}/bundle", f.release),
            None,
        ),
    ]
}

async fn auth_matrix(h: Arc<Harness>) {
    let f = fixture(&h).await;
    let ro = h.user("ro@example.com", "read_only").await;
    // A second organisation with its own admin.
    let org2 = kernex_server::create_organization(&h.state.store, "org2")
        .await
        .unwrap();
    kernex_server::auth::create_user(
        &h.state.store,
        &org2,
        "admin2@example.com",
        "another long password",
        kernex_server::auth::Role::Admin,
    )
    .await
    .unwrap();
    let other = h
        .login("org2", "admin2@example.com", "another long password")
        .await;
    let ca = std::fs::read_to_string(golden("other-ca.crt")).unwrap();
    let (s, _) = h
        .call(
            Method::PUT,
            "/api/v1/org/keyring",
            Some(&other),
            Some(json!({"pem": ca})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // org2's lists are empty of org1's things.
    let (_, devices) = h
        .call(Method::GET, "/api/v1/devices", Some(&other), None)
        .await;
    assert_eq!(devices, json!([]));

    for (method, path, body, mutating) in operator_endpoints(&f) {
        // Unauthenticated, a garbage token and a device credential: 401.
        for token in [None, Some("kxo_nonsense"), Some(f.credential.as_str())] {
            let (s, v) = h.call(method.clone(), &path, token, body.clone()).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {v}"
            );
        }
        // Read-only on mutations: 403.
        let (s, v) = h.call(method.clone(), &path, Some(&ro), body.clone()).await;
        if mutating {
            assert_eq!(s, StatusCode::FORBIDDEN, "{method} {path} read-only: {v}");
        } else {
            assert!(s.is_success(), "{method} {path} read-only: {s} {v}");
        }
        // Another organisation never sees this one's resources.
        let (s, v) = h
            .call(method.clone(), &path, Some(&other), body.clone())
            .await;
        let scoped = path.contains(&f.release)
            || path.contains(&f.device)
            || path.contains(&f.deployment)
            || path.contains(&f.enrollment_id)
            || path == "/api/v1/deployments" && method == Method::POST;
        if scoped {
            assert_eq!(s, StatusCode::NOT_FOUND, "{method} {path} from org2: {v}");
        } else if method == Method::GET {
            assert!(s.is_success(), "{method} {path} from org2: {s} {v}");
            if path == "/api/v1/audit" {
                // org2's own log: its failed attempts on org1's ids, nothing of org1's.
                for e in v["entries"].as_array().unwrap() {
                    assert_eq!(e["actor"], "user:admin2@example.com", "{e}");
                }
                continue;
            }
            for list in [&v] {
                if let Some(items) = list.as_array() {
                    let text = Value::Array(items.clone()).to_string();
                    for secret in [&f.release, &f.device, &f.deployment, &f.enrollment_id] {
                        assert!(
                            !text.contains(secret.as_str()),
                            "{path} from org2 leaks {secret}"
                        );
                    }
                }
            }
        }
    }

    // Device endpoints: unauthenticated, operator token, garbage → 401.
    for (method, path, body) in tpm_device_endpoints() {
        for token in [None, Some(h.admin.as_str()), Some("kxd_nonsense")] {
            let (s, v) = h.call(method.clone(), &path, token, body.clone()).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {v}"
            );
        }
        let (s, v) = h
            .call(method.clone(), &path, Some(&f.credential), body.clone())
            .await;
        assert_eq!(
            s,
            StatusCode::CONFLICT,
            "{method} {path} as a device without TPM: {v}"
        );
    }
    for (method, path, body) in device_endpoints(&f) {
        for token in [None, Some(h.admin.as_str()), Some("kxd_nonsense")] {
            let (s, v) = h.call(method.clone(), &path, token, body.clone()).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {v}"
            );
        }
        let (s, v) = h
            .call(method.clone(), &path, Some(&f.credential), body.clone())
            .await;
        assert!(s.is_success(), "{method} {path} as the device: {s} {v}");
    }
    // Revoke the device: every device endpoint is then 401.
    let (s, _) = h
        .call(
            Method::POST,
            &format!("/api/v1/devices/{}/revoke", f.device),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    for (method, path, body) in device_endpoints(&f)
        .into_iter()
        .chain(tpm_device_endpoints())
    {
        let (s, v) = h
            .call(method.clone(), &path, Some(&f.credential), body)
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{method} {path} revoked: {v}");
    }
    // A revoked device cannot re-enroll its way back in.
    let (s, body) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": f.enrollment, "device_id": "dev-1", "hardware_class": "qemu-aarch64"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body.get("credential").is_none());
    let (s, _) = h
        .call(
            Method::GET,
            "/api/v1/device/poll",
            Some(&f.credential),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

async fn malformed_requests(h: Arc<Harness>) {
    let json_ct = [("content-type", "application/json")];
    for (path, body) in [
        ("/api/v1/login", "{not json"),
        (
            "/api/v1/login",
            r#"{"email": "a", "password": "b", "extra": 1}"#,
        ),
        ("/api/v1/enrollment-tokens", r#"{"label": 5}"#),
        (
            "/api/v1/enrollment-tokens",
            r#"{"label": "x", "admin": true}"#,
        ),
        (
            "/api/v1/enrollment-tokens",
            r#"{"label": "x", "tags": ["bad tag!"]}"#,
        ),
        ("/api/v1/device/enroll", r#"{"enrollment_token": "x"}"#),
    ] {
        let (s, _, bytes) = h
            .raw(
                Method::POST,
                path,
                Some(&h.admin),
                &json_ct,
                Body::from(body),
            )
            .await;
        assert_eq!(
            s,
            StatusCode::BAD_REQUEST,
            "{path} {body}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"], "bad request");
    }
    // Oversized JSON body → 413 with a JSON error.
    let big = format!(r#"{{"label": "{}"}}"#, "x".repeat(400 << 10));
    let (s, _, bytes) = h
        .raw(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            &json_ct,
            Body::from(big),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["error"], "payload too large");
    // Unknown query parameter, wrong type → 400.
    for q in ["/api/v1/devices?colour=red", "/api/v1/devices?limit=lots"] {
        let (s, v) = h.call(Method::GET, q, Some(&h.admin), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {v}");
    }
    // Unknown route → JSON 404.
    let (s, v) = h
        .call(Method::GET, "/api/v1/nothing", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "not found");
    // Unknown ids → 404, never 500.
    for p in [
        "/api/v1/releases/nope",
        "/api/v1/devices/nope",
        "/api/v1/deployments/nope",
    ] {
        let (s, _) = h.call(Method::GET, p, Some(&h.admin), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{p}");
    }
}

async fn bad_bundles_are_rejected_and_nothing_is_stored(h: Arc<Harness>) {
    let valid = std::fs::read(golden("valid.kxb")).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = [
        "truncated.kxb",
        "unsigned.kxb",
        "unknown-ca.kxb",
        "tampered-manifest.kxb",
        "bitflip-chunk.kxb",
        "bitflip-index.kxb",
        "expired-signer.kxb",
        "wrong-usage.kxb",
    ]
    .iter()
    .map(|n| (n.to_string(), std::fs::read(golden(n)).unwrap()))
    .collect();
    cases.push(("cut in half".into(), valid[..valid.len() / 2].to_vec()));
    cases.push(("empty".into(), Vec::new()));
    cases.push(("garbage".into(), vec![0x42; 4096]));
    for (name, bytes) in cases {
        let (s, v) = h.upload(&h.admin, bytes).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{name}: {v}");
        assert_eq!(v["error"], "unprocessable", "{name}");
        assert!(
            v["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{name}: {v}"
        );
    }
    assert_eq!(h.count("releases").await, 0);
    assert_eq!(h.blob_files(), 0);
    assert_eq!(
        std::fs::read_dir(&h.state.spool).unwrap().count(),
        0,
        "spool cleaned"
    );
    // A keyring that does not hold the signer's CA: the valid bundle is 422 too.
    let other = std::fs::read_to_string(golden("other-ca.crt")).unwrap();
    let (s, _) = h
        .call(
            Method::PUT,
            "/api/v1/org/keyring",
            Some(&h.admin),
            Some(json!({"pem": other})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = h.upload(&h.admin, valid).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(h.count("releases").await, 0);
    assert_eq!(h.blob_files(), 0);
    // Rejections are audited.
    let (_, audit) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    let rejected = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["action"] == "release.upload"
                && e["result"].as_str().unwrap().starts_with("error: 422")
        })
        .count();
    assert_eq!(rejected, 12);
}

async fn duplicate_enrollment_is_one_device(h: Arc<Harness>) {
    let (token_id, token) = h.enrollment_token(&h.admin, &["site-a"]).await;
    let (id1, cred1) = h.enroll(&token, "serial-42", "qemu-aarch64").await;
    let (id2, cred2) = h.enroll(&token, "serial-42", "qemu-aarch64").await;
    assert_eq!(id1, id2);
    assert_ne!(cred1, cred2);
    assert_eq!(h.count("devices").await, 1);
    assert_eq!(h.count("device_tags").await, 1);
    // The rotated-out credential no longer works; the new one does.
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&cred1), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&cred2), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // The same device id with another token: 409, still one row.
    let (_, token2) = h.enrollment_token(&h.admin, &[]).await;
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": token2, "device_id": "serial-42", "hardware_class": "qemu-aarch64"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(h.count("devices").await, 1);
    // A revoked or unknown token: 401.
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/enrollment-tokens/{token_id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    for t in [token.as_str(), "kxe_unknown"] {
        let (s, v) = h
            .call(
                Method::POST,
                "/api/v1/device/enroll",
                None,
                Some(json!({"enrollment_token": t, "device_id": "serial-43", "hardware_class": "qemu-aarch64"})),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
    }
    assert_eq!(h.count("devices").await, 1);
    // Concurrent enrollments of one device id (the device retrying with
    // its key): still one row.
    let (_, token3) = h.enrollment_token(&h.admin, &[]).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let h = h.clone();
        let token3 = token3.clone();
        tasks.push(tokio::spawn(async move {
            let proof = h.proof(&h.device_key("serial-99"), "serial-99").await;
            h.call(
                Method::POST,
                "/api/v1/device/enroll",
                None,
                Some(json!({"enrollment_token": token3, "device_id": "serial-99", "hardware_class": "x86-64", "key": proof})),
            )
            .await
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let (s, v) = t.await.unwrap();
        assert!(s.is_success(), "{s} {v}");
        ids.insert(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(h.count("devices").await, 2);
}

const INJECTIONS: &[&str] = &[
    "' OR '1'='1",
    "x'; DROP TABLE devices; --",
    "\" OR 1=1 --",
    "qemu-aarch64' --",
    "%' OR 1=1 OR '%'='",
    "1; DELETE FROM devices",
    "online' UNION SELECT id, device_id FROM devices --",
    "\\'; SELECT pg_sleep(5); --",
];

async fn sql_injection_in_filters_has_no_effect(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &["lab"]).await;
    h.enroll(&token, "dev-a", "qemu-aarch64").await;
    h.enroll(&token, "dev-b", "raspberrypi4-64").await;
    for param in [
        "tag",
        "hardware_class",
        "version",
        "q",
        "site",
        "link_class",
    ] {
        for attack in INJECTIONS {
            let path = format!("/api/v1/devices?{param}={}", urlencode(attack));
            let (s, v) = h.call(Method::GET, &path, Some(&h.admin), None).await;
            assert_eq!(s, StatusCode::OK, "{path}: {v}");
            assert_eq!(v, json!([]), "{path} matched something");
        }
    }
    // A status is one of a fixed set: anything else is refused, by name.
    for attack in INJECTIONS {
        let path = format!("/api/v1/devices?status={}", urlencode(attack));
        let (s, v) = h.call(Method::GET, &path, Some(&h.admin), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(
            v["detail"].as_str().is_some_and(|d| d.contains("status")),
            "{v}"
        );
    }
    assert_eq!(h.count("devices").await, 2);
    // The filters do work with real values.
    let (_, v) = h
        .call(Method::GET, "/api/v1/devices?tag=lab", Some(&h.admin), None)
        .await;
    assert_eq!(v.as_array().unwrap().len(), 2);
    let (_, v) = h
        .call(
            Method::GET,
            "/api/v1/devices?hardware_class=raspberrypi4-64",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["device_id"], "dev-b");
    let (_, v) = h
        .call(
            Method::GET,
            "/api/v1/devices?status=offline",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(v.as_array().unwrap().len(), 2);
    // Injection in enrollment fields is rejected or stored verbatim, never run.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": token, "device_id": INJECTIONS[1], "hardware_class": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/enroll",
            None,
            Some(json!({"enrollment_token": INJECTIONS[0], "device_id": "dev-c", "hardware_class": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(h.count("devices").await, 2);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn device_update_lifecycle(h: Arc<Harness>) {
    let bundle = std::fs::read(golden("valid.kxb")).unwrap();
    let ops = h.user("ops@example.com", "ops").await;
    let (s, rel) = h.upload(&ops, bundle.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{rel}");
    assert_eq!(rel["version"], "1.0.0");
    assert_eq!(rel["compatible"], "qemu-aarch64");
    assert_eq!(rel["size"], bundle.len());
    let release = rel["id"].as_str().unwrap().to_string();

    let (_, token) = h.enrollment_token(&ops, &["fleet-1"]).await;
    let (device, cred) = h.enroll(&token, "pi-001", "qemu-aarch64").await;
    // Before any heartbeat it is offline; after one, online with its slots.
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(d["status"], "offline");
    let hb = json!({
        "cpu_percent": 12.5, "memory_used_bytes": 4_000_000_000u64, "memory_total_bytes": 8_000_000_000u64,
        "disk_used_bytes": 1, "disk_total_bytes": 2, "temperature_celsius": 51.0, "uptime_secs": 99,
        "booted_slot": "A", "primary_slot": "A", "version": "0.9.0", "updater_version": "0.1.0"
    });
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(hb),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(d["status"], "online", "{d}");
    assert_eq!(d["current_version"], "0.9.0");
    assert_eq!(d["booted_slot"], "A");
    assert_eq!(d["inventory"]["temperature_celsius"], 51.0);
    assert_eq!(d["tags"], json!(["fleet-1"]));
    // Nothing to do yet.
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&cred), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // An incompatible device cannot be assigned the release.
    let (other, _) = h.enroll(&token, "rpi-9", "raspberrypi4-64").await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&ops),
            Some(json!({"release_id": release, "devices": [other]})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    let (s, dep) = h
        .call(
            Method::POST,
            "/api/v1/deployments",
            Some(&ops),
            Some(json!({"release_id": release, "devices": [device], "description": "first"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{dep}");
    let deployment = dep["id"].as_str().unwrap().to_string();

    let (s, want) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&cred), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(want["version"], "1.0.0");
    assert_eq!(want["size"], bundle.len());
    let url = want["url"].as_str().unwrap().to_string();

    // Range downloads, bytes asserted.
    let (s, headers, bytes) = h
        .raw(
            Method::GET,
            &url,
            Some(&cred),
            &[("range", "bytes=100-4195")],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(bytes, bundle[100..4196]);
    assert_eq!(
        headers["content-range"].to_str().unwrap(),
        format!("bytes 100-4195/{}", bundle.len())
    );
    let (s, _, bytes) = h
        .raw(
            Method::GET,
            &url,
            Some(&cred),
            &[("range", "bytes=-10")],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(bytes, bundle[bundle.len() - 10..]);
    let start = bundle.len() - 7;
    let (s, _, bytes) = h
        .raw(
            Method::GET,
            &url,
            Some(&cred),
            &[("range", &format!("bytes={start}-"))],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::PARTIAL_CONTENT);
    assert_eq!(bytes, bundle[start..]);
    let (s, headers, bytes) = h
        .raw(Method::GET, &url, Some(&cred), &[], Body::empty())
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(bytes, bundle);
    for bad in [
        format!("bytes={}-", bundle.len()),
        "bytes=9-2".to_string(),
        "chunks=0-1".to_string(),
    ] {
        let (s, headers, bytes) = h
            .raw(
                Method::GET,
                &url,
                Some(&cred),
                &[("range", &bad)],
                Body::empty(),
            )
            .await;
        assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE, "{bad}");
        assert_eq!(
            headers["content-range"].to_str().unwrap(),
            format!("bytes */{}", bundle.len())
        );
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"], "range not satisfiable");
    }

    // Progress, then outcome.
    for report in [
        json!({"state": "downloading", "release_id": release, "bytes_done": 100, "bytes_total": bundle.len()}),
        json!({"state": "installed", "release_id": release}),
        json!({"state": "rebooted", "release_id": release, "booted_slot": "B"}),
    ] {
        let (s, v) = h
            .call(
                Method::POST,
                "/api/v1/device/report",
                Some(&cred),
                Some(report),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    }
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(d["status"], "updating");
    let (_, dd) = h
        .call(
            Method::GET,
            &format!("/api/v1/deployments/{deployment}"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(dd["status"], "in_progress");
    assert_eq!(dd["devices"][0]["state"], "rebooted");
    assert_eq!(dd["devices"][0]["bytes_done"], 100);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/report",
            Some(&cred),
            Some(json!({"state": "committed", "release_id": release, "version": "1.0.0", "booted_slot": "B"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred),
            Some(json!({"entries": [{"level": "info", "message": "committed slot B"}, {"level": "warn", "message": "x"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h.count("device_logs").await, 2);

    // The server shows the new version and slot; the deployment succeeded.
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(d["current_version"], "1.0.0", "{d}");
    assert_eq!(d["booted_slot"], "B");
    assert_eq!(d["status"], "online");
    let (_, list) = h
        .call(
            Method::GET,
            "/api/v1/devices?version=1.0.0",
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, dd) = h
        .call(
            Method::GET,
            &format!("/api/v1/deployments/{deployment}"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(dd["status"], "success", "{dd}");
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&cred), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // The release is in use: it cannot be deleted.
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/releases/{release}"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // A revert is shown with its reason.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/report",
            Some(&cred),
            Some(json!({"state": "reverted", "version": "0.9.0", "reason": "health check nginx failed"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&ops),
            None,
        )
        .await;
    assert_eq!(d["status"], "reverted");
    assert_eq!(d["status_reason"], "health check nginx failed");
    assert_eq!(d["current_version"], "0.9.0");
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/report",
            Some(&cred),
            Some(json!({"state": "exploded"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

async fn degraded_when_memory_is_high(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (device, cred) = h.enroll(&token, "busy", "qemu-aarch64").await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({"memory_used_bytes": 95, "memory_total_bytes": 100})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(d["status"], "degraded");
    let (_, v) = h
        .call(
            Method::GET,
            "/api/v1/devices?status=degraded",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({"memory_used_bytes": 50, "memory_total_bytes": 100})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(d["status"], "online");
    assert_eq!(h.count("heartbeats").await, 2);
    // Unknown inventory fields are refused.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({"gpu": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

async fn release_upload_conflict_and_delete(h: Arc<Harness>) {
    let bundle = std::fs::read(golden("valid.kxb")).unwrap();
    let (s, rel) = h.upload(&h.admin, bundle.clone()).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(h.blob_files(), 1);
    let (s, v) = h.upload(&h.admin, bundle.clone()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(h.count("releases").await, 1);
    let id = rel["id"].as_str().unwrap();
    let (s, detail) = h
        .call(
            Method::GET,
            &format!("/api/v1/releases/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(detail["manifest"]["compatible"], "qemu-aarch64");
    assert!(
        detail["signer"].as_str().unwrap().contains("CN="),
        "{detail}"
    );
    let (_, list) = h
        .call(Method::GET, "/api/v1/releases", Some(&h.admin), None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(list[0].get("manifest").is_none());
    // Over the size limit → 413, nothing stored.
    // (Separate server with a small limit.)
    let small = Harness::with_config(common::Db::Sqlite, |c| c.max_bundle_bytes = 1000).await;
    let (s, v) = small.upload(&small.admin, bundle.clone()).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(small.count("releases").await, 0);
    assert_eq!(small.blob_files(), 0);
    small.finish().await;
    // Unused: delete removes the row and the blob.
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/releases/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h.count("releases").await, 0);
    assert_eq!(h.blob_files(), 0);
    let (s, _) = h
        .call(
            Method::DELETE,
            &format!("/api/v1/releases/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Without a keyring uploads are refused with 409.
    sqlx::query("UPDATE organizations SET keyring_pem = NULL")
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let (s, _) = h.upload(&h.admin, bundle).await;
    assert_eq!(s, StatusCode::CONFLICT);
}

async fn audit_log_is_a_hash_chain(h: Arc<Harness>) {
    let ro = h.user("ro@example.com", "read_only").await;
    let (_, _) = h.enrollment_token(&h.admin, &[]).await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&ro),
            Some(json!({"label": "no", "expires_in_secs": 3600})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, page) = h.call(Method::GET, "/api/v1/audit", Some(&ro), None).await;
    assert_eq!(s, StatusCode::OK);
    let entries = page["entries"].as_array().unwrap();
    // bootstrap, the forced password change, keyring.set, user.create,
    // enrollment_token.create
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "enrollment_token.create",
            "user.create",
            "keyring.set",
            "user.password.change",
            "organization.bootstrap"
        ]
    );
    assert_eq!(entries[0]["actor"], "user:admin@localhost");
    assert_eq!(entries[0]["result"], "ok");
    assert!(
        entries[0]["target"]
            .as_str()
            .unwrap()
            .starts_with("enrollment_token:")
    );
    for pair in entries.windows(2) {
        assert_eq!(pair[0]["prev_hash"], pair[1]["hash"]);
    }
    assert_eq!(page["chain_broken_at"], Value::Null);
    // Tampering with a stored entry is detected.
    sqlx::query("UPDATE audit_log SET actor = 'user:someone-else' WHERE seq = 2")
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let (_, page) = h.call(Method::GET, "/api/v1/audit", Some(&ro), None).await;
    assert_eq!(page["chain_broken_at"], 2);
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM audit_log")
        .fetch_one(h.state.store.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(n, 5);
}

async fn openapi_and_metrics(h: Arc<Harness>) {
    let (s, doc) = h
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    for p in [
        "/api/v1/login",
        "/api/v1/releases",
        "/api/v1/device/poll",
        "/api/v1/device/enroll",
        "/api/v1/audit",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    let (_, _, bytes) = h
        .raw(Method::GET, "/metrics", None, &[], Body::empty())
        .await;
    let text = String::from_utf8(bytes).unwrap();
    assert!(
        text.contains(r#"kernex_http_requests_total{method="GET",route="/api/v1/openapi.json",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("kernex_http_request_duration_seconds_bucket"),
        "{text}"
    );
}

async fn device_logs_and_retention(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (device, cred) = h.enroll(&token, "logger", "qemu-aarch64").await;
    let now = kernex_server::store::now_ms();
    let day = 86_400_000i64;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred),
            Some(json!({"entries": [
                {"level": "info", "message": "fresh", "at": now - 1000},
                {"level": "error", "message": "disk full", "at": now - 2000},
                {"level": "info", "message": "ancient", "at": now - 31 * day},
            ]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = h
        .call(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred),
            Some(json!({"entries": [{"level": "loud", "message": "x"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let path = format!("/api/v1/devices/{device}/logs");
    let (_, all) = h.call(Method::GET, &path, Some(&h.admin), None).await;
    let messages: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["fresh", "disk full", "ancient"]);
    let (_, errors) = h
        .call(
            Method::GET,
            &format!("{path}?level=error"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(errors.as_array().unwrap().len(), 1);
    assert_eq!(errors[0]["message"], "disk full");
    let (_, none) = h
        .call(
            Method::GET,
            &format!("{path}?level=%27%20OR%201%3D1%20--"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(none, json!([]));
    // Heartbeats: one now, one 8 days old (inserted directly).
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Older ones, inserted directly: 8 days old, and two 2 days old.
    for (id, at, cpu, mem, status) in [
        ("old", now - 8 * day, 5.0, 40.0, "healthy"),
        ("two-a", now - 2 * day, 10.0, 50.0, "healthy"),
        ("two-b", now - 2 * day + 1000, 30.0, 95.0, "degraded"),
    ] {
        sqlx::query("INSERT INTO heartbeats (id, device_pk, org_id, at, cpu_percent, memory_percent, status, inventory) SELECT $1, id, org_id, $2, $3, $4, $5, '{}' FROM devices WHERE id = $6")
            .bind(id)
            .bind(at)
            .bind(cpu)
            .bind(mem)
            .bind(status)
            .bind(&device)
            .execute(h.state.store.pool())
            .await
            .unwrap();
    }
    assert_eq!(h.count("heartbeats").await, 4);
    // A device cannot date a line more than a day back (its "ancient" line
    // was clamped to a day ago); a line stored 31 days ago is pruned.
    sqlx::query("INSERT INTO device_logs (id, device_pk, org_id, at, level, message) SELECT 'old-line', id, org_id, $1, 'info', 'stored long ago' FROM devices WHERE id = $2")
        .bind(now - 31 * day)
        .bind(&device)
        .execute(h.state.store.pool())
        .await
        .unwrap();
    let expected = kernex_server::retention::Pruned {
        heartbeats: 3,
        daily: 1,
        logs: 1,
    };
    let pruned = kernex_server::retention::prune(&h.state.store, now, 7, 30)
        .await
        .unwrap();
    assert_eq!(pruned, expected);
    // The two 2-day-old samples are one daily row; the 8-day-old one is gone.
    let row = sqlx::query("SELECT samples, cpu_percent_sum, cpu_samples, memory_percent_max, degraded_samples FROM heartbeats_daily")
        .fetch_one(h.state.store.pool())
        .await
        .unwrap();
    assert_eq!(row.try_get::<i64, _>("samples").unwrap(), 2);
    assert_eq!(row.try_get::<f64, _>("cpu_percent_sum").unwrap(), 40.0);
    assert_eq!(row.try_get::<i64, _>("cpu_samples").unwrap(), 2);
    assert_eq!(row.try_get::<f64, _>("memory_percent_max").unwrap(), 95.0);
    assert_eq!(row.try_get::<i64, _>("degraded_samples").unwrap(), 1);
    assert_eq!(h.count("heartbeats_daily").await, 1);
    // Pruning again changes nothing.
    let again = kernex_server::retention::prune(&h.state.store, now, 7, 30)
        .await
        .unwrap();
    assert_eq!(again, kernex_server::retention::Pruned::default());
    assert_eq!(h.count("heartbeats_daily").await, 1);
    assert_eq!(h.count("heartbeats").await, 1);
    let (_, all) = h.call(Method::GET, &path, Some(&h.admin), None).await;
    assert_eq!(
        all.as_array().unwrap().len(),
        3,
        "the clamped line stays a day"
    );
}

async fn idempotency_keys_replay_instead_of_repeating(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (_, cred) = h.enroll(&token, "retrier", "qemu-aarch64").await;
    let logs =
        |msg: &str| Body::from(json!({"entries": [{"level": "info", "message": msg}]}).to_string());
    let headers = [
        ("content-type", "application/json"),
        ("idempotency-key", "batch-1"),
    ];
    let (s, first, _) = h
        .raw(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred),
            &headers,
            logs("once"),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(first.get("idempotent-replayed").is_none());
    // The retry is answered from the store; the batch is not stored twice.
    let (s, again, _) = h
        .raw(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred),
            &headers,
            logs("once"),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(again["idempotent-replayed"], "true");
    assert_eq!(h.count("device_logs").await, 1);
    // The same key with another body: 422, nothing stored.
    let (s, _, body) = h
        .raw(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred),
            &headers,
            logs("other"),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "unprocessable");
    assert_eq!(h.count("device_logs").await, 1);
    // Keys are per caller: another device may use the same key.
    let (_, cred2) = h.enroll(&token, "retrier-2", "qemu-aarch64").await;
    let (s, _, _) = h
        .raw(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred2),
            &headers,
            logs("once"),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h.count("device_logs").await, 2);
    // A JSON response (an error here) is replayed byte for byte.
    let bad = [
        ("content-type", "application/json"),
        ("idempotency-key", "user-1"),
    ];
    let user =
        || Body::from(json!({"email": "x@y", "password": "short", "role": "ops"}).to_string());
    let (s1, _, b1) = h
        .raw(Method::POST, "/api/v1/users", Some(&h.admin), &bad, user())
        .await;
    let (s2, h2, b2) = h
        .raw(Method::POST, "/api/v1/users", Some(&h.admin), &bad, user())
        .await;
    assert_eq!((s1, s2), (StatusCode::BAD_REQUEST, StatusCode::BAD_REQUEST));
    assert_eq!(b1, b2);
    assert_eq!(h2["content-type"], "application/json");
    // Without a key, requests run each time.
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/logs",
            Some(&cred),
            Some(json!({"entries": [{"level": "info", "message": "once"}]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(h.count("device_logs").await, 3);
    assert_eq!(h.count("idempotency_keys").await, 3);
}

async fn session_cookie_and_logout(h: Arc<Harness>) {
    h.user("web@example.com", "ops").await;
    let (s, headers, body) = h
        .raw(
            Method::POST,
            "/api/v1/login",
            None,
            &[("content-type", "application/json")],
            Body::from(
                json!({"email": "web@example.com", "password": "correct horse battery"})
                    .to_string(),
            ),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let cookie = headers["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let token = serde_json::from_slice::<Value>(&body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let pair = cookie.split(';').next().unwrap().to_string();
    assert_eq!(pair, format!("kernex_session={token}"));
    // The cookie authenticates reads and JSON writes...
    let (s, _, _) = h
        .raw(
            Method::GET,
            "/api/v1/me",
            None,
            &[("cookie", &pair)],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = h
        .raw(
            Method::POST,
            "/api/v1/enrollment-tokens",
            None,
            &[("cookie", &pair), ("content-type", "application/json")],
            Body::from(r#"{"label": "from the UI", "expires_in_secs": 3600}"#),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    // ...but not a form post (what a cross-site page could send).
    let (s, _, _) = h
        .raw(
            Method::POST,
            "/api/v1/devices/x/revoke",
            None,
            &[
                ("cookie", &pair),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            Body::from("a=b"),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Logout revokes the token for bearer and cookie alike.
    let (s, headers, _) = h
        .raw(
            Method::POST,
            "/api/v1/logout",
            Some(&token),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(
        headers["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let (s, _) = h.call(Method::GET, "/api/v1/me", Some(&token), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = h
        .raw(
            Method::GET,
            "/api/v1/me",
            None,
            &[("cookie", &pair)],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // The admin's own token is unaffected.
    let (s, _) = h
        .call(Method::GET, "/api/v1/me", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
}

/// Rate limits need their own configuration; SQLite only (the limiter is in
/// memory and does not touch the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let h = Harness::with_config(common::Db::Sqlite, |c| {
        c.device_requests_per_minute = 3;
        c.uploads_per_minute = 1;
    })
    .await;
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (_, cred) = h.enroll(&token, "chatty", "qemu-aarch64").await;
    let (_, other) = h.enroll(&token, "quiet", "qemu-aarch64").await;
    for _ in 0..3 {
        let (s, _) = h
            .call(Method::GET, "/api/v1/device/poll", Some(&cred), None)
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    let (s, headers, body) = h
        .raw(
            Method::GET,
            "/api/v1/device/poll",
            Some(&cred),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "too many requests");
    // Another device is not affected.
    let (s, _) = h
        .call(Method::GET, "/api/v1/device/poll", Some(&other), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Uploads: the second within the minute is refused before it is read.
    let (s, _) = h.upload(&h.admin, b"not a bundle".to_vec()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, v) = h.upload(&h.admin, b"not a bundle".to_vec()).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    h.finish().await;
}

async fn failed_install_marks_the_release_unstable(h: Arc<Harness>) {
    let f = fixture(&h).await;
    let path = format!("/api/v1/releases/{}", f.release);
    let (_, rel) = h.call(Method::GET, &path, Some(&h.admin), None).await;
    assert_eq!(rel["unstable"], false);
    let report = json!({"state": "failed", "release_id": f.release, "reason": "sha256 mismatch in chunk 17"});
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/report",
            Some(&f.credential),
            Some(report),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, rel) = h.call(Method::GET, &path, Some(&h.admin), None).await;
    assert_eq!(rel["unstable"], true);
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{}", f.device),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(d["status"], "error");
    assert_eq!(d["status_reason"], "sha256 mismatch in chunk 17");
    let (_, dep) = h
        .call(
            Method::GET,
            &format!("/api/v1/deployments/{}", f.deployment),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(dep["status"], "failed");
    assert_eq!(dep["devices"][0]["reason"], "sha256 mismatch in chunk 17");
}

/// A device with no contact for `offline-after-secs` is shown offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_devices_are_offline() {
    let h = Harness::with_config(common::Db::Sqlite, |c| c.offline_after_secs = 1).await;
    let (_, token) = h.enrollment_token(&h.admin, &[]).await;
    let (device, cred) = h.enroll(&token, "sleepy", "qemu-aarch64").await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&cred),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let path = format!("/api/v1/devices/{device}");
    let (_, d) = h.call(Method::GET, &path, Some(&h.admin), None).await;
    assert_eq!(d["status"], "online");
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let (_, d) = h.call(Method::GET, &path, Some(&h.admin), None).await;
    assert_eq!(d["status"], "offline");
    let (_, list) = h
        .call(
            Method::GET,
            "/api/v1/devices?status=offline",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, list) = h
        .call(
            Method::GET,
            "/api/v1/devices?status=online",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(list, json!([]));
    h.finish().await;
}

async fn device_tags_are_replaced_and_filtered_on(h: Arc<Harness>) {
    let (_, token) = h.enrollment_token(&h.admin, &["lab"]).await;
    let (device, _) = h.enroll(&token, "tagged-1", "qemu-aarch64").await;
    let path = format!("/api/v1/devices/{device}/tags");
    let (s, v) = h
        .call(
            Method::PUT,
            &path,
            Some(&h.admin.clone()),
            Some(json!({"tags": ["site-b", "canary", "site-b"]})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&h.admin.clone()),
            None,
        )
        .await;
    assert_eq!(d["tags"], json!(["canary", "site-b"]), "{d}");
    let (_, list) = h
        .call(
            Method::GET,
            "/api/v1/devices?tag=canary",
            Some(&h.admin.clone()),
            None,
        )
        .await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let (_, list) = h
        .call(
            Method::GET,
            "/api/v1/devices?tag=lab",
            Some(&h.admin.clone()),
            None,
        )
        .await;
    assert_eq!(
        list.as_array().unwrap().len(),
        0,
        "the enrollment tag was replaced: {list}"
    );
    // Bad tags: 400 naming the tag, nothing changed.
    let (s, v) = h
        .call(
            Method::PUT,
            &path,
            Some(&h.admin.clone()),
            Some(json!({"tags": ["no spaces"]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("no spaces"), "{v}");
    let (_, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{device}"),
            Some(&h.admin.clone()),
            None,
        )
        .await;
    assert_eq!(d["tags"], json!(["canary", "site-b"]), "{d}");
    // Unknown device: 404.
    let (s, _) = h
        .call(
            Method::PUT,
            "/api/v1/devices/nope/tags",
            Some(&h.admin.clone()),
            Some(json!({"tags": []})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, audit) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin.clone()), None)
        .await;
    assert!(audit.to_string().contains("device.tags"), "{audit}");
}
