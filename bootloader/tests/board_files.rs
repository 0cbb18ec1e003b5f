//! The checked-in board files: fw_env.config examples, the env defaults,
//! the Makefile, the GRUB snippet, and grubenv against grub-editenv.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::{crate_dir, run, tool};
use kernex_bootloader::u_boot_env::{Config, Env, Layout, decode};
use kernex_bootloader::{BootFlow, BootState, BootedSlot, Grub, GrubEnv, Slot};

#[test]
fn fw_env_config_examples_parse() {
    let dir = crate_dir().join("uboot/fw_env.config.examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "config") {
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(c.first.env_size >= 0x2000, "{}", path.display());
            seen += 1;
        }
    }
    assert_eq!(seen, 3);
}

#[test]
fn env_defaults_hold_the_contract_and_build_with_make() {
    let text = std::fs::read_to_string(crate_dir().join("uboot/uboot-env.txt")).unwrap();
    let env = Env::from_text(&text).unwrap();
    assert_eq!(BootState::from_vars(&env).unwrap(), BootState::default());
    for var in [
        "kernex_dev",
        "kernex_part_A",
        "kernex_part_B",
        "kernex_root_A",
        "kernex_root_B",
        "kernex_kernel",
    ] {
        assert!(env.get(var).is_some(), "uboot-env.txt lacks {var}");
    }
    // The Makefile builds boot.scr and uboot.env with the real tools.
    let dir = tempfile::tempdir().unwrap();
    for f in ["Makefile", "boot.cmd", "uboot-env.txt"] {
        std::fs::copy(crate_dir().join("uboot").join(f), dir.path().join(f)).unwrap();
    }
    tool("mkimage");
    tool("mkenvimage");
    run(Command::new(tool("make")).arg("-C").arg(dir.path()));
    let image = std::fs::read(dir.path().join("uboot.env")).unwrap();
    assert_eq!(image.len(), 0x4000);
    assert_eq!(decode(&image, Layout::Single).unwrap().env, env);
    let out = run(Command::new(tool("dumpimage"))
        .arg("-l")
        .arg(dir.path().join("boot.scr")));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Script"),
        "{out:?}"
    );
}

#[test]
fn grub_snippet_is_valid_grub_script() {
    run(Command::new(tool("grub-script-check")).arg(crate_dir().join("grub/kernex.cfg")));
}

#[test]
fn grubenv_round_trips_with_grub_editenv() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grubenv");
    let editenv = tool("grub-editenv");
    run(Command::new(&editenv).arg(&path).arg("create"));
    run(Command::new(&editenv).arg(&path).args([
        "set",
        "saved_entry=gnulinux-advanced",
        "weird=back\\slash\nnew line",
        "BOOT_ORDER=B A",
    ]));
    let env = GrubEnv::load(&path).unwrap();
    assert_eq!(env.get("weird"), Some("back\\slash\nnew line"));
    assert_eq!(env.get("saved_entry"), Some("gnulinux-advanced"));

    // Ours, written over it, keeps GRUB's variables and grub-editenv reads it.
    let mut flow = Grub::new(&path, BootedSlot::Fixed(Slot::A));
    assert_eq!(flow.primary_slot().unwrap(), Some(Slot::B));
    flow.mark_bad(Slot::B).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 1024);
    let out = run(Command::new(&editenv).arg(&path).arg("list"));
    let listed = String::from_utf8(out.stdout).unwrap();
    for line in [
        "BOOT_ORDER=A B",
        "BOOT_B_LEFT=0",
        "BOOT_A_LEFT=3",
        "saved_entry=gnulinux-advanced",
    ] {
        assert!(
            listed.lines().any(|l| l == line),
            "{line} missing from:\n{listed}"
        );
    }
    assert!(listed.contains("weird=back\\slash\nnew line"), "{listed}");
}

#[test]
fn bad_grubenv_is_rejected() {
    for (block, needle) in [
        (b"not a grubenv".to_vec(), "does not start with"),
        (
            b"# GRUB Environment Block\nnoequals\n".to_vec(),
            "not name=value",
        ),
        (b"# GRUB Environment Block\n=x\n".to_vec(), "not name=value"),
        (
            b"# GRUB Environment Block\na=unterminated".to_vec(),
            "not terminated",
        ),
        (vec![b'#'; 70_000], "more than"),
        (b"# GRUB Environment Block\nnoequals".to_vec(), "has no '='"),
    ] {
        let err = GrubEnv::parse(&block).unwrap_err();
        assert!(err.contains(needle), "{err}");
    }
    let mut env = GrubEnv::new();
    env.set("big", &"x".repeat(1000)).unwrap();
    assert!(env.to_bytes().unwrap_err().contains("the block holds 1024"));
    assert!(env.set("a=b", "1").is_err());
}
