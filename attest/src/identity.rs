//! What device and verifier exchange at enrollment, as JSON (byte strings in
//! lowercase hex).
//!
//! 1. Device → verifier: [`TpmIdentity`] (EK public, EK certificate, AK
//!    public).
//! 2. Verifier: checks the EK (pre-authorised, or certified by a trusted
//!    manufacturer CA), parses the AK ([`crate::AkPublic::parse`]), makes a
//!    [`crate::CredentialChallenge`] and sends its [`Activation`].
//! 3. Device: TPM2_ActivateCredential ([`crate::Tpm::activate_credential`]),
//!    answers the credential.
//! 4. Verifier: [`crate::CredentialChallenge::check`]; on success it records
//!    the AK public key as the device's, and later verifies quotes with it.

use serde::{Deserialize, Serialize};

use crate::credential::CredentialChallenge;
use crate::hex_serde::opt_hex;
use crate::quote::hex_bytes;

/// A device's TPM identity, sent at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TpmIdentity {
    /// The EK's marshalled `TPMT_PUBLIC`.
    #[serde(with = "hex_bytes")]
    pub ek_public: Vec<u8>,
    /// The EK certificate (DER) from NV, when the TPM has one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex")]
    pub ek_certificate: Option<Vec<u8>>,
    /// The AK's marshalled `TPMT_PUBLIC`.
    #[serde(with = "hex_bytes")]
    pub ak_public: Vec<u8>,
}

/// The credential-activation challenge as sent to the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Activation {
    /// TPM2_ActivateCredential's `credentialBlob` (`TPM2B_ID_OBJECT` buffer).
    #[serde(with = "hex_bytes")]
    pub id_object: Vec<u8>,
    /// TPM2_ActivateCredential's `secret` (`TPM2B_ENCRYPTED_SECRET` buffer).
    #[serde(with = "hex_bytes")]
    pub encrypted_secret: Vec<u8>,
}

impl From<&CredentialChallenge> for Activation {
    fn from(c: &CredentialChallenge) -> Self {
        Self {
            id_object: c.id_object.clone(),
            encrypted_secret: c.encrypted_secret.clone(),
        }
    }
}
