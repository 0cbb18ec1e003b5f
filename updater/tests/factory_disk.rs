//! A device whose disk came from `kernex-image disk create` (qemu-aarch64
//! profile): the updater reads the config, the U-Boot env and the slot
//! record the factory image carries, as the device would with the data
//! partition mounted at /data and the boot partition at /boot (here: the
//! files copied out of the image with debugfs and mcopy, the slots as
//! files), then installs the next release into slot B and sets B to boot
//! next in the env U-Boot reads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::*;
use kernex_image::board::BoardProfile;
use kernex_image::disk::{self, CreateOptions, Source};
use serde_json::Value;

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn copy_range(disk: &Path, start: u64, len: u64, out: &Path, file_len: u64) {
    let mut src = fs::File::open(disk).unwrap();
    src.seek(SeekFrom::Start(start)).unwrap();
    let mut buf = vec![0u8; len as usize];
    src.read_exact(&mut buf).unwrap();
    let mut dst = fs::File::create(out).unwrap();
    dst.set_len(file_len).unwrap();
    dst.write_all(&buf).unwrap();
}

#[test]
fn the_updater_reads_a_factory_disk_and_updates_it() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let v1 = image(3 << 20, 1);
    fs::write(p("r1.kxb"), bundle(&v1, "1.0.0", &keys.signer).bytes).unwrap();
    fs::write(p("keyring.pem"), &keys.ca_pem).unwrap();

    let report = disk::create(&CreateOptions {
        board: BoardProfile::load("qemu-aarch64").unwrap(),
        source: Source::Bundle {
            path: p("r1.kxb"),
            keyring: keys.ca_pem.clone(),
        },
        boot_files: None,
        output: p("disk.img"),
        fill_b: false,
        size: None,
        timestamp: 1_700_000_000,
        quiet: true,
    })
    .unwrap();
    let part = |role: &str| {
        report
            .record
            .partitions
            .iter()
            .find(|x| x.role.as_str() == role)
            .unwrap()
            .clone()
    };

    // "Mount" the data and boot partitions, take the slots as files.
    let data = part("data");
    fs::create_dir_all(p("data")).unwrap();
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", p("data").display()))
        .arg(format!("{}?offset={}", p("disk.img").display(), data.start)));
    fs::create_dir_all(p("boot")).unwrap();
    run(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-n")
        .arg("-i")
        .arg(format!(
            "{}@@{}",
            p("disk.img").display(),
            part("boot").start
        ))
        .arg("::uboot.env")
        .arg(p("boot/uboot.env")));
    let (a, b) = (part("rootfs-a"), part("rootfs-b"));
    copy_range(
        &p("disk.img"),
        a.start,
        v1.len() as u64,
        &p("slot-a.img"),
        a.size,
    );
    copy_range(&p("disk.img"), b.start, 0, &p("slot-b.img"), b.size);

    // The device's paths, moved under the temporary directory.
    let root = dir.path().display().to_string();
    let system = fs::read_to_string(p("data/etc/kernex/system.toml"))
        .unwrap()
        .replace("\"/data/", &format!("\"{root}/data/"))
        .replace("/dev/vda2", &format!("{root}/slot-a.img"))
        .replace("/dev/vda3", &format!("{root}/slot-b.img"))
        .replace("/etc/kernex/keyring.pem", &format!("{root}/keyring.pem"));
    fs::write(p("system.toml"), format!("{system}booted-slot = \"A\"\n")).unwrap();
    let fw_env = fs::read_to_string(p("data/etc/kernex/fw_env.config"))
        .unwrap()
        .replace("/boot/uboot.env", &format!("{root}/boot/uboot.env"));
    fs::write(p("data/etc/kernex/fw_env.config"), fw_env).unwrap();

    let updater = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kernex-updater"));
        c.arg("--config").arg(p("system.toml"));
        c
    };
    let status: Value = serde_json::from_slice(&run(updater().args(["status", "--json"]))).unwrap();
    assert_eq!(status["booted-slot"], "A", "{status}");
    assert_eq!(status["primary-slot"], "A");
    assert_eq!(status["boot-state"]["a-left"], 3);
    assert_eq!(status["boot-state"]["b-left"], 0);
    assert_eq!(status["slots"][0]["version"], "1.0.0");
    assert_eq!(status["slots"][0]["verified"], true);
    assert_eq!(
        status["slots"][0]["images"][0]["sha256"].as_str().unwrap(),
        sha256(&v1)
    );

    // The next release, a small change: installed into B, B boots next.
    let v2 = edit(&v1, 1 << 20, 4096);
    fs::write(p("r2.kxb"), bundle(&v2, "1.1.0", &keys.signer).bytes).unwrap();
    run(updater().arg("install").arg(p("r2.kxb")));
    let status: Value = serde_json::from_slice(&run(updater().args(["status", "--json"]))).unwrap();
    assert_eq!(status["primary-slot"], "B", "{status}");
    assert_eq!(status["slots"][1]["version"], "1.1.0");
    let env = run(Command::new("fw_printenv")
        .arg("-c")
        .arg(p("data/etc/kernex/fw_env.config"))
        .arg("BOOT_ORDER"));
    assert_eq!(String::from_utf8_lossy(&env), "BOOT_ORDER=B A\n");
}
