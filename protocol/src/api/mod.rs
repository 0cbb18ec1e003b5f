//! The device and factory HTTP contract: every request and answer a device,
//! the factory line or the simulator exchanges with `kernex-server`, the
//! header names and the paths. Serde only, no I/O: the server's handlers,
//! the updater's client, `kernex-sim`, hw-tests and `kernex-image
//! provision` all use these types, so a field is added in one place.
//!
//! With the `openapi` feature every type also derives `utoipa::ToSchema`,
//! which the server's OpenAPI document uses.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | POST | [`paths::CHALLENGE`] | | [`Challenge`] |
//! | POST | [`paths::ENROLL`] | [`EnrollRequest`] | [`EnrollResponse`] (201 new, 200 known), [`EnrollPending`] (202) |
//! | POST | [`paths::AUTH`] | [`DeviceAuth`] | [`AccessToken`] |
//! | POST | [`paths::KEY`] (device) | [`KeyProof`] | [`AccessToken`] |
//! | GET | [`paths::POLL`] | | [`DesiredState`] (200) or 204; headers [`NONCE_HEADER`], [`POLL_AFTER_HEADER`] |
//! | POST | [`paths::HEARTBEAT`] | [`Heartbeat`] | 204 |
//! | POST | [`paths::REPORT`] | [`Report`] | 204 |
//! | POST | [`paths::LOGS`] | [`LogBatch`] | 204 |
//! | GET | [`paths::bundle`] | | the bundle, with `Range` |
//! | GET | [`paths::server_patch`] | | a server-made patch ([`ServerPatch`]), with `Range` |
//! | POST | [`paths::TPM_BIND`] | [`TpmBinding`] | [`TpmBindingAnswer`] |
//! | POST | [`paths::ACTIVATE`] | [`ActivationAnswer`] | [`Activated`] |
//! | POST | [`paths::ATTESTATION`] | [`QuoteReport`] | [`QuoteResult`] |
//! | POST | [`paths::ENROLLMENT_TOKENS`] (operator) | [`NewEnrollmentToken`] | [`EnrollmentToken`] |
//! | POST | [`paths::ENROLLMENT_TOKEN_CHECK`] (operator) | [`TokenCheck`] | [`EnrollmentToken`] |
//! | DELETE | [`paths::enrollment_token`] (operator) | | 204 |
//! | POST | [`paths::PREAUTHORIZATIONS`] (operator) | [`NewPreauthorization`] | [`Preauthorization`] |
//! | DELETE | [`paths::preauthorization`] (operator) | | 204 |
//! | GET | [`paths::ENROLLMENT_REQUESTS`] (operator) | | [`EnrollmentRequest`]s |
//!
//! Requests are strict (`deny_unknown_fields`): a typo is a 400, not a
//! silently ignored setting. Answers are lenient: a newer server may say
//! more, and an older device ignores what it does not know.

mod device;
mod factory;
pub mod hex;
mod identity;
mod tpm;

pub use device::{
    DesiredAction, DesiredState, DownloadWindow, EnrollRequest, EnrollResponse, Heartbeat,
    LogBatch, LogLevel, LogLine, MAX_LOG_LINES, MAX_LOG_MESSAGE, Report, ReportState, ServerPatch,
    parse_poll_after,
};
pub use factory::{
    EnrollmentToken, NewEnrollmentToken, NewPreauthorization, Preauthorization, TokenCheck,
};
pub use identity::{
    AccessToken, Challenge, DeviceAuth, EnrollPending, EnrollmentRequest, KeyProof, auth_message,
    enroll_message,
};
pub use tpm::{
    Activated, Activation, ActivationAnswer, AttestationState, BindingState, Quote, QuoteReport,
    QuoteResult, TpmBinding, TpmBindingAnswer, TpmIdentity,
};

/// The response header of `GET /device/poll` carrying a quote nonce (hex)
/// to answer at [`paths::ATTESTATION`].
pub const NONCE_HEADER: &str = "kernex-attestation-nonce";
/// The response header of `GET /device/poll`: poll again after this many
/// whole seconds (a rollout acts on the device). See [`parse_poll_after`].
pub const POLL_AFTER_HEADER: &str = "kernex-poll-after";
/// The request header that makes a mutating request safe to retry.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Paths, absolute from the server's base URL.
pub mod paths {
    /// A nonce to sign.
    pub const CHALLENGE: &str = "/api/v1/device/challenge";
    /// Trade a signed nonce for an access token.
    pub const AUTH: &str = "/api/v1/device/auth";
    /// Register (migrate from a bearer credential) or rotate the device key.
    pub const KEY: &str = "/api/v1/device/key";
    /// Re-enrollments waiting for an operator.
    pub const ENROLLMENT_REQUESTS: &str = "/api/v1/enrollment-requests";
    /// Enroll with a factory token.
    pub const ENROLL: &str = "/api/v1/device/enroll";
    /// Poll for desired state.
    pub const POLL: &str = "/api/v1/device/poll";
    /// Heartbeat with inventory.
    pub const HEARTBEAT: &str = "/api/v1/device/heartbeat";
    /// Install progress and outcome.
    pub const REPORT: &str = "/api/v1/device/report";
    /// Log batches.
    pub const LOGS: &str = "/api/v1/device/logs";
    /// Bind the TPM of an enrolled device.
    pub const TPM_BIND: &str = "/api/v1/device/tpm";
    /// Answer a credential-activation challenge.
    pub const ACTIVATE: &str = "/api/v1/device/activate";
    /// Answer a quote nonce.
    pub const ATTESTATION: &str = "/api/v1/device/attestation";
    /// Enrollment tokens (operators).
    pub const ENROLLMENT_TOKENS: &str = "/api/v1/enrollment-tokens";
    /// Check an enrollment token (operators, the factory line).
    pub const ENROLLMENT_TOKEN_CHECK: &str = "/api/v1/enrollment-tokens/check";
    /// TPM pre-authorisations (operators, the factory line).
    pub const PREAUTHORIZATIONS: &str = "/api/v1/tpm/preauthorizations";

    /// A release's bundle, for devices (`Range` supported).
    pub fn bundle(release_id: &str) -> String {
        format!("/api/v1/device/releases/{release_id}/bundle")
    }

    /// A server-made patch of a release ([`super::ServerPatch`]).
    pub fn server_patch(release_id: &str, patch_id: &str) -> String {
        format!("/api/v1/device/releases/{release_id}/patches/{patch_id}")
    }

    /// One enrollment token, by id (operators: `DELETE` revokes it).
    pub fn enrollment_token(id: &str) -> String {
        format!("{ENROLLMENT_TOKENS}/{id}")
    }

    /// One pre-authorisation, by the device id it was made for.
    pub fn preauthorization(device_id: &str) -> String {
        format!("{PREAUTHORIZATIONS}/{device_id}")
    }
}
