//! The domain: what the control plane does, with typed inputs, typed rows
//! and one error type, and no HTTP in it. `http/` extracts a request, calls
//! a service and maps the answer; `ui/` calls the same services to render
//! pages. Neither runs SQL of its own.
//!
//! [`Error`] says what went wrong in the domain's words; `http::Error`
//! maps it to a status and a JSON body, once (`impl From<service::Error>
//! for http::Error`).

pub mod accounts;
pub mod admission;
pub mod anti_rollback;
pub mod attestation;
pub mod audit;
pub mod deployments;
pub mod devices;
pub mod enrollment;
pub mod login_throttle;
pub mod names;
pub mod orgs;
pub mod patches;
pub mod rate_limit;
pub mod refusals;
pub mod releases;
pub mod rollouts;
pub mod users;

/// Why a domain operation did not happen.
#[derive(Debug)]
pub enum Error {
    /// The input is malformed or out of range (HTTP 400).
    Invalid(String),
    /// No, or an invalid, credential (401).
    Unauthorized,
    /// The caller's role does not allow this (403).
    Forbidden,
    /// Refused by a policy, with the reason (403), e.g. the device's TPM is
    /// not the pre-authorised one.
    Refused(String),
    /// No such thing in the caller's organisation (404).
    NotFound(&'static str),
    /// Conflicts with the existing state (409).
    Conflict(String),
    /// Larger than the limit, in bytes (413; 0: the request's limit).
    TooLarge(u64),
    /// Over a named limit of what a device may send or store, with what
    /// and which limit (413), e.g. a heartbeat's `extra`.
    OverLimit(String),
    /// Well-formed but rejected, e.g. a bundle that does not verify (422).
    Unprocessable(String),
    /// Over a rate limit; seconds until the next attempt may pass (429).
    TooManyRequests(u64),
    /// A real fault (store, blob store, I/O). Logged, never shown.
    Internal(anyhow::Error),
}

/// Result of a domain operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Invalid(d) => write!(f, "invalid: {d}"),
            Error::Unauthorized => f.write_str("missing, invalid, expired or revoked credentials"),
            Error::Forbidden => f.write_str("your role does not allow this"),
            Error::Refused(d)
            | Error::Conflict(d)
            | Error::Unprocessable(d)
            | Error::OverLimit(d) => f.write_str(d),
            Error::NotFound(what) => write!(f, "not found: {what}"),
            Error::TooLarge(limit) => write!(f, "larger than the limit of {limit} bytes"),
            Error::TooManyRequests(secs) => write!(f, "too many requests; retry in {secs} s"),
            Error::Internal(e) => write!(f, "internal error: {e:#}"),
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
