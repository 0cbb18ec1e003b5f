//! fw_env.config parsing, with the same number rules as fw_printenv.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use u_boot_env::{Config, ConfigError, EnvError, Store};

#[test]
fn parses_one_and_two_lines_like_fw_printenv() {
    let c = Config::parse(
        "# MTD NOR\n\n/dev/mtd1 0x0000 0x4000 0x10000\n/dev/mtd2\t0 4000\t10000 2 # second\n",
    )
    .unwrap();
    assert!(c.is_redundant());
    assert_eq!(c.first.env_size, 0x4000);
    assert_eq!(c.first.sector_size, Some(0x10000));
    let second = c.second.unwrap();
    // Sizes are always hexadecimal, as sscanf("%lx") reads them.
    assert_eq!(second.env_size, 0x4000);
    assert_eq!(second.sector_size, Some(0x10000));
    assert_eq!(second.sectors, Some(2));
    assert_eq!(second.offset, 0);
}

#[test]
fn offset_is_a_c_integer_and_may_be_negative() {
    let c = Config::parse("/dev/mmcblk0 -0x4000 0x2000\n").unwrap();
    assert_eq!(c.first.offset, -0x4000);
    assert_eq!(Config::parse("f 4096 0x10").unwrap().first.offset, 4096);
    assert_eq!(Config::parse("f 010 0x10").unwrap().first.offset, 8);
}

#[test]
fn bad_lines_name_the_line_and_field() {
    let err = Config::parse("# c\n/dev/mtd1 0x0\n").unwrap_err();
    assert!(
        matches!(err, ConfigError::MissingFields { line: 2, .. }),
        "{err}"
    );
    let err = Config::parse("/dev/mtd1 zero 0x4000\n").unwrap_err();
    assert!(err.to_string().contains("offset \"zero\""), "{err}");
    let err = Config::parse("/dev/mtd1 0 0xfffffff0\n").unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::OutOfRange {
                field: "env size",
                ..
            }
        ),
        "{err}"
    );
    let err = Config::parse("a 0 0x10\nb 0 0x10\nc 0 0x10\n").unwrap_err();
    assert!(
        matches!(err, ConfigError::TooManyDevices { line: 3 }),
        "{err}"
    );
    let err = Config::parse("a 0 0x10\nb 0 0x20\n").unwrap_err();
    assert!(matches!(err, ConfigError::SizeMismatch { .. }), "{err}");
    assert!(matches!(
        Config::parse("# nothing\n"),
        Err(ConfigError::NoDevice)
    ));
}

#[test]
fn missing_config_and_missing_device_are_clear_errors() {
    let err = Config::load("/nonexistent/fw_env.config").unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/fw_env.config"),
        "{err}"
    );
    let c = Config::parse("/nonexistent/dev/mtd9 0 0x4000\n").unwrap();
    let err = Store::open(&c).unwrap_err();
    assert!(matches!(err, EnvError::Open { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/dev/mtd9"), "{err}");
}

#[test]
fn device_too_short_reads_as_invalid_copy() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("short.env");
    std::fs::write(&f, [0u8; 100]).unwrap();
    let c = Config::parse(&format!("{} 0 0x4000\n", f.display())).unwrap();
    let err = Store::open(&c).unwrap().read().unwrap_err();
    assert!(
        matches!(
            err,
            EnvError::Truncated {
                expected: 0x4000,
                found: 100
            }
        ),
        "{err}"
    );
}

#[test]
fn negative_offset_counts_from_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("disk.img");
    std::fs::write(&f, vec![0u8; 0x10000]).unwrap();
    let c = Config::parse(&format!("{} -0x4000 0x4000\n", f.display())).unwrap();
    let mut store = Store::open(&c).unwrap();
    store.update(|env| env.set("x", "1")).unwrap();
    let raw = std::fs::read(&f).unwrap();
    assert_eq!(&raw[..0xc000], &vec![0u8; 0xc000][..]);
    let d = u_boot_env::decode(&raw[0xc000..], u_boot_env::Layout::Single).unwrap();
    assert_eq!(d.env.get("x"), Some("1"));
}
