//! Credential activation, the verifier's half: TPM2_MakeCredential in
//! software (TPM 2.0 Part 1, 24 "Credential Protection"), so the server needs
//! no TPM.
//!
//! The verifier picks a random secret and encrypts it so that only a TPM
//! holding the EK's private key *and* a loaded object named `ak_name` can
//! recover it (TPM2_ActivateCredential checks both). A device that answers
//! with the secret has proven its AK lives in the same TPM as its EK.

use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::Padding;
use openssl::sign::Signer;
use openssl::symm::{Cipher, encrypt};

use crate::public::{AkPublic, EkPublic};
use crate::wire::put_sized;

/// The credential (secret) size: a SHA-256 digest's worth.
pub const CREDENTIAL_SIZE: usize = 32;

/// Credential activation failed.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The device answered with another secret than the one encrypted to
    /// its EK: its AK is not in the TPM holding that EK, or it guessed.
    #[error("credential activation answered wrongly: the AK is not proven to be in the EK's TPM")]
    WrongAnswer,
    /// openssl failed while building the challenge.
    #[error("making the credential: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
}

/// A MakeCredential challenge: what to send the device, and what it must
/// answer.
#[derive(Debug, Clone)]
pub struct CredentialChallenge {
    /// The `TPM2B_ID_OBJECT` buffer (integrity HMAC + encrypted credential),
    /// for TPM2_ActivateCredential's `credentialBlob`.
    pub id_object: Vec<u8>,
    /// The `TPM2B_ENCRYPTED_SECRET` buffer (the seed, RSA-OAEP encrypted to
    /// the EK), for TPM2_ActivateCredential's `secret`.
    pub encrypted_secret: Vec<u8>,
    expected: [u8; CREDENTIAL_SIZE],
}

impl CredentialChallenge {
    /// Encrypts a fresh random credential to `ek`, bound to `ak`'s name.
    pub fn new(ek: &EkPublic, ak: &AkPublic) -> Result<Self, ActivationError> {
        let mut credential = [0u8; CREDENTIAL_SIZE];
        openssl::rand::rand_bytes(&mut credential)?;
        Self::with_credential(ek, &ak.name(), credential)
    }

    /// As [`CredentialChallenge::new`] with a given credential and object name.
    pub fn with_credential(
        ek: &EkPublic,
        name: &[u8],
        credential: [u8; CREDENTIAL_SIZE],
    ) -> Result<Self, ActivationError> {
        // The seed, as large as the EK's name algorithm digest (SHA-256).
        let mut seed = [0u8; 32];
        openssl::rand::rand_bytes(&mut seed)?;

        // secret = RSA-OAEP(SHA-256, label "IDENTITY\0") of the seed.
        let pkey = PKey::from_rsa(ek.rsa().clone())?;
        let mut ctx = PkeyCtx::new(&pkey)?;
        ctx.encrypt_init()?;
        ctx.set_rsa_padding(Padding::PKCS1_OAEP)?;
        ctx.set_rsa_oaep_md(openssl::md::Md::sha256())?;
        ctx.set_rsa_mgf1_md(openssl::md::Md::sha256())?;
        ctx.set_rsa_oaep_label(b"IDENTITY\0")?;
        let mut encrypted_secret = Vec::new();
        ctx.encrypt_to_vec(&seed, &mut encrypted_secret)?;

        // symKey = KDFa(SHA-256, seed, "STORAGE", name, "", EK symmetric bits)
        let bits = u32::from(ek.public().symmetric_bits);
        let sym_key = kdfa(&seed, b"STORAGE", name, &[], bits)?;
        let cipher = if bits == 256 {
            Cipher::aes_256_cfb128()
        } else {
            Cipher::aes_128_cfb128()
        };
        let mut plain = Vec::with_capacity(2 + CREDENTIAL_SIZE);
        put_sized(&mut plain, &credential);
        let enc_identity = encrypt(cipher, &sym_key, Some(&[0u8; 16]), &plain)?;

        // HMACkey = KDFa(SHA-256, seed, "INTEGRITY", "", "", 256);
        // outerHMAC = HMAC(HMACkey, encIdentity || name)
        let hmac_key = kdfa(&seed, b"INTEGRITY", &[], &[], 256)?;
        let outer_hmac = hmac_sha256(&hmac_key, &[&enc_identity, name])?;

        let mut id_object = Vec::with_capacity(2 + outer_hmac.len() + enc_identity.len());
        put_sized(&mut id_object, &outer_hmac);
        id_object.extend_from_slice(&enc_identity);
        Ok(Self {
            id_object,
            encrypted_secret,
            expected: credential,
        })
    }

    /// Checks the device's answer (the credential TPM2_ActivateCredential
    /// returned), in constant time.
    pub fn check(&self, answer: &[u8]) -> Result<(), ActivationError> {
        if answer.len() == CREDENTIAL_SIZE && openssl::memcmp::eq(answer, &self.expected) {
            Ok(())
        } else {
            Err(ActivationError::WrongAnswer)
        }
    }

    /// The credential the device must answer with (for a verifier that keeps
    /// it elsewhere, e.g. in its database, between challenge and answer).
    pub fn expected(&self) -> &[u8; CREDENTIAL_SIZE] {
        &self.expected
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let key = PKey::hmac(key)?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key)?;
    for part in parts {
        signer.update(part)?;
    }
    signer.sign_to_vec()
}

/// KDFa with SHA-256 (TPM 2.0 Part 1, 11.4.10.2; NIST SP 800-108 counter
/// mode): `HMAC(key, i || label || 0x00 || context_u || context_v || bits)`
/// for i = 1, 2, ..., truncated to `bits`.
fn kdfa(
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        // The label's terminating NUL is part of the input.
        let block = hmac_sha256(
            key,
            &[
                &counter.to_be_bytes(),
                label,
                &[0],
                context_u,
                context_v,
                &bits.to_be_bytes(),
            ],
        )?;
        out.extend_from_slice(&block);
        counter += 1;
    }
    out.truncate(bytes);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kdfa_is_counter_mode_hmac_with_nul_terminated_label() {
        // One block: HMAC(key, 00000001 || "STORAGE\0" || u || v || 00000080)
        let key = [7u8; 32];
        let got = kdfa(&key, b"STORAGE", b"u", b"v", 128).unwrap();
        let mut input = vec![0, 0, 0, 1];
        input.extend_from_slice(b"STORAGE\0uv");
        input.extend_from_slice(&128u32.to_be_bytes());
        let want = hmac_sha256(&key, &[&input]).unwrap();
        assert_eq!(got, want[..16]);
        // Two blocks for 384 bits, the second with counter 2.
        assert_eq!(kdfa(&key, b"X", &[], &[], 384).unwrap().len(), 48);
    }
}
