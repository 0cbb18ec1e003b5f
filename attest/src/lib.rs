//! TPM-rooted device identity and attestation of the booted image.
//!
//! Two halves:
//!
//! - **Verifier** (pure; the server runs it, no TPM needed): parse and check
//!   TPM public keys ([`AkPublic`], [`EkPublic`]), make credential-activation
//!   challenges in software ([`CredentialChallenge`]), verify quotes
//!   ([`verify_quote`]) and recompute the slot PCR a release should produce
//!   ([`expected_slot_pcr`], [`slot_measurement`]); check EK certificates
//!   against the TPM vendors' CAs ([`EkCaStore`]). Every parser is bounded
//!   and written in Rust; bad bytes give an error naming the field.
//! - **Device** ([`Tpm`], through tpm2-tss): the EK and its certificate, the
//!   AK, TPM2_ActivateCredential, extending the slot measurement, quotes;
//!   the device's identity key (P-256, in the TPM) and the anti-rollback
//!   floor's NV counter.
//!
//! See attest/README.md for the protocol, the PCR map and the figures.

pub mod credential;
#[cfg(feature = "device")]
pub mod device;
pub mod ek_ca;
pub mod identity;
pub mod measure;
pub mod public;
pub mod quote;
mod wire;

pub use credential::{ActivationError, CredentialChallenge};
#[cfg(feature = "device")]
pub use device::counter::{FLOOR_BASE_INDEX, FLOOR_COUNTER_INDEX};
#[cfg(feature = "device")]
pub use device::signing::SigningKeyBlob;
#[cfg(feature = "device")]
pub use device::{AkBlob, DeviceError, Endorsement, Tpm};
pub use ek_ca::{EkCaStore, EkCaStoreError, EkCertError};
pub use identity::{Activation, TpmIdentity};
pub use measure::{DEFAULT_SLOT_PCR, expected_slot_pcr, extend, slot_measurement};
pub use public::{AkPublic, EkPublic, PublicKeyError};
pub use quote::{Quote, QuoteError, QuoteInfo, VerifiedQuote, fresh_nonce, verify_quote};
pub use wire::WireError;
