//! The boot script against real U-Boot (Debian's u-boot-qemu) under
//! qemu-system-aarch64: the env is written by this crate into pflash unit 1,
//! U-Boot runs the selection part of `uboot/boot.cmd`, saves its env back to
//! flash, prints the slot it chose and powers off.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{crate_dir, file, run, tool};
use kernex_bootloader::u_boot_env::{Config, DeviceConfig, Env, Store};
use kernex_bootloader::{BootFlow, BootedSlot, Slot, UBoot};

/// qemu_arm64_defconfig: CONFIG_ENV_SIZE / CONFIG_ENV_SECT_SIZE.
const ENV_SIZE: usize = 0x40000;
/// The second flash bank of the virt machine, where pflash unit 1 is mapped.
const FLASH1_ADDR: u64 = 0x0400_0000;
/// The test script goes in the next erase block after the env.
const SCRIPT_OFFSET: u64 = ENV_SIZE as u64;
const FLASH_SIZE: u64 = 64 * 1024 * 1024;
const UBOOT_BIN: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";

struct Machine {
    _dir: tempfile::TempDir,
    flash: PathBuf,
    config: Config,
}

fn boot_cmd() -> String {
    std::fs::read_to_string(crate_dir().join("uboot/boot.cmd")).unwrap()
}

/// The selection part of boot.cmd, between its markers.
fn select_part() -> String {
    let text = boot_cmd();
    let start = text
        .find("# >>> kernex-select")
        .expect("start marker in boot.cmd");
    let end = text
        .find("# <<< kernex-select")
        .expect("end marker in boot.cmd");
    text[start..end].to_owned()
}

fn mkimage_script(dir: &Path, name: &str, script: &str) -> Vec<u8> {
    let cmd = dir.join(format!("{name}.cmd"));
    let scr = dir.join(format!("{name}.scr"));
    std::fs::write(&cmd, script).unwrap();
    run(Command::new(tool("mkimage"))
        .args([
            "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none", "-n", name,
        ])
        .arg("-d")
        .arg(&cmd)
        .arg(&scr));
    std::fs::read(scr).unwrap()
}

impl Machine {
    /// A 64 MiB flash image with `script` (a U-Boot script image) after the env.
    fn new(script: &[u8]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let flash = dir.path().join("flash1.img");
        let mut image = vec![0xffu8; FLASH_SIZE as usize];
        let at = SCRIPT_OFFSET as usize;
        image[at..at + script.len()].copy_from_slice(script);
        std::fs::write(&flash, image).unwrap();
        let config = Config::single(DeviceConfig::new(&flash, 0, ENV_SIZE));
        Self {
            _dir: dir,
            flash,
            config,
        }
    }

    fn store(&self) -> Store {
        Store::open(&self.config).unwrap()
    }

    fn uboot(&self) -> UBoot {
        UBoot::new(self.store(), BootedSlot::Fixed(Slot::A))
    }

