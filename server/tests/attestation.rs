//! TPM identity and attestation through the HTTP API, with a real swtpm per
//! device (the device side of `kernex-attest`), on SQLite and PostgreSQL:
//! pre-authorisation by the factory line, enrollment with credential
//! activation, a quote nonce in the poll answer, quotes verified against the
//! release the device claims to run, and every bad input rejected with its
//! reason and without touching the stored attestation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../attest/tests/common/mod.rs"]
mod swtpm;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::{Harness, golden};
use kernex_attest::{AkBlob, Quote, Tpm, TpmIdentity, slot_measurement};
use kernex_protocol::{Manifest, Sha256Digest};
use serde_json::{Value, json};
use swtpm::{EkCert, LocalCa, Swtpm};

both!(
    factory_preauthorisation_and_enrollment_policy,
    activation_then_quotes_attested_mismatch_and_rejections,
    the_factory_line_client_preauthorises_what_the_device_enrolls_with,
    an_enrolled_device_binds_its_tpm_later_and_is_attested,
    a_tpm_re_enrollment_with_the_same_ek_moves_the_device_key,
);

mod vendor_cas_on_sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ek_certificates_must_chain_to_a_trusted_vendor_ca() {
        super::vendor_cas(super::common::Db::Sqlite).await;
    }
}

mod vendor_cas_on_postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ek_certificates_must_chain_to_a_trusted_vendor_ca() {
        super::vendor_cas(super::common::Db::Postgres).await;
    }
}

mod gate_on_sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rollout_gate_waits_for_attestation_and_a_mismatch_fails() {
        super::gate(super::common::Db::Sqlite).await;
    }
}

mod gate_on_postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rollout_gate_waits_for_attestation_and_a_mismatch_fails() {
        super::gate(super::common::Db::Postgres).await;
    }
}

const PCR: u8 = 14;

/// A device's TPM: a swtpm, the AK created in it, its identity.
struct DeviceTpm {
    swtpm: Swtpm,
    ak: AkBlob,
    identity: TpmIdentity,
}

impl DeviceTpm {
    fn new() -> Self {
        Self::with(EkCert::System)
    }

    fn with(ek: EkCert<'_>) -> Self {
        let swtpm = Swtpm::start_with(ek);
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        let ak = tpm.create_ak().unwrap();
        let ek = tpm.endorsement().unwrap();
        let identity = TpmIdentity {
            ek_public: ek.public,
            ek_certificate: ek.certificate,
            ak_public: ak.public.clone(),
        };
        Self {
            swtpm,
            ak,
            identity,
        }
    }

    fn tpm(&self) -> Tpm {
        Tpm::open(&self.swtpm.tcti()).unwrap()
    }

    fn identity_json(&self) -> Value {
        serde_json::to_value(&self.identity).unwrap()
    }

    /// Answers an enrollment's activation challenge with this TPM.
    fn activate(&self, enrolled: &Value) -> String {
        let a = &enrolled["activation"];
        let id_object = hex::decode(a["id-object"].as_str().unwrap()).unwrap();
        let secret = hex::decode(a["encrypted-secret"].as_str().unwrap()).unwrap();
        hex::encode(
            self.tpm()
                .activate_credential(&self.ak, &id_object, &secret)
                .unwrap(),
        )
    }

    fn quote(&self, nonce: &str) -> Quote {
        self.tpm()
            .quote(&self.ak, &hex::decode(nonce).unwrap(), &[PCR])
            .unwrap()
    }

    /// A power cycle: PCRs back to zero.
    fn reboot(&mut self) {
        self.swtpm.reboot();
    }
}

async fn preauthorize(h: &Harness, body: Value) -> (StatusCode, Value) {
    h.call(
        Method::POST,
        "/api/v1/tpm/preauthorizations",
        Some(&h.admin),
        Some(body),
    )
    .await
}

async fn token(h: &Harness, preauthorized: bool, tpm: bool) -> String {
    let (s, body) = h
        .call(
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            Some(json!({"label": "line 2", "require_preauthorization": preauthorized, "require_tpm": tpm, "expires_in_secs": 86_400})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["require_preauthorization"], preauthorized);
    assert_eq!(body["require_tpm"], tpm);
    body["token"].as_str().unwrap().to_string()
}

async fn enroll(
    h: &Harness,
    token: &str,
    device_id: &str,
    tpm: Option<Value>,
) -> (StatusCode, Value) {
    enroll_as(h, token, device_id, "qemu-x86_64", tpm).await
}

async fn enroll_as(
    h: &Harness,
    token: &str,
    device_id: &str,
    class: &str,
    tpm: Option<Value>,
) -> (StatusCode, Value) {
    let mut body =
        json!({"enrollment_token": token, "device_id": device_id, "hardware_class": class});
    if let Some(t) = tpm {
        body["tpm"] = t;
    }
    h.call(Method::POST, "/api/v1/device/enroll", None, Some(body))
        .await
}

/// Polls; the status and the quote nonce header.
async fn poll(h: &Harness, credential: &str) -> (StatusCode, Option<String>) {
    let (s, headers, _) = h
        .raw(
            Method::GET,
            "/api/v1/device/poll",
            Some(credential),
            &[],
            Body::empty(),
        )
        .await;
    let nonce = headers
        .get("kernex-attestation-nonce")
        .map(|v| v.to_str().unwrap().to_string());
    (s, nonce)
}

/// The auth matrix of a device enrolled under a TPM policy that has not
/// activated: every device endpoint but activation and the quote answers
/// 403 naming the missing activation (nothing is stored).
async fn assert_unproven_refused(h: &Harness, credential: &str) {
    let (s, _) = poll(h, credential).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "poll");
    let (s, _, body) = h
        .raw(
            Method::GET,
            "/api/v1/device/releases/x/bundle",
            Some(credential),
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "download");
    assert!(
        String::from_utf8_lossy(&body).contains("credential activation"),
        "download: {}",
        String::from_utf8_lossy(&body)
    );
    for (path, body) in [
        (
            "/api/v1/device/heartbeat",
            json!({"version": "1.0.0", "booted_slot": "A"}),
        ),
        (
            "/api/v1/device/report",
            json!({"state": "committed", "version": "9.9.9"}),
        ),
        (
            "/api/v1/device/logs",
            json!({"entries": [{"level": "info", "message": "not bound yet"}]}),
        ),
    ] {
        let (s, v) = h
            .call(Method::POST, path, Some(credential), Some(body))
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("credential activation"),
            "{path}: {v}"
        );
    }
}

