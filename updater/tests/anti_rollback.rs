//! Anti-rollback on the device: the floor (the highest security version
//! committed) is raised by the commit, survives a power cut at every write,
//! and no install or rollback below it happens, whoever asks. A rollback
//! re-verifies the other slot's manifest signature, and `allow-downgrade`
//! (default false) governs a lower version of an equal security version.
//! With a `[tpm]`, the floor is also a TPM NV counter (a real swtpm): the
//! data dir's copies deleted or rolled back do not lower it.
//! Real bundles, the real `kernex-updater` binary, a `file` boot backend.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod pause;
#[path = "../../attest/tests/common/mod.rs"]
mod swtpm;

use std::process::{Command, Output};

use common::*;
use kernex_bootloader::Slot;
use kernex_updater::floor::{self, Floor};
use kernex_updater::source::{self, Link};
use kernex_updater::store::DataDir;
use kernex_updater::{InstallOptions, UpdateError};
use pause::kill_at_pause;

const MIB: usize = 1024 * 1024;

fn cli(dev: &Device, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
        .arg("--config")
        .arg(&dev.config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(dev: &Device, args: &[&str]) -> String {
    let out = cli(dev, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(dev: &Device, args: &[&str]) -> String {
    let out = cli(dev, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What the boot script does at power-on: boot the primary slot (one
/// attempt counted); the config then says that slot is booted.
fn power_on(dev: &Device) -> Slot {
    let mut booted = Slot::A;
    dev.flow()
        .modify(&mut |s| {
            booted = s.select_boot().slot;
            Ok(())
        })
        .unwrap();
    dev.write_config(booted.name(), "");
    booted
}

/// Installs `bundle` with the CLI, boots into it and commits it with
/// `mark-good`: the floor is raised to its security version.
fn install_and_commit(dev: &Device, name: &str, bundle: &Built) -> Slot {
    let path = dev.write_bundle(name, &bundle.bytes);
    ok(dev, &["install", &path]);
    let slot = power_on(dev);
    ok(dev, &["mark-good"]);
    slot
}

fn status(dev: &Device) -> serde_json::Value {
    serde_json::from_str(&ok(dev, &["status", "--json"])).unwrap()
}

fn floor_of(dev: &Device) -> u64 {
    Floor::new(&DataDir::new(dev.path("data"))).get().unwrap()
}

/// (slot A, slot B, boot state) to compare before and after a refusal.
fn snapshot(dev: &Device) -> (String, String, String) {
    (
        file_sha256(&dev.path("slot-a.img")),
        file_sha256(&dev.path("slot-b.img")),
        std::fs::read_to_string(dev.path("boot-state")).unwrap_or_default(),
    )
}

#[test]
fn install_below_the_floor_is_refused_by_the_cli() {
    let keys = keys();
    let dev = Device::new(&keys, &image(MIB, 1));
    assert_eq!(status(&dev)["security-floor"], 0, "a new device");
    // 1.1.0 fixes a vulnerability (security version 2); committed.
    let slot = install_and_commit(
        &dev,
        "v11.kxb",
        &bundle_secure(&image(MIB, 2), "1.1.0", 2, &keys.signer),
    );
    assert_eq!(slot, Slot::B);
    assert_eq!(floor_of(&dev), 2);
    let s = status(&dev);
    assert_eq!(s["security-floor"], 2, "{s}");
    assert_eq!(s["slots"][1]["security-version"], 2, "{s}");
    // A signed 2.0.0 of security version 1 is refused, even with
    // --allow-downgrade, before slot A or the boot state is touched.
    let old = dev.write_bundle(
        "old.kxb",
        &bundle_secure(&image(MIB, 3), "2.0.0", 1, &keys.signer).bytes,
    );
    let before = snapshot(&dev);
    for args in [
        vec!["install", &old],
        vec!["install", "--allow-downgrade", &old],
    ] {
        let err = refused(&dev, &args);
        assert!(
            err.contains("security version 1 is below this device's anti-rollback floor 2"),
            "{err}"
        );
        assert_eq!(snapshot(&dev), before, "{args:?}");
    }
    // Equal to the floor is fine.
    ok(
        &dev,
        &[
            "install",
            &dev.write_bundle(
                "v12.kxb",
                &bundle_secure(&image(MIB, 4), "1.2.0", 2, &keys.signer).bytes,
            ),
        ],
    );
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::A));
}

/// B holds 1.0.0 (security version 1), A then commits 1.1.0 (2): rolling
/// back to B is refused by the CLI; with equal security versions it is not.
fn two_releases(security_of_new: u64) -> (Keys, Device) {
    let keys = keys();
    let dev = Device::new(&keys, &image(MIB, 1));
    install_and_commit(
        &dev,
        "v10.kxb",
        &bundle_secure(&image(MIB, 2), "1.0.0", 1, &keys.signer),
    );
    let slot = install_and_commit(
        &dev,
        "v11.kxb",
        &bundle_secure(&image(MIB, 3), "1.1.0", security_of_new, &keys.signer),
    );
    assert_eq!(slot, Slot::A);
    assert_eq!(floor_of(&dev), security_of_new);
    (keys, dev)
}

#[test]
fn rollback_below_the_floor_is_refused_by_the_cli() {
    let (_keys, dev) = two_releases(2);
    let before = snapshot(&dev);
    let err = refused(&dev, &["rollback"]);
    assert!(err.contains("roll back to 1.0.0 (slot B)"), "{err}");
    assert!(
        err.contains("below this device's anti-rollback floor 2"),
        "{err}"
    );
    assert_eq!(snapshot(&dev), before);
    // mark-bad of the booted slot is not a way around it either: the
    // library call the daemon uses refuses the same.
    let config = dev.load();
    let err = kernex_updater::boot::rollback(&config, dev.flow().as_mut(), true).unwrap_err();
    assert!(
        matches!(
            err,
            UpdateError::BelowFloor {
                floor: 2,
                security_version: 1,
                ..
            }
        ),
        "{err}"
    );

    // Same security version: the CLI rolls back.
    let (_keys, dev) = two_releases(1);
    let out = ok(&dev, &["rollback"]);
    assert!(out.contains("slot B boots next"), "{out}");
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::B));
}

/// `mark-bad` of the booted slot would make the bootloader fall back to
/// the other slot: refused when that slot's release is below the floor
/// (the boot state untouched), allowed at an equal security version.
#[test]
fn mark_bad_falling_back_below_the_floor_is_refused() {
    let (_keys, dev) = two_releases(2);
    let before = snapshot(&dev);
    let err = refused(&dev, &["mark-bad"]);
    assert!(err.contains("fall back to 1.0.0 (slot B)"), "{err}");
    assert!(
        err.contains("security version 1 is below this device's anti-rollback floor 2"),
        "{err}"
    );
    assert_eq!(snapshot(&dev), before);
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::A));
    let config = dev.load();
    let err = kernex_updater::boot::mark_bad(&config, dev.flow().as_mut()).unwrap_err();
    assert!(
        matches!(err, UpdateError::BelowFloor { floor: 2, .. }),
        "{err}"
    );
    assert_eq!(snapshot(&dev), before);

    // The same security version: mark-bad goes back to slot B.
    let (_keys, dev) = two_releases(1);
    let out = ok(&dev, &["mark-bad"]);
    assert!(out.contains("the next boot goes to slot B"), "{out}");
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::B));
}

