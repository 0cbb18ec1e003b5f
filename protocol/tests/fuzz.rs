//! The short CI fuzz run: `fuzz/run-ci.sh` runs every cargo-fuzz target of
//! the protocol's parsers for 35 s in all (FUZZ_SECONDS overrides), seeded
//! from the golden bundles, and fails on any crash, leak, timeout or
//! out-of-memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

/// The `[[bin]]` names in fuzz/Cargo.toml: every target must have run.
fn fuzz_targets() -> Vec<String> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/Cargo.toml");
    let text = std::fs::read_to_string(manifest)
        .unwrap_or_else(|e| panic!("unable to read {manifest}: {e}"));
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(value) = line.strip_prefix("name = ") {
            names.push(value.trim_matches('"').to_owned());
        }
    }
    assert!(!names.is_empty(), "no [[bin]] targets in {manifest}");
    names
}

#[test]
fn parsers_survive_a_short_fuzz_run() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/run-ci.sh");
    let seconds = std::env::var("FUZZ_SECONDS").unwrap_or_else(|_| "35".to_owned());
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
    let targets = fuzz_targets();
    for target in &targets {
        assert!(
            stderr.contains(&format!("run-ci.sh: fuzzing {target} for ")),
            "target {target} was not run:\n{stderr}"
        );
    }
    let runs = stderr.matches("stat::number_of_executed_units").count();
    assert!(
        stderr.matches("Done ").count() == targets.len() && runs == targets.len(),
        "{} targets, but {runs} fuzzer runs finished:\n{stderr}",
        targets.len()
    );
}
