//! The device identity key in the TPM and the anti-rollback floor counter
//! in TPM NV, against a real swtpm (tpm2-tools as the second opinion).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::Swtpm;
use kernex_attest::{FLOOR_BASE_INDEX, FLOOR_COUNTER_INDEX, Tpm};
use kernex_protocol::api;
use kernex_protocol::device_key;

#[test]
fn the_tpm_device_key_signs_what_the_server_verifies_and_stays_in_its_tpm() {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let blob = tpm.create_signing_key().unwrap();
    let public = hex::encode(blob.spki_der().unwrap());
    // The server's own parser: Ed25519 or P-256 only.
    assert!(device_key::public_key(&public).unwrap().ec_key().is_ok());

    let enroll = api::enroll_message("dev-1", "00aa", &public);
    let signature = hex::encode(tpm.sign_with_key(&blob, &enroll).unwrap());
    device_key::verify(&public, &enroll, &signature).unwrap();
    let auth = api::auth_message("pk-1", "00bb");
    let auth_signature = hex::encode(tpm.sign_with_key(&blob, &auth).unwrap());
    device_key::verify(&public, &auth, &auth_signature).unwrap();
    // Not for another message, nor for another key.
    assert!(device_key::verify(&public, &auth, &signature).is_err());
    let other = tpm.create_signing_key().unwrap();
    let other_public = hex::encode(other.spki_der().unwrap());
    assert_ne!(other_public, public);
    assert!(device_key::verify(&other_public, &enroll, &signature).is_err());

    // The blob is useless to another TPM: it cannot load it to sign.
    let stranger = Swtpm::start();
    let mut stranger_tpm = Tpm::open(&stranger.tcti()).unwrap();
    assert!(stranger_tpm.sign_with_key(&blob, &enroll).is_err());

    // After a power cycle the same TPM signs with the same key again.
    drop(tpm);
    let mut swtpm = swtpm;
    swtpm.reboot();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let again = hex::encode(tpm.sign_with_key(&blob, &enroll).unwrap());
    device_key::verify(&public, &enroll, &again).unwrap();
}

fn nv_read_u64(swtpm: &Swtpm, index: u32) -> u64 {
    let out = swtpm.tool(
        "tpm2_nvread",
        &[&format!("0x{index:08x}"), "-C", "o", "-s", "8"],
    );
    u64::from_be_bytes(out.stdout.as_slice().try_into().unwrap())
}

#[test]
fn the_floor_counter_only_goes_up_from_its_base() {
    let mut swtpm = Swtpm::start();
    // Another counter that reached 5 and was deleted: a new counter starts
    // above 5 (the TPM's rule), so the floor needs its base.
    swtpm.tool(
        "tpm2_nvdefine",
        &[
            "0x01000100",
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite|nt=counter",
        ],
    );
    for _ in 0..5 {
        swtpm.tool("tpm2_nvincrement", &["0x01000100", "-C", "o"]);
    }
    swtpm.tool("tpm2_nvundefine", &["0x01000100", "-C", "o"]);

    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.floor_counter().unwrap(), None, "never raised");
    assert_eq!(tpm.raise_floor_counter(3, 1024).unwrap(), 3);
    assert_eq!(tpm.floor_counter().unwrap(), Some(3));
    let base = nv_read_u64(&swtpm, FLOOR_BASE_INDEX);
    assert!(base > 5, "base {base}");
    assert_eq!(nv_read_u64(&swtpm, FLOOR_COUNTER_INDEX), base + 3);
    // Never lowered; bounded steps per raise.
    assert_eq!(tpm.raise_floor_counter(2, 1024).unwrap(), 3);
    assert_eq!(tpm.raise_floor_counter(10, 4).unwrap(), 7);
    assert_eq!(tpm.raise_floor_counter(10, 4).unwrap(), 10);

    // A counter cannot be written down, not even by the owner.
    let out = swtpm.tool_status(
        "tpm2_nvwrite",
        &[
            &format!("0x{FLOOR_COUNTER_INDEX:08x}"),
            "-C",
            "o",
            "-i",
            "/dev/null",
        ],
    );
    assert!(!out.status.success());

    // A power cycle keeps it.
    drop(tpm);
    swtpm.reboot();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.floor_counter().unwrap(), Some(10));
}
