//! The framework limit for `bench/server.sh`: bare axum handlers on the
//! same runtime as `kernex-server` (tokio multi-thread, axum, HTTP/1.1) that
//! answer like the device API without doing anything — no middleware, no
//! authentication, no database. The benchmark compares the real endpoints
//! with these.
//!
//! - `GET /api/v1/device/poll`: 204, no body (a device with nothing to do);
//! - `GET /api/v1/device/poll-body`: 200 with the bytes of `--body-file`
//!   (the benchmark passes the real server's answer, so the size matches);
//! - `POST /api/v1/device/heartbeat`: reads the body, 204.
//!
//! Not part of the `kernex-server` binary.
//!
//! ```text
//! cargo run --release -p kernex-server --example bare -- --listen 127.0.0.1:0 --body-file poll.json
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use clap::Parser;

/// Bare axum handlers answering like the device API, for bench/server.sh.
#[derive(Debug, Parser)]
#[command(name = "bare")]
struct Args {
    /// Address to listen on (port 0: any free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Body of `GET /api/v1/device/poll-body` (JSON) [default: `{}`].
    #[arg(long, value_name = "FILE")]
    body_file: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("bare: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let body = match &args.body_file {
        Some(path) => Bytes::from(
            std::fs::read(path).with_context(|| format!("unable to read {}", path.display()))?,
        ),
        None => Bytes::from_static(b"{}"),
    };
    let app = Router::new()
        .route(
            "/api/v1/device/poll",
            get(|| async { StatusCode::NO_CONTENT }),
        )
        .route(
            "/api/v1/device/poll-body",
            get(move || {
                let body = body.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], body).into_response() }
            }),
        )
        .route(
            "/api/v1/device/heartbeat",
            post(|_body: Bytes| async { StatusCode::NO_CONTENT }),
        );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("unable to start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("unable to listen on {}", args.listen))?;
        let local = listener.local_addr().context("no local address")?;
        println!("bare listening on http://{local}");
        axum::serve(listener, app).await.context("server failed")
    })
}
