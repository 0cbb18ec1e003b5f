//! Accounts with a lifecycle: an operator changes their own password
//! (which ends their other sessions); an admin changes a user's role,
//! disables, re-enables and deletes users, and lists and revokes any of
//! their sessions and API tokens; API tokens for automation (a name, a
//! role no higher than the creator's, a required expiry). Every change is
//! audited. Sessions and tokens are read from the store on every request
//! (`auth::authenticate`), so each change holds from the next request on.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit::Audited;
use super::{Error, Result};
use crate::AppState;
use crate::auth::{self, Operator, Role, credential_id};
use crate::store::{new_secret, now_ms, secret_hash};

/// Passwords: at least this many characters.
pub const MIN_PASSWORD: usize = 12;
/// Passwords: at most this many bytes (bounds the hashing work).
pub const MAX_PASSWORD: usize = 1024;
/// API tokens live at most this many days.
pub const MAX_TOKEN_DAYS: u32 = 366;

/// Checks a new password's length.
pub fn check_password(password: &str) -> Result<()> {
    if password.chars().count() < MIN_PASSWORD {
        return Err(Error::Invalid(format!(
            "password must have at least {MIN_PASSWORD} characters"
        )));
    }
    if password.len() > MAX_PASSWORD {
        return Err(Error::Invalid(format!(
            "password must have at most {MAX_PASSWORD} bytes"
        )));
    }
    Ok(())
}

/// A password change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    /// The current password.
    pub current_password: String,
    /// The new one (at least 12 characters, not the current one).
    pub new_password: String,
}

/// Changes the operator's own password (the current one is required) and
/// revokes their other sessions; this session stays. Clears the
/// must-change-password gate. Not with an API token.
pub async fn change_password(state: &AppState, op: &Operator, req: PasswordChange) -> Result<()> {
    let target = format!("user:{}", op.email);
    let audit = Audited::new(state, op, "user.password.change", &target);
    // Checking the current password and hashing the new one are slow: before
    // the transaction.
    let prepare = async {
        if op.api_token {
            return Err(Error::Refused(
                "an API token cannot change a password; log in".into(),
            ));
        }
        check_password(&req.new_password)?;
        if req.new_password == req.current_password {
            return Err(Error::Invalid(
                "the new password must differ from the current one".into(),
            ));
        }
        let (stored,): (String,) = sqlx::query_as("SELECT password_hash FROM users WHERE id = $1")
            .bind(&op.user_id)
            .fetch_one(state.store.pool())
            .await?;
        if !state
            .passwords
            .verify(&req.current_password, Some(&stored))
            .await?
        {
            return Err(Error::Refused("the current password is wrong".into()));
        }
        Ok((stored, state.passwords.hash(&req.new_password).await?))
    };
    let (stored, new_hash) = match prepare.await {
        Ok(prepared) => prepared,
        Err(e) => return audit.fail(e).await,
    };
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        // Only over the hash that was verified: a change in between wins.
        let done = sqlx::query(
            "UPDATE users SET password_hash = $1, must_change_password = 0 WHERE id = $2 AND password_hash = $3",
        )
        .bind(&new_hash)
        .bind(&op.user_id)
        .bind(&stored)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(
                "the password changed meanwhile; try again".into(),
            ));
        }
        sqlx::query(
            "UPDATE api_tokens SET revoked = 1 WHERE user_id = $1 AND kind = 'session' AND token_hash <> $2",
        )
        .bind(&op.user_id)
        .bind(&op.token_hash)
        .execute(&mut *tx)
        .await?;
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await?;
    tracing::info!(user = %op.email, "password changed; other sessions revoked");
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Target {
    id: String,
    email: String,
    role: String,
    disabled: i64,
}

/// The user `id` of the operator's organisation, read through `db` (the
/// pool, or an audited change's transaction).
async fn target<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    op: &Operator,
    id: &str,
) -> Result<Target> {
    sqlx::query_as::<_, Target>(
        "SELECT id, email, role, disabled FROM users WHERE id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(&op.org_id)
    .fetch_optional(db)
    .await?
    .ok_or(Error::NotFound("no such user"))
}

/// Refuses to take away the organisation's last enabled admin; reads
/// through the change's transaction, after locking the organisation's
/// row: two admins demoting each other at once are serialised (on
/// PostgreSQL the second counts after the first commits; SQLite's write
/// transactions are serialised already).
async fn keep_an_admin(tx: &mut sqlx::AnyConnection, op: &Operator, t: &Target) -> Result<()> {
    if t.role != Role::Admin.as_str() || t.disabled != 0 {
        return Ok(());
    }
    sqlx::query("UPDATE organizations SET updated_at = updated_at WHERE id = $1")
        .bind(&op.org_id)
        .execute(&mut *tx)
        .await?;
    let (others,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM users WHERE org_id = $1 AND role = 'admin' AND disabled = 0 AND id <> $2",
    )
    .bind(&op.org_id)
    .bind(&t.id)
    .fetch_one(&mut *tx)
    .await?;
    if others == 0 {
        return Err(Error::Conflict(
            "this is the organisation's last enabled admin".into(),
        ));
    }
    Ok(())
}

fn not_yourself(op: &Operator, t: &Target, what: &str) -> Result<()> {
    if t.id == op.user_id {
        return Err(Error::Conflict(format!(
            "you cannot {what} yourself; another admin can"
        )));
    }
    Ok(())
}

/// An admin's change to a user; absent fields stay.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    /// The new role.
    pub role: Option<Role>,
    /// Disable (true: every session and token is revoked, login refused)
    /// or re-enable (false).
    pub disabled: Option<bool>,
}

