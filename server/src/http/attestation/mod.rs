//! The HTTP side of TPM identity and attestation (the domain is
//! `crate::service::attestation`):
//!
//! - [`preauth`]: `POST/GET /api/v1/tpm/preauthorizations`,
//!   `DELETE /api/v1/tpm/preauthorizations/{device_id}` (operators, the
//!   factory line).
//! - [`device`]: `POST /device/tpm` (bind), `POST /device/activate`,
//!   `POST /device/attestation` (a quote).
//!
//! Enrollment with a TPM identity is `POST /device/enroll`
//! (`crate::http::device_api`); the poll's quote nonce is in
//! `crate::http::device_api::poll`.

pub mod device;
pub mod preauth;

use axum::Router;
use axum::routing::{delete, post};

use crate::AppState;
use crate::http::Result;
pub use crate::service::attestation::AttestationView;

/// Operator routes (under `/api/v1`).
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/tpm/preauthorizations",
            post(preauth::preauthorize).get(preauth::list_preauthorizations),
        )
        .route(
            "/tpm/preauthorizations/{device_id}",
            delete(preauth::remove_preauthorization),
        )
}

/// Device routes (under `/api/v1/device`).
pub fn device_router() -> Router<AppState> {
    Router::new()
        .route("/tpm", post(device::bind))
        .route("/activate", post(device::activate))
        .route("/attestation", post(device::attestation))
}

/// The attestation operators see, from a device row with the columns of
/// [`crate::service::attestation::ViewRow`]. Kept for the operator
/// handlers until they read a `ViewRow` and call
/// [`crate::service::attestation::view`] themselves.
pub fn view(state: &AppState, row: &sqlx::any::AnyRow) -> Result<AttestationView> {
    use sqlx::FromRow;
    let row = crate::service::attestation::ViewRow::from_row(row)?;
    Ok(crate::service::attestation::view(state, &row))
}
