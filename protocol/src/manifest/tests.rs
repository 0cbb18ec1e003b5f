use super::*;
use crate::container::BundleLayout;

fn manifest() -> Manifest {
    let digest = Sha256Digest::of(b"kernex");
    Manifest {
        format: MANIFEST_FORMAT,
        version: semver::Version::new(1, 0, 0),
        compatible: "qemu-aarch64".into(),
        min_updater_version: semver::Version::new(0, 1, 0),
        security_version: 0,
        images: vec![ImageEntry {
            slot_class: SlotClass::Rootfs,
            filesystem: FsType::Ext4,
            size: 4096,
            sha256: digest,
            index: IndexRef {
                size: 100,
                sha256: digest,
                head_size: 84,
                head_sha256: digest,
            },
            archive: ArchiveRef {
                size: 1000,
                header_size: 200,
                header_sha256: digest,
            },
            patches: Vec::new(),
        }],
        metadata: BTreeMap::new(),
        health: None,
    }
}

#[test]
fn health_spec_round_trips_and_is_bounded() {
    let mut m = manifest();
    let json = br#"{"deadline": 300, "stability-window": 60, "checks": [
        {"type": "service", "name": "agent", "mode": "supervise", "command": ["/usr/bin/agent"]},
        {"type": "http", "url": "http://127.0.0.1:8080/health", "body-contains": "ok"},
        {"type": "llm", "model": "/agent/m.gguf", "prompt": "Hi", "tokens": 8,
         "min-tokens-per-second": 5, "max-rss": 1000000000}]}"#;
    m.health = Some(serde_json::from_slice(json).expect("parses"));
    let bytes = m.to_vec().expect("serialises");
    assert_eq!(Manifest::from_slice(&bytes).expect("parses"), m);
    let unknown = br#"{"checks": [{"type": "command", "command": ["true"], "retries": 2}]}"#;
    let err = serde_json::from_slice::<HealthSpec>(unknown).expect_err("unknown field");
    assert!(err.to_string().contains("retries"), "{err}");
    let many = HealthSpec {
        checks: Some(vec![
            HealthCheck::Memory { min_available: 1 };
            MAX_HEALTH_CHECKS + 1
        ]),
        ..HealthSpec::default()
    };
    m.health = Some(many);
    let err = m.validate().expect_err("too many checks");
    assert!(err.to_string().contains("health.checks"), "{err}");
    m.health = Some(HealthSpec {
        checks: Some(vec![HealthCheck::Service {
            name: "agent".into(),
            mode: ServiceMode::Supervise,
            command: vec![],
            max_restarts: None,
            window: None,
            backoff_ms: None,
        }]),
        ..HealthSpec::default()
    });
    let err = m.validate().expect_err("supervise needs a command");
    assert!(
        err.to_string().contains("health.checks[0].command"),
        "{err}"
    );
}

#[test]
fn security_version_is_optional_signed_json_and_bounded() {
    let mut m = manifest();
    let old = m.to_vec().expect("serialises");
    assert!(
        !String::from_utf8_lossy(&old).contains("security-version"),
        "0 is left out, so older manifests keep their bytes"
    );
    assert_eq!(
        Manifest::from_slice(&old).expect("parses").security_version,
        0
    );
    m.security_version = 7;
    let bytes = m.to_vec().expect("serialises");
    assert!(String::from_utf8_lossy(&bytes).contains("\"security-version\": 7"));
    assert_eq!(
        Manifest::from_slice(&bytes)
            .expect("parses")
            .security_version,
        7
    );
    m.security_version = MAX_SECURITY_VERSION + 1;
    let err = m.validate().expect_err("above the limit");
    assert!(err.to_string().contains("security-version"), "{err}");
}

#[test]
fn huge_archive_size_is_rejected_before_the_layout_adds_it_up() {
    let mut m = manifest();
    let bytes = m.to_vec().expect("serialises");
    assert_eq!(Manifest::from_slice(&bytes).expect("parses"), m);
    m.images[0].archive.size = u64::MAX - 100;
    let bytes = serde_json::to_vec(&m).expect("serialises");
    let err = Manifest::from_slice(&bytes).expect_err("must fail");
    assert!(err.to_string().contains("archive.size"), "{err}");
    // At the limit, every image's members still add up without overflow.
    let mut m = manifest();
    m.images[0].size = MAX_IMAGE_SIZE;
    m.images[0].index.size = MAX_INDEX_SIZE;
    m.images[0].archive.size = MAX_ARCHIVE_SIZE;
    m.validate().expect("within limits");
    let layout = BundleLayout::compute(MAX_MANIFEST_SIZE, MAX_SIGNATURE_SIZE, &m);
    assert!(layout.total_size > MAX_ARCHIVE_SIZE);
}
