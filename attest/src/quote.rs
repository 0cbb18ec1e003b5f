//! TPM quotes (`TPMS_ATTEST` + `TPMT_SIGNATURE`) and their verification.
//!
//! Pure: parses the bytes in Rust with bounds on every field, checks the
//! signature with openssl. Needs no TPM, so the server runs it.

use std::collections::BTreeMap;

use kernex_protocol::Sha256Digest;
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::rsa::Padding;
use openssl::sign::{RsaPssSaltlen, Verifier};
use sha2::{Digest as _, Sha256};

use crate::public::AkPublic;
use crate::wire::{Reader, WireError, alg};

/// The largest marshalled `TPMS_ATTEST` accepted (a quote is ~150 bytes).
pub const MAX_ATTEST_SIZE: usize = 2048;
/// The largest marshalled `TPMT_SIGNATURE` accepted (RSA-4096: 518 bytes).
pub const MAX_SIGNATURE_SIZE: usize = 1024;
/// The most PCR values a quote may carry (one SHA-256 bank of 24 PCRs).
pub const MAX_QUOTED_PCRS: usize = 24;
/// The longest nonce (`TPM2B_DATA` holds at most 64 bytes).
pub const MAX_NONCE_SIZE: usize = 64;

/// The nonce size the verifier uses.
pub const NONCE_SIZE: usize = 32;

/// A fresh random nonce for a quote request (openssl's CSPRNG).
pub fn fresh_nonce() -> Result<[u8; NONCE_SIZE], openssl::error::ErrorStack> {
    let mut nonce = [0u8; NONCE_SIZE];
    openssl::rand::rand_bytes(&mut nonce)?;
    Ok(nonce)
}

pub use kernex_protocol::api::Quote;

/// Why a quote was rejected. Each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum QuoteError {
    /// The quote or signature bytes are not what a TPM produces.
    #[error("malformed quote: {0}")]
    Malformed(#[from] WireError),
    /// A part is larger than its limit.
    #[error("{what} is {found}, more than the limit of {limit}")]
    TooLarge {
        /// Which part.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// What was found.
        found: usize,
    },
    /// The signature does not verify with the enrolled AK: the quote was
    /// signed by another key (another TPM), or altered.
    #[error("quote signature does not verify with the enrolled attestation key")]
    BadSignature,
    /// The signature's scheme or hash is not the AK's, or not supported.
    #[error("signature scheme {scheme:#06x} with hash {hash:#06x} is not the attestation key's")]
    SignatureScheme {
        /// `TPM_ALG_*` of the scheme.
        scheme: u16,
        /// `TPM_ALG_*` of the hash.
        hash: u16,
    },
    /// Not a `TPM_GENERATED_VALUE` quote structure.
    #[error("not a TPM-generated quote (magic {magic:#010x}, type {kind:#06x})")]
    NotAQuote {
        /// The magic found.
        magic: u32,
        /// The structure type found.
        kind: u16,
    },
    /// The quote answers another nonce: a replayed or stale quote.
    #[error(
        "quote answers nonce {found}, not the outstanding challenge {expected} (replayed or stale quote)"
    )]
    NonceMismatch {
        /// Hex of the nonce the verifier issued.
        expected: String,
        /// Hex of the nonce in the quote.
        found: String,
    },
    /// The quote does not cover a PCR the verifier needs, or covers
    /// another bank.
    #[error("quote does not cover PCR {pcr} of the SHA-256 bank")]
    PcrNotQuoted {
        /// The PCR.
        pcr: u8,
    },
    /// The PCR values sent alongside do not hash to the signed PCR digest.
    #[error("the reported PCR values do not match the quote's signed PCR digest")]
    PcrDigestMismatch,
    /// A PCR holds another value than expected (e.g. the slot PCR of a
    /// different image).
    #[error("PCR {pcr} is {found}, expected {expected}")]
    PcrMismatch {
        /// The PCR.
        pcr: u8,
        /// Expected value (hex).
        expected: Sha256Digest,
        /// Quoted value (hex).
        found: Sha256Digest,
    },
}

/// What a verified quote says about the TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// TPM clock (ms since the TPM's clock was last set).
    pub clock: u64,
    /// TPM resets (power cycles) since the storage primary seed changed.
    pub reset_count: u32,
    /// TPM restarts (resumes) since the last reset.
    pub restart_count: u32,
    /// The TPM firmware version.
    pub firmware_version: u64,
    /// The quoted PCR values (all bound by the signature).
    pub pcrs: BTreeMap<u8, Sha256Digest>,
}

