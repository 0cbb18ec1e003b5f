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
    let mut conn = store.pool().acquire().await?;
    insert_user_in(&mut conn, org_id, email, password_hash, role).await
}

/// [`insert_user`] through `conn` (the caller's transaction).
pub async fn insert_user_in(
    conn: &mut sqlx::AnyConnection,
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
    .execute(conn)
    .await?;
    Ok(id)
}

/// An authenticated operator.
#[derive(Debug, Clone)]
pub struct Operator {
    /// SHA-256 of the token used (for logout).
    pub token_hash: String,
    /// An API token (automation), not a login session.
    pub api_token: bool,
    /// The password must be changed before anything else is allowed.
    pub must_change_password: bool,
    /// May manage the instance's organisations.
    pub instance_admin: bool,
    /// User id.
    pub user_id: String,
    /// Organisation id: every query is scoped to it.
    pub org_id: String,
    /// Email.
    pub email: String,
    /// Role.
    pub role: Role,
}

/// How a session or API token is named to list and revoke it: the first
/// 24 hex digits of its hash (never the secret, never the whole hash).
pub fn credential_id(token_hash: &str) -> &str {
    token_hash.get(..24).unwrap_or(token_hash)
}

#[derive(sqlx::FromRow)]
struct OperatorRow {
    id: String,
    org_id: String,
    email: String,
    role: String,
    kind: String,
    token_role: Option<String>,
    disabled: i64,
    must_change_password: i64,
    instance_admin: i64,
    org_disabled: i64,
}

/// The operator an operator token (`kxo_` session or `kxk_` API token)
/// authenticates, read from the store on every request: a role change, a
/// disabled user or organisation, a revoked token take effect at once.
/// [`Error::Unauthorized`] for an unknown, expired or revoked token, or a
/// disabled user; [`Error::Refused`] for a disabled organisation.
pub async fn authenticate(store: &Store, token: &str) -> Result<Operator, Error> {
    if !token.starts_with("kxo_") && !token.starts_with("kxk_") {
        return Err(Error::Unauthorized);
    }
    let hash = crate::store::secret_hash(token);
    let row = sqlx::query_as::<_, OperatorRow>(
        "SELECT u.id, u.org_id, u.email, u.role, t.kind, t.role AS token_role, u.disabled, \
         u.must_change_password, u.instance_admin, o.disabled AS org_disabled \
         FROM api_tokens t JOIN users u ON u.id = t.user_id JOIN organizations o ON o.id = u.org_id \
         WHERE t.token_hash = $1 AND t.revoked = 0 AND t.expires_at > $2",
    )
    .bind(&hash)
    .bind(now_ms())
    .fetch_optional(store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    if row.disabled != 0 {
        return Err(Error::Unauthorized);
    }
    if row.org_disabled != 0 {
        return Err(Error::Refused("your organisation is disabled".into()));
    }
    let role = Role::parse(&row.role)
        .ok_or_else(|| Error::Internal(anyhow!("unknown role {:?} in the database", row.role)))?;
    let api_token = row.kind == "api";
    // An API token acts with its own role, never above its user's current one.
    let role = match row.token_role.as_deref().and_then(Role::parse) {
        Some(cap) if api_token => role.min(cap),
        _ => role,
    };
    Ok(Operator {
        token_hash: hash,
        api_token,
        must_change_password: row.must_change_password != 0,
        instance_admin: row.instance_admin != 0 && !api_token,
        user_id: row.id,
        org_id: row.org_id,
        email: row.email,
        role,
    })
}

/// The refusal for an operator who must change the password first.
pub fn must_change_password() -> Error {
    Error::Refused(
        "you must change your password before anything else: POST /api/v1/account/password \
         (or the web UI's account page)"
            .into(),
    )
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
    /// The access token's expiry, unix ms; `None`: a long-lived bearer
    /// credential (a device not yet on its key).
    pub expires_at: Option<i64>,
}

impl Device {
    /// Whether the credential that authenticated it has expired at `now`
    /// (unix ms): a cached entry must not outlive its token.
    pub fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Refused (403) for a device that must prove its TPM first.
    pub fn require_proven(&self) -> crate::service::Result<()> {
        if self.unproven {
            return Err(crate::service::attestation::unproven());
        }
        Ok(())
    }
}
