//! The Kernex control plane: device enrollment, releases, deployments and
//! the audit log, over an HTTP API (`http::app`) backed by a sqlx store
//! (SQLite or PostgreSQL) and an object store for bundles.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod blobs;
pub mod config;
pub mod credentials;
pub mod http;
pub mod last_seen;
pub mod limits;
pub mod passwords;
pub mod poll_cache;
pub mod retention;
pub mod serve;
pub mod service;
pub mod store;
pub mod tls;
pub mod ui;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use sqlx::Row;

use crate::blobs::Blobs;
use crate::config::Config;
use crate::store::{Store, new_id, now_ms};

/// What every handler shares, behind one `Arc`: axum clones the state for
/// every extractor and middleware of every request, so a clone is one
/// reference count.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
#[derive(Debug)]
pub struct Shared {
    /// The database.
    pub store: Store,
    /// The blob store.
    pub blobs: Blobs,
    /// Upload spool directory.
    pub spool: PathBuf,
    /// Limits and timings.
    pub config: Arc<Config>,
    /// Request metrics.
    pub metrics: Arc<http::metrics::Metrics>,
    /// Per-caller rate limits.
    pub limits: Arc<service::rate_limit::RateLimiter>,
    /// Enrollments per token and per source address.
    pub admission: Arc<service::admission::Admission>,
    /// Where "now" comes from for rollouts and the device API (a manual
    /// clock with `test-clock = true`).
    pub clock: Arc<dyn service::rollouts::time::Clock>,
    /// Bundle bytes served per second (the HTTP layer's egress count).
    pub egress: Arc<service::rollouts::time::EgressMeter>,
    /// This replica's name in the scheduler lease.
    pub instance_id: String,
    /// Poll times not yet written to the store (write-behind).
    pub last_seen: Arc<last_seen::LastSeen>,
    /// Device credentials recently seen (revocation drops them).
    pub credentials: Arc<credentials::CredentialCache>,
    /// What devices' polls read, until a write drops it.
    pub poll_cache: Arc<poll_cache::PollCache>,
    /// The TPM vendor CAs an EK certificate must chain to
    /// (`tpm-cert-store`); none: any TPM is accepted.
    pub ek_cas: Option<Arc<kernex_attest::EkCaStore>>,
    /// Password hashing, bounded (`[login]`).
    pub passwords: Arc<passwords::Hasher>,
    /// Failed logins, per account and address (`[login]`).
    pub login_throttle: Arc<service::login_throttle::LoginThrottle>,
    /// Device-triggered audit entries, coalesced per device.
    pub audit_coalescer: Arc<audit::coalesce::Coalescer>,
}

impl AppState {
    /// Opens the store (migrating it) and the blob store for `config`.
    pub async fn open(config: Config) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!(
                "unable to create the data directory {}",
                config.data_dir.display()
            )
        })?;
        let ek_cas = config.ek_ca_store()?.map(Arc::new);
        let passwords = Arc::new(passwords::Hasher::new(config.login.hashing())?);
        if let Some(cas) = &ek_cas {
            tracing::info!(
                anchors = cas.anchors(),
                intermediates = cas.intermediates(),
                files = cas.sources().len(),
                "TPM enrollment requires an EK certificate from a trusted TPM vendor CA"
            );
        }
        let mut store = Store::connect(&config.database_url()).await?;
        store.migrate().await?;
        store.set_audit_signer(Arc::new(audit::checkpoint::Signer::load_or_create(
            &config.data_dir,
            config.audit_checkpoint_entries,
            config.audit_checkpoint_minutes,
        )?));
        let blobs = config.blobs()?;
        let spool = config.spool_dir();
        std::fs::create_dir_all(&spool)
            .with_context(|| format!("unable to create {}", spool.display()))?;
        let shared = store.backend() == store::Backend::Postgres;
        Ok(AppState(Arc::new(Shared {
            store,
            blobs,
            spool,
            metrics: Arc::new(http::metrics::Metrics::new()),
            limits: Arc::new(service::rate_limit::RateLimiter::default()),
            admission: Arc::new(service::admission::Admission::default()),
            clock: if config.test_clock {
                Arc::new(service::rollouts::time::ManualClock::new(now_ms()))
            } else {
                Arc::new(service::rollouts::time::SystemClock)
            },
            egress: Arc::new(service::rollouts::time::EgressMeter::default()),
            instance_id: new_id()?,
            last_seen: Arc::new(last_seen::LastSeen::for_offline_after(
                config.offline_after_secs,
            )),
            credentials: Arc::new(credentials::CredentialCache::default()),
            // Shared with other replicas: off until `poll_cache::listen`
            // hears their changes.
            poll_cache: Arc::new(poll_cache::PollCache::new(!shared)),
            ek_cas,
            passwords,
            login_throttle: Arc::new(service::login_throttle::LoginThrottle::new(
                config.login.throttle(),
            )),
            audit_coalescer: Arc::new(audit::coalesce::Coalescer::new(
                config.audit_device_coalesce_secs,
            )),
            config: Arc::new(config),
        })))
    }
}

/// The first admin, created on first start.
#[derive(Debug)]
pub struct FirstAdmin {
    /// Organisation name.
    pub organization: String,
    /// Email.
    pub email: String,
    /// One-time password: shown once, stored only as an argon2 hash, and
    /// it must be changed at first login.
    pub password: String,
}

/// Creates the default organisation and its admin when the database has no
/// organisation yet. Returns the admin's password the one time it is made.
pub async fn bootstrap(state: &AppState) -> Result<Option<FirstAdmin>> {
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM organizations")
        .fetch_one(state.store.pool())
        .await?
        .try_get("n")?;
    if n > 0 {
        return Ok(None);
    }
    let org = &state.config.default_organization;
    // The instance admin: the default organisation's admin, who must
    // change this password before anything else. The organisation, the
    // admin and the audit entry commit together.
    let (_, password) =
        service::orgs::bootstrap_first_org(&state.store, org, &state.config.admin_email)
            .await
            .map_err(|e| {
                anyhow::anyhow!("unable to create the first organisation and admin: {e}")
            })?;
    Ok(Some(FirstAdmin {
        organization: org.clone(),
        email: state.config.admin_email.clone(),
        password,
    }))
}

/// Creates an organisation; returns its id.
pub async fn create_organization(store: &Store, name: &str) -> Result<String> {
    let id = new_id()?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO organizations (id, name, metadata, created_at, updated_at) VALUES ($1, $2, '{}', $3, $3)",
    )
    .bind(&id)
    .bind(name)
    .bind(now)
    .execute(store.pool())
    .await
    .with_context(|| format!("unable to create organisation {name:?}"))?;
    Ok(id)
}
