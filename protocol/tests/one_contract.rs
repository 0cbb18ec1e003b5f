//! The wire contract has one owner: `protocol/src/api`. This test reads the
//! workspace's sources (every crate's `src/`, `tests/` and `examples/`) and
//! fails when a wire type, a header name or a hand-built report is defined
//! anywhere else — the drift issue #19 found (a type re-declared in four
//! places, report states as string literals) cannot come back unnoticed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// Every type of `kernex_protocol::api`.
const WIRE_TYPES: &[&str] = &[
    "EnrollRequest",
    "EnrollResponse",
    "DesiredState",
    "ServerPatch",
    "DesiredAction",
    "DownloadWindow",
    "Heartbeat",
    "Report",
    "ReportState",
    "LogLevel",
    "LogLine",
    "LogBatch",
    "TpmIdentity",
    "Activation",
    "Quote",
    "ActivationAnswer",
    "Activated",
    "AttestationState",
    "TpmBinding",
    "BindingState",
    "TpmBindingAnswer",
    "QuoteReport",
    "QuoteResult",
    "NewEnrollmentToken",
    "EnrollmentToken",
    "TokenCheck",
    "NewPreauthorization",
    "Preauthorization",
    "Challenge",
    "KeyProof",
    "DeviceAuth",
    "AccessToken",
    "EnrollPending",
    "EnrollmentRequest",
];

/// Header names, as they are written on the wire.
const HEADERS: &[&str] = &[
    "kernex-poll-after",
    "kernex-attestation-nonce",
    "idempotency-key",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Rust files of the workspace's crates, but the contract itself and
/// build output.
fn sources() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![workspace()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if !["target", ".git", "fuzz", "node_modules", "yocto"].contains(&name.as_str()) {
                    stack.push(path);
                }
            } else if name.ends_with(".rs")
                && !path.starts_with(workspace().join("protocol/src/api"))
                && !path.ends_with("protocol/tests/one_contract.rs")
            {
                out.push(path);
            }
        }
    }
    assert!(out.len() > 100, "found only {} sources", out.len());
    out
}

/// The lines of `text` that are code: no comment, no attribute (utoipa's
/// `path = ...`, `headers(...)`, even over several lines), and nothing from
/// the first `#[cfg(test)]` on (unit tests keep hand-written fixtures).
fn code_lines(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut in_attribute = 0i32;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if in_attribute > 0 || t.starts_with("#[") || t.starts_with("#![") {
            in_attribute += bracket_balance(line);
            continue;
        }
        if let Some(code) = code(line) {
            out.push((n + 1, code));
        }
    }
    out
}

fn bracket_balance(line: &str) -> i32 {
    line.chars()
        .map(|c| match c {
            '[' | '(' => 1,
            ']' | ')' => -1,
            _ => 0,
        })
        .sum()
}

/// The code of one line: none for a comment or an attribute.
fn code(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if t.starts_with("//") || t.starts_with("#[") || t.starts_with("#![") {
        return None;
    }
    Some(line.split(" //").next().unwrap_or(line))
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Does `line` define `name` (`struct Name`, `enum Name`, `type Name`)?
fn defines(line: &str, name: &str) -> bool {
    ["struct ", "enum ", "type "].iter().any(|kw| {
        line.match_indices(&format!("{kw}{name}")).any(|(i, m)| {
            let before = line[..i].chars().next_back();
            let after = line[i + m.len()..].chars().next();
            !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
        })
    })
}

#[test]
fn every_wire_type_is_defined_once_in_protocol_api() {
    let mut found = Vec::new();
    for path in sources() {
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in code_lines(&text) {
            for name in WIRE_TYPES {
                if defines(line, name) {
                    found.push(format!("{}:{n}: {name}", path.display()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "wire types defined outside protocol/src/api:\n{}",
        found.join("\n")
    );
}

#[test]
fn header_names_are_written_once() {
    // Tests keep a few hand-written requests on purpose (they pin the wire
    // format); the programs use the constants.
    let mut found = Vec::new();
    for path in sources() {
        if !path.to_string_lossy().contains("/src/") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in code_lines(&text) {
            let lower = line.to_ascii_lowercase();
            for h in HEADERS {
                if lower.contains(&format!("\"{h}\"")) {
                    found.push(format!("{}:{n}: {h}", path.display()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "header names written outside protocol/src/api (use api::*_HEADER):\n{}",
        found.join("\n")
    );
}

#[test]
fn no_source_builds_a_report_by_hand() {
    // Tests keep a few hand-written fixtures on purpose (they pin the wire
    // format); the programs use the types.
    let mut found = Vec::new();
    for path in sources() {
        let p = path.to_string_lossy();
        if !p.contains("/src/") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in code_lines(&text) {
            if line.contains("\"rebooted\"") || line.contains("\"state\": \"") {
                found.push(format!("{}:{n}: {}", path.display(), line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "report states written as strings outside protocol/src/api (use api::ReportState):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    assert!(defines("pub struct Heartbeat {", "Heartbeat"));
    assert!(defines("struct Report<'a> {", "Report"));
    assert!(!defines("pub struct ReportRow {", "Report"));
    assert!(!defines("let x: Heartbeat = y;", "Heartbeat"));
    assert_eq!(code("    /// pub struct Heartbeat"), None);
    assert_eq!(code("#[utoipa::path(get, path = \"/x\")]"), None);
    let text = "#[utoipa::path(get, path = \"/p\", responses(\n    (status = 200, headers((\"x\" = String))),\n))]\nfn handler() {}\n#[cfg(test)]\nmod tests { struct Heartbeat; }\n";
    let lines: Vec<&str> = code_lines(text).into_iter().map(|(_, l)| l).collect();
    assert_eq!(lines, ["fn handler() {}"]);
}
