//! Bounded memory under a login flood: 256 concurrent wrong-password
//! logins, three times over, against a real `kernex-server` process, each
//! from its own loopback address and for its own account (so that neither
//! the per-address nor the per-account throttle turns them away: every one
//! reaches the password hasher). The process's peak resident memory
//! (VmHWM) stays under 300 MB; before hashing was bounded it grew to
//! several GB. On SQLite and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// The documented bound (server/README.md, "Limits").
const MAX_RSS_KB: u64 = 300 * 1024;
const CLIENTS: usize = 256;
const ROUNDS: usize = 3;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(data: &std::path::Path, database_url: &str) -> (Server, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kernex-server"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .args(["--database-url", database_url])
        .env_remove("KERNEX_SERVER_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let server = Server(child);
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "server exited");
        if let Some(addr) = line
            .trim()
            .strip_prefix("kernex-server listening on http://")
        {
            return (server, addr.parse().unwrap());
        }
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One wrong-password login from `127.1.<a>.<b>`; its status.
async fn attempt(to: SocketAddr, n: usize, round: usize) -> u16 {
    let source = IpAddr::from([127, 1, (n / 250) as u8, (n % 250 + 1) as u8]);
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    let body = format!(
        r#"{{"email": "guess{n}-{round}@example.com", "password": "not the password {n}"}}"#
    );
    let request = format!(
        "POST /api/v1/login HTTP/1.1\r\nHost: kernex\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response[..12])[9..12]
        .parse()
        .unwrap()
}

async fn flood(database_url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = start(&dir.path().join("data"), database_url);
    let pid = server.0.id();
    let idle = status_kb(pid, "VmRSS:");
    let mut statuses = Vec::new();
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|n| tokio::spawn(attempt(addr, n, round)))
            .collect();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
    }
    let peak = status_kb(pid, "VmHWM:");
    let hashed = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    eprintln!(
        "{} logins: {hashed} answered 401, {refused} refused 429 (hashing saturated); RSS idle {} MB, peak {} MB",
        statuses.len(),
        idle / 1024,
        peak / 1024
    );
    assert_eq!(hashed + refused, statuses.len(), "{statuses:?}");
    assert!(hashed >= CLIENTS / 4, "few logins were hashed: {hashed}");
    assert!(
        peak < MAX_RSS_KB,
        "peak RSS {} MB over the bound of {} MB",
        peak / 1024,
        MAX_RSS_KB / 1024
    );
    // Still serving.
    let s = attempt(addr, 9999, 99).await;
    assert!(s == 401 || s == 429, "{s}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_stays_under_300_mb_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("kernex.db").display()
    );
    flood(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_stays_under_300_mb_on_postgres() {
    let admin_url = std::env::var("KERNEX_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    sqlx::any::install_default_drivers();
    let admin = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&admin_url)
        .await
        .expect("PostgreSQL must be reachable at 127.0.0.1:5432");
    let name = format!(
        "kx_flood_{}_{}",
        std::process::id(),
        &kernex_server::store::new_id().unwrap()[..8]
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .unwrap();
    let (prefix, _) = admin_url.rsplit_once('/').unwrap();
    let outcome = tokio::spawn({
        let url = format!("{prefix}/{name}");
        async move { flood(&url).await }
    })
    .await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
