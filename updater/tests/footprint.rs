//! The device binary's dependency footprint: `kernex-updater` links
//! `kernex-protocol` without its `bita` feature, so no async runtime or
//! async HTTP stack ends up on the device, and the protocol crate keeps
//! compiling without that feature. llama.cpp (the `llm` health check) is in
//! a default build and out of a `--no-default-features` one. The test hooks
//! (`failpoints`) are in the tests' build and in no other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

fn cargo() -> Command {
    let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    cmd
}

/// Crates the updater must not link: bitar's async transport and runtime.
const FORBIDDEN: &[&str] = &["bitar", "reqwest", "hyper", "tokio", "futures-executor"];

/// The crates `kernex-updater` links (normal dependencies), with `extra`
/// arguments to `cargo tree` (features), and the tree as printed.
fn updater_tree(extra: &[&str]) -> (Vec<String>, String) {
    let out = cargo()
        .args([
            "tree",
            "--locked",
            "-p",
            "kernex-updater",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .args(extra)
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crates = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    (crates, tree)
}

#[test]
fn updater_links_no_async_runtime() {
    let (crates, tree) = updater_tree(&[]);
    let crates: Vec<&str> = crates.iter().map(String::as_str).collect();
    // The tree is real: the updater's own dependencies are in it.
    for needed in ["kernex-protocol", "ureq", "zstd", "openssl"] {
        assert!(crates.contains(&needed), "{needed} missing from\n{tree}");
    }
    for bad in FORBIDDEN {
        assert!(
            !crates.contains(bad),
            "kernex-updater depends on {bad}:\n{tree}"
        );
    }
}

#[test]
fn llm_check_is_in_a_default_build_and_out_without_default_features() {
    let (crates, tree) = updater_tree(&[]);
    assert!(
        crates.iter().any(|c| c == "llama-cpp-2"),
        "a default build has no llama.cpp:\n{tree}"
    );
    let (crates, tree) = updater_tree(&["--no-default-features"]);
    assert!(crates.iter().any(|c| c == "kernex-protocol"), "{tree}");
    for llama in ["llama-cpp-2", "llama-cpp-sys-2"] {
        assert!(
            !crates.iter().any(|c| c == llama),
            "--no-default-features still links {llama}:\n{tree}"
        );
    }
}

#[test]
fn protocol_compiles_without_bita() {
    // A target dir of its own: the one running this test is locked.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("protocol-no-default");
    let out = cargo()
        .args([
            "check",
            "--locked",
            "-p",
            "kernex-protocol",
            "--no-default-features",
            "--lib",
            "--message-format",
            "short",
            "--target-dir",
        ])
        .arg(&target)
        .env("RUSTFLAGS", "-D warnings")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kernex-protocol does not compile without the bita feature:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test hooks' names (`src/failpoints.rs`).
const HOOKS: &[&str] = &["KERNEX_TEST_PAUSE_AT", "KERNEX_HEALTH_CRASH_AFTER"];

/// Which of [`HOOKS`] the file at `path` holds.
fn hooks_in(path: &Path) -> Vec<&'static str> {
    let bytes = std::fs::read(path).unwrap();
    // std's substring search (optimised even in a debug test build).
    let text = String::from_utf8_lossy(&bytes);
    HOOKS.iter().copied().filter(|h| text.contains(h)).collect()
}

#[test]
fn a_build_without_failpoints_carries_no_test_hook() {
    // The binary the tests run is built with `failpoints` (the
    // dev-dependency on this crate turns it on): the search finds both.
    let tested = hooks_in(Path::new(env!("CARGO_BIN_EXE_kernex-updater")));
    assert_eq!(tested, HOOKS, "the test build lacks a hook");
    // A build without the feature, as shipped (no llama.cpp: it has no hook
    // and takes minutes to build), has neither, in any profile.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("updater-without-failpoints");
    let out = cargo()
        .args([
            "build",
            "--locked",
            "-p",
            "kernex-updater",
            "--bin",
            "kernex-updater",
            "--no-default-features",
            "--message-format",
            "short",
            "--target-dir",
        ])
        .arg(&target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kernex-updater does not build without features:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shipped = hooks_in(&target.join("debug/kernex-updater"));
    assert!(
        shipped.is_empty(),
        "a build without the failpoints feature carries {shipped:?}"
    );
}
