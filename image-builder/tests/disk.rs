//! `kernex-image disk create` for every built-in board, checked by the real
//! peers: `sfdisk --dump` and `sgdisk -v` read the partition table,
//! `fsck.vfat -n` and `mdir`/`mcopy` the boot partition, `fw_printenv` the
//! U-Boot env, `grub-editenv`/`grub-script-check` the GRUB files, `mkimage`
//! makes the same boot.scr, `e2fsck -fn` and `debugfs` the data partition;
//! slot A's bytes hash to the manifest's digest. A missing peer fails the
//! test (scripts/setup installs them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::path::Path;

use common::*;
use serde_json::Value;

/// Vendor boot files a profile asks for, as small placeholders.
fn vendor_files(dir: &Path, profile: &Value) {
    for f in profile["vendor-boot-files"].as_array().unwrap() {
        let p = dir.join(f.as_str().unwrap());
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("vendor file {}\n", f.as_str().unwrap())).unwrap();
    }
}

fn partition<'a>(report: &'a Value, role: &str) -> &'a Value {
    report["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == role)
        .unwrap_or_else(|| panic!("no {role} partition in {report}"))
}

fn offset(report: &Value, role: &str) -> u64 {
    partition(report, role)["start"].as_u64().unwrap()
}

/// Copies partition `role` out of the disk into its own file.
fn extract(disk: &Path, report: &Value, role: &str, out: &Path) {
    let p = partition(report, role);
    let bytes = read_range(
        disk,
        p["start"].as_u64().unwrap(),
        p["size"].as_u64().unwrap(),
    );
    fs::write(out, bytes).unwrap();
}

fn mcopy_out(disk: &Path, off: u64, file: &str, out: &Path) {
    let _ = fs::remove_file(out);
    run(peer("mcopy")
        .arg("-n")
        .arg("-i")
        .arg(format!("{}@@{off}", disk.display()))
        .arg(format!("::{file}"))
        .arg(out));
}

