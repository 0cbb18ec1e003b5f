//! The device side against a real swtpm, the verifier against what that TPM
//! produced, and tpm2-tools as an independent second opinion.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::Swtpm;
use kernex_attest::quote::MAX_ATTEST_SIZE;
use kernex_attest::{
    ActivationError, AkBlob, AkPublic, CredentialChallenge, DEFAULT_SLOT_PCR, DeviceError,
    EkPublic, Quote, QuoteError, Tpm, expected_slot_pcr, verify_quote,
};
use kernex_protocol::Sha256Digest;

const PCR: u8 = DEFAULT_SLOT_PCR;

struct Device {
    swtpm: Swtpm,
    tpm: Tpm,
    ak: AkBlob,
}

impl Device {
    fn new() -> Self {
        let swtpm = Swtpm::start();
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        let ak = tpm.create_ak().unwrap();
        Self { swtpm, tpm, ak }
    }

    fn ak_public(&self) -> AkPublic {
        AkPublic::parse(&self.ak.public).unwrap()
    }

    fn ek_public(&mut self) -> EkPublic {
        EkPublic::parse(&self.tpm.endorsement().unwrap().public).unwrap()
    }

    /// Power cycle the TPM and reopen it.
    fn reboot(&mut self) {
        self.swtpm.reboot();
        self.tpm = Tpm::open(&self.swtpm.tcti()).unwrap();
    }
}

fn image(name: &str) -> Sha256Digest {
    Sha256Digest::of(format!("rootfs image {name}").as_bytes())
}

fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; 32];
    openssl::rand::rand_bytes(&mut n).unwrap();
    n
}

fn expect_slot(measurement: &Sha256Digest) -> BTreeMap<u8, Sha256Digest> {
    BTreeMap::from([(PCR, expected_slot_pcr(measurement))])
}

#[test]
fn endorsement_key_matches_the_manufacturer_certificate_in_nv() {
    let mut dev = Device::new();
    let endorsement = dev.tpm.endorsement().unwrap();
    let ek = EkPublic::parse(&endorsement.public).unwrap();
    let cert = endorsement
        .certificate
        .expect("swtpm_setup --create-ek-cert wrote an EK certificate");
    assert!(ek.matches_certificate(&cert).unwrap());
    // Another TPM's EK is not the one that certificate certifies.
    let mut other = Device::new();
    assert!(!other.ek_public().matches_certificate(&cert).unwrap());
    // The EK is a primary key: the same every time it is recreated.
    assert_eq!(dev.tpm.endorsement().unwrap().public, endorsement.public);
}

#[test]
fn credential_activation_round_trip() {
    let mut dev = Device::new();
    let ek = dev.ek_public();
    let ak = dev.ak_public();
    let challenge = CredentialChallenge::new(&ek, &ak).unwrap();
    let answer = dev
        .tpm
        .activate_credential(&dev.ak, &challenge.id_object, &challenge.encrypted_secret)
        .unwrap();
    challenge.check(&answer).unwrap();
    assert_eq!(&answer[..], &challenge.expected()[..]);
}

#[test]
fn credential_activation_answered_wrongly_is_rejected() {
    let mut dev = Device::new();
    let challenge = CredentialChallenge::new(&dev.ek_public(), &dev.ak_public()).unwrap();
    let mut answer = dev
        .tpm
        .activate_credential(&dev.ak, &challenge.id_object, &challenge.encrypted_secret)
        .unwrap();
    answer[0] ^= 1;
    assert!(matches!(
        challenge.check(&answer),
        Err(ActivationError::WrongAnswer)
    ));
    assert!(matches!(
        challenge.check(&answer[..16]),
        Err(ActivationError::WrongAnswer)
    ));
}

#[test]
fn credential_for_another_tpm_or_another_key_cannot_be_activated() {
    let mut dev = Device::new();
    let mut other = Device::new();
    // Made for the other TPM's EK: this TPM cannot decrypt the seed.
    let for_other_ek = CredentialChallenge::new(&other.ek_public(), &dev.ak_public()).unwrap();
    let err = dev
        .tpm
        .activate_credential(
            &dev.ak,
            &for_other_ek.id_object,
            &for_other_ek.encrypted_secret,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::Tpm {
                operation: "ActivateCredential",
                ..
            }
        ),
        "{err:?}"
    );
    // Made for this EK but another AK's name (an AK in another TPM): the
    // integrity HMAC binds the name, so this TPM refuses it.
    let for_other_ak = CredentialChallenge::new(&dev.ek_public(), &other.ak_public()).unwrap();
    let err = dev
        .tpm
        .activate_credential(
            &dev.ak,
            &for_other_ak.id_object,
            &for_other_ak.encrypted_secret,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::Tpm {
                operation: "ActivateCredential",
                ..
            }
        ),
        "{err:?}"
    );
    // An AK blob from another TPM does not even load here.
    let err = dev
        .tpm
        .activate_credential(
            &other.ak,
            &for_other_ak.id_object,
            &for_other_ak.encrypted_secret,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::Tpm {
                operation: "Load (attestation key)",
                ..
            }
        ),
        "{err:?}"
    );
    let _ = other.tpm.endorsement().unwrap();
}

