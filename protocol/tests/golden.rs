//! Golden bundles: a valid one and one for every way a bundle can be bad.
//! Each is read or rejected with the error that names what failed. The
//! files are regenerated only when the format changes:
//! `cargo run -p kernex-image --example make-golden -- protocol/tests/golden`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::{self, File};
use std::io::{BufReader, Cursor};
use std::path::PathBuf;

use kernex_protocol::bundle::{Bundle, BundleError};
use kernex_protocol::index::{ChunkIndex, Delta};
use kernex_protocol::signature::{Keyring, SignatureError, VerifyOptions};
use kernex_protocol::{ManifestError, SlotClass};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn keyring() -> Keyring {
    Keyring::from_pem(&fs::read(golden("ca.crt")).unwrap()).unwrap()
}

fn open(name: &str) -> Result<Bundle<BufReader<File>>, BundleError> {
    Bundle::open(BufReader::new(File::open(golden(name)).unwrap()))
}

/// Opens, verifies the signature and every byte.
fn verify_fully(name: &str) -> Result<(), BundleError> {
    let mut bundle = open(name)?;
    let verified = bundle.verify(&keyring(), VerifyOptions::default())?;
    bundle.verify_contents(&verified, &|_| {})?;
    Ok(())
}

#[test]
fn valid_bundle_verifies_and_extracts_the_exact_image() {
    let mut bundle = open("valid.kxb").unwrap();
    let verified = bundle.verify(&keyring(), VerifyOptions::default()).unwrap();
    assert_eq!(verified.version.to_string(), "1.0.0");
    assert_eq!(verified.compatible, "qemu-aarch64");
    // Made before `security-version` existed: it reads as 0, and its
    // signature still verifies (the field is left out when 0).
    assert_eq!(verified.security_version, 0);
    assert_eq!(
        verified.signer().subject,
        "O=Kernex golden, CN=Kernex golden signing"
    );
    let mut image = Vec::new();
    let report = bundle
        .extract_image(&verified, SlotClass::Rootfs, &mut image, &|_| {})
        .unwrap();
    assert_eq!(image, fs::read(golden("image.bin")).unwrap());
    assert_eq!(report.size, image.len() as u64);
    // The zero run at the end is stored once.
    assert!(report.stored_chunks < report.chunks, "{report:?}");
}

#[test]
fn valid_bundle_reads_from_memory_too() {
    let bytes = fs::read(golden("valid.kxb")).unwrap();
    let mut bundle = Bundle::open(Cursor::new(bytes)).unwrap();
    let verified = bundle.verify(&keyring(), VerifyOptions::default()).unwrap();
    let reports = bundle.verify_contents(&verified, &|_| {}).unwrap();
    assert_eq!(reports.len(), 1);
}

#[test]
fn truncated_bundle_is_rejected_as_truncated() {
    match open("truncated.kxb") {
        Err(BundleError::Truncated { expected, found }) => assert!(found < expected),
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[test]
fn every_prefix_of_the_valid_bundle_is_rejected() {
    let bytes = fs::read(golden("valid.kxb")).unwrap();
    // Every 97th cut plus the edges of each member.
    let cuts = (0..bytes.len())
        .step_by(97)
        .chain([0, 1, 511, 512, 513, bytes.len() - 1]);
    for cut in cuts {
        let result = Bundle::open(Cursor::new(bytes[..cut].to_vec()));
        assert!(result.is_err(), "a bundle cut at {cut} bytes was accepted");
    }
}

#[test]
fn tampered_manifest_fails_the_signature() {
    let bundle = open("tampered-manifest.kxb").unwrap();
    match bundle.verify(&keyring(), VerifyOptions::default()) {
        Err(BundleError::Signature(SignatureError::Verify { signer, .. })) => {
            assert!(signer.contains("Kernex golden signing"))
        }
        other => panic!("expected a signature failure, got {other:?}"),
    }
}

#[test]
fn flipped_chunk_bit_is_found_by_content_verification() {
    let err = verify_fully("bitflip-chunk.kxb").unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::Archive {
                class: SlotClass::Rootfs,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("is corrupt"), "{err}");
}

#[test]
fn flipped_index_bit_fails_the_index_digest() {
    let err = verify_fully("bitflip-index.kxb").unwrap_err();
    match &err {
        BundleError::Digest { what, .. } => assert!(what.contains("rootfs.kxi"), "{err}"),
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}

#[test]
fn unsigned_bundle_is_rejected() {
    assert!(matches!(
        open("unsigned.kxb"),
        Err(BundleError::Signature(SignatureError::Unsigned))
    ));
}

#[test]
fn signer_from_an_unknown_ca_is_rejected() {
    let bundle = open("unknown-ca.kxb").unwrap();
    match bundle.verify(&keyring(), VerifyOptions::default()) {
        Err(BundleError::Signature(SignatureError::Verify { signer, reason })) => {
            assert!(signer.contains("Somebody else"));
            assert!(reason.contains("issuer"), "{reason}");
        }
        other => panic!("expected a chain failure, got {other:?}"),
    }
    // ...and accepted by a keyring that trusts that CA.
    let other = Keyring::from_pem(&fs::read(golden("other-ca.crt")).unwrap()).unwrap();
    bundle.verify(&other, VerifyOptions::default()).unwrap();
}

#[test]
fn expired_signer_is_rejected_now_and_accepted_at_a_time_it_was_valid() {
    let bundle = open("expired-signer.kxb").unwrap();
    match bundle.verify(&keyring(), VerifyOptions::default()) {
        Err(BundleError::Signature(SignatureError::Expired {
            signer, not_after, ..
        })) => {
            assert!(signer.contains("expired"));
            assert!(not_after.contains("2002"), "{not_after}");
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    // In mid-2001 the signing certificate was valid but its CA (made with
    // the golden files) was not yet: the chain check catches that.
    let at_2001 = VerifyOptions {
        at_time: Some(994_000_000),
    };
    assert!(matches!(
        bundle.verify(&keyring(), at_2001),
        Err(BundleError::Signature(SignatureError::Verify { .. }))
    ));
}

#[test]
fn wrong_usage_certificate_is_rejected() {
    let bundle = open("wrong-usage.kxb").unwrap();
    match bundle.verify(&keyring(), VerifyOptions::default()) {
        Err(BundleError::Signature(SignatureError::WrongUsage { reason, .. })) => {
            assert!(reason.contains("codeSigning"), "{reason}")
        }
        other => panic!("expected WrongUsage, got {other:?}"),
    }
}

#[test]
fn unknown_manifest_field_is_rejected_by_name() {
    match open("unknown-field.kxb") {
        Err(BundleError::Manifest(ManifestError::Json(e))) => {
            assert!(e.to_string().contains("reboot-policy"), "{e}")
        }
        other => panic!("expected an unknown-field error, got {other:?}"),
    }
}

#[test]
fn oversized_manifest_is_rejected_before_parsing() {
    match open("oversized-manifest.kxb") {
        Err(BundleError::Manifest(ManifestError::TooLarge { limit, found })) => {
            assert!(found > limit)
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn golden_index_is_canonical_and_a_delta_against_itself_is_empty() {
    let mut bundle = open("valid.kxb").unwrap();
    let manifest = bundle.unverified_manifest().clone();
    let index: ChunkIndex = bundle.read_index(&manifest, SlotClass::Rootfs).unwrap();
    let delta = Delta::between(Some(&index), &index);
    assert_eq!(delta.chunks_fetched, 0);
    assert_eq!(delta.index_pages_fetched, 0);
    assert_eq!(delta.total_bytes(), index.head().head_size());
}
