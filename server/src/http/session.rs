//! Login, the current operator, users and the organisation's keyring
//! (`service::users`).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{self, Operator, Role};
use crate::http::{ApiJson, Result};
use crate::serve::ClientAddr;
pub use crate::service::users::{Keyring, LoginRequest, LoginResponse, NewUser, User};
use crate::service::{login_throttle, users};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/me", get(me))
        .route("/users", post(create_user).get(list_users))
        .route("/org/keyring", put(set_keyring).get(get_keyring))
}

/// Log in with email and password.
#[utoipa::path(post, path = "/api/v1/login", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse, description = "also sets the kernex_session cookie"), (status = 401),
        (status = 429, description = "backing off after failed logins, or hashing saturated; see Retry-After")))]
pub async fn login(
    State(state): State<AppState>,
    ClientAddr(from): ClientAddr,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response> {
    let session = login_throttle::login(&state, req, from).await?;
    let cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        auth::SESSION_COOKIE,
        session.token,
        state.config.token_ttl_secs
    );
    let mut response = ApiJson(session).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(response)
}

/// End the session: the token (bearer or cookie) stops working.
#[utoipa::path(post, path = "/api/v1/logout", responses((status = 204), (status = 401)))]
pub async fn logout(State(state): State<AppState>, op: Operator) -> Result<Response> {
    users::logout(&state, &op).await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("kernex_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    Ok(response)
}

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

/// Create a user in the caller's organisation (admin).
#[utoipa::path(post, path = "/api/v1/users", request_body = NewUser,
    responses((status = 201, body = User), (status = 403), (status = 409)))]
pub async fn create_user(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewUser>,
) -> Result<(StatusCode, ApiJson<User>)> {
    let user = users::create_user(&state, &op, req).await?;
    Ok((StatusCode::CREATED, ApiJson(user)))
}

/// List the organisation's users.
#[utoipa::path(get, path = "/api/v1/users", responses((status = 200, body = [User])))]
pub async fn list_users(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Vec<User>>> {
    Ok(ApiJson(users::list_users(&state, &op).await?))
}

/// Set the keyring (admin).
#[utoipa::path(put, path = "/api/v1/org/keyring", request_body = Keyring,
    responses((status = 204), (status = 403), (status = 422)))]
pub async fn set_keyring(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<Keyring>,
) -> Result<StatusCode> {
    users::set_keyring(&state, &op, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Get the keyring.
#[utoipa::path(get, path = "/api/v1/org/keyring", responses((status = 200, body = Keyring), (status = 404)))]
pub async fn get_keyring(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Keyring>> {
    Ok(ApiJson(users::keyring(&state, &op).await?))
}
