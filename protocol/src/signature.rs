//! Detached CMS (PKCS#7) signatures over the manifest, with X.509 chains.
//!
//! A bundle's `manifest.sig` is a DER-encoded CMS SignedData, detached
//! (the content is `manifest.json`), carrying the signing certificate and any
//! intermediates. A device trusts a keyring: one or more CA certificates in
//! PEM. Verification checks, in order: the signer certificate is present and
//! allowed to sign code (key usage digitalSignature, extended key usage
//! codeSigning), is within its validity period, chains to a keyring CA, and
//! its key produced the signature over exactly these manifest bytes. The same
//! files verify with `openssl cms -verify -binary -inform DER -content
//! manifest.json -CAfile ca.crt -purpose any`. The digest must be SHA-256
//! (OpenSSL's default for the EC and RSA keys Kernex uses); any other is
//! rejected before OpenSSL sees the signature.

use std::fmt;

use openssl::asn1::Asn1Time;
use openssl::cms::{CMSOptions, CmsContentInfo};
use openssl::hash::MessageDigest;
use openssl::pkcs7::{Pkcs7, Pkcs7Flags};
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyParam;
use openssl::x509::{X509, X509ExtendedKeyUsage, X509KeyUsage, X509PurposeId, X509Ref};
use serde::Serialize;

use crate::limits::MAX_SIGNATURE_SIZE;
use crate::manifest::{Manifest, ManifestError, VerifiedManifest};

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The keyring file holds no usable CA certificate.
    #[error("keyring holds no CA certificate: {0}")]
    Keyring(String),
    /// The signing key or certificate could not be loaded.
    #[error("signing key or certificate is not usable: {0}")]
    SigningKey(String),
    /// The bundle has no signature at all.
    #[error("bundle is not signed")]
    Unsigned,
    /// Larger than [`MAX_SIGNATURE_SIZE`].
    #[error("signature is {found} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The limit.
        limit: u64,
        /// The size found.
        found: u64,
    },
    /// Not a CMS/PKCS#7 structure.
    #[error("signature is not a DER-encoded CMS SignedData structure: {0}")]
    Malformed(String),
    /// No certificate for the signer is included.
    #[error("signature does not carry its signer's certificate")]
    NoSignerCertificate,
    /// The signer's certificate is not for code signing.
    #[error("signer {signer} may not sign bundles: {reason}")]
    WrongUsage {
        /// Signer subject.
        signer: String,
        /// Which usage is missing.
        reason: String,
    },
    /// The signer's certificate has expired (or is not yet valid).
    #[error(
        "signer certificate {signer} is not valid at the verification time: valid {not_before} to {not_after}"
    )]
    Expired {
        /// Signer subject.
        signer: String,
        /// Start of validity.
        not_before: String,
        /// End of validity.
        not_after: String,
    },
    /// Chain or signature check failed (unknown CA, tampered manifest...).
    #[error("signature by {signer} does not verify against the keyring: {reason}")]
    Verify {
        /// Signer subject.
        signer: String,
        /// OpenSSL's reason.
        reason: String,
    },
    /// Signature is fine but the signed manifest is not.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// Who signed a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SignerInfo {
    /// Subject, e.g. `O=Kernex dev, CN=Kernex development signing`.
    pub subject: String,
    /// Issuer subject.
    pub issuer: String,
    /// Serial number (hex).
    pub serial: String,
    /// End of validity.
    pub not_after: String,
    /// SHA-256 fingerprint of the certificate (hex).
    pub sha256_fingerprint: String,
}

impl fmt::Display for SignerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (issued by {})", self.subject, self.issuer)
    }
}

/// An X.509 name as `CN=…, O=…` (for messages).
pub fn name_to_string(name: &openssl::x509::X509NameRef) -> String {
    let parts: Vec<String> = name
        .entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_else(|_| "?".into());
            format!("{key}={value}")
        })
        .collect();
    parts.join(", ")
}

