//! `kernex-server`: the Kernex control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kernex_server::config::Config;
use kernex_server::{AppState, bootstrap, http};

/// The Kernex control plane: device enrollment, signed releases,
/// deployments and an append-only audit log, over an HTTP API.
///
/// With no options it keeps everything in ./kernex-data: an embedded SQLite
/// database (kernex.db) and a blob directory (blobs/). On the first start it
/// creates the default organisation and its admin (also the instance
/// admin) and prints the admin's one-time password, once; it must be
/// changed at the first login (`POST /api/v1/account/password`, or the web
/// UI asks).
///
/// `kernex-server admin org ...` manages organisations on the host, against
/// the same database (see `kernex-server admin org --help`).
///
/// The API is described at /api/v1/openapi.json; Prometheus metrics are at
/// /metrics. Logs go to stderr; set RUST_LOG (e.g. `kernex_server=debug`)
/// to change their level.
///
/// EXAMPLES:
///     kernex-server
///     kernex-server --listen 0.0.0.0:8080 --database-url postgres://kernex@db/kernex
///     kernex-server --database-url postgres://kernex@db/kernex --blob-store s3://kernex-releases
///     kernex-server --listen 0.0.0.0:8443 --tls-cert server.crt --tls-key server.key
///     kernex-server --config /etc/kernex/server.toml
///     kernex-server --tpm-cert-store /etc/kernex/tpm-ca
///     kernex-server admin org create acme --admin-email ops@acme.example
///     kernex-server audit verify --public-key audit.pub copy-of-kernex.db
#[derive(Debug, Parser)]
#[command(name = "kernex-server", version, verbatim_doc_comment)]
struct Args {
    /// Instance administration or the offline audit log on the host
    /// (default: serve).
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file (see server.example.toml); flags override it.
    #[arg(long, value_name = "FILE", env = "KERNEX_SERVER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Directory for the SQLite database, blobs and the upload spool
    /// [default: ./kernex-data].
    #[arg(long, value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// sqlite://FILE?mode=rwc or postgres://USER@HOST/DB
    /// [default: sqlite in the data directory].
    #[arg(long, value_name = "URL", env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Blob store: s3://BUCKET (credentials, region and endpoint from the
    /// config file or AWS_* variables) [default: DATA-DIR/blobs].
    #[arg(long, value_name = "URL")]
    blob_store: Option<String>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Serve HTTPS with this certificate chain (PEM), with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Trust these TPM vendor CA certificates for EK certificates (PEM or
    /// DER files, or directories of them; repeat the flag, or separate
    /// with `:` in the variable). Set: TPM enrollment needs an EK
    /// certificate that chains to one of them (or an EK the factory line
    /// pre-authorised) [default: none, any TPM is accepted].
    #[arg(
        long,
        value_name = "PATH",
        env = "KERNEX_TPM_CERT_STORE",
        value_delimiter = ':'
    )]
    tpm_cert_store: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage organisations on the host, against the database.
    #[command(subcommand)]
    Admin(kernex_server::admin::AdminCommand),
    /// The audit log, offline: verify or export a copy of the database.
    #[command(subcommand)]
    Audit(kernex_server::audit::cli::AuditCommand),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("kernex-server: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(u) = args.database_url {
        config.database_url = Some(u);
    }
    if let Some(b) = args.blob_store {
        config.blob_store = Some(b);
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(c) = args.tls_cert {
        config.tls_cert = Some(c);
    }
    if let Some(k) = args.tls_key {
        config.tls_key = Some(k);
    }
    if !args.tpm_cert_store.is_empty() {
        config.tpm_cert_store = args.tpm_cert_store;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("unable to start the async runtime")?;
    match args.command {
        Some(Command::Admin(cmd)) => runtime.block_on(admin(config, cmd)),
        Some(Command::Audit(command)) => {
            runtime.block_on(kernex_server::audit::cli::run(command, &config))
        }
        None => runtime.block_on(serve(config)),
    }
}

async fn admin(config: Config, cmd: kernex_server::admin::AdminCommand) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("unable to create {}", config.data_dir.display()))?;
    let store = kernex_server::store::Store::connect(&config.database_url()).await?;
    store.migrate().await?;
    let outcome = kernex_server::admin::run(&store, cmd).await;
    store.close().await;
    outcome
}

async fn serve(config: Config) -> Result<()> {
    let listen = config.listen;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(kernex_server::tls::acceptor(cert, key)?),
        (None, None) => None,
        _ => anyhow::bail!("tls-cert and tls-key go together"),
    };
    let state = AppState::open(config).await?;
    if let Some(admin) = bootstrap(&state).await? {
        println!(
            "Created organisation {:?} and admin {:?}.\nOne-time admin password (shown only now): {}\n\
             WARNING: this password is printed once, never again, and it must be changed at the \
             first login; until then it allows nothing else. Change it now (web UI, or \
             POST /api/v1/account/password) and keep this output out of shared logs.",
            admin.organization, admin.email, admin.password
        );
    }
    tokio::spawn(kernex_server::retention::run(
        state.store.clone(),
        state.config.heartbeat_retention_days,
        state.config.log_retention_days,
    ));
    tokio::spawn(kernex_server::service::rollouts::scheduler::run(
        state.clone(),
    ));
    tokio::spawn(kernex_server::last_seen::LastSeen::run(state.clone()));
    tokio::spawn(kernex_server::audit::coalesce::run(
        state.store.clone(),
        state.audit_coalescer.clone(),
    ));
    tokio::spawn(kernex_server::poll_cache::listen(state.clone()));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("unable to listen on {listen}"))?;
    let local = listener
        .local_addr()
        .context("unable to read the bound address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("kernex-server listening on {scheme}://{local}");
    tracing::info!(%local, scheme, "kernex-server listening");
    let limits = kernex_server::serve::Limits::from(&state.config.limits)
        .counted_in(&state.metrics.refusals.connections);
    kernex_server::serve::run(
        listener,
        tls,
        http::app(state.clone()),
        limits,
        shutdown_signal(),
    )
    .await
    .context("server failed")?;
    // Poll times not yet written (write-behind) go to the store now.
    state
        .last_seen
        .flush(&state.store)
        .await
        .context("unable to write the last-seen times on shutdown")?;
    kernex_server::service::rollouts::scheduler::release_lease(&state).await
}

/// Ctrl-C, or SIGTERM (what service managers and `kill` send).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
