//! The device's identity: a key pair it generates and never sends
//! (`server/README.md`, "Device identity"). The device proves it holds
//! the private key by signing a server nonce; the server answers with an
//! access token valid for minutes, which the bearer header then carries.
//!
//! | step | request | answer |
//! | --- | --- | --- |
//! | 1 | `POST` [`super::paths::CHALLENGE`] | [`Challenge`] |
//! | 2a | `POST` [`super::paths::ENROLL`] with [`KeyProof`] | [`super::EnrollResponse`] (201, 200) or [`EnrollPending`] (202) |
//! | 2b | `POST` [`super::paths::AUTH`] with [`DeviceAuth`] | [`AccessToken`] |
//! | 2c | `POST` [`super::paths::KEY`] with [`KeyProof`] (bearer) | [`AccessToken`] |
//!
//! The signed messages ([`enroll_message`], [`auth_message`]) name what
//! they are for, so a signature made for one cannot be replayed as the
//! other; each nonce is accepted once.

use serde::{Deserialize, Serialize};

/// A fresh server nonce (`POST /api/v1/device/challenge`). Valid once,
/// for [`Challenge::expires_in_secs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Challenge {
    /// The nonce, hex (32 random bytes).
    pub nonce: String,
    /// How long the server accepts an answer to it.
    pub expires_in_secs: u64,
}

/// A public key and the proof that the sender holds its private key: a
/// signature over [`enroll_message`] with a nonce from [`Challenge`].
/// Sent at enrollment ([`super::EnrollRequest::key`]), and to register a
/// key (a device migrating from a bearer credential) or rotate it
/// (`POST /api/v1/device/key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct KeyProof {
    /// The public key: hex of its DER `SubjectPublicKeyInfo` (Ed25519 or
    /// ECDSA P-256).
    pub public_key: String,
    /// The [`Challenge`] nonce signed.
    pub nonce: String,
    /// Hex signature over [`enroll_message`].
    pub signature: String,
}

/// `POST /api/v1/device/auth`: a signature by the device's key over
/// [`auth_message`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeviceAuth {
    /// The server's id for the device ([`super::EnrollResponse::id`]).
    pub id: String,
    /// The [`Challenge`] nonce signed.
    pub nonce: String,
    /// Hex signature over [`auth_message`].
    pub signature: String,
}

/// A short-lived access token: `Authorization: Bearer <token>` until it
/// expires, then [`DeviceAuth`] again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccessToken {
    /// The server's id for the device.
    pub id: String,
    /// The token (`kxa_...`).
    pub token: String,
    /// Seconds it is valid from now.
    pub expires_in_secs: u64,
}

/// The answer (HTTP 202) to an enrollment of a device id that is enrolled
/// already, without proof that the sender is that device: no credential;
/// an operator approves or rejects the request. The device enrolls again
/// later with the same key; once approved, that key is the device's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollPending {
    /// The pending request's id.
    pub request_id: String,
    /// Why it waits.
    pub detail: String,
}

/// A re-enrollment waiting for an operator (`GET /api/v1/enrollment-requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollmentRequest {
    /// Id.
    pub id: String,
    /// The enrolled device it asks to take over (internal id).
    pub device_pk: String,
    /// The device id it claims.
    pub device_id: String,
    /// SHA-256 (hex) of the public key it brings.
    pub key_fingerprint: String,
    /// The enrollment token it used (id).
    pub enrollment_token_id: String,
    /// pending, approved or rejected.
    pub status: String,
    /// When, unix ms.
    pub created_at: i64,
    /// Who decided, when decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
}

/// What [`KeyProof::signature`] signs.
pub fn enroll_message(device_id: &str, nonce: &str, public_key: &str) -> Vec<u8> {
    format!("kernex-device-key-v1\n{device_id}\n{nonce}\n{public_key}\n").into_bytes()
}

/// What [`DeviceAuth::signature`] signs.
pub fn auth_message(id: &str, nonce: &str) -> Vec<u8> {
    format!("kernex-device-auth-v1\n{id}\n{nonce}\n").into_bytes()
}