    /// Boots U-Boot once; returns what it printed.
    fn boot(&self, no_reboot: bool) -> String {
        let mut cmd = Command::new(tool("qemu-system-aarch64"));
        cmd.args([
            "-M",
            "virt",
            "-cpu",
            "cortex-a57",
            "-m",
            "512",
            "-nographic",
            "-nic",
            "none",
        ])
        .arg("-bios")
        .arg(file(UBOOT_BIN, "u-boot-qemu"))
        .arg("-drive")
        .arg(format!(
            "if=pflash,unit=1,format=raw,file={}",
            self.flash.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if no_reboot {
            cmd.arg("-no-reboot");
        }
        let mut child = cmd.spawn().expect("start qemu-system-aarch64");
        let started = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                let _ = child.wait();
                let mut out = String::new();
                let _ = child.stdout.take().unwrap().read_to_string(&mut out);
                panic!("U-Boot did not power off within 60 s:\n{out}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Parses the `KERNEX_RESULT ...` line the test script prints.
fn result(out: &str) -> (String, bool, u32, u32) {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("KERNEX_RESULT "))
        .unwrap_or_else(|| panic!("U-Boot printed no KERNEX_RESULT line:\n{out}"));
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
    };
    (
        field("slot"),
        field("fallback") == "1",
        field("A").parse().unwrap(),
        field("B").parse().unwrap(),
    )
}

#[test]
fn real_u_boot_walks_boot_order_falls_back_and_follows_a_flip() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{}echo \"KERNEX_RESULT slot=${{kernex_slot}} fallback=${{kernex_fallback}} A=${{BOOT_A_LEFT}} B=${{BOOT_B_LEFT}}\"\npoweroff\n",
        select_part()
    );
    let machine = Machine::new(&mkimage_script(dir.path(), "kernex-select", &script));

    let mut env = Env::new();
    env.set("bootdelay", "0").unwrap();
    env.set(
        "bootcmd",
        &format!("source {:#x}", FLASH1_ADDR + SCRIPT_OFFSET),
    )
    .unwrap();
    env.set("BOOT_ORDER", "A B").unwrap();
    env.set("BOOT_A_LEFT", "3").unwrap();
    env.set("BOOT_B_LEFT", "3").unwrap();
    machine.store().write(&env).unwrap();

    // (slot, fallback, A left, B left) after each boot.
    let expected = [
        ("A", false, 2, 3),
        ("A", false, 1, 3),
        ("A", false, 0, 3),
        ("B", false, 0, 2),
        ("B", false, 0, 1),
        ("B", false, 0, 0),
        ("A", true, 2, 3),
    ];
    let mut seen = Vec::new();
    for (i, want) in expected.iter().enumerate() {
        let out = machine.boot(false);
        let got = result(&out);
        assert_eq!(
            (got.0.as_str(), got.1, got.2, got.3),
            *want,
            "boot {} of the sequence; U-Boot said:\n{out}",
            i + 1
        );
        // U-Boot saved its env to flash; this crate reads what it wrote.
        let mut flow = machine.uboot();
        assert_eq!(flow.attempts_left(Slot::A).unwrap(), want.2);
        assert_eq!(flow.attempts_left(Slot::B).unwrap(), want.3);
        seen.push(if got.1 { "fallback".to_owned() } else { got.0 });
    }
    assert_eq!(seen, ["A", "A", "A", "B", "B", "B", "fallback"]);
    // U-Boot's own variables survived our writes and its saveenv.
    assert_eq!(machine.store().read().unwrap().get("bootdelay"), Some("0"));

    // The updater installs into B and flips BOOT_ORDER: U-Boot follows.
    let mut flow = machine.uboot();
    flow.set_try_next(Slot::B, 3).unwrap();
    assert_eq!(
        machine.store().read().unwrap().get("BOOT_ORDER"),
        Some("B A")
    );
    assert_eq!(result(&machine.boot(false)), ("B".to_owned(), false, 2, 2));
    // B is marked bad: back to A.
    machine.uboot().mark_bad(Slot::B).unwrap();
    assert_eq!(result(&machine.boot(false)), ("A".to_owned(), false, 1, 0));
    // fw_printenv reads the env U-Boot saved.
    let cfg = dir.path().join("fw_env.config");
    std::fs::write(
        &cfg,
        format!("{} 0x0 {ENV_SIZE:#x}\n", machine.flash.display()),
    )
    .unwrap();
    let out = run(Command::new(tool("fw_printenv"))
        .arg("-c")
        .arg(&cfg)
        .args(["-n", "BOOT_ORDER"]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "A B");
}

#[test]
fn full_boot_script_selects_saves_and_resets_when_the_slot_has_no_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let machine = Machine::new(&mkimage_script(dir.path(), "boot", &boot_cmd()));
    let mut env = Env::new();
    env.set("bootdelay", "0").unwrap();
    env.set(
        "bootcmd",
        &format!("source {:#x}", FLASH1_ADDR + SCRIPT_OFFSET),
    )
    .unwrap();
    // No BOOT_* variables: the script's defaults apply. The slot partitions
    // point at a device that does not exist, so loading fails.
    env.set("kernex_dev", "virtio 0").unwrap();
    env.set("kernex_part_A", "2").unwrap();
    env.set("kernex_part_B", "3").unwrap();
    env.set("kernex_kernel", "/boot/Image").unwrap();
    machine.store().write(&env).unwrap();
    let out = machine.boot(true);
    assert!(
        out.contains("Kernex: booting slot A (A left 2, B left 3)"),
        "{out}"
    );
    assert!(
        out.contains("Kernex: unable to boot slot A; resetting"),
        "{out}"
    );
    let mut flow = machine.uboot();
    assert_eq!(flow.primary_slot().unwrap(), Some(Slot::A));
    assert_eq!(flow.attempts_left(Slot::A).unwrap(), 2);
    assert_eq!(
        machine.store().read().unwrap().get("BOOT_ORDER"),
        Some("A B")
    );
}
