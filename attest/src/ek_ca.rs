//! The TPM vendors' CAs a verifier trusts for EK certificates (what Keylime
//! calls its `tpm_cert_store`), and the check that an EK certificate chains
//! to one of them and certifies the EK the device sent.
//!
//! Path building and signature checks are rustls-webpki's (pure Rust,
//! bounded DER parsing, no panics on malformed input): the EK certificate
//! is the end entity, the store's self-signed certificates are the trust
//! anchors and its other certificates the intermediates the path may go
//! through. Every certificate on the path must be valid at the given time,
//! CAs must be CAs (basicConstraints), and where a certificate lists
//! extended key usages the EK certificate one (`tcg-kp-EKCertificate`,
//! 2.23.133.8.1) must be among them. Signature algorithms: RSA PKCS#1 and
//! PSS with SHA-256/384/512 (RSA keys of 2048 bits or more), ECDSA P-256
//! and P-384, Ed25519; SHA-1 signatures are refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::public::EkPublic;

/// The largest EK certificate accepted (vendors' are 1–1.5 KB).
pub const MAX_EK_CERTIFICATE_SIZE: usize = 8192;
/// The largest file read into the store.
pub const MAX_STORE_FILE_SIZE: u64 = 1 << 20;
/// The most certificates a store holds.
pub const MAX_STORE_CERTIFICATES: usize = 1000;
/// The most files one store directory may hold.
const MAX_STORE_DIRECTORY_ENTRIES: usize = 10_000;

/// `tcg-kp-EKCertificate` (2.23.133.8.1), DER content octets.
const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];

/// The store could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EkCaStoreError {
    /// A file or directory could not be read.
    #[error("unable to read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_STORE_FILE_SIZE`].
    #[error("{path} is {found} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
        /// The size found.
        found: u64,
    },
    /// A file holds no certificate, bad PEM, or a certificate that does not
    /// parse.
    #[error("{path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// More than [`MAX_STORE_CERTIFICATES`] certificates.
    #[error("more than {limit} certificates")]
    TooMany {
        /// The limit.
        limit: usize,
    },
    /// Nothing to trust.
    #[error("no CA certificates in {0}")]
    Empty(String),
}

/// An EK certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum EkCertError {
    /// The TPM has no EK certificate (nothing at NV index 0x01c00002).
    #[error(
        "no EK certificate in the TPM's NV (index 0x01c00002): only TPMs whose EK is certified by a trusted TPM vendor CA are accepted"
    )]
    Missing,
    /// Larger than [`MAX_EK_CERTIFICATE_SIZE`].
    #[error("EK certificate is {found} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The limit.
        limit: usize,
        /// The size found.
        found: usize,
    },
    /// Not a well-formed X.509 certificate (or one with an unsupported
    /// critical extension or version).
    #[error("EK certificate is malformed: {0}")]
    Malformed(String),
    /// No path to a trusted CA: unknown issuer, or the signature does not
    /// verify with the trusted CA of that name.
    #[error("EK certificate not issued by a trusted TPM vendor CA (issuer {issuer}): {why}")]
    NotTrusted {
        /// The issuer's name as the certificate gives it.
        issuer: String,
        /// What failed.
        why: String,
    },
    /// Outside its validity period (or a CA certificate on its path is).
    #[error("EK certificate chain is not valid at this time: {0}")]
    Validity(String),
    /// A path exists but breaks a rule (key usage, basic constraints, path
    /// length, signature algorithm).
    #[error("EK certificate chain is not acceptable: {0}")]
    Path(String),
    /// The certificate is valid but for another key.
    #[error("EK certificate certifies another key than the EK the device sent")]
    OtherKey,
}

/// The trusted EK CA certificates.
#[derive(Debug, Clone)]
pub struct EkCaStore {
    anchors: Vec<TrustAnchor<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    /// Where they came from (for messages).
    sources: Vec<PathBuf>,
}

/// The signature algorithms accepted on an EK certificate path.
static ALGORITHMS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
];

