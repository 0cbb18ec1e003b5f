//! EK certificates against the TPM vendors' CAs, with real swtpm TPMs
//! provisioned like a manufacturer would (`swtpm_setup --create-ek-cert
//! --create-platform-cert`, certificates issued by a swtpm-localca CA in a
//! temporary directory): the certificate of a trusted vendor verifies,
//! another vendor's, none, another TPM's and malformed bytes are each
//! refused with their reason and without a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::{EkCert, LocalCa, Swtpm};
use kernex_attest::ek_ca::MAX_EK_CERTIFICATE_SIZE;
use kernex_attest::{EkCaStore, EkCaStoreError, EkCertError, EkPublic, Endorsement, Tpm};

fn endorsement(swtpm: &Swtpm) -> Endorsement {
    Tpm::open(&swtpm.tcti()).unwrap().endorsement().unwrap()
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
}

#[test]
fn ek_certificates_verify_against_the_trusted_vendor_cas_only() {
    let vendor = LocalCa::new();
    let other_vendor = LocalCa::new();
    let board = Swtpm::start_with(EkCert::From(&vendor));
    let second = Swtpm::start_with(EkCert::From(&vendor));
    let foreign = Swtpm::start_with(EkCert::From(&other_vendor));
    let bare = Swtpm::start_with(EkCert::None);

    let store = EkCaStore::load(&[vendor.store()]).unwrap();
    assert_eq!((store.anchors(), store.intermediates()), (1, 1));
    let ek_of = |e: &Endorsement| EkPublic::parse(&e.public).unwrap();

    // The trusted vendor's TPMs: the chain EK → signing CA → root verifies.
    let e = endorsement(&board);
    let cert = e.certificate.clone().unwrap();
    store.verify(Some(&cert[..]), &ek_of(&e), now()).unwrap();
    let e2 = endorsement(&second);
    store
        .verify(e2.certificate.as_deref(), &ek_of(&e2), now())
        .unwrap();
    // The same store given as the two PEM files.
    let files = EkCaStore::load(&[vendor.intermediate(), vendor.root()]).unwrap();
    files.verify(Some(&cert[..]), &ek_of(&e), now()).unwrap();

    // Another vendor's CA (the same names, other keys): not trusted.
    let f = endorsement(&foreign);
    let err = store
        .verify(f.certificate.as_deref(), &ek_of(&f), now())
        .unwrap_err();
    assert!(matches!(err, EkCertError::NotTrusted { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("EK certificate not issued by a trusted TPM vendor CA"),
        "{msg}"
    );
    assert!(msg.contains("CN=swtpm-localca"), "{msg}");
    // Trusting only the other vendor refuses the first one's.
    let other_store = EkCaStore::load(&[other_vendor.store()]).unwrap();
    let err = other_store
        .verify(Some(&cert[..]), &ek_of(&e), now())
        .unwrap_err();
    assert!(matches!(err, EkCertError::NotTrusted { .. }), "{err:?}");
    other_store
        .verify(f.certificate.as_deref(), &ek_of(&f), now())
        .unwrap();

    // No EK certificate in NV.
    let b = endorsement(&bare);
    assert!(b.certificate.is_none());
    let err = store.verify(None, &ek_of(&b), now()).unwrap_err();
    assert!(matches!(err, EkCertError::Missing), "{err:?}");
    assert!(
        err.to_string()
            .contains("no EK certificate in the TPM's NV"),
        "{err}"
    );

    // A trusted certificate of another TPM, sent with this EK.
    let err = store
        .verify(e2.certificate.as_deref(), &ek_of(&e), now())
        .unwrap_err();
    assert!(matches!(err, EkCertError::OtherKey), "{err:?}");

    // Validity at the verifier's clock: before notBefore (2001), and the
    // chain is valid up to 9999.
    let err = store
        .verify(
            Some(&cert[..]),
            &ek_of(&e),
            Duration::from_secs(1_000_000_000),
        )
        .unwrap_err();
    assert!(matches!(err, EkCertError::Validity(_)), "{err:?}");
    assert!(err.to_string().contains("not valid before"), "{err}");
    let err = store
        .verify(
            Some(&cert[..]),
            &ek_of(&e),
            Duration::from_secs(253_402_300_800 + 1),
        )
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    // Malformed bytes: garbage, too large, every truncation, a flipped bit
    // in every byte. Each is an error, never a panic, and never accepted.
    for bad in [vec![], vec![0x30], b"not a certificate".to_vec()] {
        let err = store.verify(Some(&bad[..]), &ek_of(&e), now()).unwrap_err();
        assert!(matches!(err, EkCertError::Malformed(_)), "{err:?}");
    }
    let err = store
        .verify(
            Some(&[0x30; MAX_EK_CERTIFICATE_SIZE + 1][..]),
            &ek_of(&e),
            now(),
        )
        .unwrap_err();
    assert!(matches!(err, EkCertError::TooLarge { .. }), "{err:?}");
    for len in 0..cert.len() {
        assert!(
            store.verify(Some(&cert[..len]), &ek_of(&e), now()).is_err(),
            "truncated to {len} bytes"
        );
    }
    let ek = ek_of(&e);
    for i in 0..cert.len() {
        let mut bad = cert.clone();
        bad[i] ^= 0x01;
        assert!(
            store.verify(Some(&bad[..]), &ek, now()).is_err(),
            "bit 0 of byte {i} flipped"
        );
    }
}

#[test]
fn a_store_that_cannot_be_used_is_an_error_naming_it() {
    let vendor = LocalCa::new();
    let _tpm = Swtpm::start_with(EkCert::From(&vendor));
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);

    let err = EkCaStore::load(&[p("missing")]).unwrap_err();
    assert!(matches!(err, EkCaStoreError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");

    std::fs::write(p("junk.pem"), "hello").unwrap();
    let err = EkCaStore::load(&[p("junk.pem")]).unwrap_err();
    assert!(err.to_string().contains("neither PEM nor"), "{err}");

    std::fs::write(
        p("broken.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = EkCaStore::load(&[p("broken.pem")]).unwrap_err();
    assert!(err.to_string().contains("broken.pem"), "{err}");

    std::fs::write(
        p("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let err = EkCaStore::load(&[p("key.pem")]).unwrap_err();
    assert!(err.to_string().contains("no CERTIFICATE"), "{err}");

    let empty = p("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = EkCaStore::load(&[empty]).unwrap_err();
    assert!(matches!(err, EkCaStoreError::Empty(_)), "{err:?}");

    // An intermediate alone: trusted only through its root.
    let err = EkCaStore::load(&[vendor.intermediate()]).unwrap_err();
    assert!(err.to_string().contains("none self-signed"), "{err}");

    std::fs::write(p("huge.pem"), vec![b'A'; 2 << 20]).unwrap();
    let err = EkCaStore::load(&[p("huge.pem")]).unwrap_err();
    assert!(matches!(err, EkCaStoreError::TooLarge { .. }), "{err:?}");

    // DER works too (vendors often publish .cer/.crt in DER).
    let pem = std::fs::read(vendor.root()).unwrap();
    let der = openssl::x509::X509::from_pem(&pem)
        .unwrap()
        .to_der()
        .unwrap();
    let root_der: PathBuf = p("root.der");
    std::fs::write(&root_der, der).unwrap();
    let store = EkCaStore::load(&[root_der, vendor.intermediate()]).unwrap();
    assert_eq!((store.anchors(), store.intermediates()), (1, 1));
}