#[test]
fn rollback_reverifies_the_other_slots_signature() {
    let (keys, dev) = two_releases(1);
    let record_path = dev.path("data/slot-B/record.json");
    let original = std::fs::read_to_string(&record_path).unwrap();
    let before = snapshot(&dev);
    let mut record: serde_json::Value = serde_json::from_str(&original).unwrap();
    // The manifest as recorded, one value changed (still valid JSON, still
    // a valid manifest): the signature no longer matches.
    let manifest = record["manifest"]
        .as_str()
        .unwrap()
        .replace("\"1.0.0\"", "\"1.0.9\"");
    assert_ne!(manifest, record["manifest"].as_str().unwrap());
    record["manifest"] = manifest.into();
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    let err = refused(&dev, &["rollback"]);
    assert!(err.contains("does not verify against the keyring"), "{err}");
    assert_eq!(snapshot(&dev), before);
    // A signature by the trusted signer, but over other bytes: refused.
    let wrong_signature = hex::encode(keys.signer.sign(b"another manifest").unwrap());
    let mut record: serde_json::Value = serde_json::from_str(&original).unwrap();
    record["signature"] = wrong_signature.into();
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    let err = refused(&dev, &["rollback"]);
    assert!(err.contains("does not verify against the keyring"), "{err}");
    assert_eq!(snapshot(&dev), before);
    // Restored: the rollback goes ahead.
    std::fs::write(&record_path, original).unwrap();
    ok(&dev, &["rollback"]);
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::B));
}

