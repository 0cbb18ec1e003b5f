//! The one error type of the HTTP API: a status, a stable message and an
//! optional JSON detail. Internal faults are logged and answered with a
//! generic 500 that says nothing about their cause.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An API error.
#[derive(Debug)]
pub enum Error {
    /// 400: the request is malformed.
    BadRequest(String),
    /// 401: no or invalid credentials.
    Unauthorized,
    /// 403: authenticated, but the role does not allow this.
    Forbidden,
    /// 403: refused by a policy, with the reason (e.g. the device's TPM is
    /// not the pre-authorised one).
    Refused(String),
    /// 404: no such resource (in the caller's organisation).
    NotFound(&'static str),
    /// 409: conflicts with existing state.
    Conflict(String),
    /// 413: body larger than the limit (bytes).
    TooLarge(u64),
    /// 413: over a named limit, with what and which limit.
    OverLimit(String),
    /// 429: over the rate limit; seconds until the next request may pass.
    TooManyRequests(u64),
    /// 416: the Range cannot be served; the resource's size.
    RangeNotSatisfiable(u64),
    /// 422: well-formed but rejected (e.g. a bundle that does not verify).
    Unprocessable(String),
    /// 500: a real fault. The cause is logged, never sent.
    Internal(anyhow::Error),
}

/// Result of a handler.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Forbidden | Error::Refused(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::TooLarge(_) | Error::OverLimit(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RangeNotSatisfiable(_) => StatusCode::RANGE_NOT_SATISFIABLE,
            Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Status and a one-line reason, for the audit log (never internals).
    pub fn summary(&self) -> String {
        let status = self.status().as_u16();
        match self {
            Error::BadRequest(d)
            | Error::Conflict(d)
            | Error::Unprocessable(d)
            | Error::Refused(d)
            | Error::OverLimit(d) => {
                format!("{status} {d}")
            }
            Error::NotFound(what) => format!("{status} {what}"),
            _ => status.to_string(),
        }
    }

    fn body(&self) -> Value {
        match self {
            Error::BadRequest(d) => json!({"error": "bad request", "detail": d}),
            Error::Unauthorized => {
                json!({"error": "unauthorized", "detail": "missing, invalid, expired or revoked credentials"})
            }
            Error::Forbidden => {
                json!({"error": "forbidden", "detail": "your role does not allow this"})
            }
            Error::Refused(d) => json!({"error": "forbidden", "detail": d}),
            Error::NotFound(what) => json!({"error": "not found", "detail": what}),
            Error::Conflict(d) => json!({"error": "conflict", "detail": d}),
            Error::TooLarge(0) => {
                json!({"error": "payload too large", "detail": "request body too large"})
            }
            Error::TooLarge(limit) => {
                json!({"error": "payload too large", "detail": {"limit": limit}})
            }
            Error::OverLimit(d) => json!({"error": "payload too large", "detail": d}),
            Error::RangeNotSatisfiable(size) => {
                json!({"error": "range not satisfiable", "detail": {"size": size}})
            }
            Error::Unprocessable(d) => json!({"error": "unprocessable", "detail": d}),
            Error::TooManyRequests(secs) => {
                json!({"error": "too many requests", "detail": {"retry_after_secs": secs}})
            }
            Error::Internal(_) => json!({"error": "internal server error", "detail": null}),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(e) = &self {
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        match &self {
            Error::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Error::TooManyRequests(secs) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            Error::RangeNotSatisfiable(size) => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    response.headers_mut().insert(header::CONTENT_RANGE, v);
                }
            }
            _ => {}
        }
        response
    }
}

impl From<crate::service::Error> for Error {
    fn from(e: crate::service::Error) -> Self {
        use crate::service::Error as E;
        match e {
            E::Invalid(d) => Error::BadRequest(d),
            E::Unauthorized => Error::Unauthorized,
            E::Forbidden => Error::Forbidden,
            E::Refused(d) => Error::Refused(d),
            E::NotFound(what) => Error::NotFound(what),
            E::Conflict(d) => Error::Conflict(d),
            E::TooLarge(limit) => Error::TooLarge(limit),
            E::OverLimit(d) => Error::OverLimit(d),
            E::Unprocessable(d) => Error::Unprocessable(d),
            E::TooManyRequests(secs) => Error::TooManyRequests(secs),
            E::Internal(e) => Error::Internal(e),
        }
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(e)
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Internal(e.into())
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        Error::Internal(e.into())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(e.into())
    }
}

impl From<JsonRejection> for Error {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Error::TooLarge(0)
            }
            JsonRejection::MissingJsonContentType(_) => {
                Error::BadRequest("expected Content-Type: application/json".into())
            }
            other => Error::BadRequest(other.body_text()),
        }
    }
}

impl From<QueryRejection> for Error {
    fn from(r: QueryRejection) -> Self {
        Error::BadRequest(r.body_text())
    }
}

pub use crate::store::is_unique_violation;
