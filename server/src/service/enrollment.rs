//! Enrollment tokens: issued per factory batch by an operator, presented
//! by devices at enrollment. Only their SHA-256 is stored; the secret is
//! shown once, when created.

use kernex_protocol::api::{EnrollmentToken, NewEnrollmentToken};
use sqlx::FromRow;

use super::audit::Audited;
use super::names::check_tags;
use super::users::require;
use super::{Error, Result};
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::store::{new_id, new_secret, now_ms, secret_hash};

const COLUMNS: &str =
    "id, label, tags, created_at, expires_at, revoked, require_preauthorization, require_tpm";

/// A stored token (flags are 0/1).
#[derive(FromRow)]
struct TokenRow {
    id: String,
    label: String,
    tags: String,
    created_at: i64,
    expires_at: Option<i64>,
    revoked: i64,
    require_preauthorization: i64,
    require_tpm: i64,
}

impl From<TokenRow> for EnrollmentToken {
    fn from(r: TokenRow) -> Self {
        EnrollmentToken {
            id: r.id,
            label: r.label,
            tags: serde_json::from_str(&r.tags).unwrap_or_default(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked: r.revoked != 0,
            require_preauthorization: r.require_preauthorization != 0,
            require_tpm: r.require_tpm != 0,
            token: None,
        }
    }
}

/// The token (no secret) when devices can enroll with it now (ops); 404
/// when it is unknown in the organisation, revoked or expired.
pub async fn check(state: &AppState, op: &Operator, token: &str) -> Result<EnrollmentToken> {
    require(op, Role::Ops)?;
    if token.len() > 200 {
        return Err(Error::Invalid("token: at most 200 characters".into()));
    }
    let row = sqlx::query_as::<_, TokenRow>(&format!(
        "SELECT {COLUMNS} FROM enrollment_tokens WHERE org_id = $1 AND token_hash = $2 AND revoked = 0 AND (expires_at IS NULL OR expires_at > $3)"
    ))
    .bind(&op.org_id)
    .bind(secret_hash(token))
    .bind(now_ms())
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound(
        "no such enrollment token in this organisation (unknown, revoked or expired)",
    ))?;
    Ok(row.into())
}

/// Creates a token (ops); the answer holds its secret, shown only here.
pub async fn create(
    state: &AppState,
    op: &Operator,
    req: NewEnrollmentToken,
) -> Result<EnrollmentToken> {
    require(op, Role::Ops)?;
    let audit = Audited::new(state, op, "enrollment_token.create", "enrollment_token");
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        check_tags(&req.tags)?;
        if req.label.len() > 200 {
            return Err(Error::Invalid("label: at most 200 characters".into()));
        }
        let id = new_id()?;
        let token = new_secret("kxe")?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, org_id, token_hash, label, tags, created_by, created_at, expires_at, revoked, require_preauthorization, require_tpm) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10)",
        )
        .bind(&id)
        .bind(&op.org_id)
        .bind(secret_hash(&token))
        .bind(&req.label)
        .bind(serde_json::to_string(&req.tags).map_err(|e| Error::Internal(e.into()))?)
        .bind(&op.user_id)
        .bind(now)
        .bind(req.expires_at)
        .bind(i64::from(req.require_preauthorization))
        .bind(i64::from(req.require_tpm))
        .execute(&mut *tx)
        .await?;
        let target = format!("enrollment_token:{id}");
        Ok((
            EnrollmentToken {
                id,
                label: req.label.clone(),
                tags: req.tags.clone(),
                created_at: now,
                expires_at: req.expires_at,
                revoked: false,
                require_preauthorization: req.require_preauthorization,
                require_tpm: req.require_tpm,
                token: Some(token),
            },
            target,
        ))
    }
    .await;
    audit.finish(tx, outcome).await
}

/// The organisation's tokens (without secrets), newest first.
pub async fn list(state: &AppState, op: &Operator) -> Result<Vec<EnrollmentToken>> {
    let rows = sqlx::query_as::<_, TokenRow>(&format!(
        "SELECT {COLUMNS} FROM enrollment_tokens WHERE org_id = $1 ORDER BY created_at DESC"
    ))
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    Ok(rows.into_iter().map(EnrollmentToken::from).collect())
}

/// Revokes a token (ops). Devices already enrolled stay.
pub async fn revoke(state: &AppState, op: &Operator, id: &str) -> Result<()> {
    require(op, Role::Ops)?;
    let target = format!("enrollment_token:{id}");
    let audit = Audited::new(state, op, "enrollment_token.revoke", &target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let done =
            sqlx::query("UPDATE enrollment_tokens SET revoked = 1 WHERE id = $1 AND org_id = $2")
                .bind(id)
                .bind(&op.org_id)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("no such enrollment token"));
        }
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await
}