impl SignerInfo {
    fn of(cert: &X509Ref) -> Self {
        let serial = cert
            .serial_number()
            .to_bn()
            .and_then(|bn| bn.to_hex_str().map(|s| s.to_string()))
            .unwrap_or_default();
        let fingerprint = cert
            .digest(MessageDigest::sha256())
            .map(|d| hex::encode(&*d))
            .unwrap_or_default();
        SignerInfo {
            subject: name_to_string(cert.subject_name()),
            issuer: name_to_string(cert.issuer_name()),
            serial,
            not_after: cert.not_after().to_string(),
            sha256_fingerprint: fingerprint,
        }
    }
}

/// A signing key with its certificate and chain.
pub struct Signer {
    key: PKey<Private>,
    cert: X509,
    chain: Stack<X509>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("cert", &SignerInfo::of(&self.cert))
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads a PEM private key and a PEM certificate file whose first
    /// certificate is the signer's and whose others are intermediates to
    /// include in every signature.
    pub fn from_pem(key_pem: &[u8], cert_pem: &[u8]) -> Result<Self, SignatureError> {
        let key = PKey::private_key_from_pem(key_pem)
            .map_err(|e| SignatureError::SigningKey(format!("private key: {e}")))?;
        // Devices accept SHA-256 signatures only (see `verify_detached`);
        // OpenSSL signs with SHA-256 for EC and RSA keys, but with SHA-512
        // for Ed25519/Ed448, which devices would then reject.
        if !matches!(key.id(), openssl::pkey::Id::EC | openssl::pkey::Id::RSA) {
            return Err(SignatureError::SigningKey(format!(
                "{:?} keys are not supported; use an EC (P-256) or RSA key",
                key.id()
            )));
        }
        let mut certs = X509::stack_from_pem(cert_pem)
            .map_err(|e| SignatureError::SigningKey(format!("certificate: {e}")))?
            .into_iter();
        let cert = certs.next().ok_or_else(|| {
            SignatureError::SigningKey("certificate file holds no certificate".into())
        })?;
        let cert_key = cert
            .public_key()
            .map_err(|e| SignatureError::SigningKey(e.to_string()))?;
        if !key.public_eq(&cert_key) {
            return Err(SignatureError::SigningKey(
                "the private key does not belong to the certificate".into(),
            ));
        }
        let mut chain = Stack::new().map_err(|e| SignatureError::SigningKey(e.to_string()))?;
        for c in certs {
            chain
                .push(c)
                .map_err(|e| SignatureError::SigningKey(e.to_string()))?;
        }
        Ok(Self { key, cert, chain })
    }

    /// The signer's identity.
    pub fn info(&self) -> SignerInfo {
        SignerInfo::of(&self.cert)
    }

    /// Signs `data`, returning a detached DER CMS signature.
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, SignatureError> {
        let cms = CmsContentInfo::sign(
            Some(&self.cert),
            Some(&self.key),
            Some(&self.chain),
            Some(data),
            CMSOptions::DETACHED | CMSOptions::BINARY,
        )
        .map_err(|e| SignatureError::SigningKey(format!("signing failed: {e}")))?;
        cms.to_der()
            .map_err(|e| SignatureError::SigningKey(format!("encoding the signature: {e}")))
    }
}

/// Trusted CA certificates.
pub struct Keyring {
    cas: Vec<X509>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self
            .cas
            .iter()
            .map(|c| name_to_string(c.subject_name()))
            .collect();
        f.debug_struct("Keyring").field("cas", &names).finish()
    }
}

impl Keyring {
    /// Loads every certificate from PEM text (one file may hold several).
    pub fn from_pem(pem: &[u8]) -> Result<Self, SignatureError> {
        let cas = X509::stack_from_pem(pem).map_err(|e| SignatureError::Keyring(e.to_string()))?;
        if cas.is_empty() {
            return Err(SignatureError::Keyring("no PEM certificate found".into()));
        }
        Ok(Self { cas })
    }

    /// Subjects of the trusted CAs.
    pub fn subjects(&self) -> Vec<String> {
        self.cas
            .iter()
            .map(|c| name_to_string(c.subject_name()))
            .collect()
    }
}

