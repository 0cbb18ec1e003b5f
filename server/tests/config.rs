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
