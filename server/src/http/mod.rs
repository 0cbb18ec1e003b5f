//! The HTTP API. `app(state)` builds the whole router without a socket, so
//! tests drive it with `tower::ServiceExt::oneshot`.

pub mod accounts;
pub mod attestation;
pub mod audit_log;
pub mod deployments;
pub mod device_api;
pub mod device_identity;
pub mod device_poll;
pub mod devices;
pub mod enrollment;
pub mod error;
pub mod extract;
pub mod guard;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod orgs;
pub mod releases;
pub mod rollouts;
pub mod session;
pub mod throttle;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::response::{IntoResponse, Response};
use axum::{Router, middleware};
use serde::de::DeserializeOwned;
use tower_http::trace::TraceLayer;

use crate::AppState;
pub use error::{Error, Result};

/// The application: operator API, device API, OpenAPI document, metrics.
pub fn app(state: AppState) -> Router {
    let json_limit = state.config.max_json_bytes;
    let api = Router::new()
        .merge(session::router())
        .merge(accounts::router())
        .merge(orgs::router())
        .merge(throttle::router())
        .merge(enrollment::router())
        .merge(releases::router())
        .merge(devices::router())
        .merge(deployments::router())
        .merge(rollouts::router())
        .merge(audit_log::router())
        .merge(attestation::router())
        .merge(device_identity::router())
        .merge(openapi::router())
        .nest("/device", device_api::router());
    Router::new()
        .nest("/api/v1", api)
        .merge(metrics::router())
        .merge(crate::ui::router())
        .fallback(|| async { Error::NotFound("no such endpoint") })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::poll_cache::layer,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), guard::layer))
        .layer(DefaultBodyLimit::max(json_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// `Json` whose rejections are API errors (400 for malformed JSON and
/// unknown fields, 413 for oversized bodies), always with a JSON body.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::BytesRejection(b))
                if b.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(Error::TooLarge(0))
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}
