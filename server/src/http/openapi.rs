//! The OpenAPI document, generated from the handlers (utoipa), served at
//! `/api/v1/openapi.json`.

use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::AppState;
use crate::http::{
    accounts, attestation, audit_log, deployments, device_api, device_identity, devices,
    enrollment, orgs, releases, rollouts, session, throttle,
};

/// The API description.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Kernex control plane", description = "Operator API and device API"),
    modifiers(&Bearer),
    security(("bearer" = [])),
    paths(
        session::login, session::logout, session::me, session::create_user, session::list_users,
        session::set_keyring, session::get_keyring,
        accounts::change_password, accounts::my_tokens, accounts::create_token,
        accounts::revoke_my_token, accounts::get_user, accounts::update_user, accounts::delete_user,
        accounts::user_credentials, accounts::revoke_credential,
        orgs::list, orgs::create, orgs::update, orgs::add_admin,
        enrollment::create, enrollment::list, enrollment::revoke, enrollment::check,
        releases::upload, releases::list, releases::detail, releases::remove, releases::download_operator, releases::patch_jobs, releases::retry_patch_job,
        devices::list, devices::detail, devices::revoke, devices::set_tags, devices::logs,
        deployments::create, deployments::list, deployments::detail, deployments::preview, deployments::preview_of,
        audit_log::list, audit_log::key,
        rollouts::create, rollouts::list, rollouts::detail, rollouts::preview, rollouts::preview_spec,
        rollouts::start, rollouts::pause, rollouts::resume, rollouts::abort, rollouts::rollback,
        rollouts::samples, rollouts::egress, rollouts::set_link, rollouts::get_link, rollouts::accept_link, rollouts::get_clock, rollouts::set_clock,
        device_api::enroll, device_api::poll, device_api::heartbeat, device_api::report,
        device_api::logs, device_api::download, device_api::download_patch,
        device_identity::challenge, device_identity::auth, device_identity::key,
        device_identity::list, device_identity::approve, device_identity::reject,
        attestation::preauth::preauthorize, attestation::preauth::list_preauthorizations,
        attestation::preauth::remove_preauthorization, attestation::device::bind,
        attestation::device::activate, attestation::device::attestation,
        throttle::clear,
    )
)]
pub struct ApiDoc;

#[derive(Debug)]
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
}
