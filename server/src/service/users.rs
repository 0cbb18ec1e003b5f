//! Operators: login and logout, the organisation's users and roles, and
//! its keyring (the CAs release bundles must chain to).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit::Audited;
use super::{Error, Result};
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::store::{new_secret, now_ms, secret_hash};

/// 403 unless the operator has at least `role`.
pub fn require(op: &Operator, role: Role) -> Result<()> {
    if op.role >= role {
        Ok(())
    } else {
        Err(Error::Forbidden)
    }
}

/// Login request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Organisation name; default: the server's default organisation.
    pub organization: Option<String>,
    /// Email.
    pub email: String,
    /// Password.
    pub password: String,
}

/// A bearer token for `Authorization: Bearer <token>`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// The token (shown once).
    pub token: String,
    /// Expiry, unix ms.
    pub expires_at: i64,
    /// The operator's role.
    pub role: Role,
    /// Until the password is changed (`POST /api/v1/account/password`),
    /// every other call answers 403.
    pub must_change_password: bool,
}

#[derive(sqlx::FromRow)]
struct Credentials {
    id: String,
    password_hash: String,
    role: String,
    must_change_password: i64,
}

/// Checks email and password and issues a token (401 when they do not
/// match, with the same timing as when they do). Unthrottled: callers go
/// through `login_throttle::login`.
pub async fn login(state: &AppState, req: LoginRequest) -> Result<LoginResponse> {
    let org = req
        .organization
        .unwrap_or_else(|| state.config.default_organization.clone());
    let row = sqlx::query_as::<_, Credentials>(
        "SELECT u.id, u.password_hash, u.role, u.must_change_password FROM users u JOIN organizations o ON o.id = u.org_id WHERE o.name = $1 AND u.email = $2 AND u.disabled = 0 AND o.disabled = 0",
    )
    .bind(&org)
    .bind(&req.email)
    .fetch_optional(state.store.pool())
    .await?;
    // Hash even when the user is unknown, so timing does not tell.
    let (user_id, hash, role, must_change_password) = match row {
        Some(r) => (
            Some(r.id),
            Some(r.password_hash),
            r.role,
            r.must_change_password != 0,
        ),
        None => (None, None, String::new(), false),
    };
    let ok = state
        .passwords
        .verify(&req.password, hash.as_deref())
        .await?;
    let (Some(user_id), true) = (user_id, ok) else {
        return Err(Error::Unauthorized);
    };
    let role = Role::parse(&role).ok_or(Error::Unauthorized)?;
    let token = new_secret("kxo")?;
    let now = now_ms();
    let ttl = i64::try_from(state.config.token_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let expires_at = now.saturating_add(ttl);
    sqlx::query(
        "INSERT INTO api_tokens (token_hash, user_id, created_at, expires_at, revoked) VALUES ($1, $2, $3, $4, 0)",
    )
    .bind(secret_hash(&token))
    .bind(&user_id)
    .bind(now)
    .bind(expires_at)
    .execute(state.store.pool())
    .await?;
    Ok(LoginResponse {
        token,
        expires_at,
        role,
        must_change_password,
    })
}

/// Ends the operator's session: the token stops working.
pub async fn logout(state: &AppState, op: &Operator) -> Result<()> {
    sqlx::query("UPDATE api_tokens SET revoked = 1 WHERE token_hash = $1")
        .bind(&op.token_hash)
        .execute(state.store.pool())
        .await?;
    Ok(())
}

/// A new user.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// Email, unique in the organisation.
    pub email: String,
    /// Initial password (at least 12 characters).
    pub password: String,
    /// Role.
    pub role: Role,
}

/// A user.
#[derive(Debug, Serialize, ToSchema)]
pub struct User {
    /// Id.
    pub id: String,
    /// Email.
    pub email: String,
    /// Role.
    pub role: Role,
    /// Disabled: every session and token is refused, login too.
    pub disabled: bool,
    /// Must change the password before anything else.
    pub must_change_password: bool,
}

