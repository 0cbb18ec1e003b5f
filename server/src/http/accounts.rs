//! Accounts: your password and API tokens, and the admin's user lifecycle
//! (role, disable, delete, sessions and tokens) (`service::accounts`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};

use crate::AppState;
use crate::auth::Operator;
use crate::http::{ApiJson, Result};
use crate::service::accounts;
pub use crate::service::accounts::{
    CreatedApiToken, Credential, CredentialKind, NewApiToken, PasswordChange, UserUpdate,
};
use crate::service::users::User;

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/account/password", post(change_password))
        .route("/account/tokens", get(my_tokens).post(create_token))
        .route("/account/tokens/{id}", delete(revoke_my_token))
        .route(
            "/users/{id}",
            get(get_user).patch(update_user).delete(delete_user),
        )
        .route("/users/{id}/credentials", get(user_credentials))
        .route(
            "/users/{id}/credentials/{credential}",
            delete(revoke_credential),
        )
}

/// Change your password (the current one is required). Your other
/// sessions are revoked; this one stays. Clears the must-change gate.
#[utoipa::path(post, path = "/api/v1/account/password", request_body = PasswordChange,
    responses((status = 204), (status = 400), (status = 403, description = "wrong current password, or an API token")))]
pub async fn change_password(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<PasswordChange>,
) -> Result<StatusCode> {
    accounts::change_password(&state, &op, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Your live sessions and API tokens (never their secrets).
#[utoipa::path(get, path = "/api/v1/account/tokens", responses((status = 200, body = [Credential])))]
pub async fn my_tokens(
    State(state): State<AppState>,
    op: Operator,
) -> Result<ApiJson<Vec<Credential>>> {
    Ok(ApiJson(
        accounts::credentials(&state, &op, &op.user_id).await?,
    ))
}

/// Create an API token for automation (`Authorization: Bearer kxk_...`):
/// a name, a role no higher than yours, a required expiry. The secret is
/// in this answer only.
#[utoipa::path(post, path = "/api/v1/account/tokens", request_body = NewApiToken,
    responses((status = 201, body = CreatedApiToken), (status = 400), (status = 403)))]
pub async fn create_token(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewApiToken>,
) -> Result<(StatusCode, ApiJson<CreatedApiToken>)> {
    let token = accounts::create_api_token(&state, &op, req).await?;
    Ok((StatusCode::CREATED, ApiJson(token)))
}

/// Revoke one of your sessions or API tokens.
#[utoipa::path(delete, path = "/api/v1/account/tokens/{id}", responses((status = 204), (status = 404)))]
pub async fn revoke_my_token(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    accounts::revoke_credential(&state, &op, &op.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A user of your organisation.
#[utoipa::path(get, path = "/api/v1/users/{id}", responses((status = 200, body = User), (status = 404)))]
pub async fn get_user(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<User>> {
    Ok(ApiJson(accounts::user(&state, &op, &id).await?))
}

/// Change a user's role, disable or re-enable them (admin). Takes effect
/// on their next request; disabling revokes every session and token. Not
/// yourself, never the last enabled admin (409).
#[utoipa::path(patch, path = "/api/v1/users/{id}", request_body = UserUpdate,
    responses((status = 200, body = User), (status = 403), (status = 404), (status = 409)))]
pub async fn update_user(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<UserUpdate>,
) -> Result<ApiJson<User>> {
    Ok(ApiJson(accounts::update_user(&state, &op, &id, req).await?))
}

/// Delete a user and their sessions and tokens (admin). Not yourself,
/// never the last enabled admin (409).
#[utoipa::path(delete, path = "/api/v1/users/{id}",
    responses((status = 204), (status = 403), (status = 404), (status = 409)))]
pub async fn delete_user(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    accounts::delete_user(&state, &op, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A user's live sessions and API tokens (admin, or the user).
#[utoipa::path(get, path = "/api/v1/users/{id}/credentials",
    responses((status = 200, body = [Credential]), (status = 403), (status = 404)))]
pub async fn user_credentials(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Vec<Credential>>> {
    Ok(ApiJson(accounts::credentials(&state, &op, &id).await?))
}

/// Revoke one of a user's sessions or API tokens (admin, or the user).
#[utoipa::path(delete, path = "/api/v1/users/{id}/credentials/{credential}",
    responses((status = 204), (status = 403), (status = 404)))]
pub async fn revoke_credential(
    State(state): State<AppState>,
    op: Operator,
    Path((id, credential)): Path<(String, String)>,
) -> Result<StatusCode> {
    accounts::revoke_credential(&state, &op, &id, &credential).await?;
    Ok(StatusCode::NO_CONTENT)
}
