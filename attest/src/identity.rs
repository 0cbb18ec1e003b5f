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

use crate::credential::CredentialChallenge;

pub use kernex_protocol::api::{Activation, TpmIdentity};

impl From<&CredentialChallenge> for Activation {
    fn from(c: &CredentialChallenge) -> Self {
        Self {
            id_object: c.id_object.clone(),
            encrypted_secret: c.encrypted_secret.clone(),
        }
    }
}