#[test]
fn allow_downgrade_governs_a_lower_version_of_equal_security_version() {
    // The daemon's setting defaults to false.
    let keys = keys();
    let dev = Device::new(&keys, &image(MIB, 1));
    let text =
        std::fs::read_to_string(&dev.config).unwrap() + "[server]\nurl = \"http://127.0.0.1:9\"\n";
    std::fs::write(&dev.config, text).unwrap();
    assert!(!dev.load().server.unwrap().allow_downgrade);
    dev.write_config("A", "");

    install_and_commit(
        &dev,
        "v11.kxb",
        &bundle_secure(&image(MIB, 2), "1.1.0", 1, &keys.signer),
    );
    let older = bundle_secure(&image(MIB, 3), "1.0.0", 1, &keys.signer);
    let path = dev.write_bundle("v10.kxb", &older.bytes);
    let install = |allow_downgrade: bool| {
        let config = dev.load();
        let mut flow = config.bootloader.open().unwrap();
        let mut src = source::open(&path, Link::unlimited()).unwrap();
        let options = InstallOptions {
            allow_downgrade,
            at_time: None,
        };
        kernex_updater::install(&config, flow.as_mut(), src.as_mut(), &options)
    };
    let before = snapshot(&dev);
    let err = install(false).unwrap_err();
    assert!(
        err.to_string().contains("lower than the booted 1.1.0"),
        "{err}"
    );
    assert_eq!(snapshot(&dev), before);
    install(true).unwrap();
    // Slot A now holds 1.0.0 and boots next; take the boot order back to
    // B (booted, committed) to ask for a rollback to A.
    dev.flow().mark_bad(Slot::A).unwrap();
    let before = snapshot(&dev);
    let config = dev.load();
    let err = kernex_updater::boot::rollback(&config, dev.flow().as_mut(), false).unwrap_err();
    assert!(
        err.to_string()
            .contains("would downgrade from the booted 1.1.0 and allow-downgrade is false"),
        "{err}"
    );
    assert_eq!(snapshot(&dev), before);
    kernex_updater::boot::rollback(&config, dev.flow().as_mut(), true).unwrap();
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::A));
}

/// Runs `mark-good` until it pauses at the failpoint `step`, then cuts
/// its power (`kill -9`).
fn mark_good_killed_at(dev: &Device, step: &str) {
    kill_at_pause(&dev.config, &["mark-good"], step, 30);
}