/// Changes a user's role and/or disables or re-enables them (admin). Not
/// yourself, and never the organisation's last enabled admin.
pub async fn update_user(
    state: &AppState,
    op: &Operator,
    id: &str,
    req: UserUpdate,
) -> Result<super::users::User> {
    auth::Operator::require(op, Role::Admin)?;
    let label = format!("user:{}", target(state.store.pool(), op, id).await?.email);
    if let Some(role) = req.role {
        let audit = Audited::new(state, op, "user.role", &label);
        let mut tx = audit.begin().await?;
        let outcome: Result<_> = async {
            let t = target(&mut *tx, op, id).await?;
            not_yourself(op, &t, "change the role of")?;
            if role != Role::Admin {
                keep_an_admin(&mut tx, op, &t).await?;
            }
            sqlx::query("UPDATE users SET role = $1 WHERE id = $2")
                .bind(role.as_str())
                .bind(&t.id)
                .execute(&mut *tx)
                .await?;
            Ok(((), format!("{label} role={}", role.as_str())))
        }
        .await;
        audit.finish(tx, outcome).await?;
    }
    if let Some(disabled) = req.disabled {
        let action = if disabled {
            "user.disable"
        } else {
            "user.enable"
        };
        let audit = Audited::new(state, op, action, &label);
        let mut tx = audit.begin().await?;
        let outcome: Result<_> = async {
            // Read again in the transaction: the role may have just changed.
            let t = target(&mut *tx, op, id).await?;
            not_yourself(op, &t, "disable or enable")?;
            if disabled {
                keep_an_admin(&mut tx, op, &t).await?;
            }
            sqlx::query("UPDATE users SET disabled = $1 WHERE id = $2")
                .bind(i64::from(disabled))
                .bind(&t.id)
                .execute(&mut *tx)
                .await?;
            if disabled {
                sqlx::query("UPDATE api_tokens SET revoked = 1 WHERE user_id = $1")
                    .bind(&t.id)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(((), String::new()))
        }
        .await;
        audit.finish(tx, outcome).await?;
    }
    user(state, op, id).await
}

/// One user of the operator's organisation.
pub async fn user(state: &AppState, op: &Operator, id: &str) -> Result<super::users::User> {
    super::users::list_users(state, op)
        .await?
        .into_iter()
        .find(|u| u.id == id)
        .ok_or(Error::NotFound("no such user"))
}

/// Deletes a user and every session and token of theirs (admin). Not
/// yourself, and never the organisation's last enabled admin. The audit
/// log keeps their email.
pub async fn delete_user(state: &AppState, op: &Operator, id: &str) -> Result<()> {
    auth::Operator::require(op, Role::Admin)?;
    let label = format!("user:{}", target(state.store.pool(), op, id).await?.email);
    let audit = Audited::new(state, op, "user.delete", &label);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let t = target(&mut *tx, op, id).await?;
        not_yourself(op, &t, "delete")?;
        keep_an_admin(&mut tx, op, &t).await?;
        sqlx::query("DELETE FROM api_tokens WHERE user_id = $1")
            .bind(&t.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM users WHERE id = $1 AND org_id = $2")
            .bind(&t.id)
            .bind(&op.org_id)
            .execute(&mut *tx)
            .await?;
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await
}

/// What a credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// A login session (`POST /login`, the web UI's cookie).
    Session,
    /// An API token for automation.
    ApiToken,
}

/// A live session or API token (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct Credential {
    /// Names it to revoke it: the first 24 hex digits of its SHA-256.
    pub id: String,
    /// Session or API token.
    pub kind: CredentialKind,
    /// An API token's name.
    pub name: Option<String>,
    /// An API token's role (it acts with at most its user's role).
    pub role: Option<Role>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub expires_at: i64,
    /// The credential this request was made with.
    pub current: bool,
}

