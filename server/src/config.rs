//! Server configuration: a TOML file (kebab-case keys, see
//! `server.example.toml`), overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

/// Everything the server needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory: the SQLite file and the local blob store live here.
    pub data_dir: PathBuf,
    /// Database URL; default `sqlite://<data-dir>/kernex.db`.
    pub database_url: Option<String>,
    /// Blob store: unset for `<data-dir>/blobs`, or `s3://BUCKET`.
    pub blob_store: Option<String>,
    /// S3 endpoint for S3-compatible servers (default: AWS_ENDPOINT or AWS).
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION or us-east-1).
    pub s3_region: Option<String>,
    /// S3 access key id (default: AWS_ACCESS_KEY_ID).
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key (default: AWS_SECRET_ACCESS_KEY).
    pub s3_secret_access_key: Option<String>,
    /// Allow an `http://` S3 endpoint.
    pub s3_allow_http: bool,
    /// Lifetime of presigned download URLs, in seconds.
    pub presign_ttl_secs: u64,
    /// Largest release bundle accepted, in bytes.
    pub max_bundle_bytes: u64,
    /// Largest JSON request body, in bytes.
    pub max_json_bytes: usize,
    /// A device with no contact for this many seconds is shown offline.
    pub offline_after_secs: u64,
    /// Heartbeats older than this many days are deleted.
    pub heartbeat_retention_days: u32,
    /// Device log lines older than this many days are deleted.
    pub log_retention_days: u32,
    /// Requests per minute one device may make (0: unlimited).
    pub device_requests_per_minute: u32,
    /// Requests per minute one operator may make (0: unlimited).
    pub user_requests_per_minute: u32,
    /// Bundle uploads per minute one operator may make (0: unlimited).
    pub uploads_per_minute: u32,
    /// Lifetime of an operator bearer token, in seconds.
    pub token_ttl_secs: u64,
    /// Lifetime of a device access token, in seconds (1 to 86400): a
    /// device signs a server nonce with its key for a new one, so a token
    /// that leaks is useless after this long.
    pub device_token_secs: u64,
    /// Accept enrollments without a device key (updaters older than
    /// device keys): such a device gets a long-lived bearer credential
    /// until it registers a key. Off: those enrollments are refused.
    pub legacy_device_credentials: bool,
    /// Name of the organisation created on first start.
    pub default_organization: String,
    /// Email of the admin user created on first start.
    pub admin_email: String,
    /// Milliseconds between rollout scheduler passes (0: no scheduler).
    pub scheduler_interval_ms: u64,
    /// Build chunk patches for devices on releases the new bundle carries
    /// no patch from (`service::patches`), and offer them when cheaper.
    pub server_patches: bool,
    /// Lifetime of the scheduler lease, seconds: another replica takes
    /// over this long after the holder stops renewing it.
    pub scheduler_lease_secs: u64,
    /// Poll hint, seconds, for devices a rollout is acting on: next in
    /// line for a download window, holding one or installing; committed
    /// devices get twice this (so that a rollback reaches them that
    /// fast). Sent as the
    /// `Kernex-Poll-After` header (and `poll_after_secs` in a 200); a
    /// device only ever polls sooner than its own interval because of it.
    /// 0: no hint.
    pub rollout_poll_secs: u64,
    /// How long after a rollout completed its committed devices keep the
    /// rollout poll hint, seconds (a rollback of a completed rollout
    /// reaches them within `rollout-poll-secs` during this time).
    pub rollback_watch_secs: u64,
    /// Serve HTTPS with this certificate chain (PEM); with `tls-key`.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// An attestation older than this is shown as stale, and the device is
    /// asked for a fresh quote after half of it.
    pub attestation_max_age_secs: u64,
    /// The TPM vendors' CA certificates trusted for EK certificates
    /// (Keylime's `tpm_cert_store`): PEM (or DER) files, or directories of
    /// them. Set: a TPM identity is accepted only when its EK certificate
    /// (from the TPM's NV) chains to one of them and certifies the EK, or
    /// when the factory line pre-authorised that very EK. Empty (the
    /// default): any TPM that passes credential activation, a software TPM
    /// (swtpm) included.
    pub tpm_cert_store: Vec<PathBuf>,
    /// Limits on enrollment and on what one device may store
    /// (`[limits]`; see `server/README.md`, "Limits").
    pub limits: crate::limits::Limits,
    /// A manual server clock, stepped through `POST /api/v1/test/clock`,
    /// for the fleet simulator and tests. Never enable in production.
    pub test_clock: bool,
    /// An `Idempotency-Key` still in progress after this long (its request
    /// crashed or the server restarted) is taken over by the next request
    /// with it, seconds.
    pub idempotency_in_progress_secs: u64,
    /// The instance signs each organisation's audit chain head every this
    /// many entries (0: never by count).
    pub audit_checkpoint_entries: u64,
    /// ... or at the first entry this many minutes after the last signed
    /// checkpoint (0: never by time).
    pub audit_checkpoint_minutes: u64,
    /// Device-triggered audit entries (enrollment, attestation) of one
    /// device, action and outcome are written at most once per this many
    /// seconds; repeats in between are counted into the next entry
    /// (0: every one is written).
    pub audit_device_coalesce_secs: u64,
    /// `/metrics` answers only `Authorization: Bearer <this>` when set.
    pub metrics_token: Option<String>,
    /// Login throttling and password hashing (`[login]`).
    pub login: LoginConfig,
}

