//! The device binary's dependency footprint: `kernex-updater` links
//! `kernex-protocol` without its `bita` feature, so no async runtime or
//! async HTTP stack ends up on the device, and the protocol crate keeps
//! compiling without that feature.
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

#[test]
fn updater_links_no_async_runtime() {
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
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
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
