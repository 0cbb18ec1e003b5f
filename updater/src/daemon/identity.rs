//! The key that is the device's identity: a P-256 key in the TPM when
//! `[tpm]` is configured (and the updater has TPM support), otherwise an
//! Ed25519 key file in the data dir ([`super::state::device_key`]). A
//! device that already has a key file keeps it when a `[tpm]` is added
//! later: a new key would be a new identity the server parks for an
//! operator.

use anyhow::Result;
use kernex_protocol::api;
use kernex_protocol::device_key::DeviceKey;

/// The device's key, wherever it lives.
#[derive(Debug)]
pub(super) enum DeviceIdentity {
    /// A key file in the data dir.
    File(DeviceKey),
    /// A key in the TPM.
    #[cfg(feature = "tpm")]
    Tpm {
        /// The TPM.
        config: crate::cli::attest::TpmConfig,
        /// The key's blob.
        blob: kernex_attest::SigningKeyBlob,
    },
}

impl DeviceIdentity {
    /// The public key: hex of its DER SPKI.
    pub fn public_key_hex(&self) -> Result<String> {
        match self {
            Self::File(key) => Ok(key.public_key_hex()?),
            #[cfg(feature = "tpm")]
            Self::Tpm { blob, .. } => Ok(hex::encode(blob.spki_der()?)),
        }
    }

    /// Signs `message`; hex (DER for P-256).
    fn sign(&self, message: &[u8]) -> Result<String> {
        match self {
            Self::File(key) => Ok(key.sign(message)?),
            #[cfg(feature = "tpm")]
            Self::Tpm { config, blob } => Ok(hex::encode(crate::attest::sign_with_device_key(
                config, blob, message,
            )?)),
        }
    }

    /// Whether the key lives in the TPM.
    pub fn in_tpm(&self) -> bool {
        !matches!(self, Self::File(_))
    }

    /// The proof that this device (`device_id`) holds the key, for `nonce`.
    pub fn proof(&self, device_id: &str, nonce: &str) -> Result<api::KeyProof> {
        let public_key = self.public_key_hex()?;
        let signature = self.sign(&api::enroll_message(device_id, nonce, &public_key))?;
        Ok(api::KeyProof {
            public_key,
            nonce: nonce.to_owned(),
            signature,
        })
    }

    /// The answer to `nonce` of the device the server knows as `id`.
    pub fn auth(&self, id: &str, nonce: &str) -> Result<api::DeviceAuth> {
        Ok(api::DeviceAuth {
            id: id.to_owned(),
            nonce: nonce.to_owned(),
            signature: self.sign(&api::auth_message(id, nonce))?,
        })
    }
}
