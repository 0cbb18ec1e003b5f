//! The checked-in example configuration parses and matches the defaults.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kernex_server::config::Config;

#[test]
fn example_config_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("server.example.toml");
    let c = Config::load(&path).unwrap();
    let d = Config::default();
    assert_eq!(c.listen, d.listen);
    assert_eq!(c.max_bundle_bytes, d.max_bundle_bytes);
    assert_eq!(c.max_json_bytes, d.max_json_bytes);
    assert_eq!(c.offline_after_secs, 1800);
    assert_eq!(c.token_ttl_secs, d.token_ttl_secs);
    assert_eq!(c.heartbeat_retention_days, 7);
    assert_eq!(c.log_retention_days, 30);
    assert_eq!(c.device_requests_per_minute, 100);
    assert_eq!(c.user_requests_per_minute, 1000);
    assert_eq!(c.uploads_per_minute, 10);
    assert_eq!(c.default_organization, "default");
    assert!(c.database_url.is_none());
    assert!(c.blob_store.is_none());
    assert!(!c.s3_allow_http);
    assert_eq!(c.presign_ttl_secs, 3600);
    assert_eq!(c.rollout_poll_secs, d.rollout_poll_secs);
    assert_eq!(c.rollback_watch_secs, d.rollback_watch_secs);
    assert!(c.database_url().starts_with("sqlite://"));
    assert!(c.tpm_cert_store.is_empty());
    assert!(c.ek_ca_store().unwrap().is_none());
    assert_eq!(
        c.idempotency_in_progress_secs,
        d.idempotency_in_progress_secs
    );
    assert_eq!(c.audit_checkpoint_entries, d.audit_checkpoint_entries);
    assert_eq!(c.audit_checkpoint_minutes, d.audit_checkpoint_minutes);
    assert_eq!(c.audit_device_coalesce_secs, d.audit_device_coalesce_secs);
    // [login] and [limits]: the example states the defaults.
    assert!(c.metrics_token.is_none());
    let (l, dl) = (&c.login, &d.login);
    assert_eq!(
        (
            l.free_attempts,
            l.lockout_after,
            l.lockout_secs,
            l.backoff_base_ms
        ),
        (
            dl.free_attempts,
            dl.lockout_after,
            dl.lockout_secs,
            dl.backoff_base_ms
        )
    );
    assert_eq!(
        (
            l.address_free_attempts,
            l.account_free_attempts,
            l.account_max_backoff_secs
        ),
        (
            dl.address_free_attempts,
            dl.account_free_attempts,
            dl.account_max_backoff_secs
        )
    );
    assert_eq!(l.throttle_max_entries, dl.throttle_max_entries);
    assert_eq!(
        (
            l.argon2_m_kib,
            l.argon2_t,
            l.argon2_p,
            l.hash_concurrency,
            l.hash_queue_ms
        ),
        (19456, 2, 1, 0, 2000)
    );
    let (m, dm) = (&c.limits, &d.limits);
    assert_eq!(
        (
            m.header_read_timeout_secs,
            m.idle_timeout_secs,
            m.request_timeout_secs
        ),
        (
            dm.header_read_timeout_secs,
            dm.idle_timeout_secs,
            dm.request_timeout_secs
        )
    );
    assert_eq!(
        (m.max_connections, m.max_connections_per_address),
        (dm.max_connections, dm.max_connections_per_address)
    );
    assert_eq!(
        m.unauthenticated_per_address_per_minute,
        dm.unauthenticated_per_address_per_minute
    );
    assert!(m.trusted_proxies.is_empty());
    let e = Config::from_toml("[login]\nargon2-m-kib = 1\n").unwrap();
    assert!(
        kernex_server::passwords::Hasher::new(e.login.hashing()).is_err(),
        "argon2 refuses m = 1 KiB"
    );
    assert_eq!(c.limits, d.limits, "the [limits] table shows the defaults");
}

#[test]
fn limits_are_a_table_of_their_own() {
    let c = Config::from_toml("[limits]\nenrollments-per-token-per-minute = 0\n").unwrap();
    assert_eq!(c.limits.enrollments_per_token_per_minute, 0);
    assert_eq!(c.limits.enrollment_token_max_ttl_days, 365);
    let e = Config::from_toml("[limits]\nmax-extra = 1\n").unwrap_err();
    assert!(format!("{e:#}").contains("max-extra"), "{e:#}");
}

#[test]
fn unknown_keys_are_rejected() {
    let e = Config::from_toml("listen = \"127.0.0.1:1\"\ncolour = \"red\"\n").unwrap_err();
    assert!(format!("{e:#}").contains("colour"), "{e:#}");
}

#[test]
fn blob_store_urls_are_checked() {
    for bad in ["s3://", "s3://a/b", "gs://bucket", "bucket"] {
        let c = Config {
            blob_store: Some(bad.into()),
            ..Config::default()
        };
        let e = c.blobs().unwrap_err();
        assert!(format!("{e:#}").contains("s3://BUCKET"), "{bad}: {e:#}");
    }
}

#[test]
fn tpm_cert_store_paths_parse_and_a_bad_store_is_an_error() {
    let c = Config::from_toml(
        "tpm-cert-store = [\"/etc/kernex/tpm-ca\", \"/etc/kernex/nuvoton.pem\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.tpm_cert_store,
        vec![
            std::path::PathBuf::from("/etc/kernex/tpm-ca"),
            std::path::PathBuf::from("/etc/kernex/nuvoton.pem")
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let c = Config {
        tpm_cert_store: vec![dir.path().to_path_buf()],
        ..Config::default()
    };
    let e = c.ek_ca_store().unwrap_err();
    let text = format!("{e:#}");
    assert!(text.contains("tpm-cert-store"), "{text}");
    assert!(text.contains("no CA certificates"), "{text}");
}
