#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use kernex_bootloader::{Backend, BootloaderConfig, Slot};
use kernex_protocol::SlotClass;

use crate::*;

fn board_config() -> SystemConfig {
    SystemConfig::new(
        "raspberrypi4-64",
        "/data/kernex",
        "/etc/kernex/keyring.pem",
        Slots {
            rootfs: SlotPair::new("/dev/mmcblk0p2", "/dev/mmcblk0p3"),
            agent: None,
        },
        BootloaderConfig {
            backend: Backend::UBoot,
            fw_env_config: Some("/data/etc/kernex/fw_env.config".into()),
            grubenv: None,
            path: None,
            cmdline: None,
            booted_slot: None,
        },
    )
}

#[test]
fn a_written_config_says_only_what_is_not_a_default_and_reads_back_equal() {
    let config = board_config();
    let text = toml::to_string(&config).unwrap();
    for absent in ["[link]", "reboot-command", "[server]", "[health]", "[tpm]"] {
        assert!(!text.contains(absent), "{absent} in {text}");
    }
    assert!(text.contains("data-dir = \"/data/kernex\""), "{text}");
    assert!(text.contains("[slots.rootfs]"), "{text}");
    let back = SystemConfig::from_toml(&text, Path::new("system.toml")).unwrap();
    assert_eq!(back, config);
    // The last table is [bootloader]: keys appended to the file land there
    // (updater/tests/factory_disk.rs appends `booted-slot`).
    assert!(
        text.trim_end()
            .rsplit_once('[')
            .unwrap()
            .1
            .starts_with("bootloader]"),
        "{text}"
    );
}

#[test]
fn the_server_table_with_link_fields_round_trips() {
    let mut config = board_config();
    let mut server = ServerConfig::new("https://kernex.example.com");
    server.device_id = Some("SN-0042".into());
    server.enrollment_token_file = Some(PathBuf::from("/data/etc/kernex/enrollment-token"));
    server.link_class = Some("metered-4g".into());
    server.site = Some("berlin-3".into());
    server.time_zone = Some("Europe/Berlin".into());
    config.server = Some(server);
    let text = toml::to_string(&config).unwrap();
    assert!(text.contains("link-class = \"metered-4g\""), "{text}");
    assert!(text.contains("time-zone = \"Europe/Berlin\""), "{text}");
    assert!(!text.contains("poll-interval"), "{text}");
    assert!(!text.contains("allow-downgrade"), "{text}");
    let back = SystemConfig::from_toml(&text, Path::new("system.toml")).unwrap();
    assert_eq!(back, config);
    let server = back.server.unwrap();
    assert_eq!(server.poll_interval, DEFAULT_POLL_INTERVAL);
    assert!(!server.allow_downgrade, "anti-rollback by default");

    let typo = text.replace("time-zone", "timezone");
    let err = SystemConfig::from_toml(&typo, Path::new("system.toml")).unwrap_err();
    assert!(err.to_string().contains("timezone"), "{err}");
}

#[test]
fn load_names_the_file_and_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("kernex-device-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.toml");
    let err = SystemConfig::load(&missing).unwrap_err();
    assert!(
        matches!(err, ConfigError::Io { action: "open", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("missing.toml"), "{err}");
    let big = dir.join("big.toml");
    std::fs::write(&big, vec![b'#'; MAX_CONFIG_SIZE as usize + 1]).unwrap();
    let err = SystemConfig::load(&big).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
    let latin1 = dir.join("latin1.toml");
    std::fs::write(&latin1, b"compatible = \"\xe9\"\n").unwrap();
    let err = SystemConfig::load(&latin1).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("config {}: not UTF-8", latin1.display())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_slot_record_is_kebab_case_json_and_names_a_bad_manifest() {
    let record = SlotRecord {
        manifest: "{}".into(),
        signature: "00ff".into(),
        verified: true,
        installed_at: 1_700_000_000,
    };
    let json = serde_json::to_value(&record).unwrap();
    assert_eq!(json["installed-at"], 1_700_000_000);
    assert_eq!(json["verified"], true);
    let back: SlotRecord = serde_json::from_value(json).unwrap();
    assert_eq!(back, record);
    let err = record.manifest().unwrap_err();
    assert!(err.to_string().starts_with("recorded manifest: "), "{err}");
}

#[test]
fn the_layout_names_the_slot_files() {
    assert_eq!(
        layout::slot_record(Slot::A),
        Path::new("slot-A/record.json")
    );
    assert_eq!(
        layout::slot_index(Slot::B, SlotClass::Agent),
        Path::new("slot-B/agent.kxi")
    );
    assert!(layout::JOURNAL.starts_with(layout::INSTALL_DIR));
    assert!(layout::INSTALL_STATE.starts_with(layout::INSTALL_DIR));
}