#[test]
fn extend_then_quote_verifies_here_and_with_tpm2_checkquote() {
    let mut dev = Device::new();
    let measurement = image("1.0.0");
    let value = dev.tpm.extend_slot_measurement(PCR, &measurement).unwrap();
    assert_eq!(value, expected_slot_pcr(&measurement));

    // tpm2_pcrread sees the value the updater extended.
    let out = dev.swtpm.tool("tpm2_pcrread", &[&format!("sha256:{PCR}")]);
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        text.contains(&format!("{PCR}: 0x{}", value.to_hex())),
        "tpm2_pcrread output: {text}"
    );

    let n = nonce();
    let quote = dev.tpm.quote(&dev.ak, &n, &[PCR]).unwrap();
    let verified = verify_quote(&dev.ak_public(), &quote, &n, &expect_slot(&measurement)).unwrap();
    assert_eq!(verified.pcrs[&PCR], value);

    // The independent verifier: AK public key in PEM, the same nonce and PCRs.
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    std::fs::write(path("ak.pem"), dev.ak_public().to_pem().unwrap()).unwrap();
    std::fs::write(path("quote.msg"), &quote.attest).unwrap();
    std::fs::write(path("quote.sig"), &quote.signature).unwrap();
    std::fs::write(path("pcrs.bin"), value.0).unwrap();
    let check = |nonce_hex: &str, pcr_file: &str| {
        dev.swtpm.tool_status(
            "tpm2_checkquote",
            &[
                "-u",
                &path("ak.pem"),
                "-m",
                &path("quote.msg"),
                "-s",
                &path("quote.sig"),
                "-f",
                &path(pcr_file),
                "-l",
                &format!("sha256:{PCR}"),
                "-g",
                "sha256",
                "-q",
                nonce_hex,
            ],
        )
    };
    let out = check(&hex::encode(&n), "pcrs.bin");
    assert!(
        out.status.success(),
        "tpm2_checkquote rejected our quote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and it is a real check: another nonce or another PCR value fails.
    assert!(!check(&hex::encode(nonce()), "pcrs.bin").status.success());
    std::fs::write(path("other.bin"), expected_slot_pcr(&image("2.0.0")).0).unwrap();
    assert!(!check(&hex::encode(&n), "other.bin").status.success());
}

#[test]
fn slot_pcr_is_measured_once_per_boot_and_starts_over_after_reboot() {
    let mut dev = Device::new();
    let measurement = image("1.0.0");
    dev.tpm.extend_slot_measurement(PCR, &measurement).unwrap();
    let err = dev
        .tpm
        .extend_slot_measurement(PCR, &measurement)
        .unwrap_err();
    assert!(
        matches!(err, DeviceError::AlreadyMeasured { pcr: PCR, .. }),
        "{err:?}"
    );

    // Reboot into another image: the PCR starts at zero and takes the new one.
    dev.reboot();
    let next = image("2.0.0");
    dev.tpm.extend_slot_measurement(PCR, &next).unwrap();
    let n = nonce();
    let quote = dev.tpm.quote(&dev.ak, &n, &[PCR]).unwrap();
    verify_quote(&dev.ak_public(), &quote, &n, &expect_slot(&next)).unwrap();
    // The AK survives the power cycle (it is loaded from its blob).
    let err = verify_quote(&dev.ak_public(), &quote, &n, &expect_slot(&measurement)).unwrap_err();
    assert!(
        matches!(err, QuoteError::PcrMismatch { pcr: PCR, .. }),
        "{err:?}"
    );
}