impl EkCaStore {
    /// Loads the certificates of `paths`: each a file (PEM, one or more
    /// certificates; or one DER certificate) or a directory, whose regular
    /// files are all read (not recursively; names starting with `.` are
    /// skipped). Self-signed certificates are trust anchors; the others are
    /// intermediates, trusted only through an anchor in the store.
    pub fn load(paths: &[PathBuf]) -> Result<Self, EkCaStoreError> {
        let mut certs = Vec::new();
        let mut sources = Vec::new();
        for path in paths {
            let meta = std::fs::metadata(path).map_err(|source| EkCaStoreError::Read {
                path: path.clone(),
                source,
            })?;
            if meta.is_dir() {
                let mut files = Vec::new();
                let entries = std::fs::read_dir(path).map_err(|source| EkCaStoreError::Read {
                    path: path.clone(),
                    source,
                })?;
                for entry in entries {
                    if files.len() >= MAX_STORE_DIRECTORY_ENTRIES {
                        return Err(EkCaStoreError::Certificate {
                            path: path.clone(),
                            reason: format!(
                                "more than {MAX_STORE_DIRECTORY_ENTRIES} files in this directory"
                            ),
                        });
                    }
                    let entry = entry.map_err(|source| EkCaStoreError::Read {
                        path: path.clone(),
                        source,
                    })?;
                    let file = entry.path();
                    if entry.file_name().to_string_lossy().starts_with('.') || !file.is_file() {
                        continue;
                    }
                    files.push(file);
                }
                files.sort();
                for file in files {
                    read_certificates(&file, &mut certs)?;
                    sources.push(file);
                }
            } else {
                read_certificates(path, &mut certs)?;
                sources.push(path.clone());
            }
            if certs.len() > MAX_STORE_CERTIFICATES {
                return Err(EkCaStoreError::TooMany {
                    limit: MAX_STORE_CERTIFICATES,
                });
            }
        }
        let mut store = Self {
            anchors: Vec::new(),
            intermediates: Vec::new(),
            sources,
        };
        for (path, der) in certs {
            let bad = |e: webpki::Error| EkCaStoreError::Certificate {
                path: path.clone(),
                reason: format!("not a usable X.509 CA certificate: {e:?}"),
            };
            let self_signed = {
                let cert = EndEntityCert::try_from(&der).map_err(bad)?;
                cert.subject() == cert.issuer()
            };
            if self_signed {
                let anchor = webpki::anchor_from_trusted_cert(&der).map_err(bad)?;
                store.anchors.push(anchor.to_owned());
            } else {
                store.intermediates.push(der);
            }
        }
        if store.anchors.is_empty() {
            let names = paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            if store.intermediates.is_empty() {
                return Err(EkCaStoreError::Empty(names));
            }
            return Err(EkCaStoreError::Certificate {
                path: paths.first().cloned().unwrap_or_default(),
                reason: format!(
                    "{} CA certificates in {names}, none self-signed: add the vendors' root CA certificates (an intermediate is trusted only through its root)",
                    store.intermediates.len()
                ),
            });
        }
        Ok(store)
    }

    /// Trust anchors (self-signed CA certificates).
    pub fn anchors(&self) -> usize {
        self.anchors.len()
    }

    /// Intermediate CA certificates.
    pub fn intermediates(&self) -> usize {
        self.intermediates.len()
    }

    /// The files the certificates came from.
    pub fn sources(&self) -> &[PathBuf] {
        &self.sources
    }

    /// Checks that `certificate` (DER; `None`: the TPM has none) chains to
    /// a trusted CA at `now` (seconds since the Unix epoch) and certifies
    /// `ek`.
    pub fn verify(
        &self,
        certificate: Option<&[u8]>,
        ek: &EkPublic,
        now: Duration,
    ) -> Result<(), EkCertError> {
        let der = certificate.ok_or(EkCertError::Missing)?;
        if der.len() > MAX_EK_CERTIFICATE_SIZE {
            return Err(EkCertError::TooLarge {
                limit: MAX_EK_CERTIFICATE_SIZE,
                found: der.len(),
            });
        }
        let der = CertificateDer::from(der);
        let cert =
            EndEntityCert::try_from(&der).map_err(|e| EkCertError::Malformed(format!("{e:?}")))?;
        let issuer = || issuer_name(der.as_ref());
        cert.verify_for_usage(
            ALGORITHMS,
            &self.anchors,
            &self.intermediates,
            UnixTime::since_unix_epoch(now),
            KeyUsage::required_if_present(TCG_KP_EK_CERTIFICATE),
            None,
            None,
        )
        .map_err(|e| classify(e, issuer))?;
        let same = ek
            .matches_certificate(der.as_ref())
            .map_err(|e| EkCertError::Malformed(format!("its public key does not parse: {e}")))?;
        if !same {
            return Err(EkCertError::OtherKey);
        }
        Ok(())
    }
}

