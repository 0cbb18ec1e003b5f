//! Login, the current operator, users and the organisation's keyring.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{self, Operator, Role};
use crate::http::{ApiJson, Error, Result, audited};
use crate::store::{new_secret, now_ms, secret_hash};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/me", get(me))
        .route("/users", post(create_user).get(list_users))
        .route("/org/keyring", put(set_keyring).get(get_keyring))
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
}

/// Log in with email and password.
#[utoipa::path(post, path = "/api/v1/login", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse, description = "also sets the kernex_session cookie"), (status = 401)))]
pub async fn login(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response> {
    let org = req
        .organization
        .unwrap_or_else(|| state.config.default_organization.clone());
    let row = sqlx::query(
        "SELECT u.id, u.password_hash, u.role FROM users u JOIN organizations o ON o.id = u.org_id WHERE o.name = $1 AND u.email = $2",
    )
    .bind(&org)
    .bind(&req.email)
    .fetch_optional(state.store.pool())
    .await?;
    // Hash even when the user is unknown, so timing does not tell.
    let (user_id, hash, role) = match row {
        Some(r) => (
            Some(r.try_get::<String, _>("id")?),
            r.try_get::<String, _>("password_hash")?,
            r.try_get::<String, _>("role")?,
        ),
        None => (None, DUMMY_HASH.to_string(), String::new()),
    };
    let password = req.password;
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
        .await
        .map_err(|e| Error::Internal(e.into()))?;
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
    let cookie = format!(
        "{}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        auth::SESSION_COOKIE,
        state.config.token_ttl_secs
    );
    let mut response = ApiJson(LoginResponse {
        token,
        expires_at,
        role,
    })
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(response)
}

/// End the session: the token (bearer or cookie) stops working.
#[utoipa::path(post, path = "/api/v1/logout", responses((status = 204), (status = 401)))]
pub async fn logout(State(state): State<AppState>, op: Operator) -> Result<Response> {
    sqlx::query("UPDATE api_tokens SET revoked = 1 WHERE token_hash = $1")
        .bind(&op.token_hash)
        .execute(state.store.pool())
        .await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("kernex_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    Ok(response)
}

// argon2id hash of a random password nobody knows.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0Jq4i1hO7x3YxRzr8wJt1nq0b9n9i5m1Zb0uI0p0v5k";

/// The operator behind the token.
#[derive(Debug, Serialize, ToSchema)]
pub struct Me {
    /// User id.
    pub id: String,
    /// Email.
    pub email: String,
    /// Role.
    pub role: Role,
    /// Organisation id.
    pub organization_id: String,
}

/// Who am I.
#[utoipa::path(get, path = "/api/v1/me", responses((status = 200, body = Me), (status = 401)))]
pub async fn me(op: Operator) -> ApiJson<Me> {
    ApiJson(Me {
        id: op.user_id,
        email: op.email,
        role: op.role,
        organization_id: op.org_id,
    })
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
}

/// Create a user in the caller's organisation (admin).
#[utoipa::path(post, path = "/api/v1/users", request_body = NewUser,
    responses((status = 201, body = User), (status = 403), (status = 409)))]
pub async fn create_user(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewUser>,
) -> Result<(StatusCode, ApiJson<User>)> {
    op.require(Role::Admin)?;
    let target = format!("user:{}", req.email);
    audited(&state, &op, "user.create", &target, async {
        if req.password.chars().count() < 12 {
            return Err(Error::BadRequest(
                "password must have at least 12 characters".into(),
            ));
        }
        if req.email.is_empty() || req.email.len() > 254 {
            return Err(Error::BadRequest(
                "email must have 1 to 254 characters".into(),
            ));
        }
        let id = match auth::create_user(
            &state.store,
            &op.org_id,
            &req.email,
            &req.password,
            req.role,
        )
        .await
        {
            Ok(id) => id,
            Err(e) => {
                if e.downcast_ref::<sqlx::Error>()
                    .is_some_and(crate::http::error::is_unique_violation)
                {
                    return Err(Error::Conflict(format!(
                        "user {} already exists",
                        req.email
                    )));
                }
                return Err(Error::Internal(e));
            }
        };
        Ok((
            (
                StatusCode::CREATED,
                ApiJson(User {
                    id,
                    email: req.email.clone(),
                    role: req.role,
                }),
            ),
            String::new(),
        ))
    })
    .await
}

/// List the organisation's users.
#[utoipa::path(get, path = "/api/v1/users", responses((status = 200, body = [User])))]
pub async fn list_users(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Vec<User>>> {
    let rows = sqlx::query("SELECT id, email, role FROM users WHERE org_id = $1 ORDER BY email")
        .bind(&op.org_id)
        .fetch_all(state.store.pool())
        .await?;
    let mut users = Vec::new();
    for r in rows {
        let role: String = r.try_get("role")?;
        users.push(User {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            role: Role::parse(&role).unwrap_or(Role::ReadOnly),
        });
    }
    Ok(ApiJson(users))
}

/// The organisation's keyring: CA certificates (PEM) that release bundles
/// must chain to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Keyring {
    /// PEM text, one or more certificates.
    pub pem: String,
}

/// Set the keyring (admin).
#[utoipa::path(put, path = "/api/v1/org/keyring", request_body = Keyring,
    responses((status = 204), (status = 403), (status = 422)))]
pub async fn set_keyring(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<Keyring>,
) -> Result<StatusCode> {
    op.require(Role::Admin)?;
    audited(&state, &op, "keyring.set", "org", async {
        kernex_protocol::signature::Keyring::from_pem(req.pem.as_bytes())
            .map_err(|e| Error::Unprocessable(e.to_string()))?;
        sqlx::query("UPDATE organizations SET keyring_pem = $1, updated_at = $2 WHERE id = $3")
            .bind(&req.pem)
            .bind(now_ms())
            .bind(&op.org_id)
            .execute(state.store.pool())
            .await?;
        Ok((StatusCode::NO_CONTENT, String::new()))
    })
    .await
}

/// Get the keyring.
#[utoipa::path(get, path = "/api/v1/org/keyring", responses((status = 200, body = Keyring), (status = 404)))]
pub async fn get_keyring(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Keyring>> {
    let pem: Option<String> = sqlx::query("SELECT keyring_pem FROM organizations WHERE id = $1")
        .bind(&op.org_id)
        .fetch_one(state.store.pool())
        .await?
        .try_get("keyring_pem")?;
    pem.map(|pem| ApiJson(Keyring { pem }))
        .ok_or(Error::NotFound("no keyring set"))
}