/// Verification settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Check certificate validity at this Unix time instead of now (for
    /// devices whose clock is known to be wrong, and for tests).
    pub at_time: Option<i64>,
}

/// Reads the signer certificate out of a signature without trusting it, for
/// display (`bundle inspect`).
pub fn signer_of(signature: &[u8]) -> Result<SignerInfo, SignatureError> {
    let cert = signer_cert(signature)?;
    Ok(SignerInfo::of(&cert))
}

fn signer_cert(signature: &[u8]) -> Result<X509, SignatureError> {
    if signature.is_empty() {
        return Err(SignatureError::Unsigned);
    }
    if signature.len() as u64 > MAX_SIGNATURE_SIZE {
        return Err(SignatureError::TooLarge {
            limit: MAX_SIGNATURE_SIZE,
            found: signature.len() as u64,
        });
    }
    let p7 = Pkcs7::from_der(signature).map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let empty = Stack::new().map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let signers = p7
        .signers(&empty, Pkcs7Flags::empty())
        .map_err(|_| SignatureError::NoSignerCertificate)?;
    let mut signers = signers.into_iter();
    let cert = signers.next().ok_or(SignatureError::NoSignerCertificate)?;
    if signers.next().is_some() {
        return Err(SignatureError::Malformed(
            "more than one signer; Kernex bundles carry exactly one".into(),
        ));
    }
    Ok(cert)
}

fn check_usage(cert: &X509Ref, signer: &str) -> Result<(), SignatureError> {
    let wrong = |reason: &str| SignatureError::WrongUsage {
        signer: signer.to_string(),
        reason: reason.to_string(),
    };
    if let Some(ku) = cert.key_usage()
        && !ku.contains(X509KeyUsage::DIGITAL_SIGNATURE)
    {
        return Err(wrong("key usage lacks digitalSignature"));
    }
    match cert.extended_key_usage() {
        Some(eku) if eku.contains(X509ExtendedKeyUsage::CODE_SIGN) => Ok(()),
        Some(_) => Err(wrong("extended key usage lacks codeSigning")),
        None => Err(wrong(
            "no extended key usage; a bundle signing certificate must carry codeSigning",
        )),
    }
}

/// Verifies a detached signature over `data` against `keyring`.
pub fn verify_detached(
    keyring: &Keyring,
    data: &[u8],
    signature: &[u8],
    options: VerifyOptions,
) -> Result<SignerInfo, SignatureError> {
    let cert = signer_cert(signature)?;
    let info = SignerInfo::of(&cert);
    check_usage(&cert, &info.subject)?;

    let now = match options.at_time {
        Some(t) => Asn1Time::from_unix(t),
        None => Asn1Time::days_from_now(0),
    }
    .map_err(|e| SignatureError::Malformed(e.to_string()))?;
    let not_yet = cert
        .not_before()
        .compare(&now)
        .map(|o| o.is_gt())
        .unwrap_or(true);
    let expired = cert
        .not_after()
        .compare(&now)
        .map(|o| o.is_lt())
        .unwrap_or(true);
    if not_yet || expired {
        return Err(SignatureError::Expired {
            signer: info.subject.clone(),
            not_before: cert.not_before().to_string(),
            not_after: cert.not_after().to_string(),
        });
    }

    let verify_err = |reason: String| SignatureError::Verify {
        signer: info.subject.clone(),
        reason,
    };
    let mut store = X509StoreBuilder::new().map_err(|e| verify_err(e.to_string()))?;
    for ca in &keyring.cas {
        store
            .add_cert(ca.clone())
            .map_err(|e| verify_err(e.to_string()))?;
    }
    // Usage is checked above (codeSigning); OpenSSL's default CMS purpose
    // would demand S/MIME email protection instead.
    store
        .set_purpose(X509PurposeId::ANY)
        .map_err(|e| verify_err(e.to_string()))?;
    if let Some(t) = options.at_time {
        let mut param = X509VerifyParam::new().map_err(|e| verify_err(e.to_string()))?;
        param.set_time(t as _);
        store
            .set_param(&param)
            .map_err(|e| verify_err(e.to_string()))?;
    }
    let store = store.build();

    check_digest_algorithms(signature)?;
    let mut cms = CmsContentInfo::from_der(signature)
        .map_err(|e| SignatureError::Malformed(e.to_string()))?;
    cms.verify(None, Some(&store), Some(data), None, CMSOptions::BINARY)
        .map_err(|e| verify_err(openssl_reason(&e)))?;
    Ok(info)
}