fn classify(e: webpki::Error, issuer: impl Fn() -> String) -> EkCertError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => EkCertError::NotTrusted {
            issuer: issuer(),
            why: "no trusted CA has that name".into(),
        },
        W::InvalidSignatureForPublicKey | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => EkCertError::NotTrusted {
            issuer: issuer(),
            why: "its signature does not verify with the trusted CA of that name".into(),
        },
        W::CertExpired { time, not_after } => EkCertError::Validity(format!(
            "a certificate expired at {} (unix seconds), now is {}",
            not_after.as_secs(),
            time.as_secs()
        )),
        W::CertNotValidYet { time, not_before } => EkCertError::Validity(format!(
            "a certificate is not valid before {} (unix seconds), now is {}",
            not_before.as_secs(),
            time.as_secs()
        )),
        W::InvalidCertValidity => {
            EkCertError::Validity("a certificate's notBefore is after its notAfter".into())
        }
        W::BadDer
        | W::BadDerTime
        | W::TrailingData(_)
        | W::UnsupportedCertVersion
        | W::UnsupportedCriticalExtension
        | W::ExtensionValueInvalid
        | W::MalformedExtensions
        | W::InvalidSerialNumber
        | W::SignatureAlgorithmMismatch
        | W::EmptyEkuExtension => EkCertError::Malformed(format!("{e:?}")),
        W::UnsupportedSignatureAlgorithmContext(_) => {
            EkCertError::Path(
                "a signature algorithm on the path is not accepted (SHA-1, or an RSA key under 2048 bits?)"
                    .into(),
            )
        }
        W::RequiredEkuNotFoundContext(_) => EkCertError::Path(
            "its extended key usage does not include tcg-kp-EKCertificate (2.23.133.8.1)".into(),
        ),
        other => EkCertError::Path(format!("{other:?}")),
    }
}

/// The issuer as `CN=…, O=…` for messages; `?` when unreadable.
fn issuer_name(der: &[u8]) -> String {
    let Ok(cert) = openssl::x509::X509::from_der(der) else {
        return "?".into();
    };
    match kernex_protocol::signature::name_to_string(cert.issuer_name()) {
        n if n.is_empty() => "(empty)".into(),
        n => n,
    }
}

/// Reads one file's certificates (PEM, or a single DER certificate).
fn read_certificates(
    path: &Path,
    out: &mut Vec<(PathBuf, CertificateDer<'static>)>,
) -> Result<(), EkCaStoreError> {
    let read_err = |source| EkCaStoreError::Read {
        path: path.to_owned(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_err)?.len();
    if size > MAX_STORE_FILE_SIZE {
        return Err(EkCaStoreError::TooLarge {
            path: path.to_owned(),
            limit: MAX_STORE_FILE_SIZE,
            found: size,
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    let bad = |reason: String| EkCaStoreError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let before = out.len();
    if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        for cert in CertificateDer::pem_slice_iter(&bytes) {
            let cert = cert.map_err(|e| bad(format!("bad PEM: {e}")))?;
            out.push((path.to_owned(), cert));
            if out.len() > MAX_STORE_CERTIFICATES {
                return Err(EkCaStoreError::TooMany {
                    limit: MAX_STORE_CERTIFICATES,
                });
            }
        }
        if out.len() == before {
            return Err(bad("no CERTIFICATE in this PEM file".into()));
        }
    } else if bytes.first() == Some(&0x30) {
        out.push((path.to_owned(), CertificateDer::from(bytes)));
    } else {
        return Err(bad(
            "neither PEM nor a DER certificate (expected -----BEGIN CERTIFICATE----- or DER)"
                .into(),
        ));
    }
    Ok(())
}