/// Creates a user in the operator's organisation (admin).
pub async fn create_user(state: &AppState, op: &Operator, req: NewUser) -> Result<User> {
    require(op, Role::Admin)?;
    let target = format!("user:{}", req.email);
    let prepare = async {
        if req.password.chars().count() < 12 {
            return Err(Error::Invalid(
                "password must have at least 12 characters".into(),
            ));
        }
        if req.email.is_empty() || req.email.len() > 254 {
            return Err(Error::Invalid("email must have 1 to 254 characters".into()));
        }
        // Hashed before the transaction: argon2 is slow.
        state.passwords.hash(&req.password).await
    };
    let audit_target = &target;
    let audit = Audited::new(state, op, "user.create", audit_target);
    let hash = match prepare.await {
        Ok(prepared) => prepared,
        Err(e) => return audit.fail(e).await,
    };
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let id = crate::store::new_id()?;
        let inserted = sqlx::query(
            "INSERT INTO users (id, org_id, email, password_hash, role, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(&op.org_id)
        .bind(&req.email)
        .bind(&hash)
        .bind(req.role.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if crate::store::is_unique_violation(&e) => {
                return Err(Error::Conflict(format!(
                    "user {} already exists",
                    req.email
                )));
            }
            Err(e) => return Err(e.into()),
        }
        Ok((
            User {
                id,
                email: req.email.clone(),
                role: req.role,
                disabled: false,
                must_change_password: false,
            },
            String::new(),
        ))
    }
    .await;
    audit.finish(tx, outcome).await
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: String,
    email: String,
    role: String,
    disabled: i64,
    must_change_password: i64,
}

/// The organisation's users, by email.
pub async fn list_users(state: &AppState, op: &Operator) -> Result<Vec<User>> {
    let rows = sqlx::query_as::<_, UserRow>(
        "SELECT id, email, role, disabled, must_change_password FROM users WHERE org_id = $1 ORDER BY email",
    )
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| User {
            id: r.id,
            email: r.email,
            role: Role::parse(&r.role).unwrap_or(Role::ReadOnly),
            disabled: r.disabled != 0,
            must_change_password: r.must_change_password != 0,
        })
        .collect())
}

/// The organisation's keyring: CA certificates (PEM) that release bundles
/// must chain to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Keyring {
    /// PEM text, one or more certificates.
    pub pem: String,
}

/// Replaces the keyring (admin); 422 when the PEM holds no usable CA.
pub async fn set_keyring(state: &AppState, op: &Operator, keyring: Keyring) -> Result<()> {
    require(op, Role::Admin)?;
    let audit_target = "org";
    let audit = Audited::new(state, op, "keyring.set", audit_target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        kernex_protocol::signature::Keyring::from_pem(keyring.pem.as_bytes())
            .map_err(|e| Error::Unprocessable(e.to_string()))?;
        sqlx::query("UPDATE organizations SET keyring_pem = $1, updated_at = $2 WHERE id = $3")
            .bind(&keyring.pem)
            .bind(now_ms())
            .bind(&op.org_id)
            .execute(&mut *tx)
            .await?;
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await
}

/// The keyring's PEM text, `None` when none is set.
pub async fn keyring_pem(state: &AppState, org_id: &str) -> Result<Option<String>> {
    let (pem,): (Option<String>,) =
        sqlx::query_as("SELECT keyring_pem FROM organizations WHERE id = $1")
            .bind(org_id)
            .fetch_one(state.store.pool())
            .await?;
    Ok(pem)
}

/// The keyring (404 when none is set).
pub async fn keyring(state: &AppState, op: &Operator) -> Result<Keyring> {
    keyring_pem(state, &op.org_id)
        .await?
        .map(|pem| Keyring { pem })
        .ok_or(Error::NotFound("no keyring set"))
}

/// A CA certificate of the keyring, as operators see it.
#[derive(Debug)]
pub struct Certificate {
    /// Subject, `key=value, ...`.
    pub subject: String,
    /// Issuer, `key=value, ...`.
    pub issuer: String,
    /// Expiry, as OpenSSL prints it.
    pub not_after: String,
    /// Hex SHA-256 fingerprint.
    pub sha256: String,
}

fn name(n: &openssl::x509::X509NameRef) -> String {
    n.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_default();
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn certificates(pem: &str) -> Vec<Certificate> {
    openssl::x509::X509::stack_from_pem(pem.as_bytes())
        .unwrap_or_default()
        .iter()
        .map(|c| Certificate {
            subject: name(c.subject_name()),
            issuer: name(c.issuer_name()),
            not_after: c.not_after().to_string(),
            sha256: c
                .digest(openssl::hash::MessageDigest::sha256())
                .map(|d| hex::encode(d.as_ref()))
                .unwrap_or_default(),
        })
        .collect()
}

/// The keyring's certificates (none when no keyring is set).
pub async fn keyring_certificates(state: &AppState, op: &Operator) -> Result<Vec<Certificate>> {
    Ok(keyring_pem(state, &op.org_id)
        .await?
        .as_deref()
        .map(certificates)
        .unwrap_or_default())
}