async fn attestation_of(h: &Harness, id: &str) -> Value {
    let (s, d) = h
        .call(
            Method::GET,
            &format!("/api/v1/devices/{id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{d}");
    d["attestation"].clone()
}

async fn factory_preauthorisation_and_enrollment_policy(h: Arc<Harness>) {
    let board = DeviceTpm::new();
    let other = DeviceTpm::new();
    let ek = hex::encode(&board.identity.ek_public);
    let cert = board.identity.ek_certificate.as_ref().map(hex::encode);

    // Pre-authorise: created, then the same again is a retry (200).
    let (s, p) = preauthorize(
        &h,
        json!({"device_id": "sn-1", "ek_public": ek, "ek_certificate": cert}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let fp = p["ek_fingerprint"].as_str().unwrap().to_string();
    assert_eq!(fp.len(), 64);
    assert_eq!(p["ek_certificate"], cert.is_some());
    let (s, again) = preauthorize(&h, json!({"device_id": "sn-1", "ek_public": ek})).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["id"], p["id"]);
    // The same serial with another EK, or the same EK for another serial.
    let (s, v) = preauthorize(
        &h,
        json!({"device_id": "sn-1", "ek_public": hex::encode(&other.identity.ek_public)}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = preauthorize(&h, json!({"device_id": "sn-9", "ek_public": ek})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("sn-1"), "{v}");
    // Bad EKs: not hex, not a TPMT_PUBLIC, an AK instead of an EK, a
    // certificate of another TPM.
    let (s, v) = preauthorize(&h, json!({"device_id": "sn-2", "ek_public": "zz"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = preauthorize(&h, json!({"device_id": "sn-2", "ek_public": "0001000b"})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = preauthorize(
        &h,
        json!({"device_id": "sn-2", "ek_public": hex::encode(&board.identity.ak_public)}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    if let Some(other_cert) = &other.identity.ek_certificate {
        let (s, v) = preauthorize(&h, json!({"device_id": "sn-2", "ek_public": ek, "ek_certificate": hex::encode(other_cert)})).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("another key"), "{v}");
    }
    // By serial only (a board without TPM).
    let (s, v) = preauthorize(&h, json!({"device_id": "sn-3"})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v["ek_fingerprint"].is_null());
    // Read-only operators cannot pre-authorise.
    let ro = h.user("ro@example.com", "read_only").await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/tpm/preauthorizations",
            Some(&ro),
            Some(json!({"device_id": "sn-4"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, list) = h
        .call(
            Method::GET,
            "/api/v1/tpm/preauthorizations",
            Some(&ro),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");

    // A factory token: pre-authorised devices only.
    let line = token(&h, true, false).await;
    let (s, v) = enroll(&h, &line, "sn-7", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("not pre-authorised"),
        "{v}"
    );
    // sn-1's EK was recorded: no TPM, or another TPM, is refused.
    let (s, v) = enroll(&h, &line, "sn-1", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(v["detail"].as_str().unwrap().contains(&fp), "{v}");
    let (s, v) = enroll(&h, &line, "sn-1", Some(other.identity_json())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("EK not pre-authorised"),
        "{v}"
    );
    // sn-3 was pre-authorised by serial: it enrolls without a TPM.
    let (s, v) = enroll(&h, &line, "sn-3", None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert!(v.get("activation").is_none(), "{v}");
    assert_eq!(
        attestation_of(&h, v["id"].as_str().unwrap()).await["state"],
        "unattested"
    );
    // A TPM token refuses a device without one.
    let tpm_only = token(&h, false, true).await;
    let (s, v) = enroll(&h, &tpm_only, "sn-8", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("TPM identity"),
        "{v}"
    );
    // The board's own TPM gets a challenge; until it answers, no release.
    let (s, v) = enroll(&h, &line, "sn-1", Some(board.identity_json())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let credential = v["credential"].as_str().unwrap().to_string();
    assert!(v["activation"]["id-object"].is_string(), "{v}");
    assert_unproven_refused(&h, &credential).await;
    // A malformed identity is a 4xx, never a 500.
    let mut broken = board.identity_json();
    broken["ak-public"] = json!("00");
    let (s, v) = enroll(&h, &tpm_only, "sn-5", Some(broken)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = enroll(&h, &tpm_only, "sn-5", Some(json!({"ek-public": "00"}))).await;
    assert!(s.is_client_error(), "{s}: {v}");
    // Removing a pre-authorisation.
    let (s, _) = h
        .call(
            Method::DELETE,
            "/api/v1/tpm/preauthorizations/sn-3",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call(
            Method::DELETE,
            "/api/v1/tpm/preauthorizations/sn-3",
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

async fn activation_then_quotes_attested_mismatch_and_rejections(h: Arc<Harness>) {
    let mut board = DeviceTpm::new();
    let other = DeviceTpm::new();
    let (s, release) = h
        .upload(&h.admin, std::fs::read(golden("valid.kxb")).unwrap())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{release}");
    let version = release["version"].as_str().unwrap().to_string();
    let (s, detail) = h
        .call(
            Method::GET,
            &format!("/api/v1/releases/{}", release["id"].as_str().unwrap()),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let manifest = Manifest::from_slice(detail["manifest"].to_string().as_bytes()).unwrap();
    let measurement = slot_measurement(&manifest).unwrap();

    let line = token(&h, false, true).await;
    let (s, v) = enroll(&h, &line, "sn-1", Some(board.identity_json())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let credential = v["credential"].as_str().unwrap().to_string();

    // A wrong answer burns the challenge; another enrollment makes a new one.
    let activate = |answer: String| {
        let h = h.clone();
        let credential = credential.clone();
        async move {
            h.call(
                Method::POST,
                "/api/v1/device/activate",
                Some(&credential),
                Some(json!({"credential": answer})),
            )
            .await
        }
    };
    let (s, err) = activate("00".repeat(32)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{err}");
    assert!(
        err["detail"].as_str().unwrap().contains("answered wrongly"),
        "{err}"
    );
    let (s, err) = activate(board.activate(&v)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");
    // Another TPM cannot open the board's challenge at all.
    let (s, v) = enroll(&h, &line, "sn-1", Some(board.identity_json())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let credential = v["credential"].as_str().unwrap().to_string();
    let a = &v["activation"];
    let opened = other.tpm().activate_credential(
        &other.ak,
        &hex::decode(a["id-object"].as_str().unwrap()).unwrap(),
        &hex::decode(a["encrypted-secret"].as_str().unwrap()).unwrap(),
    );
    assert!(opened.is_err(), "another TPM opened the challenge");
    let (s, ok) = h
        .call(
            Method::POST,
            "/api/v1/device/activate",
            Some(&credential),
            Some(json!({"credential": board.activate(&v)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    assert_eq!(ok["attestation"], "pending");
    let view = attestation_of(&h, &id).await;
    assert_eq!(view["state"], "pending", "{view}");
    assert_eq!(view["ek_fingerprint"].as_str().unwrap().len(), 64);
    // The TPM is now bound to the id: the other TPM cannot take it over.
    let (s, v) = enroll(&h, &line, "sn-1", Some(other.identity_json())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    // Nor can someone who knows the (public) EK: re-enrolling with the
    // board's EK and a foreign AK yields a credential that works only once
    // the board's TPM answers, which it cannot for another AK.
    let mut forged = board.identity_json();
    forged["ak-public"] = json!(hex::encode(&other.identity.ak_public));
    let (s, v) = enroll(&h, &line, "sn-1", Some(forged)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let forged_credential = v["credential"].as_str().unwrap().to_string();
    assert_eq!(
        poll(&h, &forged_credential).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, err) = h
        .call(
            Method::POST,
            "/api/v1/device/activate",
            Some(&forged_credential),
            Some(json!({"credential": "11".repeat(32)})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{err}");
    assert_eq!(
        poll(&h, &forged_credential).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(
        poll(&h, &credential).await.0.is_success(),
        "the board's credential still works"
    );
    // The board itself re-enrolls: its new credential takes over only
    // after its TPM answered.
    let (s, v) = enroll(&h, &line, "sn-1", Some(board.identity_json())).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let renewed = v["credential"].as_str().unwrap().to_string();
    assert_eq!(poll(&h, &renewed).await.0, StatusCode::UNAUTHORIZED);
    let (s, ok) = h
        .call(
            Method::POST,
            "/api/v1/device/activate",
            Some(&renewed),
            Some(json!({"credential": board.activate(&v)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    assert_eq!(poll(&h, &credential).await.0, StatusCode::UNAUTHORIZED);
    let credential = renewed;
    let (s, v) = enroll(&h, &line, "sn-2", Some(board.identity_json())).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    // The device runs the release: heartbeat, poll → a nonce, kept until
    // answered.
    let heartbeat = |v: &str| {
        let h = h.clone();
        let credential = credential.clone();
        let v = v.to_string();
        async move {
            let (s, _) = h
                .call(
                    Method::POST,
                    "/api/v1/device/heartbeat",
                    Some(&credential),
                    Some(json!({"version": v, "booted_slot": "B"})),
                )
                .await;
            assert_eq!(s, StatusCode::NO_CONTENT);
        }
    };
    heartbeat(&version).await;
    let (s, nonce) = poll(&h, &credential).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let nonce = nonce.expect("a nonce for a bound device without a quote");
    assert_eq!(nonce.len(), 64);
    assert_eq!(
        poll(&h, &credential).await.1.as_deref(),
        Some(nonce.as_str())
    );

    let post_quote = |body: Value| {
        let h = h.clone();
        let credential = credential.clone();
        async move {
            h.call(
                Method::POST,
                "/api/v1/device/attestation",
                Some(&credential),
                Some(body),
            )
            .await
        }
    };
    // Boot: the measurement extended into the slot PCR; the quote attests.
    board
        .tpm()
        .extend_slot_measurement(PCR, &measurement)
        .unwrap();
    let quote = board.quote(&nonce);
    let (s, r) = post_quote(json!({"version": version, "quote": quote})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["attestation"], "attested", "{r}");
    let view = attestation_of(&h, &id).await;
    assert_eq!(view["state"], "attested", "{view}");
    assert_eq!(view["version"], version.as_str());
    let (s, list) = h
        .call(Method::GET, "/api/v1/devices", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list[0]["attestation"]["state"], "attested");
    // Fresh: no nonce now.
    assert_eq!(poll(&h, &credential).await.1, None);

    // Rejections change nothing. A replayed quote meets no nonce.
    let (s, err) = post_quote(json!({"version": version, "quote": quote})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(
        err["detail"]
            .as_str()
            .unwrap()
            .contains("stale or replayed"),
        "{err}"
    );
    // A claimed version that is no release.
    heartbeat("0.0.1-unknown").await;
    assert_eq!(attestation_of(&h, &id).await["state"], "stale");
    let nonce = poll(&h, &credential)
        .await
        .1
        .expect("a nonce for a stale attestation");
    let (s, err) =
        post_quote(json!({"version": "0.0.1-unknown", "quote": board.quote(&nonce)})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(
        err["detail"].as_str().unwrap().contains("not a release"),
        "{err}"
    );
    heartbeat(&version).await;
    // A quote by another TPM's AK over the outstanding nonce.
    let nonce = poll(&h, &credential).await.1;
    assert_eq!(nonce, None, "attested for this version and fresh again");
    sqlx::query("UPDATE devices SET attested_at = 0 WHERE id = $1")
        .bind(&id)
        .execute(h.state.store.pool())
        .await
        .unwrap();
    assert_eq!(attestation_of(&h, &id).await["state"], "stale");
    let nonce = poll(&h, &credential)
        .await
        .1
        .expect("a nonce for an old attestation");
    let (s, err) = post_quote(json!({"version": version, "quote": other.quote(&nonce)})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(
        err["detail"].as_str().unwrap().contains("signature"),
        "{err}"
    );
    // Malformed quote bytes: rejected by name, no panic.
    let nonce = poll(&h, &credential).await.1.unwrap();
    let mut bad = serde_json::to_value(board.quote(&nonce)).unwrap();
    bad["attest"] = json!("ff544347");
    let (s, err) = post_quote(json!({"version": version, "quote": bad})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(
        err["detail"].as_str().unwrap().contains("quote rejected"),
        "{err}"
    );
    let (s, err) = post_quote(
        json!({"version": version, "quote": {"attest": "zz", "signature": "", "pcrs": {}}}),
    )
    .await;
    assert!(s.is_client_error(), "{s}: {err}");
    // The stored attestation survived all of it (old, hence stale).
    let view = attestation_of(&h, &id).await;
    assert_eq!(view["version"], version.as_str(), "{view}");
    assert_eq!(view["state"], "stale", "{view}");

    // A different image booted (a swapped rootfs): the quote verifies, the
    // slot PCR names the mismatch.
    board.reboot();
    board
        .tpm()
        .extend_slot_measurement(PCR, &Sha256Digest::of(b"another image"))
        .unwrap();
    let nonce = poll(&h, &credential).await.1.unwrap();
    let (s, r) = post_quote(json!({"version": version, "quote": board.quote(&nonce)})).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["attestation"], "mismatch", "{r}");
    assert!(
        r["reason"].as_str().unwrap().starts_with("PCR 14 is "),
        "{r}"
    );
    let view = attestation_of(&h, &id).await;
    assert_eq!(view["state"], "mismatch", "{view}");
    // The audit log holds every attempt.
    let (s, audit) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let text = audit.to_string();
    assert!(text.contains("device.attestation"), "{text}");
    assert!(text.contains("device.tpm-activate"), "{text}");
}

/// The slot PCR measurement of an uploaded release.
async fn measurement_of(h: &Harness, release_id: &str) -> Sha256Digest {
    let (s, detail) = h
        .call(
            Method::GET,
            &format!("/api/v1/releases/{release_id}"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{detail}");
    let manifest = Manifest::from_slice(detail["manifest"].to_string().as_bytes()).unwrap();
    slot_measurement(&manifest).unwrap()
}

async fn gate(db: common::Db) {
    common::run_with(
        db,
        |c| {
            c.test_clock = true;
            c.scheduler_interval_ms = 0;
        },
        gate_body,
    )
    .await;
}

/// A rollout whose waves require attestation: a committed device holds its
/// wave until a quote for the new release attests it; in the next wave a
/// quote showing another image counts as a failure and rolls back.
async fn gate_body(h: Arc<Harness>) {
    let ids = common::upload_sim_releases(&h).await;
    let target = measurement_of(&h, &ids[1]).await;

    let line = token(&h, false, true).await;
    let mut devices = Vec::new();
    for name in ["g-1", "g-2"] {
        let board = DeviceTpm::new();
        let (s, v) = enroll_as(&h, &line, name, "sim-x86", Some(board.identity_json())).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let credential = v["credential"].as_str().unwrap().to_string();
        // Before activation: refused (and this answer is what a credential
        // cache would hold).
        let (s, _) = h
            .call(
                Method::POST,
                "/api/v1/device/heartbeat",
                Some(&credential),
                Some(json!({"version": "1.0.0"})),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, ok) = h
            .call(
                Method::POST,
                "/api/v1/device/activate",
                Some(&credential),
                Some(json!({"credential": board.activate(&v)})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{ok}");
        let (s, _) = h
            .call(
                Method::POST,
                "/api/v1/device/heartbeat",
                Some(&credential),
                Some(json!({"version": "1.0.0"})),
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        devices.push((id, credential, board));
    }
    // A board without a TPM (a plain token), and one enrolled under the
    // TPM token that never answered its activation challenge.
    let (_, plain) = h.enrollment_token(&h.admin, &[]).await;
    let (no_tpm, no_tpm_credential) = h.enroll(&plain, "g-no-tpm", "sim-x86").await;
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/heartbeat",
            Some(&no_tpm_credential),
            Some(json!({"version": "1.0.0"})),
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let unactivated_board = DeviceTpm::new();
    let (s, v) = enroll_as(
        &h,
        &line,
        "g-unactivated",
        "sim-x86",
        Some(unactivated_board.identity_json()),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_unproven_refused(&h, v["credential"].as_str().unwrap()).await;

    let gates = json!({"require_attestation": true, "promote_min_committed": 1.0});
    // Canaries attested, the rest not: the board without a TPM moves to
    // wave 2; the unactivated one is never selected.
    let (s, p) = h
        .call(
            Method::POST,
            "/api/v1/rollouts/preview",
            Some(&h.admin),
            Some(json!({
                "release_id": ids[1],
                "waves": [{"count": 2, "soak_secs": 0, "gates": gates}, {"percent": 100.0, "soak_secs": 0}],
            })),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["targets"], 3, "{p}");
    assert_eq!(p["unactivated"], 1, "{p}");
    assert_eq!(p["no_tpm_left_out"], 0, "{p}");
    assert_eq!(p["waves"][0]["devices"], 2, "{p}");
    assert_eq!(p["waves"][0]["requires_attestation"], true, "{p}");
    let moved = p["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == no_tpm.as_str())
        .unwrap();
    assert_eq!(moved["wave"], 2, "{p}");
    let warnings = p["warnings"].to_string();
    assert!(warnings.contains("activation"), "{p}");
    if p["waves"][0]["cannot_attest"] == 1 {
        assert!(warnings.contains("they move to wave 2"), "{p}");
    }

    // Every wave attested: it is left out, and the preview says so.
    let spec = json!({
        "name": "attested",
        "release_id": ids[1],
        "waves": [
            {"count": 1, "soak_secs": 5, "gates": gates},
            {"percent": 100.0, "soak_secs": 0, "gates": gates},
        ],
    });
    let (s, p) = h
        .call(
            Method::POST,
            "/api/v1/rollouts/preview",
            Some(&h.admin),
            Some(spec.clone()),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["targets"], 2, "{p}");
    assert_eq!(p["no_tpm_left_out"], 1, "{p}");
    assert_eq!(p["unactivated"], 1, "{p}");
    let cannot: u64 = p["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["cannot_attest"].as_u64().unwrap())
        .sum();
    assert_eq!(cannot, 1, "{p}");
    assert_eq!(p["warnings"].as_array().unwrap().len(), 2, "{p}");
    assert!(
        p["warnings"]
            .to_string()
            .contains("left out of the rollout"),
        "{p}"
    );
    let (s, rollout) = h
        .call(Method::POST, "/api/v1/rollouts", Some(&h.admin), Some(spec))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{rollout}");
    let rid = rollout["id"].as_str().unwrap().to_string();
    let (s, v) = h
        .call(
            Method::POST,
            &format!("/api/v1/rollouts/{rid}/start"),
            Some(&h.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["devices_total"], 2, "{v}");
    assert_eq!(v["left_out"], json!({"no_tpm": 1, "unactivated": 1}), "{v}");
    let step = || {
        let h = h.clone();
        async move {
            let (s, v) = h
                .call(
                    Method::POST,
                    "/api/v1/test/clock",
                    Some(&h.admin),
                    Some(json!({"advance_ms": 1000})),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
    };
    let detail = |rid: String| {
        let h = h.clone();
        async move {
            let (s, d) = h
                .call(
                    Method::GET,
                    &format!("/api/v1/rollouts/{rid}"),
                    Some(&h.admin),
                    None,
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{d}");
            d
        }
    };
    let in_wave = |d: &Value, wave: u64| {
        d["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["wave"] == wave)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let install = |credential: String| {
        let h = h.clone();
        let release = ids[1].clone();
        async move {
            for state in ["downloading", "installed", "rebooted", "committed"] {
                let mut body = json!({"state": state, "release_id": release});
                if state == "committed" {
                    body["version"] = json!("1.1.0");
                }
                let (s, v) = h
                    .call(
                        Method::POST,
                        "/api/v1/device/report",
                        Some(&credential),
                        Some(body),
                    )
                    .await;
                assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
            }
        }
    };
    step().await;
    let d = detail(rid.clone()).await;
    let first = in_wave(&d, 1);
    let ix = devices.iter().position(|(id, _, _)| *id == first).unwrap();
    install(devices[ix].1.clone()).await;
    step().await;
    step().await;
    let d = detail(rid.clone()).await;
    assert_eq!(d["status"], "running", "{d}");
    assert_eq!(d["current_wave"], 1, "held in wave 1: {d}");
    assert!(
        d["status_reason"]
            .as_str()
            .unwrap_or("")
            .contains("no TPM quote"),
        "{d}"
    );
    // Booted 1.1.0: measured and quoted → attested → the wave promotes.
    let (_, credential, board) = &mut devices[ix];
    board.reboot();
    board.tpm().extend_slot_measurement(PCR, &target).unwrap();
    let nonce = poll(&h, credential)
        .await
        .1
        .expect("a nonce after the version changed");
    let (s, r) = h
        .call(
            Method::POST,
            "/api/v1/device/attestation",
            Some(credential),
            Some(json!({"version": "1.1.0", "quote": board.quote(&nonce)})),
        )
        .await;
    assert_eq!(
        (s, r["attestation"].as_str()),
        (StatusCode::OK, Some("attested")),
        "{r}"
    );
    // Attested: the wave soaks (5 s) and the "waiting for a quote" reason
    // is gone at once, not at the promotion.
    step().await;
    let d = detail(rid.clone()).await;
    assert_eq!(d["current_wave"], 1, "soaking: {d}");
    assert!(d["status_reason"].is_null(), "stale reason: {d}");
    for _ in 0..10 {
        step().await;
        if detail(rid.clone()).await["current_wave"] == 2 {
            break;
        }
    }
    let d = detail(rid.clone()).await;
    assert_eq!(d["current_wave"], 2, "promoted: {d}");
    assert_eq!(d["left_out"], json!({"no_tpm": 1, "unactivated": 1}), "{d}");

    // Wave 2: the device commits, but its TPM measured another image.
    step().await;
    let second = in_wave(&detail(rid.clone()).await, 2);
    let ix = devices.iter().position(|(id, _, _)| *id == second).unwrap();
    install(devices[ix].1.clone()).await;
    let (_, credential, board) = &mut devices[ix];
    board.reboot();
    board
        .tpm()
        .extend_slot_measurement(PCR, &Sha256Digest::of(b"not 1.1.0"))
        .unwrap();
    let nonce = poll(&h, credential).await.1.unwrap();
    let (s, r) = h
        .call(
            Method::POST,
            "/api/v1/device/attestation",
            Some(credential),
            Some(json!({"version": "1.1.0", "quote": board.quote(&nonce)})),
        )
        .await;
    assert_eq!(
        (s, r["attestation"].as_str()),
        (StatusCode::OK, Some("mismatch")),
        "{r}"
    );
    step().await;
    let d = detail(rid.clone()).await;
    assert_eq!(d["status"], "rolled_back", "a mismatch is a failure: {d}");
}

/// `kernex-image provision`'s pre-authorisation client against the real
/// server on loopback: what the line records is what the board's updater
/// enrolls with (the same EK read through the same device code).
async fn the_factory_line_client_preauthorises_what_the_device_enrolls_with(h: Arc<Harness>) {
    use kernex_image::preauth::{Outcome, PreauthRequest, preauthorize};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = kernex_server::http::app(h.state.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let board = DeviceTpm::new();
    let other = DeviceTpm::new();
    let ek = board.tpm().endorsement().unwrap();
    let request = PreauthRequest {
        device_id: "line-1".into(),
        ek_public: Some(hex::encode(&ek.public)),
        ek_certificate: ek.certificate.as_ref().map(hex::encode),
    };
    let send = |request: PreauthRequest, token: String| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || preauthorize(&url, &token, &request))
    };
    let (outcome, recorded) = send(request.clone(), h.admin.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Created);
    assert_eq!(recorded.ek_fingerprint, request.ek_fingerprint());
    let (outcome, _) = send(request.clone(), h.admin.clone())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::AlreadyPresent, "the line may retry");
    // A second board claiming the serial is refused; so is a bad token.
    let mut claim = request.clone();
    claim.ek_public = Some(hex::encode(&other.identity.ek_public));
    claim.ek_certificate = None;
    assert!(send(claim, h.admin.clone()).await.unwrap().is_err());
    assert!(
        send(request.clone(), "kxt_wrong".into())
            .await
            .unwrap()
            .is_err()
    );

    let line = token(&h, true, true).await;
    // The line checks the enrollment token before writing it onto a board.
    let check = |t: String| {
        let url = url.clone();
        let admin = h.admin.clone();
        tokio::task::spawn_blocking(move || {
            kernex_image::preauth::check_enrollment_token(&url, &admin, &t)
        })
    };
    let info = check(line.clone()).await.unwrap().unwrap();
    assert_eq!(info.label, "line 2");
    let err = check("kxe_unknown".into()).await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            kernex_image::preauth::PreauthError::UnknownEnrollmentToken { .. }
        ),
        "{err}"
    );
    // The board carries its own single-use token, made from the line's.
    let made = {
        let (url, admin, info) = (url.clone(), h.admin.clone(), info.clone());
        tokio::task::spawn_blocking(move || {
            kernex_image::preauth::device_token(&url, &admin, &info, "line-1")
        })
        .await
        .unwrap()
        .unwrap()
    };
    assert_eq!(made.label, "line 2 / line-1");
    assert_eq!(made.max_uses, Some(1));
    assert!(made.require_preauthorization && made.require_tpm);
    assert_eq!(made.expires_at, info.expires_at);
    let board_token = made.token.clone().unwrap();
    let (s, v) = enroll(&h, &board_token, "line-1", Some(other.identity_json())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = enroll(&h, &board_token, "line-1", Some(board.identity_json())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, list) = h
        .call(
            Method::GET,
            "/api/v1/enrollment-tokens",
            Some(&h.admin),
            None,
        )
        .await;
    let used = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == made.id.as_str())
        .unwrap();
    assert_eq!(
        (used["uses"].as_i64(), used["max_uses"].as_i64()),
        (Some(1), Some(1))
    );
    let credential = v["credential"].as_str().unwrap().to_string();
    let (s, ok) = h
        .call(
            Method::POST,
            "/api/v1/device/activate",
            Some(&credential),
            Some(json!({"credential": board.activate(&v)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    assert_eq!(
        Some(ok["ek_fingerprint"].as_str().unwrap().to_string()),
        request.ek_fingerprint()
    );
    server.abort();
}

// ---------------------------------------------------------------------------
// EK certificates against the trusted TPM vendor CAs (tpm-cert-store)

/// The TPMs of the vendor-CA test, all provisioned before the server's
/// manual clock starts (an EK certificate is valid from the second it was
/// made).
struct Vendors {
    _vendor: LocalCa,
    _other_vendor: LocalCa,
    board: DeviceTpm,
    second: DeviceTpm,
    foreign: DeviceTpm,
    bare: DeviceTpm,
}

async fn vendor_cas(db: common::Db) {
    let vendor = LocalCa::new();
    let other_vendor = LocalCa::new();
    let board = DeviceTpm::with(EkCert::From(&vendor));
    let second = DeviceTpm::with(EkCert::From(&vendor));
    let foreign = DeviceTpm::with(EkCert::From(&other_vendor));
    let bare = DeviceTpm::with(EkCert::None);
    let store = vendor.store();
    let vendors = Vendors {
        _vendor: vendor,
        _other_vendor: other_vendor,
        board,
        second,
        foreign,
        bare,
    };
    common::run_with(
        db,
        move |c| {
            c.tpm_cert_store = vec![store];
            c.test_clock = true;
        },
        move |h| vendor_cas_body(h, vendors),
    )
    .await;
}

fn detail(v: &Value) -> String {
    v["detail"].as_str().unwrap_or_default().to_string()
}

async fn device_call(
    h: &Harness,
    credential: &str,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    h.call(Method::POST, path, Some(credential), Some(body))
        .await
}

async fn vendor_cas_body(h: Arc<Harness>, t: Vendors) {
    const NOT_TRUSTED: &str = "EK certificate not issued by a trusted TPM vendor CA";
    let line = token(&h, false, true).await;

    // A TPM of the trusted vendor: challenge, activation, bound.
    let (s, v) = enroll(&h, &line, "v-1", Some(t.board.identity_json())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let credential = v["credential"].as_str().unwrap().to_string();
    let (s, ok) = device_call(
        &h,
        &credential,
        "/api/v1/device/activate",
        json!({"credential": t.board.activate(&v)}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    assert_eq!(attestation_of(&h, &id).await["state"], "pending");

    // Another vendor's TPM (its CA has the same names, other keys).
    let (s, v) = enroll(&h, &line, "v-2", Some(t.foreign.identity_json())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(detail(&v).starts_with(NOT_TRUSTED), "{v}");
    assert!(detail(&v).contains("CN=swtpm-localca"), "{v}");
    // A TPM without an EK certificate.
    assert!(t.bare.identity.ek_certificate.is_none());
    let (s, v) = enroll(&h, &line, "v-3", Some(t.bare.identity_json())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(
        detail(&v).starts_with("no EK certificate in the TPM's NV"),
        "{v}"
    );
    // Malformed certificate bytes: refused with a reason, never a 500.
    let cert = t.second.identity.ek_certificate.clone().unwrap();
    let mut flipped = cert.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    for (bad, why) in [
        (hex::encode(b"\x30"), "malformed"),
        (hex::encode(b"hello, not DER"), "malformed"),
        (hex::encode(&cert[..cert.len() / 2]), "malformed"),
        (hex::encode(&flipped), "EK certificate"),
        ("30".repeat(8193), "more than the limit"),
    ] {
        let mut identity = t.second.identity_json();
        identity["ek-certificate"] = json!(bad);
        let (s, v) = enroll(&h, &line, "v-4", Some(identity)).await;
        assert!(s.is_client_error(), "{s}: {v}");
        assert!(detail(&v).contains(why), "{why}: {v}");
    }
    // A trusted certificate, but of another TPM.
    let mut mixed = t.second.identity_json();
    mixed["ek-certificate"] = json!(hex::encode(
        t.board.identity.ek_certificate.as_ref().unwrap()
    ));
    let (s, v) = enroll(&h, &line, "v-4", Some(mixed)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(detail(&v).contains("certifies another key"), "{v}");
    // Validity at enrollment time, by the server's clock.
    let real_now = h.state.clock.now_ms();
    assert!(h.state.clock.set_ms(1_000_000_000_000));
    let (s, v) = enroll(&h, &line, "v-4", Some(t.second.identity_json())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(detail(&v).contains("not valid before"), "{v}");
    assert!(h.state.clock.set_ms(real_now));
    let (s, v) = enroll(&h, &line, "v-4", Some(t.second.identity_json())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");

    // A token that does not require a TPM: a TPM identity is still checked
    // (the server binds only TPMs it trusts); without one the device
    // enrolls, unattested.
    let open = token(&h, false, false).await;
    let (s, v) = enroll(&h, &open, "v-5", Some(t.foreign.identity_json())).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(detail(&v).starts_with(NOT_TRUSTED), "{v}");
    let (s, v) = enroll(&h, &open, "v-5", None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let plain = v["credential"].as_str().unwrap().to_string();
    // Binding a TPM later is checked the same way, and a refusal leaves
    // the device served.
    let (s, v) = device_call(
        &h,
        &plain,
        "/api/v1/device/tpm",
        json!({"tpm": t.foreign.identity_json()}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(detail(&v).starts_with(NOT_TRUSTED), "{v}");
    let (s, v) = device_call(
        &h,
        &plain,
        "/api/v1/device/tpm",
        json!({"tpm": t.bare.identity_json()}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(detail(&v).starts_with("no EK certificate"), "{v}");
    assert!(poll(&h, &plain).await.0.is_success());

    // An EK the factory line pre-authorised is trusted on its word, even
    // without a certificate.
    let (s, p) = preauthorize(
        &h,
        json!({"device_id": "v-6", "ek_public": hex::encode(&t.bare.identity.ek_public)}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    let (s, v) = enroll(&h, &line, "v-6", Some(t.bare.identity_json())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, ok) = device_call(
        &h,
        v["credential"].as_str().unwrap(),
        "/api/v1/device/activate",
        json!({"credential": t.bare.activate(&v)}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    // A certificate the factory line sends must be a trusted vendor's.
    let (s, p) = preauthorize(
        &h,
        json!({
            "device_id": "v-7",
            "ek_public": hex::encode(&t.foreign.identity.ek_public),
            "ek_certificate": hex::encode(t.foreign.identity.ek_certificate.as_ref().unwrap()),
        }),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert!(detail(&p).starts_with(NOT_TRUSTED), "{p}");

    // The refusals are in the audit log with their reasons.
    let (s, audit) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let entries = audit["entries"].as_array().unwrap();
    let refused = |action: &str, reason: &str| {
        entries.iter().any(|e| {
            e["action"] == action
                && e["result"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("error: 403") && r.contains(reason))
        })
    };
    assert!(refused("device.enroll", NOT_TRUSTED), "{audit}");
    assert!(refused("device.enroll", "no EK certificate"), "{audit}");
    assert!(refused("device.enroll", "not valid before"), "{audit}");
    assert!(refused("device.tpm-bind", NOT_TRUSTED), "{audit}");
}

// ---------------------------------------------------------------------------
// A device enrolled without a TPM binds it later

async fn an_enrolled_device_binds_its_tpm_later_and_is_attested(h: Arc<Harness>) {
    // No tpm-cert-store: any TPM is accepted, one without an EK
    // certificate included (as before it existed).
    let board = DeviceTpm::with(EkCert::None);
    let other = DeviceTpm::new();
    let (s, release) = h
        .upload(&h.admin, std::fs::read(golden("valid.kxb")).unwrap())
        .await;
    assert_eq!(s, StatusCode::CREATED, "{release}");
    let version = release["version"].as_str().unwrap().to_string();
    let measurement = measurement_of(&h, release["id"].as_str().unwrap()).await;

    let open = token(&h, false, false).await;
    let (s, v) = enroll(&h, &open, "late-1", None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let credential = v["credential"].as_str().unwrap().to_string();
    assert_eq!(attestation_of(&h, &id).await["state"], "unattested");
    assert_eq!(poll(&h, &credential).await.1, None);

    let (s, doc) = h
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        doc["paths"]["/api/v1/device/tpm"]["post"].is_object(),
        "the OpenAPI document describes the binding"
    );
    let bind = |credential: String, body: Value| {
        let h = h.clone();
        async move { device_call(&h, &credential, "/api/v1/device/tpm", body).await }
    };
    // Bad input: 4xx with the reason, no credential: 401.
    let (s, v) = bind(
        credential.clone(),
        json!({"tpm": {"ek-public": "00", "ak-public": "00"}}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(detail(&v).contains("ek_public"), "{v}");
    let (s, v) = bind(
        credential.clone(),
        json!({"tpm": board.identity_json(), "tpm_slot_pcr": 23}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/tpm",
            None,
            Some(json!({"tpm": board.identity_json()})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // A challenge answered wrongly: refused, and the device is served as
    // before (a failed binding does not lock it out).
    let (s, v) = bind(credential.clone(), json!({"tpm": board.identity_json()})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "challenge", "{v}");
    let (s, err) = device_call(
        &h,
        &credential,
        "/api/v1/device/activate",
        json!({"credential": "00".repeat(32)}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{err}");
    assert!(poll(&h, &credential).await.0.is_success());
    assert_eq!(attestation_of(&h, &id).await["state"], "unattested");

    // Answered by the TPM: bound.
    let (s, v) = bind(credential.clone(), json!({"tpm": board.identity_json()})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let fp = v["ek_fingerprint"].as_str().unwrap().to_string();
    let (s, ok) = device_call(
        &h,
        &credential,
        "/api/v1/device/activate",
        json!({"credential": board.activate(&v)}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    let view = attestation_of(&h, &id).await;
    assert_eq!(view["state"], "pending", "{view}");
    assert_eq!(view["ek_fingerprint"], fp.as_str(), "{view}");
    // Asking again changes nothing.
    let (s, v) = bind(credential.clone(), json!({"tpm": board.identity_json()})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "bound", "{v}");
    assert!(v.get("activation").is_none(), "{v}");
    // Another TPM for this device, or this TPM for another device: refused.
    let (s, v) = bind(credential.clone(), json!({"tpm": other.identity_json()})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    assert!(detail(&v).contains(&fp), "{v}");
    let (s, v) = enroll(&h, &open, "late-2", None).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = bind(
        v["credential"].as_str().unwrap().to_string(),
        json!({"tpm": board.identity_json()}),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // Re-enrolling without the TPM is refused now that the id is bound.
    let (s, v) = enroll(&h, &open, "late-1", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // The device runs the release and answers the nonce: attested.
    let (s, _) = device_call(
        &h,
        &credential,
        "/api/v1/device/heartbeat",
        json!({"version": version, "booted_slot": "B"}),
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let nonce = poll(&h, &credential)
        .await
        .1
        .expect("a nonce once the TPM is bound");
    board
        .tpm()
        .extend_slot_measurement(PCR, &measurement)
        .unwrap();
    let (s, r) = device_call(
        &h,
        &credential,
        "/api/v1/device/attestation",
        json!({"version": version, "quote": board.quote(&nonce)}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(attestation_of(&h, &id).await["state"], "attested");

    let (s, audit) = h
        .call(Method::GET, "/api/v1/audit", Some(&h.admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let binds: Vec<_> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "device.tpm-bind")
        .map(|e| e["result"].as_str().unwrap().to_string())
        .collect();
    assert!(
        binds.iter().filter(|r| *r == "ok").count() >= 3,
        "{binds:?}"
    );
    assert!(
        binds.iter().any(|r| r.starts_with("error: 403")),
        "{binds:?}"
    );
    assert!(
        binds.iter().any(|r| r.starts_with("error: 409")),
        "{binds:?}"
    );
}

/// Enrolls `device_id` with `key`'s proof and a TPM identity.
async fn enroll_keyed(
    h: &Harness,
    token: &str,
    device_id: &str,
    key: &kernex_protocol::device_key::DeviceKey,
    tpm: Value,
) -> (StatusCode, Value) {
    let proof = h.proof(key, device_id).await;
    h.call(
        Method::POST,
        "/api/v1/device/enroll",
        None,
        Some(json!({"enrollment_token": token, "device_id": device_id, "hardware_class": "qemu-x86_64", "tpm": tpm, "key": proof})),
    )
    .await
}

/// Proof by TPM credential activation (issue #20): the board re-enrolls
/// with a new key (its data dir was wiped) and the same TPM. The new key
/// becomes the device's only once that TPM answers; until then the
/// device's current key keeps working. Someone who knows the board's
/// (public) EK but not its TPM gets nothing that works.
async fn a_tpm_re_enrollment_with_the_same_ek_moves_the_device_key(h: Arc<Harness>) {
    let line = token(&h, false, true).await;
    let board = DeviceTpm::new();
    let first = h.device_key("tpm-1");
    let (s, v) = enroll_keyed(&h, &line, "tpm-1", &first, board.identity_json()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let credential = v["credential"].as_str().unwrap().to_string();
    assert!(credential.starts_with("kxa_"));
    let (s, ok) = h
        .call(
            Method::POST,
            "/api/v1/device/activate",
            Some(&credential),
            Some(json!({"credential": board.activate(&v)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    assert!(poll(&h, &credential).await.0.is_success());

    // Someone with the board's EK, another TPM's AK and their own key.
    let other = DeviceTpm::new();
    let stranger = kernex_protocol::device_key::DeviceKey::generate().unwrap();
    let mut forged = board.identity_json();
    forged["ak-public"] = json!(hex::encode(&other.identity.ak_public));
    let (s, v) = enroll_keyed(&h, &line, "tpm-1", &stranger, forged).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let forged_token = v["credential"].as_str().unwrap().to_string();
    assert_eq!(poll(&h, &forged_token).await.0, StatusCode::UNAUTHORIZED);
    let (s, _) = h
        .call(
            Method::POST,
            "/api/v1/device/activate",
            Some(&forged_token),
            Some(json!({"credential": "11".repeat(32)})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        h.authenticate(&stranger, &id).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert!(
        poll(&h, &credential).await.0.is_success(),
        "the device keeps working"
    );

    // The board, data dir wiped: a new key, the same TPM.
    let second = kernex_protocol::device_key::DeviceKey::generate().unwrap();
    let (s, v) = enroll_keyed(&h, &line, "tpm-1", &second, board.identity_json()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let renewed = v["credential"].as_str().unwrap().to_string();
    assert_eq!(
        poll(&h, &renewed).await.0,
        StatusCode::UNAUTHORIZED,
        "not before the TPM answers"
    );
    assert_eq!(
        h.authenticate(&second, &id).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.authenticate(&first, &id).await.0,
        StatusCode::OK,
        "the current key still works"
    );
    let (s, ok) = h
        .call(
            Method::POST,
            "/api/v1/device/activate",
            Some(&renewed),
            Some(json!({"credential": board.activate(&v)})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{ok}");
    assert!(poll(&h, &renewed).await.0.is_success());
    assert_eq!(
        poll(&h, &credential).await.0,
        StatusCode::UNAUTHORIZED,
        "the old key's token"
    );
    assert_eq!(
        h.authenticate(&first, &id).await.0,
        StatusCode::UNAUTHORIZED,
        "the old key"
    );
    let (s, fresh) = h.authenticate(&second, &id).await;
    assert_eq!(s, StatusCode::OK, "{fresh}");
    assert!(
        poll(&h, fresh["token"].as_str().unwrap())
            .await
            .0
            .is_success()
    );
}
