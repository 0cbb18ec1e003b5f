#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use kernex_bootloader::Backend;
use kernex_updater::SystemConfig;

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("system.example.toml");
    let config = SystemConfig::load(&path).unwrap();
    assert_eq!(config.compatible, "raspberrypi4-64");
    assert_eq!(config.slots.rootfs.a, Path::new("/dev/mmcblk0p2"));
    assert!(config.slots.agent.is_some());
    assert_eq!(config.bootloader.backend, Backend::UBoot);
    assert_eq!(config.link.rate_limit, Some(1_000_000));
    assert!(config.link.metered);
    assert_eq!(config.link.daily_budget, Some(200_000_000));
    assert_eq!(config.reboot_command, vec!["systemctl", "reboot"]);
    let server = config.server.unwrap();
    assert_eq!(server.url, "https://kernex.example.com");
    assert_eq!(server.poll_interval, 60);
    assert_eq!(server.tags, vec!["site-berlin"]);
    assert!(!server.allow_downgrade, "anti-rollback by default");
    assert_eq!(server.link_class.as_deref(), Some("metered-4g"));
    assert_eq!(server.site.as_deref(), Some("berlin-3"));
    assert_eq!(server.time_zone.as_deref(), Some("Europe/Berlin"));
    let health = config.health.unwrap();
    assert_eq!(health.deadline, Some(300));
    assert_eq!(health.stability_window, Some(60));
    assert_eq!(health.watchdog_device.unwrap(), Path::new("/dev/watchdog"));
    assert_eq!(health.systemctl_command.unwrap(), vec!["systemctl"]);
    let tpm = config.tpm.unwrap();
    assert_eq!((tpm.tcti.as_str(), tpm.pcr), ("device:/dev/tpmrm0", 14));
}

#[test]
fn unknown_keys_and_bad_values_are_rejected() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("system.example.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let typo = text.replace("data-dir", "data_dir");
    let err = SystemConfig::from_toml(&typo, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data_dir"), "{err}");
    let same = text.replace("/dev/mmcblk0p3", "/dev/mmcblk0p2");
    let err = SystemConfig::from_toml(&same, &path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("same path"), "{err}");
    let empty = text.replace(
        "systemctl-command = [\"systemctl\"]",
        "systemctl-command = []",
    );
    let err = SystemConfig::from_toml(&empty, &path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("systemctl-command must name a program"),
        "{err}"
    );
    let bad = text.replace("\"raspberrypi4-64\"", "\"no spaces allowed\"");
    assert!(SystemConfig::from_toml(&bad, &path).is_err());
}
