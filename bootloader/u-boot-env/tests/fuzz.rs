//! The short CI fuzz run: `fuzz/run-ci.sh` runs the cargo-fuzz target
//! `env_parse` for 20 s (FUZZ_SECONDS overrides) and fails on any crash.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn env_parser_survives_a_short_fuzz_run() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/run-ci.sh");
    let seconds = std::env::var("FUZZ_SECONDS").unwrap_or_else(|_| "20".to_owned());
    let out = Command::new("bash")
        .arg(script)
        .arg(&seconds)
        .output()
        .unwrap_or_else(|e| panic!("unable to run {script}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{}\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("Done ") && stderr.contains("stat::number_of_executed_units"),
        "the fuzzer did not run:\n{stderr}"
    );
}
