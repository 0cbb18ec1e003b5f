//! `kernex-updater attest` on a simulated device with a real swtpm: enroll
//! with credential activation, install a release, reboot (a power cycle of
//! the TPM: PCRs back to zero), measure the booted slot, quote a nonce, and
//! the verifier accepts the release the device runs and names the PCR when
//! a different image is booted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../attest/tests/common/mod.rs"]
mod swtpm;

use std::collections::BTreeMap;
use std::process::{Command, Output};

use common::*;
use kernex_attest::{
    Activation, AkPublic, CredentialChallenge, EkPublic, Quote, QuoteError, TpmIdentity,
    expected_slot_pcr, slot_measurement, verify_quote,
};
use kernex_bootloader::Slot;
use kernex_protocol::Sha256Digest;
use kernex_updater::store::DataDir;
use swtpm::Swtpm;

const PCR: u8 = 14;

struct Sim {
    dev: Device,
    tpm: Swtpm,
}

impl Sim {
    fn boot(&mut self, slot: &str) {
        self.dev.write_config(slot, "");
        let mut text = std::fs::read_to_string(&self.dev.config).unwrap();
        text.push_str(&format!(
            "[tpm]\ntcti = \"{}\"\npcr = {PCR}\n",
            self.tpm.tcti()
        ));
        std::fs::write(&self.dev.config, text).unwrap();
    }

    /// Power cycle into `slot`.
    fn reboot(&mut self, slot: &str) {
        self.tpm.reboot();
        self.boot(slot);
    }