#[test]
fn every_board_makes_a_disk_the_peers_accept() {
    let r = Release::new();
    let profiles: Value = run_json(kernex_image().args(["disk", "boards", "--json"]));
    let profiles = profiles.as_array().unwrap();
    assert_eq!(profiles.len(), 4, "{profiles:?}");
    for profile in profiles {
        let board = profile["name"].as_str().unwrap();
        let work = r.path(board);
        fs::create_dir_all(&work).unwrap();
        let bundle = r.bundle_for(board, "1.0.0");
        let vendor = work.join("vendor");
        fs::create_dir_all(&vendor).unwrap();
        vendor_files(&vendor, profile);
        let disk = work.join("disk.img");
        let report = run_json(
            kernex_image()
                .args(["disk", "create", "--board", board, "--bundle"])
                .arg(&bundle)
                .arg("--keyring")
                .arg(r.path("keys/ca.crt"))
                .arg("--boot-files")
                .arg(&vendor)
                .arg("--output")
                .arg(&disk)
                .args(["--timestamp", "1700000000", "--json"]),
        );
        let ctx = format!("board {board}");

        // Partition table: sfdisk reads what the report says.
        let dump = String::from_utf8(run(peer("sfdisk").arg("--dump").arg(&disk)).stdout).unwrap();
        let gpt = profile["partition-table"] == "gpt";
        assert!(
            dump.contains(if gpt { "label: gpt" } else { "label: dos" }),
            "{ctx}: {dump}"
        );
        for p in report["partitions"].as_array().unwrap() {
            let line = format!(
                "{}{} : start= {:>11}, size= {:>11}",
                disk.display(),
                p["number"],
                p["start"].as_u64().unwrap() / 512,
                p["size"].as_u64().unwrap() / 512
            )
            .replace("start= ", "start=")
            .replace("size= ", "size=");
            let normalised = dump.replace("start= ", "start=").replace("size= ", "size=");
            let normalised: String = normalised
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
                .join("\n");
            let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(normalised.contains(&line), "{ctx}: {line:?} not in\n{dump}");
            if gpt {
                assert!(
                    dump.contains(&format!("name=\"{}\"", p["role"].as_str().unwrap())),
                    "{ctx}: {dump}"
                );
                let uuid = p["partuuid"].as_str().unwrap().to_uppercase();
                assert!(dump.contains(&format!("uuid={uuid}")), "{ctx}: {dump}");
            }
        }
        if gpt {
            let v = String::from_utf8(run(peer("sgdisk").arg("-v").arg(&disk)).stdout).unwrap();
            assert!(v.contains("No problems found"), "{ctx}: sgdisk -v: {v}");
            assert!(
                dump.contains("type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
                "{ctx}: ESP"
            );
        } else {
            assert!(
                dump.contains("type=c, bootable"),
                "{ctx}: FAT32 boot: {dump}"
            );
        }

        // Boot partition: a clean FAT with the expected files.
        let boot_off = offset(&report, "boot");
        let fat = work.join("boot.vfat");
        extract(&disk, &report, "boot", &fat);
        run(peer("fsck.vfat").arg("-n").arg(&fat));
        let listing = String::from_utf8(
            run(peer("mdir")
                .args(["-b", "-/", "-i"])
                .arg(format!("{}@@{boot_off}", disk.display()))
                .arg("::"))
            .stdout,
        )
        .unwrap()
        .to_lowercase();
        for f in profile["vendor-boot-files"].as_array().unwrap() {
            let f = f.as_str().unwrap().to_lowercase();
            assert!(listing.contains(&f), "{ctx}: {f} not in {listing}");
        }
        for f in profile["boot-files"].as_array().unwrap() {
            let path = f["path"].as_str().unwrap();
            let out = work.join("boot-file");
            mcopy_out(&disk, boot_off, path, &out);
            assert_eq!(
                fs::read_to_string(&out).unwrap(),
                f["content"].as_str().unwrap().trim_start(),
                "{ctx}: {path}"
            );
        }

        let bl = &profile["bootloader"];
        let a = partition(&report, "rootfs-a");
        let b = partition(&report, "rootfs-b");
        if bl["kind"] == "u-boot" {
            // The env file, read by fw_printenv through a config pointing at it.
            let env = work.join("uboot.env");
            mcopy_out(&disk, boot_off, bl["env-file"].as_str().unwrap(), &env);
            let cfg = work.join("fw_env.config");
            fs::write(
                &cfg,
                format!(
                    "{} 0x0 {:#x}\n",
                    env.display(),
                    bl["env-size"].as_u64().unwrap()
                ),
            )
            .unwrap();
            let vars =
                String::from_utf8(run(peer("fw_printenv").arg("-c").arg(&cfg)).stdout).unwrap();
            for want in [
                "BOOT_ORDER=A B".to_string(),
                "BOOT_A_LEFT=3".into(),
                "BOOT_B_LEFT=0".into(),
                format!("kernex_part_A={}", a["number"]),
                format!("kernex_part_B={}", b["number"]),
                format!("kernex_root_A={}", a["device"].as_str().unwrap()),
                format!("bootcmd={}", bl["settings"]["bootcmd"].as_str().unwrap()),
            ] {
                assert!(
                    vars.lines().any(|l| l == want),
                    "{ctx}: {want:?} not in\n{vars}"
                );
            }
            // boot.scr is what mkimage makes of the same script.
            let scr = work.join("boot.scr");
            mcopy_out(&disk, boot_off, "boot.scr", &scr);
            let reference = work.join("mkimage.scr");
            let (arch, source) = match bl["script"].as_str().unwrap() {
                "boot.cmd" => ("arm64", "boot.cmd"),
                other => ("x86", other),
            };
            run(peer("mkimage")
                .env("SOURCE_DATE_EPOCH", "1700000000")
                .args([
                    "-A",
                    arch,
                    "-O",
                    "linux",
                    "-T",
                    "script",
                    "-C",
                    "none",
                    "-n",
                    "Kernex A/B",
                    "-d",
                ])
                .arg(repo().join("bootloader/uboot").join(source))
                .arg(&reference));
            assert_eq!(
                fs::read(&scr).unwrap(),
                fs::read(&reference).unwrap(),
                "{ctx}: boot.scr"
            );
        } else {
            let dir = bl["config-dir"].as_str().unwrap();
            let env = work.join("grubenv");
            mcopy_out(&disk, boot_off, &format!("{dir}/grubenv"), &env);
            let vars =
                String::from_utf8(run(peer("grub-editenv").arg(&env).arg("list")).stdout).unwrap();
            assert_eq!(
                vars, "BOOT_A_LEFT=3\nBOOT_B_LEFT=0\nBOOT_ORDER=A B\n",
                "{ctx}"
            );
            for f in ["grub.cfg", "kernex.cfg"] {
                let out = work.join(f);
                mcopy_out(&disk, boot_off, &format!("{dir}/{f}"), &out);
                run(peer("grub-script-check").arg(&out));
            }
            let cfg = fs::read_to_string(work.join("grub.cfg")).unwrap();
            let uuid = a["partuuid"].as_str().unwrap();
            assert!(
                cfg.contains(&format!("set kernex_part_A=\"(hd0,gpt{})\"", a["number"])),
                "{cfg}"
            );
            assert!(
                cfg.contains(&format!("set kernex_root_A=\"PARTUUID={uuid}\"")),
                "{cfg}"
            );
        }

        // Slot A holds exactly the release's image; slot B is empty.
        let inspect = run_json(
            kernex_image()
                .args(["bundle", "inspect", "--json"])
                .arg(&bundle),
        );
        let image = &inspect["manifest"]["images"][0];
        let size = image["size"].as_u64().unwrap();
        let slot_a = read_range(&disk, a["start"].as_u64().unwrap(), size);
        assert_eq!(
            sha256_hex(&slot_a),
            image["sha256"].as_str().unwrap(),
            "{ctx}"
        );
        assert_eq!(report["slot-a-sha256"], image["sha256"], "{ctx}");
        let slot_b = read_range(&disk, b["start"].as_u64().unwrap(), size);
        assert!(slot_b.iter().all(|x| *x == 0), "{ctx}: slot B is not empty");

        // Data partition: clean ext4 holding the config and the records.
        let data_off = offset(&report, "data");
        run(peer("e2fsck")
            .arg("-fn")
            .arg(format!("{}?offset={data_off}", disk.display())));
        let record: Value =
            serde_json::from_slice(&debugfs_cat(&disk, data_off, "/etc/kernex/disk.json")).unwrap();
        assert_eq!(record["board"], board);
        assert_eq!(record["release"]["version"], "1.0.0");
        assert_eq!(record["slot-a-sha256"], image["sha256"]);
        let system: toml::Table = toml::from_str(
            &String::from_utf8(debugfs_cat(&disk, data_off, "/etc/kernex/system.toml")).unwrap(),
        )
        .unwrap();
        assert_eq!(system["compatible"].as_str(), Some(board));
        assert_eq!(system["data-dir"].as_str(), Some("/data/kernex"));
        assert_eq!(
            system["slots"]["rootfs"]["A"].as_str(),
            a["device"].as_str(),
            "{ctx}"
        );
        let slot_record: Value =
            serde_json::from_slice(&debugfs_cat(&disk, data_off, "/kernex/slot-A/record.json"))
                .unwrap();
        assert_eq!(slot_record["verified"], true);
        let kxi = debugfs_cat(&disk, data_off, "/kernex/slot-A/rootfs.kxi");
        assert_eq!(sha256_hex(&kxi), image["index"]["sha256"].as_str().unwrap());
        // The image file is all that is left in the directory.
        let left: Vec<_> = fs::read_dir(&work)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".kernex-disk-"))
            .collect();
        assert!(left.is_empty(), "{ctx}: temporary files left: {left:?}");
    }
}

