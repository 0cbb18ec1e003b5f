//! Round trips with the real tools: fw_printenv / fw_setenv (libubootenv)
//! and mkenvimage (u-boot-tools). Each test fails when a tool is missing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{run, tool};
use u_boot_env::{Config, Env, Layout, Store, decode, encode};

const SIZE: usize = 0x4000;

struct Setup {
    _dir: tempfile::TempDir,
    env: PathBuf,
    config: PathBuf,
}

/// An env file and an fw_env.config for it: one copy, or two copies in the
/// same file (at 0 and SIZE).
fn setup(redundant: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("uboot.env");
    std::fs::write(&env, vec![0u8; 2 * SIZE]).unwrap();
    let config = dir.path().join("fw_env.config");
    let mut text = format!("# test\n{} 0x0 {SIZE:#x}\n", env.display());
    if redundant {
        text.push_str(&format!("{} {SIZE:#x} {SIZE:#x}\n", env.display()));
    }
    std::fs::write(&config, text).unwrap();
    Setup {
        _dir: dir,
        env,
        config,
    }
}

fn store(s: &Setup) -> Store {
    Store::open(&Config::load(&s.config).unwrap()).unwrap()
}

fn sample() -> Env {
    let mut env = Env::new();
    env.set("BOOT_ORDER", "A B").unwrap();
    env.set("BOOT_A_LEFT", "3").unwrap();
    env.set("BOOT_B_LEFT", "2").unwrap();
    env.set("bootargs", "console=ttyAMA0 root=/dev/mmcblk0p2 rw")
        .unwrap();
    env.set("script", "if test 1 -eq 1; then\n  echo multi line\nfi")
        .unwrap();
    env.set("utf8", "grüße ✓").unwrap();
    env
}

fn fw_printenv(config: &Path) -> String {
    let out = run(Command::new(tool("fw_printenv")).arg("-c").arg(config));
    String::from_utf8(out.stdout).unwrap()
}

fn fw_printenv_value(config: &Path, name: &str) -> String {
    let out = run(Command::new(tool("fw_printenv"))
        .arg("-c")
        .arg(config)
        .arg("-n")
        .arg(name));
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end_matches('\n')
        .to_owned()
}

fn fw_setenv(config: &Path, name: &str, value: &str) {
    run(Command::new(tool("fw_setenv"))
        .arg("-c")
        .arg(config)
        .arg(name)
        .arg(value));
}

