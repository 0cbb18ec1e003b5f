//! The codec against golden images (made with mkenvimage) and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use u_boot_env::image::{FLAG_ACTIVE, FLAG_OBSOLETE, current_copy};
use u_boot_env::{Env, EnvError, Layout, decode, decode_redundant, encode};

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/golden/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn expected() -> Env {
    let mut env = Env::new();
    env.set("BOOT_ORDER", "A B").unwrap();
    env.set("BOOT_A_LEFT", "3").unwrap();
    env.set("BOOT_B_LEFT", "3").unwrap();
    env.set("bootcmd", "run kernex_select\necho done").unwrap();
    env
}

#[test]
fn golden_images_from_mkenvimage_decode() {
    let single = decode(&golden("single-0x100.bin"), Layout::Single).unwrap();
    assert_eq!(single.env, expected());
    assert_eq!(single.flag, None);
    let pad0 = decode(&golden("single-0x100-pad0.bin"), Layout::Single).unwrap();
    assert_eq!(pad0.env, expected());
    let red = decode(&golden("redundant-0x100.bin"), Layout::Redundant).unwrap();
    assert_eq!(red.env, expected());
    assert_eq!(red.flag, Some(1));
}

#[test]
fn encode_matches_mkenvimage_byte_for_byte() {
    // mkenvimage writes variables in file order; the golden env.txt is
    // sorted the way U-Boot sorts, so the bytes must be identical.
    let text = std::fs::read_to_string(format!(
        "{}/tests/golden/env.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let env = Env::from_text(&text).unwrap();
    assert_eq!(env, expected());
    assert_eq!(
        encode(&env, 0x100, Layout::Redundant, 1).unwrap(),
        golden("redundant-0x100.bin")
    );
    assert_eq!(
        encode(&env, 0x100, Layout::Single, 0).unwrap(),
        golden("single-0x100.bin")
    );
}

#[test]
fn wrong_crc_is_rejected_with_both_values() {
    match decode(&golden("bad-crc-0x100.bin"), Layout::Single) {
        Err(EnvError::Crc { stored, computed }) => assert_ne!(stored, computed),
        other => panic!("expected a CRC error, got {other:?}"),
    }
}

#[test]
fn truncated_image_is_rejected() {
    // 128 bytes of a 256-byte image: the CRC covers bytes that are not there.
    let err = decode(&golden("truncated-0x80.bin"), Layout::Single).unwrap_err();
    assert!(matches!(err, EnvError::Crc { .. }), "{err}");
    assert!(matches!(
        decode(&[0, 0, 0], Layout::Single),
        Err(EnvError::SizeOutOfRange { size: 3, .. })
    ));
}

#[test]
fn oversized_value_is_rejected_before_writing() {
    let mut env = Env::new();
    env.set("big", &"x".repeat(0x100)).unwrap();
    match encode(&env, 0x100, Layout::Single, 0) {
        Err(EnvError::TooLarge { needed, capacity }) => {
            assert_eq!(needed, 3 + 1 + 0x100 + 1 + 1);
            assert_eq!(capacity, 0x100 - 4);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // Exactly full fits.
    let mut env = Env::new();
    env.set("v", &"y".repeat(0x100 - 5 - 4)).unwrap();
    assert_eq!(env.encoded_len(), 0x100 - 5);
    let image = encode(&env, 0x100, Layout::Redundant, 0).unwrap();
    assert_eq!(decode(&image, Layout::Redundant).unwrap().env, env);
}

#[test]
fn bad_names_and_values_are_rejected() {
    let mut env = Env::new();
    let err = env.set("a=b", "1").unwrap_err();
    assert!(matches!(err, EnvError::InvalidName { bad: '=', .. }));
    assert!(err.to_string().contains("\"a=b\""), "{err}");
    assert!(matches!(env.set("", "1"), Err(EnvError::EmptyName)));
    assert!(matches!(
        env.set("a\0", "1"),
        Err(EnvError::InvalidName { bad: '\0', .. })
    ));
    assert!(matches!(
        env.set("a", "x\0y"),
        Err(EnvError::InvalidValue { .. })
    ));
    // Empty value removes, like `setenv NAME`.
    env.set("a", "1").unwrap();
    env.set("a", "").unwrap();
    assert!(env.is_empty());
}

fn with_crc(data: &[u8]) -> Vec<u8> {
    let mut image = crc32fast::hash(data).to_le_bytes().to_vec();
    image.extend_from_slice(data);
    image
}

#[test]
fn malformed_data_areas_give_errors_not_panics() {
    // No terminator anywhere.
    let err = decode(&with_crc(b"abc=1"), Layout::Single).unwrap_err();
    assert!(matches!(err, EnvError::Unterminated { offset: 0 }), "{err}");
    // Entry without a name.
    let err = decode(&with_crc(b"=1\0\0"), Layout::Single).unwrap_err();
    assert!(
        matches!(err, EnvError::EntryWithoutName { offset: 0 }),
        "{err}"
    );
    // Not UTF-8.
    let err = decode(&with_crc(b"a=1\0b=\xff\xfe\0\0"), Layout::Single).unwrap_err();
    assert!(matches!(err, EnvError::NotUtf8 { offset: 4 }), "{err}");
    // `name` and `name=` delete, later entries win (U-Boot's himport).
    let d = decode(&with_crc(b"a=1\0b=2\0a\0b=3\0c=\0\0\xff"), Layout::Single).unwrap();
    assert_eq!(d.env.iter().collect::<Vec<_>>(), vec![("b", "3")]);
    // Last entry ending exactly at the end of the area.
    let d = decode(&with_crc(b"a=1\0"), Layout::Single).unwrap();
    assert_eq!(d.env.get("a"), Some("1"));
    // Empty environment.
    assert!(
        decode(&with_crc(b"\0\xff\xff"), Layout::Single)
            .unwrap()
            .env
            .is_empty()
    );
}

#[test]
fn redundant_flag_rules_follow_u_boot() {
    assert_eq!(current_copy(FLAG_ACTIVE, FLAG_OBSOLETE), 0);
    assert_eq!(current_copy(FLAG_OBSOLETE, FLAG_ACTIVE), 1);
    assert_eq!(current_copy(5, 6), 1);
    assert_eq!(current_copy(6, 5), 0);
    assert_eq!(current_copy(0xff, 0), 1, "counter wrapped");
    assert_eq!(current_copy(0, 0xff), 0, "counter wrapped");
    assert_eq!(current_copy(1, 1), 0, "equal: first");

    let mut old = Env::new();
    old.set("v", "old").unwrap();
    let mut new = Env::new();
    new.set("v", "new").unwrap();
    let a = encode(&old, 0x40, Layout::Redundant, 0xff).unwrap();
    let b = encode(&new, 0x40, Layout::Redundant, 0).unwrap();
    let r = decode_redundant(&a, &b).unwrap();
    assert_eq!((r.current, r.env.get("v")), (1, Some("new")));
    // One corrupt copy: the other is used.
    let mut broken = b.clone();
    broken[10] ^= 1;
    let r = decode_redundant(&a, &broken).unwrap();
    assert_eq!((r.current, r.other_valid), (0, false));
    // Both corrupt.
    let mut broken_a = a.clone();
    broken_a[0] ^= 1;
    let err = decode_redundant(&broken_a, &broken).unwrap_err();
    assert!(matches!(err, EnvError::BothCopiesInvalid { .. }));
    assert!(err.to_string().contains("CRC mismatch"), "{err}");
}

#[test]
fn text_format_round_trips() {
    let mut env = Env::new();
    env.set("script", "if true; then\n  echo hi\nfi").unwrap();
    env.set("x", "1").unwrap();
    assert_eq!(Env::from_text(&env.to_text()).unwrap(), env);
    let err = Env::from_text("good=1\nno equals here\n").unwrap_err();
    assert!(
        matches!(err, EnvError::TextLineWithoutEquals { line: 2, .. }),
        "{err}"
    );
}

/// A data area whose last entry ends at its very end (no terminating empty
/// entry) is read, as U-Boot reads it; writing it back in the same size
/// needs one byte more for the terminator, a clear error rather than a
/// truncated environment (found by the fuzzer).
#[test]
fn an_area_filled_to_its_last_byte_reads_and_refuses_a_rewrite_in_place() {
    let data = b"abcd=efghi\0";
    let mut image = crc32fast::hash(data).to_le_bytes().to_vec();
    image.extend_from_slice(data);
    let copy = decode(&image, Layout::Single).unwrap();
    assert_eq!(copy.env.get("abcd"), Some("efghi"));
    match encode(&copy.env, image.len(), Layout::Single, 0) {
        Err(EnvError::TooLarge { needed, capacity }) => assert_eq!((needed, capacity), (12, 11)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let bigger = encode(&copy.env, image.len() + 1, Layout::Single, 0).unwrap();
    assert_eq!(decode(&bigger, Layout::Single).unwrap().env, copy.env);
}