    fn updater(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
            .arg("--config")
            .arg(&self.dev.config)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.updater(args);
        assert!(
            out.status.success(),
            "kernex-updater {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn err(&self, args: &[&str]) -> String {
        let out = self.updater(args);
        assert!(!out.status.success(), "kernex-updater {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// What the verifier expects from the release recorded in `slot`.
    fn expected(&self, slot: Slot) -> BTreeMap<u8, Sha256Digest> {
        let record = DataDir::new(self.dev.path("data"))
            .slot_record(slot)
            .unwrap()
            .unwrap();
        let measurement = slot_measurement(&record.manifest().unwrap()).unwrap();
        BTreeMap::from([(PCR, expected_slot_pcr(&measurement))])
    }

    fn quote(&self, nonce: &[u8]) -> Quote {
        serde_json::from_str(&self.ok(&["attest", "quote", &hex::encode(nonce)])).unwrap()
    }
}

fn nonce() -> Vec<u8> {
    kernex_attest::fresh_nonce().unwrap().to_vec()
}

#[test]
fn enroll_install_reboot_measure_and_quote_attests_the_running_release() {
    let keys = keys();
    let v1 = image(256 * 1024, 1);
    let mut sim = Sim {
        dev: Device::new(&keys, &v1),
        tpm: Swtpm::start(),
    };
    sim.boot("A");

    // The factory image has no recorded release: nothing to measure.
    let err = sim.err(&["attest", "measure"]);
    assert!(err.contains("no recorded release"), "{err}");

    // Enrollment: identity, then the server's challenge, then the answer.
    let identity: TpmIdentity = serde_json::from_str(&sim.ok(&["attest", "identity"])).unwrap();
    let ek = EkPublic::parse(&identity.ek_public).unwrap();
    assert!(
        ek.matches_certificate(identity.ek_certificate.as_ref().unwrap())
            .unwrap()
    );
    let ak = AkPublic::parse(&identity.ak_public).unwrap();
    let challenge = CredentialChallenge::new(&ek, &ak).unwrap();
    let path = sim.dev.path("challenge.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&Activation::from(&challenge)).unwrap(),
    )
    .unwrap();
    let answer = sim.ok(&["attest", "activate", path.to_str().unwrap()]);
    challenge
        .check(&hex::decode(answer.trim()).unwrap())
        .unwrap();
    // The AK is kept: asking again gives the same one.
    let again: TpmIdentity = serde_json::from_str(&sim.ok(&["attest", "identity"])).unwrap();
    assert_eq!(again.ak_public, identity.ak_public);
    // A challenge for another AK cannot be opened by this device.
    let other_tpm = Swtpm::start();
    let mut other = kernex_attest::Tpm::open(&other_tpm.tcti()).unwrap();
    let other_ak = AkPublic::parse(&other.create_ak().unwrap().public).unwrap();
    let wrong = CredentialChallenge::new(&ek, &other_ak).unwrap();
    std::fs::write(
        &path,
        serde_json::to_vec(&Activation::from(&wrong)).unwrap(),
    )
    .unwrap();
    let err = sim.err(&["attest", "activate", path.to_str().unwrap()]);
    assert!(err.contains("credential activation failed"), "{err}");

    // Install 2.0.0 into B and reboot into it.
    let v2 = image(256 * 1024, 2);
    let b2 = sim
        .dev
        .write_bundle("v2.kxb", &bundle(&v2, "2.0.0", &keys.signer).bytes);
    sim.ok(&["install", &b2]);
    sim.reboot("B");
    let measured: serde_json::Value =
        serde_json::from_str(&sim.ok(&["attest", "measure", "--json"])).unwrap();
    assert_eq!(measured["slot"], "B");
    assert_eq!(measured["version"], "2.0.0");
    assert_eq!(measured["measurement"], sha256(&v2));
    let expected_b = sim.expected(Slot::B);
    assert_eq!(measured["value"], expected_b[&PCR].to_hex());
    // tpm2_pcrread sees what the updater extended.
    let out = sim.tpm.tool("tpm2_pcrread", &[&format!("sha256:{PCR}")]);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .to_lowercase()
            .contains(&expected_b[&PCR].to_hex())
    );
    // Once per boot: a second run finds its own measurement and leaves it.
    let again = sim.ok(&["attest", "measure"]);
    assert!(again.contains("already measured"), "{again}");

    // The server's nonce, the device's quote: committed release attested.
    let n = nonce();
    let quote = sim.quote(&n);
    verify_quote(&ak, &quote, &n, &expected_b).unwrap();
    // The same quote replayed against the next challenge is refused.
    let err = verify_quote(&ak, &quote, &nonce(), &expected_b).unwrap_err();
    assert!(matches!(err, QuoteError::NonceMismatch { .. }), "{err:?}");

    // Install 3.0.0 into A and boot it while the server still expects 2.0.0
    // (a swapped image): the quote verifies, the slot PCR does not match.
    let v3 = image(256 * 1024, 3);
    let b3 = sim
        .dev
        .write_bundle("v3.kxb", &bundle(&v3, "3.0.0", &keys.signer).bytes);
    sim.ok(&["install", &b3]);
    sim.reboot("A");
    sim.ok(&["attest", "measure"]);
    let n = nonce();
    let quote = sim.quote(&n);
    let err = verify_quote(&ak, &quote, &n, &expected_b).unwrap_err();
    match err {
        QuoteError::PcrMismatch { pcr, expected, .. } => {
            assert_eq!(pcr, PCR);
            assert_eq!(expected, expected_b[&PCR]);
        }
        other => panic!("expected a PCR mismatch, got {other:?}"),
    }
    verify_quote(&ak, &quote, &n, &sim.expected(Slot::A)).unwrap();
    // A PCR holding anything else than this one measurement is refused:
    // extending over it would match no release.
    sim.tpm.tool(
        "tpm2_pcrextend",
        &[&format!("{PCR}:sha256={}", "ab".repeat(32))],
    );
    let err = sim.err(&["attest", "measure"]);
    assert!(err.contains("already extended"), "{err}");
}

#[test]
fn attest_errors_name_what_failed() {
    let keys = keys();
    let mut sim = Sim {
        dev: Device::new(&keys, &image(64 * 1024, 1)),
        tpm: Swtpm::start(),
    };
    sim.boot("A");
    // No AK yet.
    let err = sim.err(&["attest", "quote", "00"]);
    assert!(err.contains("attest identity"), "{err}");
    sim.ok(&["attest", "identity"]);
    let err = sim.err(&["attest", "quote", "not-hex"]);
    assert!(err.contains("nonce must be hex"), "{err}");
    let err = sim.err(&["attest", "quote", &"00".repeat(65)]);
    assert!(err.contains("more than the limit of 64"), "{err}");
    let path = sim.dev.path("bad.json");
    std::fs::write(&path, b"{\"id-object\": \"zz\"}").unwrap();
    let err = sim.err(&["attest", "activate", path.to_str().unwrap()]);
    assert!(err.contains("unable to parse the challenge JSON"), "{err}");
    // A TPM that is not there.
    let port = sim.tpm.port;
    drop(sim.tpm);
    let err = {
        let out = Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
            .arg("--config")
            .arg(&sim.dev.config)
            .args(["attest", "identity"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(
        err.contains(&format!(
            "unable to open the TPM (swtpm:host=127.0.0.1,port={port})"
        )),
        "{err}"
    );
}