#[test]
fn bad_quotes_are_rejected_with_the_reason() {
    let mut dev = Device::new();
    let measurement = image("1.0.0");
    dev.tpm.extend_slot_measurement(PCR, &measurement).unwrap();
    let ak = dev.ak_public();
    let expected = expect_slot(&measurement);

    // Replayed quote: answers an older nonce than the outstanding one.
    let old = nonce();
    let replayed = dev.tpm.quote(&dev.ak, &old, &[PCR]).unwrap();
    verify_quote(&ak, &replayed, &old, &expected).unwrap();
    let fresh = nonce();
    let err = verify_quote(&ak, &replayed, &fresh, &expected).unwrap_err();
    match &err {
        QuoteError::NonceMismatch { expected, found } => {
            assert_eq!(expected, &hex::encode(&fresh));
            assert_eq!(found, &hex::encode(&old));
        }
        other => panic!("expected NonceMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("replayed or stale"));

    // Signed by another TPM's AK (same PCR state, same nonce).
    let mut other = Device::new();
    other
        .tpm
        .extend_slot_measurement(PCR, &measurement)
        .unwrap();
    let forged = other.tpm.quote(&other.ak, &fresh, &[PCR]).unwrap();
    verify_quote(&other.ak_public(), &forged, &fresh, &expected).unwrap();
    let err = verify_quote(&ak, &forged, &fresh, &expected).unwrap_err();
    assert!(matches!(err, QuoteError::BadSignature), "{err:?}");

    // The PCR of a different image: names the PCR and both values.
    let quote = dev.tpm.quote(&dev.ak, &fresh, &[PCR]).unwrap();
    let other_image = expect_slot(&image("2.0.0"));
    let err = verify_quote(&ak, &quote, &fresh, &other_image).unwrap_err();
    match err {
        QuoteError::PcrMismatch {
            pcr,
            expected,
            found,
        } => {
            assert_eq!(pcr, PCR);
            assert_eq!(expected, other_image[&PCR]);
            assert_eq!(found, expected_slot_pcr(&measurement));
        }
        other => panic!("expected PcrMismatch, got {other:?}"),
    }

    // PCR values that are not the ones the TPM signed.
    let mut lied = quote.clone();
    lied.pcrs.insert(PCR, other_image[&PCR]);
    let err = verify_quote(&ak, &lied, &fresh, &other_image).unwrap_err();
    assert!(matches!(err, QuoteError::PcrDigestMismatch), "{err:?}");

    // A PCR the quote does not cover.
    let mut more = expected.clone();
    more.insert(7, Sha256Digest([0; 32]));
    let err = verify_quote(&ak, &quote, &fresh, &more).unwrap_err();
    assert!(
        matches!(err, QuoteError::PcrNotQuoted { pcr: 7 }),
        "{err:?}"
    );

    // Altered signed bytes (e.g. the nonce rewritten): signature fails.
    let mut altered = quote.clone();
    let last = altered.attest.len() - 1;
    altered.attest[last] ^= 1;
    let err = verify_quote(&ak, &altered, &fresh, &expected).unwrap_err();
    assert!(matches!(err, QuoteError::BadSignature), "{err:?}");

    // Malformed bytes: every truncation of both parts, garbage, trailing
    // bytes, oversize. Each is an error, none panics.
    for cut in 0..quote.attest.len() {
        let mut q = quote.clone();
        q.attest.truncate(cut);
        let err = verify_quote(&ak, &q, &fresh, &expected).unwrap_err();
        assert!(
            matches!(err, QuoteError::Malformed(_) | QuoteError::NotAQuote { .. }),
            "cut {cut}: {err:?}"
        );
    }
    for cut in 0..quote.signature.len() {
        let mut q = quote.clone();
        q.signature.truncate(cut);
        let err = verify_quote(&ak, &q, &fresh, &expected).unwrap_err();
        assert!(
            matches!(err, QuoteError::Malformed(_)),
            "cut {cut}: {err:?}"
        );
    }
    let mut q = quote.clone();
    q.attest.push(0);
    let err = verify_quote(&ak, &q, &fresh, &expected).unwrap_err();
    assert!(err.to_string().contains("trailing"), "{err}");
    let mut q = quote.clone();
    q.attest = vec![0xff; MAX_ATTEST_SIZE + 1];
    assert!(matches!(
        verify_quote(&ak, &q, &fresh, &expected),
        Err(QuoteError::TooLarge { .. })
    ));
    let mut q = quote.clone();
    q.attest = b"definitely not a TPMS_ATTEST".to_vec();
    assert!(matches!(
        verify_quote(&ak, &q, &fresh, &expected),
        Err(QuoteError::NotAQuote { .. })
    ));
    // Flip every byte of the attest in turn: never a panic, never accepted.
    for i in 0..quote.attest.len() {
        let mut q = quote.clone();
        q.attest[i] ^= 0xa5;
        assert!(
            verify_quote(&ak, &q, &fresh, &expected).is_err(),
            "byte {i}"
        );
    }

    // The JSON the device sends round-trips, and bad JSON is an error.
    let json = serde_json::to_string(&quote).unwrap();
    let back: Quote = serde_json::from_str(&json).unwrap();
    verify_quote(&ak, &back, &fresh, &expected).unwrap();
    assert!(serde_json::from_str::<Quote>(r#"{"attest":"zz","signature":"","pcrs":{}}"#).is_err());
}

#[test]
fn a_non_attestation_key_is_not_accepted_as_ak() {
    let mut dev = Device::new();
    // The EK is a decryption key: not an AK.
    let ek = dev.tpm.endorsement().unwrap().public;
    let err = AkPublic::parse(&ek).unwrap_err();
    assert!(err.to_string().contains("attestation key must be"), "{err}");
    // And the AK is not an EK.
    let err = EkPublic::parse(&dev.ak.public).unwrap_err();
    assert!(err.to_string().contains("endorsement key must be"), "{err}");
    // Truncated public keys are errors.
    for cut in 0..dev.ak.public.len() {
        assert!(AkPublic::parse(&dev.ak.public[..cut]).is_err());
    }
}
