//! The boot-state contract through every backend, and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use kernex_bootloader::u_boot_env::{Config, DeviceConfig, Env, Store};
use kernex_bootloader::{
    Backend, BootError, BootFlow, BootState, BootedSlot, BootloaderConfig, File, Grub, Slot, UBoot,
    slot_from_cmdline,
};

fn backends(dir: &Path) -> Vec<Box<dyn BootFlow>> {
    let env = dir.join("uboot.env");
    std::fs::write(&env, vec![0u8; 0x8000]).unwrap();
    let mut store = Store::open(&Config::redundant(
        DeviceConfig::new(&env, 0, 0x4000),
        DeviceConfig::new(&env, 0x4000, 0x4000),
    ))
    .unwrap();
    let mut defaults = Env::new();
    defaults.set("bootcmd", "run kernex").unwrap();
    store.write(&defaults).unwrap();
    vec![
        Box::new(UBoot::new(store, BootedSlot::Fixed(Slot::A))),
        Box::new(Grub::new(dir.join("grubenv"), BootedSlot::Fixed(Slot::A))),
        Box::new(File::new(dir.join("state"), BootedSlot::Fixed(Slot::A))),
    ]
}

#[test]
fn rauc_semantics_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    for mut flow in backends(dir.path()) {
        let name = flow.name();
        // Nothing set: the defaults the boot scripts use.
        assert_eq!(flow.state().unwrap(), BootState::default(), "{name}");
        assert_eq!(flow.primary_slot().unwrap(), Some(Slot::A), "{name}");
        assert_eq!(flow.booted_slot().unwrap(), Slot::A);

        // Install into B: try it first, 3 times.
        flow.set_try_next(Slot::B, 3).unwrap();
        let s = flow.state().unwrap();
        assert_eq!(s.order, [Slot::B, Slot::A], "{name}");
        assert_eq!(flow.primary_slot().unwrap(), Some(Slot::B), "{name}");

        // B fails its health checks: bad = 0 attempts, moved last.
        flow.mark_bad(Slot::B).unwrap();
        let s = flow.state().unwrap();
        assert_eq!(
            (s.order.as_slice(), s.b_left),
            ([Slot::A, Slot::B].as_slice(), 0),
            "{name}"
        );
        assert_eq!(flow.primary_slot().unwrap(), Some(Slot::A), "{name}");

        // Try B again with 1 attempt, it works: good resets to 3.
        flow.set_try_next(Slot::B, 1).unwrap();
        assert_eq!(flow.attempts_left(Slot::B).unwrap(), 1, "{name}");
        flow.mark_good(Slot::B).unwrap();
        assert_eq!(flow.attempts_left(Slot::B).unwrap(), 3, "{name}");
        assert_eq!(flow.primary_slot().unwrap(), Some(Slot::B), "{name}");

        // Both bad: no primary (the boot script falls back on its own).
        flow.mark_bad(Slot::A).unwrap();
        flow.mark_bad(Slot::B).unwrap();
        assert_eq!(flow.primary_slot().unwrap(), None, "{name}");

        // Attempts out of range are refused, nothing written.
        let before = flow.state().unwrap();
        for n in [0, 10, 255] {
            let err = flow.set_try_next(Slot::A, n).unwrap_err();
            assert!(
                matches!(err, BootError::InvalidAttempts { .. }),
                "{name}: {err}"
            );
        }
        assert_eq!(flow.state().unwrap(), before, "{name}");
    }
}

#[test]
fn uboot_backend_keeps_other_variables_and_refuses_a_corrupt_env() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("uboot.env");
    std::fs::write(&env, vec![0u8; 0x4000]).unwrap();
    let config = Config::single(DeviceConfig::new(&env, 0, 0x4000));
    let mut store = Store::open(&config).unwrap();
    let mut defaults = Env::new();
    defaults.set("bootcmd", "run kernex").unwrap();
    store.write(&defaults).unwrap();
    let mut flow = UBoot::new(store, BootedSlot::Fixed(Slot::A));
    flow.set_try_next(Slot::B, 3).unwrap();
    let read = Store::open(&config).unwrap().read().unwrap();
    assert_eq!(read.get("bootcmd"), Some("run kernex"));
    assert_eq!(read.get("BOOT_ORDER"), Some("B A"));

    // Corrupt the env: a write would drop bootcmd, so it must fail.
    let mut raw = std::fs::read(&env).unwrap();
    raw[8] ^= 0xff;
    std::fs::write(&env, &raw).unwrap();
    let err = flow.mark_good(Slot::B).unwrap_err();
    assert!(err.to_string().contains("U-Boot environment"), "{err}");
    assert_eq!(
        std::fs::read(&env).unwrap(),
        raw,
        "corrupt env was overwritten"
    );
}

