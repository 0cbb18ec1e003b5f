//! The database: one sqlx `AnyPool` that is SQLite (embedded default) or
//! PostgreSQL, chosen by the URL, with one set of portable migrations.
//!
//! All queries are runtime queries with `$n` placeholders (both drivers
//! accept them) and bound parameters: no SQL is ever built from input.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

/// The numbered migrations, in order. Never edit one once it has landed.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "idempotency",
        include_str!("../migrations/0002_idempotency.sql"),
    ),
    (
        3,
        "heartbeats_daily",
        include_str!("../migrations/0003_heartbeats_daily.sql"),
    ),
    (
        4,
        "rollouts",
        include_str!("../migrations/0004_rollouts.sql"),
    ),
    (
        5,
        "attestation",
        include_str!("../migrations/0005_attestation.sql"),
    ),
    (
        6,
        "rollout_left_out",
        include_str!("../migrations/0006_rollout_left_out.sql"),
    ),
    (
        7,
        "release_deltas_exact",
        include_str!("../migrations/0007_release_deltas_exact.sql"),
    ),
    (
        8,
        "anti_rollback",
        include_str!("../migrations/0008_anti_rollback.sql"),
    ),
    (
        9,
        "device_keys",
        include_str!("../migrations/0009_device_keys.sql"),
    ),
    (
        10,
        "enrollment_limits",
        include_str!("../migrations/0010_enrollment_limits.sql"),
    ),
    (
        11,
        "accounts",
        include_str!("../migrations/0011_accounts.sql"),
    ),
    (
        13,
        "audit_checkpoints",
        include_str!("../migrations/0013_audit_checkpoints.sql"),
    ),
    (
        14,
        "server_patches",
        include_str!("../migrations/0014_server_patches.sql"),
    ),
    (
        15,
        "fleet_pages",
        include_str!("../migrations/0015_fleet_pages.sql"),
    ),
];

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file.
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

/// The store: a pool, which backend it talks to, and the key that signs
/// the audit chain's checkpoints as entries are appended.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    audit_signer: Option<std::sync::Arc<crate::audit::checkpoint::Signer>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A random identifier (128 bits, hex).
pub fn new_id() -> Result<String> {
    Ok(hex::encode(random_bytes::<16>()?))
}

/// A random secret with a type prefix (256 bits, hex).
pub fn new_secret(prefix: &str) -> Result<String> {
    Ok(format!("{prefix}_{}", hex::encode(random_bytes::<32>()?)))
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    openssl::rand::rand_bytes(&mut buf).context("unable to get random bytes")?;
    Ok(buf)
}

/// SHA-256 of a secret, hex: what is stored for tokens and credentials.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl Store {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://...`).
    pub async fn connect(url: &str) -> Result<Self> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            bail!("unsupported database URL scheme in {url:?}: use sqlite:// or postgres://");
        };
        let mut options = AnyPoolOptions::new();
        options = match backend {
            // One writer at a time is what SQLite does anyway; a few
            // connections let readers proceed (WAL mode).
            Backend::Sqlite => options.max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 5000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            }),
            Backend::Postgres => options.max_connections(16),
        };
        let pool = options
            .connect(url)
            .await
            .with_context(|| format!("unable to connect to the database ({})", redact(url)))?;
        Ok(Store {
            pool,
            backend,
            audit_signer: None,
        })
    }

    /// Signs audit checkpoints with `signer` from now on.
    pub fn set_audit_signer(&mut self, signer: std::sync::Arc<crate::audit::checkpoint::Signer>) {
        self.audit_signer = Some(signer);
    }

    /// The audit checkpoint signer, if any.
    pub fn audit_signer(&self) -> Option<&crate::audit::checkpoint::Signer> {
        self.audit_signer.as_deref()
    }

    /// The pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies the migrations not yet applied, each in a transaction.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .context("unable to create schema_migrations")?;
        for (version, name, sql) in MIGRATIONS {
            let done: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM schema_migrations WHERE version = $1")
                    .bind(*version)
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("n")?;
            if done > 0 {
                continue;
            }
            let mut tx = self.pool.begin().await?;
            for statement in statements(sql) {
                sqlx::query(&statement)
                    .execute(&mut *tx)
                    .await
                    .with_context(|| {
                        format!("migration {version:04}_{name} failed at: {statement}")
                    })?;
            }
            sqlx::query(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            )
            .bind(*version)
            .bind(*name)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(version, name, "applied migration");
        }
        Ok(())
    }

    /// Begins a transaction that will write. On SQLite it takes the write
    /// lock up front (`BEGIN IMMEDIATE`), so a transaction that reads first
    /// waits for other writers (busy timeout) instead of failing with
    /// SQLITE_BUSY when it upgrades.
    pub async fn begin_write(&self) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Any>> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.pool.begin().await,
        }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Splits a migration into statements: `;` at the end of a line ends one;
/// `--` comment lines are dropped.
fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let stmt = current.trim().trim_end_matches(';').to_string();
            out.push(stmt);
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// A unique-constraint violation (either backend)?
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.is_unique_violation()
                || db
                    .code()
                    .is_some_and(|c| c == "23505" || c == "2067" || c == "1555")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_and_drops_comments() {
        let s = statements("-- c\nCREATE TABLE a (x TEXT);\nCREATE INDEX i\n ON a (x);\n");
        assert_eq!(
            s,
            vec!["CREATE TABLE a (x TEXT)", "CREATE INDEX i\n ON a (x)"]
        );
    }

    #[test]
    fn redacts_password() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }
}
