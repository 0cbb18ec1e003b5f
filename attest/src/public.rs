//! TPM public keys as they travel: a marshalled `TPMT_PUBLIC`, parsed here
//! (bounded, in Rust) into what the verifier needs — the key for openssl, the
//! object's attributes and its TPM name.

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public};
use openssl::rsa::Rsa;
use sha2::{Digest as _, Sha256};

use crate::wire::{Reader, WireError, alg};

/// The largest marshalled `TPMT_PUBLIC` accepted (an RSA-4096 key with a
/// SHA-512 policy is about 600 bytes).
pub const MAX_PUBLIC_SIZE: usize = 1024;

/// `TPMA_OBJECT` bits (TPM 2.0 Part 2, 8.3).
pub mod attributes {
    /// The key cannot be duplicated out of this TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// The key cannot be moved to another parent.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM generated the key's sensitive part.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// The key only signs or decrypts TPM-made structures.
    pub const RESTRICTED: u32 = 1 << 16;
    /// A decryption (storage) key.
    pub const DECRYPT: u32 = 1 << 17;
    /// A signing key.
    pub const SIGN: u32 = 1 << 18;
}

/// A TPM public key was unusable.
#[derive(Debug, thiserror::Error)]
pub enum PublicKeyError {
    /// The bytes are not a `TPMT_PUBLIC`.
    #[error("malformed TPMT_PUBLIC: {0}")]
    Malformed(#[from] WireError),
    /// Longer than [`MAX_PUBLIC_SIZE`].
    #[error("TPMT_PUBLIC is {found} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The limit.
        limit: usize,
        /// The size found.
        found: usize,
    },
    /// The key's type, curve, scheme or name algorithm is not supported.
    #[error("unsupported key: {0}")]
    Unsupported(String),
    /// The key lacks an attribute its role requires (or has one it must not).
    #[error("{role} must be {required}: object attributes are {attributes:#010x}")]
    Attributes {
        /// "attestation key" or "endorsement key".
        role: &'static str,
        /// What the role requires.
        required: &'static str,
        /// The attributes found.
        attributes: u32,
    },
    /// openssl refused the key material.
    #[error("invalid key material: {0}")]
    KeyMaterial(#[from] openssl::error::ErrorStack),
}

/// The parts of a `TPMT_PUBLIC` the verifier uses.
#[derive(Debug, Clone)]
pub struct TpmPublic {
    /// The marshalled `TPMT_PUBLIC`, exactly as received.
    pub bytes: Vec<u8>,
    /// `TPMA_OBJECT`.
    pub attributes: u32,
    /// Symmetric algorithm key bits for storage keys (AES), 0 when none.
    pub symmetric_bits: u16,
    /// The key's signing scheme (`TPM_ALG_*`, `NULL` when unrestricted).
    pub scheme: u16,
    /// The key for openssl.
    pub key: PKey<Public>,
}

impl TpmPublic {
    /// Parses a marshalled `TPMT_PUBLIC` (RSA, or ECC on P-256/P-384; name
    /// algorithm SHA-256).
    pub fn parse(bytes: &[u8]) -> Result<Self, PublicKeyError> {
        if bytes.len() > MAX_PUBLIC_SIZE {
            return Err(PublicKeyError::TooLarge {
                limit: MAX_PUBLIC_SIZE,
                found: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes);
        let kind = r.u16("type")?;
        let name_alg = r.u16("nameAlg")?;
        if name_alg != alg::SHA256 {
            return Err(PublicKeyError::Unsupported(format!(
                "name algorithm {name_alg:#06x} (only SHA-256)"
            )));
        }
        let attributes = r.u32("objectAttributes")?;
        r.sized(64, "authPolicy")?;
        // TPMT_SYM_DEF_OBJECT
        let sym = r.u16("parameters.symmetric.algorithm")?;
        let mut symmetric_bits = 0;
        if sym != alg::NULL {
            symmetric_bits = r.u16("parameters.symmetric.keyBits")?;
            let mode = r.u16("parameters.symmetric.mode")?;
            if sym != alg::AES || mode != alg::CFB {
                return Err(PublicKeyError::Unsupported(format!(
                    "symmetric {sym:#06x} mode {mode:#06x} (only AES-CFB)"
                )));
            }
        }
        let key = match kind {
            alg::RSA => {
                let scheme = r.u16("parameters.rsa.scheme")?;
                if scheme != alg::NULL {
                    r.u16("parameters.rsa.scheme.hashAlg")?;
                }
                let _key_bits = r.u16("parameters.rsa.keyBits")?;
                let exponent = match r.u32("parameters.rsa.exponent")? {
                    0 => 65537,
                    e => e,
                };
                let modulus = r.sized(512, "unique.rsa")?;
                r.finish("TPMT_PUBLIC")?;
                let rsa = Rsa::from_public_components(
                    BigNum::from_slice(modulus)?,
                    BigNum::from_u32(exponent)?,
                )?;
                (scheme, PKey::from_rsa(rsa)?)
            }
            alg::ECC => {
                let scheme = r.u16("parameters.ecc.scheme")?;
                if scheme != alg::NULL {
                    r.u16("parameters.ecc.scheme.hashAlg")?;
                    if scheme == alg::ECDAA {
                        r.u16("parameters.ecc.scheme.count")?;
                    }
                }
                let curve = r.u16("parameters.ecc.curveID")?;
                let kdf = r.u16("parameters.ecc.kdf")?;
                if kdf != alg::NULL {
                    r.u16("parameters.ecc.kdf.hashAlg")?;
                }
                let x = r.sized(66, "unique.ecc.x")?;
                let y = r.sized(66, "unique.ecc.y")?;
                r.finish("TPMT_PUBLIC")?;
                let nid = match curve {
                    alg::ECC_NIST_P256 => Nid::X9_62_PRIME256V1,
                    alg::ECC_NIST_P384 => Nid::SECP384R1,
                    other => {
                        return Err(PublicKeyError::Unsupported(format!(
                            "ECC curve {other:#06x} (only NIST P-256 and P-384)"
                        )));
                    }
                };
                let group = EcGroup::from_curve_name(nid)?;
                let (x, y) = (BigNum::from_slice(x)?, BigNum::from_slice(y)?);
                let ec = EcKey::from_public_key_affine_coordinates(&group, &x, &y)?;
                ec.check_key()?;
                (scheme, PKey::from_ec_key(ec)?)
            }
            other => {
                return Err(PublicKeyError::Unsupported(format!(
                    "key type {other:#06x} (only RSA and ECC)"
                )));
            }
        };
        Ok(Self {
            bytes: bytes.to_vec(),
            attributes,
            symmetric_bits,
            scheme: key.0,
            key: key.1,
        })
    }

    /// The TPM name: `nameAlg` (SHA-256) followed by SHA-256 of the
    /// `TPMT_PUBLIC`. MakeCredential binds the credential to it.
    pub fn name(&self) -> Vec<u8> {
        let mut name = alg::SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(&Sha256::digest(&self.bytes));
        name
    }

    /// The key as PEM (SubjectPublicKeyInfo), e.g. for `tpm2_checkquote -u`.
    pub fn to_pem(&self) -> Result<String, PublicKeyError> {
        let pem = self.key.public_key_to_pem()?;
        Ok(String::from_utf8_lossy(&pem).into_owned())
    }

    fn has(&self, bits: u32) -> bool {
        self.attributes & bits == bits
    }
}

/// An attestation key: a restricted signing key that never leaves its TPM.
#[derive(Debug, Clone)]
pub struct AkPublic(TpmPublic);

impl AkPublic {
    /// Parses and checks an AK's marshalled `TPMT_PUBLIC`: restricted, sign,
    /// not decrypt, fixedTPM, fixedParent, sensitiveDataOrigin. A restricted
    /// key signs only digests the TPM computed itself, so a quote it signed
    /// cannot be forged by feeding the TPM a hand-made `TPMS_ATTEST`.
    pub fn parse(bytes: &[u8]) -> Result<Self, PublicKeyError> {
        use attributes::*;
        let public = TpmPublic::parse(bytes)?;
        let required = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
        if !public.has(required) || public.has(DECRYPT) {
            return Err(PublicKeyError::Attributes {
                role: "attestation key",
                required: "restricted, sign, not decrypt, fixedTPM, fixedParent, sensitiveDataOrigin",
                attributes: public.attributes,
            });
        }
        Ok(Self(public))
    }

    /// The parsed key.
    pub fn public(&self) -> &TpmPublic {
        &self.0
    }

    /// The TPM name (see [`TpmPublic::name`]).
    pub fn name(&self) -> Vec<u8> {
        self.0.name()
    }

    /// The key as PEM.
    pub fn to_pem(&self) -> Result<String, PublicKeyError> {
        self.0.to_pem()
    }
}

/// An endorsement key: a restricted decryption key (RSA, AES-CFB), the root
/// of the TPM's identity. Credential activation encrypts to it.
#[derive(Debug, Clone)]
pub struct EkPublic {
    public: TpmPublic,
    rsa: Rsa<Public>,
}

impl EkPublic {
    /// Parses and checks an EK's marshalled `TPMT_PUBLIC` (RSA with an AES
    /// symmetric; restricted, decrypt, fixedTPM, fixedParent).
    pub fn parse(bytes: &[u8]) -> Result<Self, PublicKeyError> {
        use attributes::*;
        let public = TpmPublic::parse(bytes)?;
        let required = FIXED_TPM | FIXED_PARENT | RESTRICTED | DECRYPT;
        if !public.has(required) || public.has(SIGN) {
            return Err(PublicKeyError::Attributes {
                role: "endorsement key",
                required: "restricted, decrypt, not sign, fixedTPM, fixedParent",
                attributes: public.attributes,
            });
        }
        if !matches!(public.symmetric_bits, 128 | 256) {
            return Err(PublicKeyError::Unsupported(format!(
                "endorsement key symmetric of {} bits (AES-128 or AES-256)",
                public.symmetric_bits
            )));
        }
        let rsa = public.key.rsa().map_err(|_| {
            PublicKeyError::Unsupported("ECC endorsement key (only RSA for now)".to_owned())
        })?;
        Ok(Self { public, rsa })
    }

    /// The parsed key.
    pub fn public(&self) -> &TpmPublic {
        &self.public
    }

    pub(crate) fn rsa(&self) -> &Rsa<Public> {
        &self.rsa
    }

    /// Whether the X.509 certificate (DER, as the manufacturer wrote it to
    /// NV) certifies this key.
    pub fn matches_certificate(&self, der: &[u8]) -> Result<bool, PublicKeyError> {
        let cert = openssl::x509::X509::from_der(der)?;
        Ok(cert.public_key()?.public_eq(&self.public.key))
    }
}