#[test]
fn fill_b_writes_the_release_into_both_slots_and_gives_b_attempts() {
    let r = Release::new();
    let bundle = r.bundle_for("qemu-aarch64", "1.0.0");
    let disk = r.path("fill-b.img");
    let report = run_json(
        kernex_image()
            .args([
                "disk",
                "create",
                "--board",
                "qemu-aarch64",
                "--fill-b",
                "--size",
                "1GiB",
                "--bundle",
            ])
            .arg(&bundle)
            .arg("--keyring")
            .arg(r.path("keys/ca.crt"))
            .arg("--output")
            .arg(&disk)
            .arg("--json"),
    );
    assert_eq!(fs::metadata(&disk).unwrap().len(), 1 << 30);
    // The data partition grew to the end of the disk.
    let data = partition(&report, "data");
    assert_eq!(
        data["start"].as_u64().unwrap() + data["size"].as_u64().unwrap(),
        1 << 30
    );
    let size = report["slot-a-image-size"].as_u64().unwrap();
    let a = read_range(&disk, offset(&report, "rootfs-a"), size);
    let b = read_range(&disk, offset(&report, "rootfs-b"), size);
    assert_eq!(sha256_hex(&a), report["slot-a-sha256"].as_str().unwrap());
    assert_eq!(a, b);
    let env = r.path("fill-b.env");
    mcopy_out(&disk, offset(&report, "boot"), "uboot.env", &env);
    let cfg = r.path("fill-b.fw_env.config");
    fs::write(&cfg, format!("{} 0x0 0x4000\n", env.display())).unwrap();
    let out = run(peer("fw_printenv").arg("-c").arg(&cfg).arg("BOOT_B_LEFT"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "BOOT_B_LEFT=3\n");
    let data_off = offset(&report, "data");
    let rec: Value =
        serde_json::from_slice(&debugfs_cat(&disk, data_off, "/kernex/slot-B/record.json"))
            .unwrap();
    assert_eq!(rec["verified"], true);
}

/// Runs a failing `disk create` and checks its error and that nothing is
/// left at the output or beside it.
fn fails(r: &Release, args: &[&str], output: &str, expect: &str) {
    let dir = r.path("fail");
    fs::create_dir_all(&dir).unwrap();
    let out_path = dir.join(output);
    let out = kernex_image()
        .args(["disk", "create"])
        .args(args)
        .arg("--output")
        .arg(&out_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains(expect),
        "{args:?}: {expect:?} not in: {stderr}"
    );
    assert!(
        !out_path.exists(),
        "{args:?}: {} was written",
        out_path.display()
    );
    let left: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{args:?}: left behind {left:?}");
}

#[test]
fn bad_input_fails_with_a_named_reason_and_leaves_nothing() {
    let r = Release::new();
    let bundle = r.bundle_for("qemu-aarch64", "1.0.0");
    let bundle = bundle.to_str().unwrap();
    let ca = r.path("keys/ca.crt");
    let ca = ca.to_str().unwrap();

    fails(
        &r,
        &[
            "--board",
            "no-such-board",
            "--bundle",
            bundle,
            "--keyring",
            ca,
        ],
        "a.img",
        "unknown board \"no-such-board\"",
    );

    // A bundle signed under another CA.
    run(kernex_image()
        .args(["keys", "create", "--out"])
        .arg(r.path("other-keys")));
    let other = r.path("other-keys/ca.crt");
    fails(
        &r,
        &[
            "--board",
            "qemu-aarch64",
            "--bundle",
            bundle,
            "--keyring",
            other.to_str().unwrap(),
        ],
        "b.img",
        "signature of",
    );

    // A bundle for another board.
    fails(
        &r,
        &[
            "--board",
            "raspberrypi4-64",
            "--bundle",
            bundle,
            "--keyring",
            ca,
            "--boot-files",
            "/nonexistent",
        ],
        "c.img",
        "--boot-files /nonexistent is not a directory",
    );
    let vendor = r.path("rpi-vendor");
    for f in [
        "start4.elf",
        "fixup4.dat",
        "bcm2711-rpi-4-b.dtb",
        "u-boot.bin",
    ] {
        fs::create_dir_all(&vendor).unwrap();
        fs::write(vendor.join(f), "x").unwrap();
    }
    fails(
        &r,
        &[
            "--board",
            "raspberrypi4-64",
            "--bundle",
            bundle,
            "--keyring",
            ca,
            "--boot-files",
            vendor.to_str().unwrap(),
        ],
        "d.img",
        "the bundle is for \"qemu-aarch64\", board raspberrypi4-64 runs \"raspberrypi4-64\"",
    );

    // Missing vendor files.
    fs::remove_file(vendor.join("u-boot.bin")).unwrap();
    let rpi = r.bundle_for("raspberrypi4-64", "1.0.0");
    fails(
        &r,
        &[
            "--board",
            "raspberrypi4-64",
            "--bundle",
            rpi.to_str().unwrap(),
            "--keyring",
            ca,
            "--boot-files",
            vendor.to_str().unwrap(),
        ],
        "e.img",
        "missing from --boot-files",
    );

    // An image larger than its slot (a profile of our own with a 1 MiB slot).
    let qemu = fs::read_to_string(repo().join("image-builder/boards/qemu-aarch64.toml")).unwrap();
    let small = r.path("small.toml");
    fs::write(
        &small,
        qemu.replacen("size = \"256MiB\"", "size = \"1MiB\"", 1),
    )
    .unwrap();
    fails(
        &r,
        &[
            "--board",
            small.to_str().unwrap(),
            "--bundle",
            bundle,
            "--keyring",
            ca,
        ],
        "f.img",
        "larger than its 1048576-byte slot",
    );
    let big = r.path("big.img");
    fs::write(&big, vec![7u8; 3 << 20]).unwrap();
    fails(
        &r,
        &[
            "--board",
            small.to_str().unwrap(),
            "--image",
            &format!("rootfs={}", big.display()),
        ],
        "g.img",
        "larger than its 1048576-byte slot",
    );

    // A truncated profile, and one with a key this version does not know.
    let truncated = r.path("truncated.toml");
    fs::write(&truncated, &qemu[..qemu.len() / 2]).unwrap();
    fails(
        &r,
        &[
            "--board",
            truncated.to_str().unwrap(),
            "--bundle",
            bundle,
            "--keyring",
            ca,
        ],
        "h.img",
        "board profile",
    );
    let unknown = r.path("unknown.toml");
    fs::write(
        &unknown,
        qemu.replacen("[device]", "[device]\nsurprise = 1", 1),
    )
    .unwrap();
    fails(
        &r,
        &[
            "--board",
            unknown.to_str().unwrap(),
            "--bundle",
            bundle,
            "--keyring",
            ca,
        ],
        "i.img",
        "unknown field `surprise`",
    );

    // --size smaller than the profile needs.
    fails(
        &r,
        &[
            "--board",
            "qemu-aarch64",
            "--bundle",
            bundle,
            "--keyring",
            ca,
            "--size",
            "100MiB",
        ],
        "j.img",
        "is smaller than board qemu-aarch64 needs",
    );
}

#[test]
fn plain_images_go_into_slot_a_unsigned() {
    let r = Release::new();
    let disk = r.path("plain.img");
    let report = run_json(
        kernex_image()
            .args(["disk", "create", "--board", "qemu-aarch64", "--image"])
            .arg(format!("rootfs={}", r.path("rootfs-1.img").display()))
            .arg("--output")
            .arg(&disk)
            .arg("--json"),
    );
    assert!(report["release"].is_null());
    let image = fs::read(r.path("rootfs-1.img")).unwrap();
    let a = read_range(&disk, offset(&report, "rootfs-a"), image.len() as u64);
    assert_eq!(a, image);
    assert_eq!(
        report["slot-a-sha256"].as_str().unwrap(),
        sha256_hex(&image)
    );
}

#[test]
fn disk_create_help_reads_like_a_man_page() {
    let out = run(kernex_image().args(["disk", "create", "--help"]));
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--board",
        "--bundle",
        "--keyring",
        "--fill-b",
        "--boot-files",
        "no loop devices",
    ] {
        assert!(help.contains(want), "{want} not in help:\n{help}");
    }
}
