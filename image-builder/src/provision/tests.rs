#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn the_server_table_replaces_an_earlier_one() {
    let base = "# written by disk create\n\
                compatible = \"x\"\ndata-dir = \"/data/kernex\"\nkeyring = \"/k.pem\"\n\
                [slots.rootfs]\nA = \"/dev/vda2\"\nB = \"/dev/vda3\"\n\
                [bootloader]\nbackend = \"u-boot\"\n\
                [server]\nurl = \"https://old\"\ntags = [\"lab\"]\nenrollment-token = \"kxe_old\"\n";
    let once = with_server_table(base, "https://a", "SN-1", "/data/t").unwrap();
    let twice = with_server_table(&once, "https://b", "SN-2", "/data/t").unwrap();
    assert_eq!(twice.matches("[server]").count(), 1);
    assert!(twice.contains("url = \"https://b\"") && !twice.contains("https://a"));
    assert!(twice.starts_with("# written by disk create\n"), "{twice}");
    let config = SystemConfig::from_toml(&twice, Path::new("system.toml")).unwrap();
    let server = config.server.unwrap();
    assert_eq!(server.device_id.as_deref(), Some("SN-2"));
    assert_eq!(server.enrollment_token_file, Some(PathBuf::from("/data/t")));
    // The inline token would win over the file: it is gone; other keys stay.
    assert_eq!(server.enrollment_token, None);
    assert_eq!(server.tags, ["lab"]);
    assert_eq!(config.compatible, "x");
}

#[test]
fn a_target_smaller_than_the_image_is_refused() {
    let err = check_capacity(Path::new("/dev/sdz"), 1000, 1001).unwrap_err();
    assert_eq!(
        err.to_string(),
        "/dev/sdz holds 1000 bytes, the image needs 1001"
    );
    assert!(check_capacity(Path::new("/dev/sdz"), 1001, 1001).is_ok());
}

#[test]
fn device_ids_are_checked() {
    assert!(check_device_id("SN-0001").is_ok());
    assert!(check_device_id("").is_err());
    assert!(check_device_id("a b").is_err());
    assert!(check_device_id(&"x".repeat(129)).is_err());
}
