//! `kernex-server audit verify` and `kernex-server audit export`.

use std::collections::HashSet;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::{checkpoint, offline};
use crate::config::Config;

/// The audit log, offline: on a copy of the database (or an export),
/// without the server.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every organisation's hash chain from its first entry, and the
    /// signed checkpoints against the instance's public key. Exit status 1
    /// when anything does not verify.
    ///
    /// EXAMPLES:
    ///     kernex-server audit verify --public-key audit.pub copy-of-kernex.db
    ///     kernex-server audit verify --public-key audit.pub postgres://kernex@db/kernex
    ///     kernex-server audit verify --public-key audit.pub --export audit.jsonl
    #[command(verbatim_doc_comment)]
    Verify(VerifyArgs),
    /// Write every entry and signed checkpoint as JSON Lines (a header, the
    /// checkpoints, then the entries in chain order, exactly as stored);
    /// `audit verify --export` checks the file.
    ///
    /// EXAMPLE:
    ///     kernex-server audit export copy-of-kernex.db --output audit.jsonl
    #[command(verbatim_doc_comment)]
    Export(ExportArgs),
}

/// `audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A SQLite file, sqlite:// or postgres:// URL, opened read-only
    /// [default: the configured database].
    #[arg(value_name = "DATABASE", conflicts_with = "export")]
    pub database: Option<String>,
    /// Verify this export (JSON Lines) instead of a database.
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
    /// A trusted signing key: the PEM from `GET /api/v1/audit/key` (or
    /// the instance's key file). Repeat for several replicas' keys
    /// [default: DATA-DIR/audit-signing.key when present].
    #[arg(long, value_name = "FILE")]
    pub public_key: Vec<PathBuf>,
    /// The server's `audit-checkpoint-entries` (the largest it ever had):
    /// checkpoints further apart, or a longer unsigned tail, is a problem
    /// [default: from the configuration].
    #[arg(long, value_name = "N")]
    pub checkpoint_entries: Option<u64>,
    /// Check the hash chain only, not the signatures (no key at hand).
    #[arg(long)]
    pub chain_only: bool,
}

/// `audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A SQLite file, sqlite:// or postgres:// URL, opened read-only
    /// [default: the configured database].
    #[arg(value_name = "DATABASE")]
    pub database: Option<String>,
    /// Write here instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Runs a command; `config` supplies the defaults.
pub async fn run(command: AuditCommand, config: &Config) -> Result<()> {
    match command {
        AuditCommand::Verify(args) => verify(args, config).await,
        AuditCommand::Export(args) => export(args, config).await,
    }
}

async fn verify(args: VerifyArgs, config: &Config) -> Result<()> {
    let trusted = if args.chain_only {
        None
    } else {
        let mut keys = HashSet::new();
        for path in &args.public_key {
            keys.insert(checkpoint::read_public_key(path)?);
        }
        if keys.is_empty() {
            let own = config.data_dir.join(checkpoint::KEY_FILE);
            if !own.is_file() {
                bail!(
                    "no signing key to check the checkpoints with: pass --public-key FILE (the PEM from GET /api/v1/audit/key), or --chain-only"
                );
            }
            eprintln!("trusting the instance key {}", own.display());
            keys.insert(checkpoint::read_public_key(&own)?);
        }
        Some(keys)
    };
    let every = args
        .checkpoint_entries
        .unwrap_or(config.audit_checkpoint_entries);
    let report = match &args.export {
        Some(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("unable to open {}", path.display()))?;
            offline::verify_export(BufReader::new(file), trusted.clone(), every)?
        }
        None => {
            let db = args.database.unwrap_or_else(|| config.database_url());
            let pool = offline::open(&db).await?;
            let report = offline::verify_database(&pool, trusted.clone(), every).await;
            pool.close().await;
            report?
        }
    };
    print!("{}", report.render());
    if trusted.is_none() {
        println!("signatures NOT checked (--chain-only): a re-hashed chain would pass");
    }
    if !report.ok() {
        bail!("the audit log does not verify");
    }
    Ok(())
}

async fn export(args: ExportArgs, config: &Config) -> Result<()> {
    let db = args.database.unwrap_or_else(|| config.database_url());
    let pool = offline::open(&db).await?;
    let written = match &args.output {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("unable to create {}", path.display()))?;
            offline::export(&pool, &mut std::io::BufWriter::new(file)).await
        }
        None => offline::export(&pool, &mut std::io::stdout().lock()).await,
    };
    pool.close().await;
    let n = written?;
    eprintln!("exported {n} audit entries");
    Ok(())
}