/// DER contents of the SHA-256 algorithm identifier (2.16.840.1.101.3.4.2.1).
const SHA256_OID: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];

/// Splits the DER element at the start of `input` into its contents and the
/// bytes after it, if its tag is `tag`. Definite lengths only (DER).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&found, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0x00..=0x7f => (usize::from(first), rest),
        0x81..=0x84 => {
            let (len, rest) = rest.split_at_checked(usize::from(first & 0x7f))?;
            let len = len.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
            (len, rest)
        }
        _ => return None,
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    (found == tag).then_some((contents, rest))
}

/// Checks that the SignedData's digest algorithm set is SHA-256 alone, the
/// only digest Kernex signs with, before OpenSSL verifies it.
///
/// OpenSSL 3.0 (3.0.19 included) leaks a BIO in `CMS_verify` when that set
/// (which no signature covers) is empty or names a digest it cannot compute
/// (openssl/openssl#30471): anyone could edit a published bundle's signature
/// so that every verification attempt leaks memory.
fn check_digest_algorithms(signature: &[u8]) -> Result<(), SignatureError> {
    let malformed = || SignatureError::Malformed("no SignedData digest algorithm set".into());
    let (content_info, _) = der_element(signature, 0x30).ok_or_else(malformed)?;
    let (_, rest) = der_element(content_info, 0x06).ok_or_else(malformed)?;
    let (explicit, _) = der_element(rest, 0xa0).ok_or_else(malformed)?;
    let (signed_data, _) = der_element(explicit, 0x30).ok_or_else(malformed)?;
    let (_, rest) = der_element(signed_data, 0x02).ok_or_else(malformed)?;
    let (mut set, _) = der_element(rest, 0x31).ok_or_else(malformed)?;
    let not_sha256 = || {
        SignatureError::Malformed("signature names a digest algorithm other than SHA-256".into())
    };
    if set.is_empty() {
        return Err(not_sha256());
    }
    while !set.is_empty() {
        let (algorithm, rest) = der_element(set, 0x30).ok_or_else(malformed)?;
        let (oid, parameters) = der_element(algorithm, 0x06).ok_or_else(malformed)?;
        if oid != SHA256_OID || !(parameters.is_empty() || parameters == [0x05, 0x00]) {
            return Err(not_sha256());
        }
        set = rest;
    }
    Ok(())
}

fn openssl_reason(e: &openssl::error::ErrorStack) -> String {
    let reasons: Vec<String> = e
        .errors()
        .iter()
        .map(|err| {
            let mut s = err.reason().unwrap_or("unknown error").to_string();
            if let Some(data) = err.data() {
                s.push_str(&format!(" ({data})"));
            }
            s
        })
        .collect();
    if reasons.is_empty() {
        "verification failed".into()
    } else {
        reasons.join("; ")
    }
}

