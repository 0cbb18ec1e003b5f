//! TPM identity, credential activation and quotes on the wire (byte
//! strings in lowercase hex). `kernex-attest` makes and checks what these
//! carry; the updater sends them and the server receives them.
//!
//! 1. Device → server: [`TpmIdentity`] at enrollment ([`super::EnrollRequest`])
//!    or later ([`TpmBinding`]).
//! 2. Server → device: an [`Activation`] challenge.
//! 3. Device → server: [`ActivationAnswer`], the credential the TPM
//!    released; the server answers [`Activated`].
//! 4. Later, for each nonce a poll carries: [`QuoteReport`] → [`QuoteResult`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Sha256Digest;

/// A device's TPM identity, sent at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TpmIdentity {
    /// The EK's marshalled `TPMT_PUBLIC`.
    #[serde(with = "super::hex::bytes")]
    pub ek_public: Vec<u8>,
    /// The EK certificate (DER) from NV, when the TPM has one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "super::hex::opt_bytes"
    )]
    pub ek_certificate: Option<Vec<u8>>,
    /// The AK's marshalled `TPMT_PUBLIC`.
    #[serde(with = "super::hex::bytes")]
    pub ak_public: Vec<u8>,
}

/// The credential-activation challenge as sent to the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Activation {
    /// TPM2_ActivateCredential's `credentialBlob` (`TPM2B_ID_OBJECT` buffer).
    #[serde(with = "super::hex::bytes")]
    pub id_object: Vec<u8>,
    /// TPM2_ActivateCredential's `secret` (`TPM2B_ENCRYPTED_SECRET` buffer).
    #[serde(with = "super::hex::bytes")]
    pub encrypted_secret: Vec<u8>,
}

/// A quote as the device sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Quote {
    /// The marshalled `TPMS_ATTEST` the TPM signed (`tpm2_quote -m`).
    #[serde(with = "super::hex::bytes")]
    pub attest: Vec<u8>,
    /// The marshalled `TPMT_SIGNATURE` (`tpm2_quote -s`).
    #[serde(with = "super::hex::bytes")]
    pub signature: Vec<u8>,
    /// The SHA-256 bank values of the quoted PCRs, read right after the
    /// quote; the quote's PCR digest binds them.
    pub pcrs: BTreeMap<u8, Sha256Digest>,
}

/// The device's answer to its activation challenge
/// (`POST /api/v1/device/activate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ActivationAnswer {
    /// Hex of the credential TPM2_ActivateCredential released.
    pub credential: String,
}

/// A device's attestation verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AttestationState {
    /// No TPM.
    Unattested,
    /// TPM bound, no quote verified yet.
    Pending,
    /// The last quote verified and matched the running release.
    Attested,
    /// The last quote verified, but a PCR is not what the release expects.
    Mismatch,
    /// The last quote is for another version than the device runs now, or
    /// too old.
    Stale,
}

impl AttestationState {
    /// Every verdict.
    pub const ALL: [AttestationState; 5] = [
        Self::Unattested,
        Self::Pending,
        Self::Attested,
        Self::Mismatch,
        Self::Stale,
    ];

    /// The wire name (also what the server stores).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unattested => "unattested",
            Self::Pending => "pending",
            Self::Attested => "attested",
            Self::Mismatch => "mismatch",
            Self::Stale => "stale",
        }
    }

    /// The verdict named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for AttestationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The device is bound to its TPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Activated {
    /// Hex SHA-256 of the EK's `TPMT_PUBLIC`.
    pub ek_fingerprint: String,
    /// `pending`: bound, no quote verified yet.
    pub attestation: AttestationState,
}

/// The TPM identity of a device that enrolled without one
/// (`POST /api/v1/device/tpm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TpmBinding {
    /// The device's TPM identity (`kernex-updater attest identity`): EK,
    /// its certificate, AK.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub tpm: TpmIdentity,
    /// The PCR the device extends its slot measurement into (default 14).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_slot_pcr: Option<u8>,
}

/// Where a TPM binding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BindingState {
    /// Answer `activation` at `POST /device/activate`.
    Challenge,
    /// The device is bound to this EK and AK already: nothing to do.
    Bound,
}

/// What binding needs next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TpmBindingAnswer {
    /// `challenge`: answer `activation` at `POST /device/activate` (with
    /// the device credential); `bound`: the device is bound to this EK and
    /// AK already, nothing to do.
    pub state: BindingState,
    /// Hex SHA-256 of the EK's `TPMT_PUBLIC`.
    pub ek_fingerprint: String,
    /// The credential-activation challenge (`id-object`,
    /// `encrypted-secret`, hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub activation: Option<Activation>,
}

/// A quote answering the outstanding nonce
/// (`POST /api/v1/device/attestation`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct QuoteReport {
    /// The release version the device claims to run: its slot PCR must be
    /// the value that release's manifest gives.
    pub version: String,
    /// The quote (`kernex-updater attest quote NONCE`): `attest`
    /// (`TPMS_ATTEST`), `signature` (`TPMT_SIGNATURE`), both hex, and the
    /// quoted SHA-256 `pcrs`.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub quote: Quote,
}

/// A verified quote's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QuoteResult {
    /// `attested` or `mismatch`.
    pub attestation: AttestationState,
    /// For a mismatch: which PCR, found and expected.
    #[serde(default)]
    pub reason: Option<String>,
    /// The version the quote was checked against.
    pub version: String,
}