/// `[login]`: the login throttle (`service::login_throttle`) and password
/// hashing (`passwords`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct LoginConfig {
    /// Failed logins per (account, address) before backoff starts.
    pub free_attempts: u32,
    /// Failed logins per (account, address) that lock that pair.
    pub lockout_after: u32,
    /// How long a lockout lasts; failures are forgotten this long after the
    /// last one.
    pub lockout_secs: u64,
    /// The first backoff step, doubled with every further failure.
    pub backoff_base_ms: u64,
    /// Failed logins per address (any account) before backoff starts.
    pub address_free_attempts: u32,
    /// Failed logins per account (any address) before backoff starts.
    pub account_free_attempts: u32,
    /// Longest backoff per account (bounds what others can do to it).
    pub account_max_backoff_secs: u64,
    /// Throttle entries kept in memory.
    pub throttle_max_entries: usize,
    /// argon2id memory per hash, KiB (new hashes; stored ones keep theirs).
    pub argon2_m_kib: u32,
    /// argon2id passes.
    pub argon2_t: u32,
    /// argon2id lanes.
    pub argon2_p: u32,
    /// Password hashes at once (0: twice the cores).
    pub hash_concurrency: usize,
    /// How long a login waits for a hashing slot before 429.
    pub hash_queue_ms: u64,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            free_attempts: 5,
            lockout_after: 20,
            lockout_secs: 900,
            backoff_base_ms: 1000,
            address_free_attempts: 20,
            account_free_attempts: 20,
            account_max_backoff_secs: 60,
            throttle_max_entries: 100_000,
            argon2_m_kib: 19 * 1024,
            argon2_t: 2,
            argon2_p: 1,
            hash_concurrency: 0,
            hash_queue_ms: 2000,
        }
    }
}

impl LoginConfig {
    /// The throttle's settings.
    pub fn throttle(&self) -> crate::service::login_throttle::Settings {
        crate::service::login_throttle::Settings {
            free_attempts: self.free_attempts,
            lockout_after: self.lockout_after.max(self.free_attempts),
            lockout: Duration::from_secs(self.lockout_secs),
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            address_free_attempts: self.address_free_attempts,
            account_free_attempts: self.account_free_attempts,
            account_max_backoff: Duration::from_secs(self.account_max_backoff_secs),
            max_entries: self.throttle_max_entries.max(16),
        }
    }

    /// The hasher's settings.
    pub fn hashing(&self) -> crate::passwords::Settings {
        crate::passwords::Settings {
            m_kib: self.argon2_m_kib,
            t: self.argon2_t,
            p: self.argon2_p,
            concurrency: self.hash_concurrency,
            queue: Duration::from_millis(self.hash_queue_ms),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("kernex-data"),
            database_url: None,
            blob_store: None,
            s3_endpoint: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_allow_http: false,
            presign_ttl_secs: 3600,
            max_bundle_bytes: 8 << 30,
            max_json_bytes: 256 << 10,
            offline_after_secs: 30 * 60,
            heartbeat_retention_days: 7,
            log_retention_days: 30,
            device_requests_per_minute: 100,
            user_requests_per_minute: 1000,
            uploads_per_minute: 10,
            token_ttl_secs: 12 * 3600,
            device_token_secs: 15 * 60,
            legacy_device_credentials: true,
            default_organization: "default".into(),
            admin_email: "admin@localhost".into(),
            scheduler_interval_ms: 2000,
            server_patches: true,
            scheduler_lease_secs: 15,
            rollout_poll_secs: 5,
            rollback_watch_secs: 30 * 60,
            tls_cert: None,
            tls_key: None,
            attestation_max_age_secs: 24 * 3600,
            tpm_cert_store: Vec::new(),
            limits: crate::limits::Limits::default(),
            test_clock: false,
            metrics_token: None,
            login: LoginConfig::default(),
            idempotency_in_progress_secs: 300,
            audit_checkpoint_entries: 100,
            audit_checkpoint_minutes: 10,
            audit_device_coalesce_secs: 60,
        }
    }
}

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).context("invalid server configuration")?;
        if !(1..=86_400).contains(&config.device_token_secs) {
            anyhow::bail!(
                "device-token-secs = {}: must be 1 to 86400",
                config.device_token_secs
            );
        }
        Ok(config)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("unable to read {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The database URL to use.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("kernex.db").display()
            ),
        }
    }

    /// The local blob directory.
    pub fn blob_dir(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }

    /// Opens the configured blob store.
    pub fn blobs(&self) -> Result<crate::blobs::Blobs> {
        match &self.blob_store {
            None => crate::blobs::Blobs::local(&self.blob_dir()),
            Some(url) => {
                let bucket = url
                    .strip_prefix("s3://")
                    .map(|b| b.trim_end_matches('/'))
                    .filter(|b| !b.is_empty() && !b.contains('/'))
                    .with_context(|| format!("blob-store {url:?}: expected s3://BUCKET"))?;
                crate::blobs::Blobs::s3(&crate::blobs::S3Settings {
                    bucket: bucket.to_string(),
                    endpoint: self.s3_endpoint.clone(),
                    region: self.s3_region.clone(),
                    access_key_id: self.s3_access_key_id.clone(),
                    secret_access_key: self.s3_secret_access_key.clone(),
                    allow_http: self.s3_allow_http,
                })
            }
        }
    }

    /// Loads the trusted EK CAs, when `tpm-cert-store` is set.
    pub fn ek_ca_store(&self) -> Result<Option<kernex_attest::EkCaStore>> {
        if self.tpm_cert_store.is_empty() {
            return Ok(None);
        }
        let store = kernex_attest::EkCaStore::load(&self.tpm_cert_store)
            .context("unable to load the TPM vendor CA certificates (tpm-cert-store)")?;
        Ok(Some(store))
    }

    /// Where uploads are spooled before they are verified.
    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }
}