/// The floor is raised by the commit in two atomic writes (copy A, then
/// copy B). `kill -9` at each step: before either write, between them and
/// after both; plus a torn temp file and a torn copy as a cut in the middle
/// of a write leaves them. The floor never reads lower than before, and the
/// next boot (the watchdog's run on a committed slot) completes the raise.
#[test]
fn the_floor_survives_a_power_cut_at_every_write() {
    let keys = keys();
    for step in ["floor-raise", "floor-copy-a", "floor-copy-b"] {
        let dev = Device::new(&keys, &image(MIB, 1));
        install_and_commit(
            &dev,
            "v1.kxb",
            &bundle_secure(&image(MIB, 2), "1.0.0", 1, &keys.signer),
        );
        assert_eq!(floor_of(&dev), 1);
        let path = dev.write_bundle(
            "v2.kxb",
            &bundle_secure(&image(MIB, 3), "1.1.0", 3, &keys.signer).bytes,
        );
        ok(&dev, &["install", &path]);
        power_on(&dev);
        mark_good_killed_at(&dev, step);

        let a = dev.path("data/security-floor.a");
        let b = dev.path("data/security-floor.b");
        let read = |p: &std::path::Path| floor::decode(&std::fs::read(p).unwrap_or_default());
        match step {
            "floor-raise" => {
                assert_eq!((read(&a), read(&b)), (Some(1), Some(1)), "{step}");
                assert_eq!(floor_of(&dev), 1, "{step}: not raised yet, not lowered");
                // A cut in the middle of writing copy A: a torn temp file
                // beside it, or (a file system without atomic rename) a
                // torn copy A itself. Both are ignored.
                std::fs::write(
                    dev.path("data/security-floor.a.new"),
                    &floor::encode(3)[..20],
                )
                .unwrap();
                assert_eq!(floor_of(&dev), 1, "{step}: torn temp file ignored");
                std::fs::write(&a, &floor::encode(3)[..30]).unwrap();
                assert_eq!(floor_of(&dev), 1, "{step}: torn copy A ignored");
            }
            "floor-copy-a" => {
                assert_eq!((read(&a), read(&b)), (Some(3), Some(1)), "{step}");
                assert_eq!(floor_of(&dev), 3, "{step}: the new copy wins");
                // And with copy A rotten, copy B still holds the old floor.
                let saved = std::fs::read(&a).unwrap();
                std::fs::write(&a, b"kernex-security-floor 1 9 0000\n").unwrap();
                assert_eq!(floor_of(&dev), 1, "{step}");
                std::fs::write(&a, saved).unwrap();
            }
            _ => assert_eq!((read(&a), read(&b)), (Some(3), Some(3)), "{step}"),
        }
        // The slot was committed before the floor was raised.
        assert_eq!(
            dev.flow().state().unwrap().attempts_left(Slot::B),
            3,
            "{step}"
        );
        // Next boot: the watchdog sees a committed slot and completes the
        // raise; both copies hold the floor again.
        let out = ok(&dev, &["health", "run", "--json"]);
        assert!(out.contains("not-on-trial"), "{step}: {out}");
        assert_eq!((read(&a), read(&b)), (Some(3), Some(3)), "{step}");
        // And the old release is refused from then on.
        let old = dev.write_bundle(
            "old.kxb",
            &bundle_secure(&image(MIB, 4), "1.2.0", 2, &keys.signer).bytes,
        );
        let err = refused(&dev, &["install", &old]);
        assert!(err.contains("anti-rollback floor 3"), "{step}: {err}");
    }
}

/// A device with a TPM: committing raises the floor in the data dir and
/// in the TPM's NV counter. Deleting both floor files, or putting back
/// the copies of an older floor, leaves the floor where the TPM holds it:
/// installs and rollbacks below it stay refused.
#[test]
fn with_a_tpm_the_floor_files_deleted_or_rolled_back_do_not_lower_it() {
    let keys = keys();
    let tpm = swtpm::Swtpm::start();
    let tpm_conf = format!("\n[tpm]\ntcti = \"{}\"\n", tpm.tcti());
    let dev = Device::new(&keys, &image(MIB, 1));
    dev.write_config("A", &tpm_conf);
    let commit = |name: &str, bundle: &Built| {
        let path = dev.write_bundle(name, &bundle.bytes);
        ok(&dev, &["install", &path]);
        let slot = power_on(&dev);
        dev.write_config(slot.name(), &tpm_conf);
        ok(&dev, &["mark-good"]);
        slot
    };
    commit(
        "v10.kxb",
        &bundle_secure(&image(MIB, 2), "1.0.0", 1, &keys.signer),
    );
    let a = dev.path("data/security-floor.a");
    let b = dev.path("data/security-floor.b");
    let old = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(floor::decode(&old.0), Some(1));
    commit(
        "v11.kxb",
        &bundle_secure(&image(MIB, 3), "1.1.0", 3, &keys.signer),
    );
    let tpm_floor = || Floor::for_device(&dev.load()).tpm_floor().unwrap();
    assert_eq!(tpm_floor(), 3, "the TPM counter holds the floor");
    assert_eq!(status(&dev)["security-floor"], 3);

    let below = dev.write_bundle(
        "below.kxb",
        &bundle_secure(&image(MIB, 4), "2.0.0", 2, &keys.signer).bytes,
    );
    let expect_refused = |when: &str| {
        assert_eq!(status(&dev)["security-floor"], 3, "{when}");
        let before = snapshot(&dev);
        let err = refused(&dev, &["install", "--allow-downgrade", &below]);
        assert!(
            err.contains("security version 2 is below this device's anti-rollback floor 3"),
            "{when}: {err}"
        );
        let err = refused(&dev, &["rollback"]);
        assert!(
            err.contains("roll back to 1.0.0 (slot B)") && err.contains("floor 3"),
            "{when}: {err}"
        );
        let err = refused(&dev, &["mark-bad"]);
        assert!(err.contains("floor 3"), "{when}: {err}");
        assert_eq!(snapshot(&dev), before, "{when}");
    };
    // Both files deleted.
    std::fs::remove_file(&a).unwrap();
    std::fs::remove_file(&b).unwrap();
    expect_refused("floor files deleted");
    // The copies of floor 1 put back.
    std::fs::write(&a, &old.0).unwrap();
    std::fs::write(&b, &old.1).unwrap();
    assert_eq!(
        Floor::new(&DataDir::new(dev.path("data"))).get().unwrap(),
        1
    );
    expect_refused("floor files rolled back");
    assert_eq!(tpm_floor(), 3);

    // The same device without its TPM: the files alone would have let
    // the old release in (what the counter prevents).
    dev.write_config("A", "");
    assert_eq!(status(&dev)["security-floor"], 1);
    ok(&dev, &["install", "--allow-downgrade", &below]);
}

