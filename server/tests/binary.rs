//! The `kernex-server` binary: first start creates the admin and prints its
//! one-time password, which logs in over real TCP and must be changed
//! before anything else; a restart prints nothing and the one-time password
//! is dead. `kernex-server admin org ...` manages organisations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server on a free port; returns it, its address and the
/// lines it printed before listening.
fn start(data_dir: &std::path::Path) -> (Server, String, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kernex-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .env_remove("KERNEX_SERVER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let server = Server(child);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "server exited: {lines:?}"
        );
        if let Some(addr) = line
            .trim()
            .strip_prefix("kernex-server listening on http://")
        {
            return (server, addr.to_string(), lines);
        }
        lines.push(line.trim().to_string());
    }
}

fn post_json(addr: &str, path: &str, body: &str) -> (u16, String) {
    send(addr, "POST", path, None, body)
}

fn send(addr: &str, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

#[test]
fn first_start_prints_a_one_time_admin_password_that_logs_in() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (server, addr, lines) = start(&data);
    let password = lines
        .iter()
        .find_map(|l| l.strip_prefix("One-time admin password (shown only now): "))
        .unwrap_or_else(|| panic!("no password in {lines:?}"))
        .to_string();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("WARNING: this password is printed once")),
        "{lines:?}"
    );
    let login = format!(r#"{{"email": "admin@localhost", "password": "{password}"}}"#);
    let (status, body) = post_json(&addr, "/api/v1/login", &login);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"token\":\"kxo_"), "{body}");
    assert!(body.contains("\"must_change_password\":true"), "{body}");
    let token = body
        .split("\"token\":\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap()
        .to_string();
    // Until the password is changed, nothing else is allowed.
    let (status, body) = send(&addr, "GET", "/api/v1/devices", Some(&token), "");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("change your password"), "{body}");
    let change =
        format!(r#"{{"current_password": "{password}", "new_password": "a new admin password"}}"#);
    let (status, body) = send(
        &addr,
        "POST",
        "/api/v1/account/password",
        Some(&token),
        &change,
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = send(&addr, "GET", "/api/v1/devices", Some(&token), "");
    assert_eq!(status, 200, "{body}");
    let (status, _) = post_json(
        &addr,
        "/api/v1/login",
        r#"{"email": "admin@localhost", "password": "nope"}"#,
    );
    assert_eq!(status, 401);
    assert!(data.join("kernex.db").exists());
    drop(server);

    // Second start on the same data: no new admin, nothing printed; the
    // one-time password no longer logs in, the new one does.
    let (_server, addr, lines) = start(&data);
    assert!(lines.iter().all(|l| !l.contains("password")), "{lines:?}");
    let (status, _) = post_json(&addr, "/api/v1/login", &login);
    assert_eq!(status, 401);
    let (status, body) = post_json(
        &addr,
        "/api/v1/login",
        r#"{"email": "admin@localhost", "password": "a new admin password"}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"must_change_password\":false"), "{body}");
}

#[test]
fn help_reads_like_a_man_page() {
    let out = Command::new(env!("CARGO_BIN_EXE_kernex-server"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "--data-dir",
        "--database-url",
        "--listen",
        "--config",
        "EXAMPLES:",
        "one-time password",
    ] {
        assert!(text.contains(want), "--help lacks {want}:\n{text}");
    }
}

#[test]
fn a_bad_config_file_is_an_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(&cfg, "listen = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kernex-server"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("server.toml"), "{err}");
}

#[test]
fn an_unusable_tpm_cert_store_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("vendor-ca.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    // The flag, and the variable (`:`-separated), both name the store.
    let flag = Command::new(env!("CARGO_BIN_EXE_kernex-server"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--tpm-cert-store")
        .arg(&junk)
        .output()
        .unwrap();
    let env = Command::new(env!("CARGO_BIN_EXE_kernex-server"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env(
            "KERNEX_TPM_CERT_STORE",
            format!(
                "{}:{}",
                dir.path().join("missing").display(),
                junk.display()
            ),
        )
        .output()
        .unwrap();
    for (out, want) in [(flag, "vendor-ca.pem"), (env, "missing")] {
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("tpm-cert-store"), "{err}");
        assert!(err.contains(want), "{err}");
    }
}

fn admin_cli(data: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kernex-server"))
        .args(["admin", "--data-dir"])
        .arg(data)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("KERNEX_SERVER_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "admin {args:?}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn admin_subcommand_manages_organisations_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // First start creates the default organisation.
    drop(start(&data));
    let out = admin_cli(
        &data,
        &[
            "org",
            "create",
            "acme",
            "--admin-email",
            "root@acme.example",
        ],
    );
    let password = out
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "One-time password (shown only now; it must be changed at first login): ",
            )
        })
        .unwrap_or_else(|| panic!("no password in {out}"))
        .to_string();
    let list = admin_cli(&data, &["org", "list"]);
    assert!(list.contains("acme") && list.contains("default"), "{list}");
    admin_cli(&data, &["org", "rename", "acme", "acme-corp"]);

    let (server, addr, _) = start(&data);
    let login = format!(
        r#"{{"organization": "acme-corp", "email": "root@acme.example", "password": "{password}"}}"#
    );
    let (status, body) = post_json(&addr, "/api/v1/login", &login);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"must_change_password\":true"), "{body}");
    drop(server);

    admin_cli(&data, &["org", "disable", "acme-corp"]);
    assert!(admin_cli(&data, &["org", "list"]).contains("disabled"));
    let (_server, addr, _) = start(&data);
    let (status, _) = post_json(&addr, "/api/v1/login", &login);
    assert_eq!(status, 401, "a disabled organisation's admin cannot log in");
    drop(_server);
    admin_cli(&data, &["org", "enable", "acme-corp"]);
    let (_server, addr, _) = start(&data);
    let (status, body) = post_json(&addr, "/api/v1/login", &login);
    assert_eq!(status, 200, "{body}");
}