fn printed(env: &Env) -> String {
    env.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

#[test]
fn fw_printenv_reads_what_we_write_single() {
    let s = setup(false);
    let mut st = store(&s);
    st.write(&sample()).unwrap();
    assert_eq!(fw_printenv(&s.config), printed(&sample()));
    assert_eq!(fw_printenv_value(&s.config, "BOOT_ORDER"), "A B");
}

#[test]
fn fw_printenv_reads_what_we_write_redundant_every_time() {
    let s = setup(true);
    let mut st = store(&s);
    let mut env = sample();
    for i in 0..5 {
        env.set("counter", &i.to_string()).unwrap();
        st.write(&env).unwrap();
        assert_eq!(fw_printenv(&s.config), printed(&env), "after write {i}");
    }
    // The writes alternate between the copies.
    assert_eq!(st.read_state().unwrap().current, 0);
}

#[test]
fn we_read_what_fw_setenv_writes_single() {
    let s = setup(false);
    store(&s).write(&sample()).unwrap();
    fw_setenv(&s.config, "BOOT_ORDER", "B A");
    fw_setenv(&s.config, "with space", "x y");
    let mut expected = sample();
    expected.set("BOOT_ORDER", "B A").unwrap();
    expected.set("with space", "x y").unwrap();
    assert_eq!(store(&s).read().unwrap(), expected);
    // Deleting with fw_setenv NAME.
    run(Command::new(tool("fw_setenv"))
        .arg("-c")
        .arg(&s.config)
        .arg("with space"));
    expected.remove("with space");
    assert_eq!(store(&s).read().unwrap(), expected);
}

#[test]
fn we_read_what_fw_setenv_writes_redundant_interleaved() {
    let s = setup(true);
    let mut env = sample();
    store(&s).write(&env).unwrap();
    for i in 0..4 {
        fw_setenv(&s.config, "BOOT_A_LEFT", &i.to_string());
        env.set("BOOT_A_LEFT", &i.to_string()).unwrap();
        let state = store(&s).read_state().unwrap();
        assert_eq!(state.env, env, "after fw_setenv {i}");
        assert!(state.other_valid);
        env.set("ours", &i.to_string()).unwrap();
        store(&s).write(&env).unwrap();
        assert_eq!(fw_printenv(&s.config), printed(&env), "after our write {i}");
    }
}

#[test]
fn flag_counter_wraps_the_same_way_in_both() {
    let s = setup(true);
    // Copy 0 current with flag 0xfe, copy 1 older.
    let mut old = Env::new();
    old.set("v", "old").unwrap();
    let mut cur = Env::new();
    cur.set("v", "fe").unwrap();
    let mut raw = encode(&cur, SIZE, Layout::Redundant, 0xfe).unwrap();
    raw.extend(encode(&old, SIZE, Layout::Redundant, 0xfd).unwrap());
    std::fs::write(&s.env, &raw).unwrap();
    assert_eq!(fw_printenv_value(&s.config, "v"), "fe");
    // We write flag 0xff into copy 1.
    store(&s).update(|e| e.set("v", "ff")).unwrap();
    assert_eq!(store(&s).read_state().unwrap().flag, Some(0xff));
    assert_eq!(fw_printenv_value(&s.config, "v"), "ff");
    // fw_setenv wraps to 0 in copy 0; we must pick that one.
    fw_setenv(&s.config, "v", "00");
    let state = store(&s).read_state().unwrap();
    assert_eq!((state.current, state.flag), (0, Some(0)));
    assert_eq!(state.env.get("v"), Some("00"));
    // And we continue with 1 in copy 1.
    store(&s).update(|e| e.set("v", "01")).unwrap();
    assert_eq!(fw_printenv_value(&s.config, "v"), "01");
}

fn mkenvimage(dir: &Path, redundant: bool, text: &str) -> Vec<u8> {
    let input = dir.join("env.txt");
    std::fs::write(&input, text).unwrap();
    let output = dir.join("env.bin");
    let mut cmd = Command::new(tool("mkenvimage"));
    cmd.arg("-s")
        .arg(format!("{SIZE:#x}"))
        .arg("-o")
        .arg(&output);
    if redundant {
        cmd.arg("-r");
    }
    run(cmd.arg(&input));
    std::fs::read(output).unwrap()
}

#[test]
fn we_read_mkenvimage_output_with_and_without_r() {
    let s = setup(false);
    let text = sample().to_text();
    let image = mkenvimage(s.env.parent().unwrap(), false, &text);
    assert_eq!(decode(&image, Layout::Single).unwrap().env, sample());
    std::fs::write(&s.env, &image).unwrap();
    assert_eq!(store(&s).read().unwrap(), sample());
    assert_eq!(fw_printenv(&s.config), printed(&sample()));

    let r = setup(true);
    let image = mkenvimage(r.env.parent().unwrap(), true, &text);
    let d = decode(&image, Layout::Redundant).unwrap();
    assert_eq!((d.env, d.flag), (sample(), Some(1)));
    // A factory image: copy 0 from mkenvimage -r, copy 1 blank.
    let mut disk = image.clone();
    disk.resize(2 * SIZE, 0xff);
    std::fs::write(&r.env, &disk).unwrap();
    assert_eq!(store(&r).read().unwrap(), sample());
    // Our first update goes to copy 1 with flag 2, and fw_printenv agrees.
    store(&r).update(|e| e.set("BOOT_ORDER", "B A")).unwrap();
    let state = store(&r).read_state().unwrap();
    assert_eq!((state.current, state.flag), (1, Some(2)));
    assert_eq!(fw_printenv_value(&r.config, "BOOT_ORDER"), "B A");
}

#[test]
fn corrupt_env_is_rejected_by_us_and_by_fw_printenv() {
    let s = setup(false);
    store(&s).write(&sample()).unwrap();
    let mut raw = std::fs::read(&s.env).unwrap();
    raw[20] ^= 0x01;
    std::fs::write(&s.env, &raw).unwrap();
    let err = store(&s).read().unwrap_err();
    assert!(matches!(err, u_boot_env::EnvError::Crc { .. }), "{err}");
    let out = Command::new(tool("fw_printenv"))
        .arg("-c")
        .arg(&s.config)
        .arg("-n")
        .arg("BOOT_ORDER")
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("A B"),
        "fw_printenv read a corrupt env"
    );
    // Both copies corrupt.
    let r = setup(true);
    store(&r).write(&sample()).unwrap();
    store(&r).write(&sample()).unwrap();
    let mut raw = std::fs::read(&r.env).unwrap();
    raw[20] ^= 0x01;
    raw[SIZE + 20] ^= 0x01;
    std::fs::write(&r.env, &raw).unwrap();
    let err = store(&r).read().unwrap_err();
    assert!(
        matches!(err, u_boot_env::EnvError::BothCopiesInvalid { .. }),
        "{err}"
    );
}