/// Verifies the manifest's signature and parses it: the only way to obtain a
/// [`VerifiedManifest`].
pub fn verify_manifest(
    keyring: &Keyring,
    manifest_bytes: &[u8],
    signature: &[u8],
    options: VerifyOptions,
) -> Result<VerifiedManifest, SignatureError> {
    let signer = verify_detached(keyring, manifest_bytes, signature, options)?;
    let manifest = Manifest::from_slice(manifest_bytes)?;
    Ok(VerifiedManifest::new(
        manifest,
        manifest_bytes.to_vec(),
        signer,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a code-signing certificate issued by it, made here so the
    /// test needs no files.
    fn ca_and_signer() -> (Keyring, Signer) {
        use openssl::bn::{BigNum, MsbOption};
        use openssl::ec::{EcGroup, EcKey};
        use openssl::nid::Nid;
        use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
        use openssl::x509::{X509Builder, X509NameBuilder};

        let key = || {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("curve");
            PKey::from_ec_key(EcKey::generate(&group).expect("key")).expect("pkey")
        };
        let cert = |cn: &str, key: &PKey<Private>, issuer: Option<(&X509, &PKey<Private>)>| {
            let mut name = X509NameBuilder::new().expect("name");
            name.append_entry_by_text("CN", cn).expect("cn");
            let name = name.build();
            let mut b = X509Builder::new().expect("builder");
            b.set_version(2).expect("version");
            let mut serial = BigNum::new().expect("bn");
            serial.rand(64, MsbOption::MAYBE_ZERO, false).expect("rand");
            b.set_serial_number(&serial.to_asn1_integer().expect("serial"))
                .expect("serial");
            b.set_subject_name(&name).expect("subject");
            b.set_pubkey(key).expect("pubkey");
            b.set_not_before(&Asn1Time::days_from_now(0).expect("time"))
                .expect("not before");
            b.set_not_after(&Asn1Time::days_from_now(1).expect("time"))
                .expect("not after");
            let signing_key = match issuer {
                Some((ca, ca_key)) => {
                    b.set_issuer_name(ca.subject_name()).expect("issuer");
                    b.append_extension(KeyUsage::new().digital_signature().build().expect("ku"))
                        .expect("ku");
                    b.append_extension(
                        ExtendedKeyUsage::new().code_signing().build().expect("eku"),
                    )
                    .expect("eku");
                    ca_key
                }
                None => {
                    b.set_issuer_name(&name).expect("issuer");
                    b.append_extension(
                        BasicConstraints::new().critical().ca().build().expect("bc"),
                    )
                    .expect("bc");
                    key
                }
            };
            b.sign(signing_key, MessageDigest::sha256()).expect("sign");
            b.build()
        };
        let ca_key = key();
        let ca = cert("test CA", &ca_key, None);
        let signer_key = key();
        let signer = cert("test signer", &signer_key, Some((&ca, &ca_key)));
        let keyring = Keyring::from_pem(&ca.to_pem().expect("pem")).expect("keyring");
        let signer = Signer::from_pem(
            &signer_key.private_key_to_pem_pkcs8().expect("pem"),
            &signer.to_pem().expect("pem"),
        )
        .expect("signer");
        (keyring, signer)
    }

    #[test]
    fn ed25519_signing_keys_are_refused_up_front() {
        let key = PKey::generate_ed25519().expect("key");
        let pem = key.private_key_to_pem_pkcs8().expect("pem");
        let err = Signer::from_pem(&pem, b"").expect_err("must fail");
        assert!(err.to_string().contains("not supported"), "{err}");
    }

    #[test]
    fn digest_algorithm_other_than_sha256_is_rejected_before_openssl_verifies() {
        let (keyring, signer) = ca_and_signer();
        let data = b"manifest bytes";
        let signature = signer.sign(data).expect("signs");
        verify_detached(&keyring, data, &signature, VerifyOptions::default())
            .expect("the untouched signature verifies");
        // The SignedData's digest set is not covered by the signature: change
        // its SHA-256 to an OID no digest has (the last arc 1 -> 99).
        let at = signature
            .windows(SHA256_OID.len())
            .position(|w| w == SHA256_OID)
            .expect("names SHA-256");
        let mut edited = signature.clone();
        edited[at + SHA256_OID.len() - 1] = 99;
        let err = verify_detached(&keyring, data, &edited, VerifyOptions::default())
            .expect_err("must fail");
        assert!(err.to_string().contains("SHA-256"), "{err}");
        for cut in 0..signature.len() {
            assert!(
                check_digest_algorithms(&signature[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