/// With a TPM the raise writes both copies, then counts the TPM up. A
/// power cut between the two (`floor-tpm`): the copies hold the new floor,
/// so it is in force at once; the next boot's watchdog run catches the
/// counter up, and from then on deleting the copies does not lower it.
#[test]
fn with_a_tpm_a_power_cut_before_the_counter_is_raised_is_caught_up() {
    let keys = keys();
    let tpm = swtpm::Swtpm::start();
    let tpm_conf = format!("\n[tpm]\ntcti = \"{}\"\n", tpm.tcti());
    let dev = Device::new(&keys, &image(MIB, 1));
    dev.write_config("A", &tpm_conf);
    let install = |name: &str, bundle: &Built| {
        let path = dev.write_bundle(name, &bundle.bytes);
        ok(&dev, &["install", &path]);
        let slot = power_on(&dev);
        dev.write_config(slot.name(), &tpm_conf);
    };
    install(
        "v10.kxb",
        &bundle_secure(&image(MIB, 2), "1.0.0", 1, &keys.signer),
    );
    ok(&dev, &["mark-good"]);
    let tpm_floor = || Floor::for_device(&dev.load()).tpm_floor().unwrap();
    assert_eq!(tpm_floor(), 1);

    install(
        "v11.kxb",
        &bundle_secure(&image(MIB, 3), "1.1.0", 3, &keys.signer),
    );
    mark_good_killed_at(&dev, "floor-tpm");
    let a = dev.path("data/security-floor.a");
    let b = dev.path("data/security-floor.b");
    let read = |p: &std::path::Path| floor::decode(&std::fs::read(p).unwrap_or_default());
    assert_eq!((read(&a), read(&b)), (Some(3), Some(3)));
    assert_eq!(tpm_floor(), 1, "cut before the counter was raised");
    assert_eq!(status(&dev)["security-floor"], 3, "the copies are in force");

    // Next boot: the watchdog completes the raise in the TPM.
    let out = ok(&dev, &["health", "run", "--json"]);
    assert!(out.contains("not-on-trial"), "{out}");
    assert_eq!(tpm_floor(), 3, "the counter caught up");
    std::fs::remove_file(&a).unwrap();
    std::fs::remove_file(&b).unwrap();
    assert_eq!(status(&dev)["security-floor"], 3);
    let below = dev.write_bundle(
        "below.kxb",
        &bundle_secure(&image(MIB, 4), "2.0.0", 2, &keys.signer).bytes,
    );
    let err = refused(&dev, &["install", "--allow-downgrade", &below]);
    assert!(err.contains("anti-rollback floor 3"), "{err}");
}
