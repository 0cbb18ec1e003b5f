//! The server's layering, checked on its source: the web UI (`src/ui/`)
//! issues no SQL and calls no HTTP handler, only services; the domain
//! (`src/service/`) imports nothing of HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// Code lines (comments left out) of every `.rs` file under `src/<dir>`,
/// as (path relative to `src/`, line number, line).
fn code_lines(dir: &str) -> Vec<(String, usize, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src.join(dir), &mut files);
    assert!(!files.is_empty(), "no source under src/{dir}");
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source file");
        let rel = file
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            out.push((rel.clone(), n + 1, line.to_string()));
        }
    }
    out
}

/// Does `line` name a module of `crate::http` (a resource, and through it
/// a handler), rather than one of its types (`crate::http::Error`)?
fn names_http_module(line: &str) -> bool {
    let mut rest = line;
    while let Some(at) = rest.find("crate::http") {
        let after = &rest[at + "crate::http".len()..];
        if after.starts_with(';') || after.starts_with(" as ") {
            return true;
        }
        if let Some(path) = after.strip_prefix("::")
            && path
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '{')
        {
            return true;
        }
        rest = after;
    }
    false
}

/// What a UI line must not do, if anything.
fn ui_violation(line: &str) -> Option<&'static str> {
    if line.contains("sqlx::") {
        Some("runs SQL")
    } else if line.contains("ApiJson") {
        Some("speaks the JSON API's extractor")
    } else if names_http_module(line) {
        Some("calls into an HTTP resource module")
    } else {
        None
    }
}

/// What a service line must not do, if anything.
fn service_violation(_file: &str, line: &str) -> Option<&'static str> {
    if line.contains("crate::http") {
        Some("imports the HTTP layer")
    } else if line.contains("axum") {
        Some("imports axum")
    } else {
        None
    }
}

#[test]
fn the_ui_calls_services_only() {
    let found: Vec<String> = code_lines("ui")
        .into_iter()
        .filter_map(|(file, n, line)| {
            ui_violation(&line).map(|why| format!("src/{file}:{n} {why}: {}", line.trim()))
        })
        .collect();
    assert!(
        found.is_empty(),
        "the web UI must call services:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_service_layer_knows_no_http() {
    let found: Vec<String> = code_lines("service")
        .into_iter()
        .filter_map(|(file, n, line)| {
            service_violation(&file, &line)
                .map(|why| format!("src/{file}:{n} {why}: {}", line.trim()))
        })
        .collect();
    assert!(
        found.is_empty(),
        "the service layer must not know HTTP:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_rules_catch_what_the_ui_did_before() {
    // Lines of the UI before it called services: each must be caught.
    for line in [
        "use sqlx::Row;",
        "let rows = sqlx::query(sql)",
        "use crate::http::ApiJson;",
        "use crate::http::devices::{self, Device, DeviceFilter};",
        "use crate::http::{deployments, releases};",
        "crate::http::rollouts::list(State(state.clone()), s.op.clone()).await?;",
        "let crate::http::ApiJson(list) =",
    ] {
        assert!(ui_violation(line).is_some(), "not caught: {line}");
    }
    // What the UI may name: services, and the HTTP error type it renders.
    for line in [
        "use crate::service::devices::fleet::{self, Device};",
        "use crate::http::Error;",
        "Err(e) => Error::from(e).into_response(),",
    ] {
        assert!(ui_violation(line).is_none(), "wrongly caught: {line}");
    }
    assert!(service_violation("service/x.rs", "use axum::http::StatusCode;").is_some());
    assert!(service_violation("service/x.rs", "use crate::http::Error;").is_some());
    assert!(service_violation("service/x.rs", "use crate::store::now_ms;").is_none());
}
