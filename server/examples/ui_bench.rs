//! Web UI and device list at fleet scale (prints numbers; not a test): N
//! devices (default 100,000; a tenth with a tag, a hostname each) in a
//! fresh SQLite store, or PostgreSQL with `--postgres URL` (a database it
//! may create and drop), then the server's time to answer each page in
//! full (through the router, as a browser's request would be handled, not
//! counting the browser's rendering) and its size: the overview and its
//! live fragment, the device list's first page, page 500 (a cursor), a
//! search, a device page, and the JSON API's pages of 500 and 5,000.
//!
//! cargo run --release -p kernex-server --example ui_bench -- [DEVICES] [RUNS] [--postgres URL]

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use kernex_server::config::Config;
use kernex_server::{AppState, bootstrap, http};
use tower::ServiceExt;

async fn seed(state: &AppState, org: &str, n: usize) -> Result<()> {
    let now = kernex_server::store::now_ms();
    let mut tx = state.store.pool().begin().await?;
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(500) {
        let rows: Vec<String> = chunk
            .iter()
            .map(|i| {
                let status = if i % 50 == 7 { "degraded" } else { "online" };
                let seen = if i % 100 == 3 { 0 } else { now };
                format!(
                    "('pk{i:07}', '{org}', 'dev-{i:07}', 'sim-x86', '{{\"hostname\":\"host-{i}\"}}', '1.0.{}', '{status}', 'cred{i}', 0, 0, {seen})",
                    i % 3
                )
            })
            .collect();
        sqlx::query(&format!(
            "INSERT INTO devices (id, org_id, device_id, hardware_class, hardware_metadata, current_version, status, credential_hash, revoked, registered_at, last_seen_at) VALUES {}",
            rows.join(", ")
        ))
        .execute(&mut *tx)
        .await
        .context("unable to insert devices")?;
        let tags: Vec<String> = chunk
            .iter()
            .filter(|i| *i % 10 == 0)
            .map(|i| format!("('pk{i:07}', '{org}', 'canary')"))
            .collect();
        if !tags.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO device_tags (device_pk, org_id, tag) VALUES {}",
                tags.join(", ")
            ))
            .execute(&mut *tx)
            .await
            .context("unable to insert tags")?;
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn get(
    app: &axum::Router,
    path: &str,
    cookie: &str,
    bearer: &str,
) -> Result<(Duration, usize)> {
    let req = Request::get(path)
        .header("cookie", cookie)
        .header("authorization", bearer)
        .body(Body::empty())?;
    let t = Instant::now();
    let response = app.clone().oneshot(req).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let took = t.elapsed();
    if status != StatusCode::OK {
        bail!("{path}: {status}: {}", String::from_utf8_lossy(&bytes));
    }
    Ok((took, bytes.len()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut postgres = None;
    let mut plain = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--postgres" {
            postgres = Some(it.next().context("--postgres needs a URL")?.clone());
        } else {
            plain.push(a.clone());
        }
    }
    let n: usize = plain
        .first()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(100_000);
    let runs: usize = plain.get(1).map(|a| a.parse()).transpose()?.unwrap_or(20);
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().join("data"),
        user_requests_per_minute: 0,
        ..Config::default()
    };
    let mut drop_db = None;
    if let Some(url) = &postgres {
        let name = format!("kx_ui_bench_{}", std::process::id());
        sqlx::any::install_default_drivers();
        let admin = sqlx::AnyPool::connect(url).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        let (prefix, _) = url.rsplit_once('/').context("a URL with a database")?;
        config.database_url = Some(format!("{prefix}/{name}"));
        drop_db = Some((admin, name));
    }
    let state = AppState::open(config).await?;
    let first = bootstrap(&state).await?.context("first start")?;
    sqlx::query("UPDATE users SET must_change_password = 0")
        .execute(state.store.pool())
        .await?;
    let org: String = sqlx::query_scalar::<_, String>("SELECT id FROM organizations")
        .fetch_one(state.store.pool())
        .await?;
    let t = Instant::now();
    seed(&state, &org, n).await?;
    println!(
        "setup: {n} devices in {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        if postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        }
    );
    let app = http::app(state.clone());
    let login = Request::post("/api/v1/login")
        .header("content-type", "application/json")
        .body(Body::from(
            serde_json::json!({"organization": "default", "email": first.email, "password": first.password})
                .to_string(),
        ))?;
    let response = app.clone().oneshot(login).await?;
    let body: serde_json::Value =
        serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
    let token = body["token"].as_str().context("no token")?.to_string();
    let cookie = format!("kernex_session={token}");
    let bearer = format!("Bearer {token}");
    let page_500 = hex::encode(format!(
        "dev-{:07}",
        (499 * 100 - 1).min(n.saturating_sub(2))
    ));
    let pages = [
        ("overview", "/ui/".to_string()),
        ("overview live fragment", "/ui/live/overview".to_string()),
        ("device list, first page", "/ui/devices".to_string()),
        (
            "device list, page 500",
            format!("/ui/devices?after={page_500}"),
        ),
        (
            "device list, search",
            format!("/ui/devices?q=host-{}", n / 2),
        ),
        (
            "device list, tag filter",
            "/ui/devices?tag=canary".to_string(),
        ),
        ("device page", "/ui/devices/pk0000007".to_string()),
        (
            "device live fragment",
            "/ui/devices/pk0000007/live".to_string(),
        ),
        ("API list, 500", "/api/v1/devices".to_string()),
        ("API list, 5000", "/api/v1/devices?limit=5000".to_string()),
        (
            "API list, page 500 of 100",
            format!("/api/v1/devices?limit=100&after={page_500}"),
        ),
        ("API search", format!("/api/v1/devices?q=host-{}", n / 2)),
    ];
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>10}",
        "page", "p50 ms", "p95 ms", "max ms", "bytes"
    );
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(runs);
        let mut size = 0;
        get(&app, path, &cookie, &bearer).await?; // warm
        for _ in 0..runs {
            let (d, s) = get(&app, path, &cookie, &bearer).await?;
            times.push(d);
            size = s;
        }
        times.sort();
        let at =
            |q: f64| times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1];
        println!(
            "{name:<28} {:>9.1} {:>9.1} {:>9.1} {size:>10}",
            ms(at(0.5)),
            ms(at(0.95)),
            ms(at(1.0))
        );
    }
    drop(app);
    state.store.pool().close().await;
    if let Some((admin, name)) = drop_db {
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&admin)
            .await?;
    }
    Ok(())
}
