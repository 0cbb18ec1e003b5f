//! Operators and devices: argon2 password hashes, bearer tokens (stored as
//! SHA-256), roles, and the extractors that authenticate a request.

use anyhow::{Context, anyhow};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};

use crate::service::Error;
use crate::store::{Store, new_id, now_ms};

/// Operator roles, least to most powerful.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May read everything in the organisation.
    ReadOnly,
    /// May also upload releases, deploy, manage enrollment tokens and devices.
    Ops,
    /// May also manage users and the organisation's keyring.
    Admin,
}

impl Role {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read_only",
            Role::Ops => "ops",
            Role::Admin => "admin",
        }
    }

    /// Parses the database spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read_only" => Some(Role::ReadOnly),
            "ops" => Some(Role::Ops),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Hashes a password with argon2id, the argon2 crate's default parameters
/// and a random salt. The server hashes through [`crate::passwords::Hasher`]
/// (configured parameters, bounded concurrency).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; 16];
    openssl::rand::rand_bytes(&mut salt)?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| anyhow!("salt: {e}"))?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow!("unable to hash password: {e}"))?
        .to_string())
}

/// Checks a password against a stored hash (with the hash's own
/// parameters), unbounded: the server verifies through
/// [`crate::passwords::Hasher`].
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Creates a user, hashing `password` with the argon2 crate's defaults
/// (unbounded: the server's own paths hash through
/// [`crate::passwords::Hasher`] and [`insert_user`]); returns its id.
pub async fn create_user(
    store: &Store,
    org_id: &str,
    email: &str,
    password: &str,
    role: Role,
) -> anyhow::Result<String> {
    let password = password.to_string();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .context("hashing task failed")??;
    insert_user(store, org_id, email, &hash, role).await
}

/// Creates a user with a password hash already made (by
/// [`crate::passwords::Hasher`]); returns its id.
pub async fn insert_user(
    store: &Store,
    org_id: &str,
    email: &str,
    password_hash: &str,
    role: Role,
) -> anyhow::Result<String> {
    let id = new_id()?;
    sqlx::query(
        "INSERT INTO users (id, org_id, email, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(org_id)
    .bind(email)
    .bind(password_hash)
    .bind(role.as_str())
    .bind(now_ms())
    .execute(store.pool())
    .await?;
    Ok(id)
}

/// An authenticated operator.
#[derive(Debug, Clone)]
pub struct Operator {
    /// SHA-256 of the token used (for logout).
    pub token_hash: String,
    /// User id.
    pub user_id: String,
    /// Organisation id: every query is scoped to it.
    pub org_id: String,
    /// Email.
    pub email: String,
    /// Role.
    pub role: Role,
}

impl Operator {
    /// 403 unless the operator has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), Error> {
        if self.role >= role {
            Ok(())
        } else {
            Err(Error::Forbidden)
        }
    }

    /// How the audit log names this operator.
    pub fn actor(&self) -> String {
        format!("user:{}", self.email)
    }
}

/// The session cookie set by `POST /login` (for the web UI).
pub const SESSION_COOKIE: &str = "kernex_session";

/// An authenticated, non-revoked device.
#[derive(Debug, Clone)]
pub struct Device {
    /// Internal id (primary key).
    pub pk: String,
    /// Organisation id.
    pub org_id: String,
    /// The device's own id (unique per organisation).
    pub device_id: String,
    /// Enrolled under a TPM policy and credential activation not done: it
    /// may poll (to be refused) and activate, nothing else.
    pub unproven: bool,
}

impl Device {
    /// Refused (403) for a device that must prove its TPM first.
    pub fn require_proven(&self) -> crate::service::Result<()> {
        if self.unproven {
            return Err(crate::service::attestation::unproven());
        }
        Ok(())
    }
}
