//! Organisations, for the instance admin (`service::orgs`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};

use crate::AppState;
use crate::auth::Operator;
use crate::http::{ApiJson, Result};
use crate::service::orgs;
pub use crate::service::orgs::{
    CreatedAdmin, CreatedOrganization, NewOrgAdmin, NewOrganization, Organization,
    OrganizationUpdate,
};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/instance/organizations", get(list).post(create))
        .route("/instance/organizations/{id}", axum::routing::patch(update))
        .route("/instance/organizations/{id}/admins", post(add_admin))
}

/// Every organisation (instance admin).
#[utoipa::path(get, path = "/api/v1/instance/organizations",
    responses((status = 200, body = [Organization]), (status = 403)))]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
) -> Result<ApiJson<Vec<Organization>>> {
    Ok(ApiJson(orgs::list(&state, &op).await?))
}

/// Create an organisation, optionally with its first admin, whose
/// one-time password is in the answer (instance admin).
#[utoipa::path(post, path = "/api/v1/instance/organizations", request_body = NewOrganization,
    responses((status = 201, body = CreatedOrganization), (status = 403), (status = 409)))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewOrganization>,
) -> Result<(StatusCode, ApiJson<CreatedOrganization>)> {
    let created = orgs::create(&state, &op, req).await?;
    Ok((StatusCode::CREATED, ApiJson(created)))
}

/// Rename, disable or re-enable an organisation (instance admin). A
/// disabled organisation's operators and devices are refused.
#[utoipa::path(patch, path = "/api/v1/instance/organizations/{id}", request_body = OrganizationUpdate,
    responses((status = 200, body = Organization), (status = 403), (status = 404), (status = 409)))]
pub async fn update(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<OrganizationUpdate>,
) -> Result<ApiJson<Organization>> {
    Ok(ApiJson(orgs::update(&state, &op, &id, req).await?))
}

/// Create an admin in an organisation, with a one-time password that must
/// be changed at first login (instance admin).
#[utoipa::path(post, path = "/api/v1/instance/organizations/{id}/admins", request_body = NewOrgAdmin,
    responses((status = 201, body = CreatedAdmin), (status = 403), (status = 404), (status = 409)))]
pub async fn add_admin(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<NewOrgAdmin>,
) -> Result<(StatusCode, ApiJson<CreatedAdmin>)> {
    let admin = orgs::add_admin(&state, &op, &id, req).await?;
    Ok((StatusCode::CREATED, ApiJson(admin)))
}