/// The parsed `TPMS_ATTEST` of a quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteInfo {
    /// `TPMS_ATTEST.magic`.
    pub magic: u32,
    /// `TPMS_ATTEST.type`.
    pub kind: u16,
    /// `extraData`: the verifier's nonce.
    pub extra_data: Vec<u8>,
    /// `clockInfo.clock`.
    pub clock: u64,
    /// `clockInfo.resetCount`.
    pub reset_count: u32,
    /// `clockInfo.restartCount`.
    pub restart_count: u32,
    /// `firmwareVersion`.
    pub firmware_version: u64,
    /// `pcrSelect`: per bank (`TPM_ALG_*`), the selected PCR indices.
    pub selection: Vec<(u16, Vec<u8>)>,
    /// `pcrDigest`.
    pub pcr_digest: Vec<u8>,
}

impl QuoteInfo {
    /// Parses a marshalled `TPMS_ATTEST` holding a `TPMS_QUOTE_INFO`.
    pub fn parse(bytes: &[u8]) -> Result<Self, QuoteError> {
        if bytes.len() > MAX_ATTEST_SIZE {
            return Err(QuoteError::TooLarge {
                what: "TPMS_ATTEST (bytes)",
                limit: MAX_ATTEST_SIZE,
                found: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes);
        let magic = r.u32("magic")?;
        let kind = r.u16("type")?;
        if magic != alg::TPM_GENERATED || kind != alg::ST_ATTEST_QUOTE {
            return Err(QuoteError::NotAQuote { magic, kind });
        }
        r.sized(68, "qualifiedSigner")?;
        let extra_data = r.sized(MAX_NONCE_SIZE, "extraData")?.to_vec();
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        r.u8("clockInfo.safe")?;
        let firmware_version = r.u64("firmwareVersion")?;
        let banks = r.u32("pcrSelect.count")?;
        if banks > 16 {
            return Err(WireError::TooLarge {
                field: "pcrSelect.count",
                limit: 16,
                found: banks as usize,
            }
            .into());
        }
        let mut selection = Vec::new();
        for _ in 0..banks {
            let hash = r.u16("pcrSelect.hash")?;
            let size = usize::from(r.u8("pcrSelect.sizeofSelect")?);
            if size > 4 {
                return Err(WireError::TooLarge {
                    field: "pcrSelect.sizeofSelect",
                    limit: 4,
                    found: size,
                }
                .into());
            }
            let bits = r.take(size, "pcrSelect.pcrSelect")?;
            let mut pcrs = Vec::new();
            for (byte_index, byte) in bits.iter().enumerate() {
                for bit in 0..8u8 {
                    if byte & (1 << bit) != 0 {
                        // byte_index < 4, so this fits in a u8.
                        pcrs.push(byte_index as u8 * 8 + bit);
                    }
                }
            }
            selection.push((hash, pcrs));
        }
        let pcr_digest = r.sized(64, "pcrDigest")?.to_vec();
        r.finish("TPMS_ATTEST")?;
        Ok(Self {
            magic,
            kind,
            extra_data,
            clock,
            reset_count,
            restart_count,
            firmware_version,
            selection,
            pcr_digest,
        })
    }
}

/// A parsed `TPMT_SIGNATURE`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Signature {
    Rsa {
        scheme: u16,
        hash: u16,
        sig: Vec<u8>,
    },
    Ecdsa {
        hash: u16,
        r: Vec<u8>,
        s: Vec<u8>,
    },
}

impl Signature {
    fn parse(bytes: &[u8]) -> Result<Self, QuoteError> {
        if bytes.len() > MAX_SIGNATURE_SIZE {
            return Err(QuoteError::TooLarge {
                what: "TPMT_SIGNATURE (bytes)",
                limit: MAX_SIGNATURE_SIZE,
                found: bytes.len(),
            });
        }
        let mut r = Reader::new(bytes);
        let scheme = r.u16("sigAlg")?;
        let sig = match scheme {
            alg::RSASSA | alg::RSAPSS => {
                let hash = r.u16("signature.hash")?;
                let sig = r.sized(512, "signature.sig")?.to_vec();
                Signature::Rsa { scheme, hash, sig }
            }
            alg::ECDSA => {
                let hash = r.u16("signature.hash")?;
                let rr = r.sized(66, "signature.signatureR")?.to_vec();
                let s = r.sized(66, "signature.signatureS")?.to_vec();
                Signature::Ecdsa { hash, r: rr, s }
            }
            other => {
                return Err(WireError::Unexpected {
                    field: "sigAlg",
                    value: u32::from(other),
                }
                .into());
            }
        };
        r.finish("TPMT_SIGNATURE")?;
        Ok(sig)
    }

