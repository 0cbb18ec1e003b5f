//! The device's key pair ([`api::KeyProof`], [`api::DeviceAuth`]):
//! generated on the device (Ed25519), kept in its data dir, never sent.
//! The server verifies with [`verify`], which also takes ECDSA P-256 keys
//! (a TPM-resident key), signatures in DER.

use openssl::hash::MessageDigest;
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::sign::{Signer, Verifier};
use sha2::{Digest as _, Sha256};

use crate::api;

/// Longest public key accepted, hex characters (an SPKI is ~90 bytes).
pub const MAX_PUBLIC_KEY_HEX: usize = 512;
/// Longest signature accepted, hex characters (a DER ECDSA signature is
/// at most 72 bytes, Ed25519 64).
pub const MAX_SIGNATURE_HEX: usize = 256;

/// What was wrong with a key or a signature.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not hex, too long, or not a key this scheme takes.
    #[error("public key: {0}")]
    PublicKey(String),
    /// The signature is malformed or does not verify.
    #[error("the signature does not verify")]
    Signature,
    /// The private key could not be read or used.
    #[error("device key: {0}")]
    Private(String),
}

/// The device's private key.
pub struct DeviceKey(PKey<Private>);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

fn private(e: openssl::error::ErrorStack) -> KeyError {
    KeyError::Private(e.to_string())
}

impl DeviceKey {
    /// A new Ed25519 key.
    pub fn generate() -> Result<Self, KeyError> {
        PKey::generate_ed25519().map(Self).map_err(private)
    }

    /// Reads a PKCS#8 PEM private key (Ed25519 or P-256).
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let key = PKey::private_key_from_pem(pem).map_err(private)?;
        match key.id() {
            Id::ED25519 | Id::EC => Ok(Self(key)),
            other => Err(KeyError::Private(format!("unsupported key type {other:?}"))),
        }
    }

    /// The key as PKCS#8 PEM.
    pub fn to_pem(&self) -> Result<Vec<u8>, KeyError> {
        self.0.private_key_to_pem_pkcs8().map_err(private)
    }

    /// The public key, hex of its DER `SubjectPublicKeyInfo`.
    pub fn public_key_hex(&self) -> Result<String, KeyError> {
        Ok(hex::encode(self.0.public_key_to_der().map_err(private)?))
    }

    /// Signs `message`; hex.
    pub fn sign(&self, message: &[u8]) -> Result<String, KeyError> {
        let mut signer = if self.0.id() == Id::ED25519 {
            Signer::new_without_digest(&self.0)
        } else {
            Signer::new(MessageDigest::sha256(), &self.0)
        }
        .map_err(private)?;
        Ok(hex::encode(
            signer.sign_oneshot_to_vec(message).map_err(private)?,
        ))
    }

    /// The proof that this device (`device_id`) holds the key, for `nonce`.
    pub fn proof(&self, device_id: &str, nonce: &str) -> Result<api::KeyProof, KeyError> {
        let public_key = self.public_key_hex()?;
        let signature = self.sign(&api::enroll_message(device_id, nonce, &public_key))?;
        Ok(api::KeyProof {
            public_key,
            nonce: nonce.to_owned(),
            signature,
        })
    }

    /// The answer to `nonce` of the device the server knows as `id`.
    pub fn auth(&self, id: &str, nonce: &str) -> Result<api::DeviceAuth, KeyError> {
        Ok(api::DeviceAuth {
            id: id.to_owned(),
            nonce: nonce.to_owned(),
            signature: self.sign(&api::auth_message(id, nonce))?,
        })
    }
}

