//! What the built-in board profiles tell the kernel, checked where a
//! mistake would brick a field of boards (found by booting the factory
//! images: hw-tests/tests/vendor_boards.rs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kernex_image::board::{BoardProfile, BootloaderSpec};

fn uboot_setting(board: &str, name: &str) -> Option<String> {
    let p = BoardProfile::load(board).unwrap();
    match &p.bootloader {
        BootloaderSpec::UBoot { settings, .. } => settings.get(name).cloned(),
        other => panic!("{board} does not boot U-Boot: {other:?}"),
    }
}

/// U-Boot's bootargs never pass through the Pi firmware, which is what
/// rewrites `console=serial0` in cmdline.txt: a Linux kernel booted by
/// U-Boot has no console of that name, and with `console=tty1` beside it
/// the serial console was gone. The kernel takes it from the device tree.
#[test]
fn raspberry_pi_kernel_console_comes_from_the_device_tree() {
    let args = uboot_setting("raspberrypi4-64", "kernex_bootargs").unwrap();
    assert!(
        !args.split_whitespace().any(|a| a.starts_with("console=")),
        "{args}"
    );
}

fn grub_setting(board: &str, name: &str) -> Option<String> {
    let p = BoardProfile::load(board).unwrap();
    match &p.bootloader {
        BootloaderSpec::Grub { settings, .. } => settings.get(name).cloned(),
        other => panic!("{board} does not boot GRUB: {other:?}"),
    }
}

/// A kernel that panics must reset the board, or the boot loader never
/// counts the next attempt and never falls back to the other slot (Debian's
/// kernel, like most, halts forever by default).
#[test]
fn arm_boards_reset_on_a_kernel_panic() {
    for (board, args) in [
        (
            "raspberrypi4-64",
            uboot_setting("raspberrypi4-64", "kernex_bootargs"),
        ),
        (
            "qemu-aarch64",
            uboot_setting("qemu-aarch64", "kernex_bootargs"),
        ),
        (
            "jetson-orin-nano",
            grub_setting("jetson-orin-nano", "kernex_bootargs"),
        ),
    ] {
        let args = args.unwrap();
        let panic = args
            .split_whitespace()
            .find_map(|a| a.strip_prefix("panic="))
            .unwrap_or_else(|| panic!("{board}: no panic= in {args:?}"));
        let secs: i64 = panic.parse().unwrap();
        assert!(secs > 0, "{board}: panic={secs} never resets");
    }
}

/// Distribution kernels (Debian's arm64 one has the SD controller and ext4
/// as modules) cannot mount the slot without their initramfs.
#[test]
fn raspberry_pi_loads_the_slots_initramfs() {
    assert_eq!(
        uboot_setting("raspberrypi4-64", "kernex_initrd").as_deref(),
        Some("/boot/initrd.img")
    );
}