    fn verify(&self, ak: &AkPublic, message: &[u8]) -> Result<(), QuoteError> {
        let key = &ak.public().key;
        let ak_scheme = ak.public().scheme;
        let (scheme, hash) = match self {
            Signature::Rsa { scheme, hash, .. } => (*scheme, *hash),
            Signature::Ecdsa { hash, .. } => (alg::ECDSA, *hash),
        };
        let digest = match hash {
            alg::SHA256 => MessageDigest::sha256(),
            0x000C => MessageDigest::sha384(),
            _ => return Err(QuoteError::SignatureScheme { scheme, hash }),
        };
        if ak_scheme != alg::NULL && ak_scheme != scheme {
            return Err(QuoteError::SignatureScheme { scheme, hash });
        }
        let fail = |_| QuoteError::BadSignature;
        let ok = match self {
            Signature::Rsa { scheme, sig, .. } => {
                if key.rsa().is_err() {
                    return Err(QuoteError::SignatureScheme {
                        scheme: *scheme,
                        hash,
                    });
                }
                let mut v = Verifier::new(digest, key).map_err(fail)?;
                if *scheme == alg::RSAPSS {
                    v.set_rsa_padding(Padding::PKCS1_PSS).map_err(fail)?;
                    v.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)
                        .map_err(fail)?;
                } else {
                    v.set_rsa_padding(Padding::PKCS1).map_err(fail)?;
                }
                v.verify_oneshot(sig, message).unwrap_or(false)
            }
            Signature::Ecdsa { r, s, .. } => {
                if key.ec_key().is_err() {
                    return Err(QuoteError::SignatureScheme { scheme, hash });
                }
                let der = openssl::bn::BigNum::from_slice(r)
                    .and_then(|r| Ok((r, openssl::bn::BigNum::from_slice(s)?)))
                    .and_then(|(r, s)| EcdsaSig::from_private_components(r, s))
                    .and_then(|sig| sig.to_der())
                    .map_err(fail)?;
                let mut v = Verifier::new(digest, key).map_err(fail)?;
                v.verify_oneshot(&der, message).unwrap_or(false)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(QuoteError::BadSignature)
        }
    }
}

/// Verifies `quote` against the enrolled AK, the nonce the verifier issued
/// and the PCR values it expects.
///
/// In order: sizes and structure (→ [`QuoteError::Malformed`]), the signature
/// with `ak` (→ [`QuoteError::BadSignature`]), the nonce (→
/// [`QuoteError::NonceMismatch`]), that every expected PCR is quoted in the
/// SHA-256 bank (→ [`QuoteError::PcrNotQuoted`]), that the reported PCR
/// values hash to the signed digest (→ [`QuoteError::PcrDigestMismatch`]),
/// then each expected PCR value (→ [`QuoteError::PcrMismatch`], naming the
/// PCR). `nonce` is compared in constant time.
pub fn verify_quote(
    ak: &AkPublic,
    quote: &Quote,
    nonce: &[u8],
    expected: &BTreeMap<u8, Sha256Digest>,
) -> Result<VerifiedQuote, QuoteError> {
    if quote.pcrs.len() > MAX_QUOTED_PCRS {
        return Err(QuoteError::TooLarge {
            what: "PCR value count",
            limit: MAX_QUOTED_PCRS,
            found: quote.pcrs.len(),
        });
    }
    let info = QuoteInfo::parse(&quote.attest)?;
    let signature = Signature::parse(&quote.signature)?;
    signature.verify(ak, &quote.attest)?;

    if info.extra_data.len() != nonce.len() || !openssl::memcmp::eq(&info.extra_data, nonce) {
        return Err(QuoteError::NonceMismatch {
            expected: hex::encode(nonce),
            found: hex::encode(&info.extra_data),
        });
    }

    // The quoted selection must be exactly the SHA-256 PCRs reported (the
    // digest covers them in ascending order), and include every expected one.
    let mut quoted: Vec<u8> = Vec::new();
    for (hash, pcrs) in &info.selection {
        if *hash == alg::SHA256 {
            quoted.extend(pcrs);
        } else if !pcrs.is_empty() {
            // Another bank's values would enter the digest; we only carry SHA-256.
            return Err(QuoteError::PcrDigestMismatch);
        }
    }
    quoted.sort_unstable();
    quoted.dedup();
    for pcr in expected.keys() {
        if !quoted.contains(pcr) {
            return Err(QuoteError::PcrNotQuoted { pcr: *pcr });
        }
    }
    let reported: Vec<u8> = quote.pcrs.keys().copied().collect();
    if reported != quoted {
        return Err(QuoteError::PcrDigestMismatch);
    }
    let mut hasher = Sha256::new();
    for value in quote.pcrs.values() {
        hasher.update(value.0);
    }
    let digest: [u8; 32] = hasher.finalize().into();
    if info.pcr_digest != digest {
        return Err(QuoteError::PcrDigestMismatch);
    }

    for (pcr, want) in expected {
        let found = quote
            .pcrs
            .get(pcr)
            .copied()
            .unwrap_or(Sha256Digest([0; 32]));
        if found != *want {
            return Err(QuoteError::PcrMismatch {
                pcr: *pcr,
                expected: *want,
                found,
            });
        }
    }
    Ok(VerifiedQuote {
        clock: info.clock,
        reset_count: info.reset_count,
        restart_count: info.restart_count,
        firmware_version: info.firmware_version,
        pcrs: quote.pcrs.clone(),
    })
}