/// Parses a public key (hex DER SPKI): Ed25519 or ECDSA P-256 only.
pub fn public_key(public_key_hex: &str) -> Result<PKey<Public>, KeyError> {
    if public_key_hex.len() > MAX_PUBLIC_KEY_HEX {
        return Err(KeyError::PublicKey(format!(
            "{} hex characters, more than the limit of {MAX_PUBLIC_KEY_HEX}",
            public_key_hex.len()
        )));
    }
    let der = hex::decode(public_key_hex).map_err(|e| KeyError::PublicKey(e.to_string()))?;
    let key = PKey::public_key_from_der(&der).map_err(|e| KeyError::PublicKey(e.to_string()))?;
    match key.id() {
        Id::ED25519 => Ok(key),
        Id::EC => {
            let curve = key
                .ec_key()
                .ok()
                .and_then(|k| k.group().curve_name())
                .ok_or_else(|| KeyError::PublicKey("EC key without a named curve".into()))?;
            if curve == openssl::nid::Nid::X9_62_PRIME256V1 {
                Ok(key)
            } else {
                Err(KeyError::PublicKey(format!(
                    "EC curve {curve:?}; only P-256 is taken"
                )))
            }
        }
        other => Err(KeyError::PublicKey(format!(
            "unsupported key type {other:?}; Ed25519 or P-256"
        ))),
    }
}

/// Checks that `signature_hex` is a signature over `message` by
/// `public_key_hex`.
pub fn verify(public_key_hex: &str, message: &[u8], signature_hex: &str) -> Result<(), KeyError> {
    let key = public_key(public_key_hex)?;
    if signature_hex.len() > MAX_SIGNATURE_HEX {
        return Err(KeyError::Signature);
    }
    let signature = hex::decode(signature_hex).map_err(|_| KeyError::Signature)?;
    let mut verifier = if key.id() == Id::ED25519 {
        Verifier::new_without_digest(&key)
    } else {
        Verifier::new(MessageDigest::sha256(), &key)
    }
    .map_err(|_| KeyError::Signature)?;
    match verifier.verify_oneshot(&signature, message) {
        Ok(true) => Ok(()),
        _ => Err(KeyError::Signature),
    }
}

/// SHA-256 (hex) of a public key's DER: how operators see a key.
pub fn fingerprint(public_key_hex: &str) -> String {
    let der = hex::decode(public_key_hex).unwrap_or_default();
    hex::encode(Sha256::digest(&der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_only_for_its_message_and_key() -> Result<(), KeyError> {
        let key = DeviceKey::generate()?;
        let again = DeviceKey::from_pem(&key.to_pem()?)?;
        assert_eq!(key.public_key_hex()?, again.public_key_hex()?);
        let proof = key.proof("dev-1", "00aa")?;
        let msg = api::enroll_message("dev-1", "00aa", &proof.public_key);
        verify(&proof.public_key, &msg, &proof.signature)?;
        let other = api::enroll_message("dev-2", "00aa", &proof.public_key);
        assert!(verify(&proof.public_key, &other, &proof.signature).is_err());
        let auth = key.auth("pk", "00aa")?;
        // A signature for enrollment is not one for authentication.
        assert!(
            verify(
                &proof.public_key,
                &api::auth_message("pk", "00aa"),
                &proof.signature
            )
            .is_err()
        );
        verify(
            &proof.public_key,
            &api::auth_message("pk", "00aa"),
            &auth.signature,
        )?;
        let stranger = DeviceKey::generate()?;
        assert!(verify(&stranger.public_key_hex()?, &msg, &proof.signature).is_err());
        Ok(())
    }

    #[test]
    fn p256_keys_verify_and_other_keys_are_refused() -> Result<(), Box<dyn std::error::Error>> {
        let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)?;
        let ec = PKey::from_ec_key(openssl::ec::EcKey::generate(&group)?)?;
        let key = DeviceKey::from_pem(&ec.private_key_to_pem_pkcs8()?)?;
        let auth = key.auth("pk", "01")?;
        verify(
            &key.public_key_hex()?,
            &api::auth_message("pk", "01"),
            &auth.signature,
        )?;
        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048)?)?;
        let rsa_hex = hex::encode(rsa.public_key_to_der()?);
        assert!(matches!(public_key(&rsa_hex), Err(KeyError::PublicKey(_))));
        assert!(matches!(public_key("zz"), Err(KeyError::PublicKey(_))));
        assert!(public_key(&"0".repeat(MAX_PUBLIC_KEY_HEX + 2)).is_err());
        Ok(())
    }
}
