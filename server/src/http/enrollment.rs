//! Enrollment tokens: issued per factory batch by an operator, presented by
//! devices at enrollment. Only their SHA-256 is stored.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use kernex_protocol::api::{EnrollmentToken, NewEnrollmentToken, TokenCheck};
use sqlx::Row;

use crate::AppState;
use crate::auth::{Operator, Role};
use crate::http::{ApiJson, Error, Result, audited};
use crate::store::{new_id, new_secret, now_ms, secret_hash};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/enrollment-tokens", post(create).get(list))
        .route("/enrollment-tokens/{id}", delete(revoke))
        .route("/enrollment-tokens/check", post(check))
}

/// Check an enrollment token before it goes onto a device (ops; the
/// factory line's `kernex-image provision`): 200 with the token (no
/// secret) when devices can enroll with it now, 404 when it is unknown in
/// this organisation, revoked or expired.
#[utoipa::path(post, path = "/api/v1/enrollment-tokens/check", request_body = TokenCheck,
    responses((status = 200, body = EnrollmentToken), (status = 403),
        (status = 404, description = "unknown, revoked or expired")))]
pub async fn check(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<TokenCheck>,
) -> Result<ApiJson<EnrollmentToken>> {
    op.require(Role::Ops)?;
    if req.token.len() > 200 {
        return Err(Error::BadRequest("token: at most 200 characters".into()));
    }
    let r = sqlx::query(
        "SELECT id, label, tags, created_at, expires_at, revoked, require_preauthorization, require_tpm FROM enrollment_tokens WHERE org_id = $1 AND token_hash = $2 AND revoked = 0 AND (expires_at IS NULL OR expires_at > $3)",
    )
    .bind(&op.org_id)
    .bind(secret_hash(&req.token))
    .bind(now_ms())
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound(
        "no such enrollment token in this organisation (unknown, revoked or expired)",
    ))?;
    token_row(&r).map(ApiJson)
}

fn token_row(r: &sqlx::any::AnyRow) -> Result<EnrollmentToken> {
    let tags: String = r.try_get("tags")?;
    Ok(EnrollmentToken {
        id: r.try_get("id")?,
        label: r.try_get("label")?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        revoked: r.try_get::<i64, _>("revoked")? != 0,
        require_preauthorization: r.try_get::<i64, _>("require_preauthorization")? != 0,
        require_tpm: r.try_get::<i64, _>("require_tpm")? != 0,
        token: None,
    })
}

pub use crate::service::names::check_tags;

/// Create an enrollment token (ops).
#[utoipa::path(post, path = "/api/v1/enrollment-tokens", request_body = NewEnrollmentToken,
    responses((status = 201, body = EnrollmentToken), (status = 403)))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewEnrollmentToken>,
) -> Result<(StatusCode, ApiJson<EnrollmentToken>)> {
    op.require(Role::Ops)?;
    audited(&state, &op, "enrollment_token.create", "enrollment_token", async {
        check_tags(&req.tags)?;
        if req.label.len() > 200 {
            return Err(Error::BadRequest("label: at most 200 characters".into()));
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
        .execute(state.store.pool())
        .await?;
        let target = format!("enrollment_token:{id}");
        Ok((
            (
                StatusCode::CREATED,
                ApiJson(EnrollmentToken {
                    id,
                    label: req.label.clone(),
                    tags: req.tags.clone(),
                    created_at: now,
                    expires_at: req.expires_at,
                    revoked: false,
                    require_preauthorization: req.require_preauthorization,
                    require_tpm: req.require_tpm,
                    token: Some(token),
                }),
            ),
            target,
        ))
    })
    .await
}

/// List enrollment tokens (without secrets).
#[utoipa::path(get, path = "/api/v1/enrollment-tokens", responses((status = 200, body = [EnrollmentToken])))]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
) -> Result<ApiJson<Vec<EnrollmentToken>>> {
    let rows = sqlx::query(
        "SELECT id, label, tags, created_at, expires_at, revoked, require_preauthorization, require_tpm FROM enrollment_tokens WHERE org_id = $1 ORDER BY created_at DESC",
    )
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    Ok(ApiJson(rows.iter().map(token_row).collect::<Result<_>>()?))
}

/// Revoke an enrollment token (ops). Devices already enrolled stay.
#[utoipa::path(delete, path = "/api/v1/enrollment-tokens/{id}",
    responses((status = 204), (status = 403), (status = 404)))]
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    op.require(Role::Ops)?;
    audited(
        &state,
        &op,
        "enrollment_token.revoke",
        &format!("enrollment_token:{id}"),
        async {
            let done = sqlx::query(
                "UPDATE enrollment_tokens SET revoked = 1 WHERE id = $1 AND org_id = $2",
            )
            .bind(&id)
            .bind(&op.org_id)
            .execute(state.store.pool())
            .await?;
            if done.rows_affected() == 0 {
                return Err(Error::NotFound("no such enrollment token"));
            }
            Ok((StatusCode::NO_CONTENT, String::new()))
        },
    )
    .await
}