#[derive(sqlx::FromRow)]
struct CredentialRow {
    token_hash: String,
    kind: String,
    name: Option<String>,
    role: Option<String>,
    created_at: i64,
    expires_at: i64,
}

fn may_manage(op: &Operator, user_id: &str) -> Result<()> {
    if op.user_id == user_id {
        Ok(())
    } else {
        op.require(Role::Admin)
    }
}

/// The live sessions and API tokens of a user of the organisation (admin,
/// or the user), newest first.
pub async fn credentials(
    state: &AppState,
    op: &Operator,
    user_id: &str,
) -> Result<Vec<Credential>> {
    may_manage(op, user_id)?;
    target(state.store.pool(), op, user_id).await?;
    let rows = sqlx::query_as::<_, CredentialRow>(
        "SELECT token_hash, kind, name, role, created_at, expires_at FROM api_tokens \
         WHERE user_id = $1 AND revoked = 0 AND expires_at > $2 ORDER BY created_at DESC LIMIT 1000",
    )
    .bind(user_id)
    .bind(now_ms())
    .fetch_all(state.store.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Credential {
            id: credential_id(&r.token_hash).to_string(),
            kind: if r.kind == "api" {
                CredentialKind::ApiToken
            } else {
                CredentialKind::Session
            },
            name: r.name,
            role: r.role.as_deref().and_then(Role::parse),
            created_at: r.created_at,
            expires_at: r.expires_at,
            current: r.token_hash == op.token_hash,
        })
        .collect())
}

/// Revokes one session or API token of a user of the organisation
/// (admin, or the user); it stops working at once.
pub async fn revoke_credential(
    state: &AppState,
    op: &Operator,
    user_id: &str,
    credential: &str,
) -> Result<()> {
    may_manage(op, user_id)?;
    let t = target(state.store.pool(), op, user_id).await?;
    let label = format!("user:{} credential:{credential}", t.email);
    let audit = Audited::new(state, op, "user.credential.revoke", &label);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        if credential.len() != 24 || !credential.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::NotFound("no such session or token"));
        }
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked = 1 WHERE user_id = $1 AND substr(token_hash, 1, 24) = $2 AND revoked = 0",
        )
        .bind(&t.id)
        .bind(credential)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("no such session or token"));
        }
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await
}

/// A new API token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiToken {
    /// What it is for (1-100 characters), e.g. "CI release upload".
    pub name: String,
    /// Its role, no higher than yours [default: yours].
    pub role: Option<Role>,
    /// Days until it expires (1-366); required.
    pub expires_in_days: u32,
}

/// A created API token: the secret is shown only here.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiToken {
    /// Names it to list and revoke it.
    pub id: String,
    /// The name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Unix ms.
    pub expires_at: i64,
    /// `Authorization: Bearer <token>`; shown once, stored as SHA-256.
    pub token: String,
}

/// Creates an API token for the operator, with a role no higher than
/// theirs. Not with an API token (a token cannot outlive itself).
pub async fn create_api_token(
    state: &AppState,
    op: &Operator,
    req: NewApiToken,
) -> Result<CreatedApiToken> {
    let name = req.name.trim().to_string();
    let label = format!("api_token:{name}");
    let audit = Audited::new(state, op, "api_token.create", &label);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        if op.api_token {
            return Err(Error::Refused(
                "an API token cannot create API tokens; log in".into(),
            ));
        }
        if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(Error::Invalid(
                "name: 1-100 characters, no control characters".into(),
            ));
        }
        if !(1..=MAX_TOKEN_DAYS).contains(&req.expires_in_days) {
            return Err(Error::Invalid(format!(
                "expires_in_days: 1 to {MAX_TOKEN_DAYS}"
            )));
        }
        let role = req.role.unwrap_or(op.role);
        if role > op.role {
            return Err(Error::Refused(format!(
                "a token's role cannot be above yours ({})",
                op.role.as_str()
            )));
        }
        let token = new_secret("kxk")?;
        let hash = secret_hash(&token);
        let now = now_ms();
        let expires_at = now.saturating_add(i64::from(req.expires_in_days) * 86_400_000);
        sqlx::query(
            "INSERT INTO api_tokens (token_hash, user_id, created_at, expires_at, revoked, kind, name, role) VALUES ($1, $2, $3, $4, 0, 'api', $5, $6)",
        )
        .bind(&hash)
        .bind(&op.user_id)
        .bind(now)
        .bind(expires_at)
        .bind(&name)
        .bind(role.as_str())
        .execute(&mut *tx)
        .await?;
        let id = credential_id(&hash).to_string();
        let target = format!("{label} id:{id} role={}", role.as_str());
        Ok((
            CreatedApiToken {
                id,
                name: name.clone(),
                role,
                expires_at,
                token,
            },
            target,
        ))
    }
    .await;
    audit.finish(tx, outcome).await
}