#[test]
fn bad_variables_are_named_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    let mut flow = File::new(&path, BootedSlot::Fixed(Slot::A));
    for (text, needle) in [
        ("BOOT_ORDER=A C\n", "BOOT_ORDER is \"A C\""),
        ("BOOT_ORDER=A A\n", "BOOT_ORDER is \"A A\""),
        ("BOOT_A_LEFT=three\n", "BOOT_A_LEFT is \"three\""),
        ("BOOT_B_LEFT=-1\n", "BOOT_B_LEFT is \"-1\""),
        ("no equals sign\n", "malformed state file"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = flow.state().unwrap_err();
        assert!(err.to_string().contains(needle), "{text:?}: {err}");
        assert!(flow.mark_good(Slot::A).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }
    std::fs::write(&path, vec![b'x'; 100_000]).unwrap();
    assert!(matches!(flow.state(), Err(BootError::TooLarge { .. })));
}

#[test]
fn booted_slot_from_the_kernel_command_line() {
    assert_eq!(
        slot_from_cmdline("root=/dev/sda2 kernex.slot=B quiet").unwrap(),
        Some(Slot::B)
    );
    assert_eq!(slot_from_cmdline("rauc.slot=A").unwrap(), Some(Slot::A));
    assert_eq!(
        slot_from_cmdline("rauc.slot=A kernex.slot=B").unwrap(),
        Some(Slot::B)
    );
    assert_eq!(slot_from_cmdline("root=/dev/sda2").unwrap(), None);
    let err = slot_from_cmdline("kernex.slot=C").unwrap_err();
    assert!(
        err.to_string().contains("\"C\" is not a slot name"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let cmdline = dir.path().join("cmdline");
    std::fs::write(
        &cmdline,
        "console=ttyAMA0 root=/dev/mmcblk0p3 rauc.slot=B rootwait\n",
    )
    .unwrap();
    let flow = File::new(dir.path().join("s"), BootedSlot::Cmdline(cmdline.clone()));
    assert_eq!(flow.booted_slot().unwrap(), Slot::B);
    std::fs::write(&cmdline, "console=ttyAMA0\n").unwrap();
    let err = flow.booted_slot().unwrap_err();
    assert!(matches!(err, BootError::NoSlotOnCmdline { .. }), "{err}");
    // The real one, on this machine, names no slot; reading it must not fail
    // with anything but that.
    let real = BootedSlot::default().resolve();
    assert!(
        matches!(real, Ok(_) | Err(BootError::NoSlotOnCmdline { .. })),
        "{real:?}"
    );
}

#[test]
fn backend_from_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg: BootloaderConfig = serde_json::from_value(serde_json::json!({
        "backend": "file",
        "path": dir.path().join("state"),
        "booted-slot": "B",
    }))
    .unwrap();
    assert_eq!(cfg.backend, Backend::File);
    let mut flow = cfg.open().unwrap();
    assert_eq!(
        (flow.name(), flow.booted_slot().unwrap()),
        ("file", Slot::B)
    );
    flow.mark_good(Slot::B).unwrap();

    let cfg: BootloaderConfig =
        serde_json::from_value(serde_json::json!({ "backend": "file" })).unwrap();
    let err = cfg.open().unwrap_err();
    assert!(
        err.to_string().contains("needs the setting \"path\""),
        "{err}"
    );

    let cfg: BootloaderConfig = serde_json::from_value(serde_json::json!({
        "backend": "u-boot",
        "fw-env-config": dir.path().join("missing.config"),
    }))
    .unwrap();
    let err = cfg.open().unwrap_err();
    let chain = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(chain.contains("missing.config"), "{chain}");

    let bad = serde_json::from_value::<BootloaderConfig>(serde_json::json!({
        "backend": "lilo"
    }));
    assert!(bad.is_err());
}

/// The boot script's choices, as simulated devices make them: the same
/// sequence `tests/uboot_qemu.rs` watches real U-Boot take.
#[test]
fn select_boot_walks_the_order_then_falls_back() {
    let mut state = BootState::default();
    let mut seen = Vec::new();
    for _ in 0..7 {
        let pick = state.select_boot();
        seen.push((pick.slot.name(), pick.fallback));
    }
    assert_eq!(
        seen,
        [
            ("A", false),
            ("A", false),
            ("A", false),
            ("B", false),
            ("B", false),
            ("B", false),
            ("A", true),
        ]
    );
    assert_eq!((state.a_left, state.b_left), (2, 3));
    // An update: B first with 3 attempts; B boots, is committed, boots again.
    state.set_try_next(Slot::B, 3).unwrap();
    assert_eq!(state.select_boot().slot, Slot::B);
    state.mark_good(Slot::B);
    assert_eq!(state.select_boot().slot, Slot::B);
    assert_eq!(state.b_left, 2);
    // B marked bad: A boots next.
    state.mark_bad(Slot::B);
    let pick = state.select_boot();
    assert_eq!((pick.slot, pick.fallback), (Slot::A, false));
}
