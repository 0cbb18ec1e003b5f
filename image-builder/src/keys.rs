//! Development signing keys: a CA and a code-signing certificate under it.
//!
//! These are for development and CI only. Production keys belong in an HSM
//! or an offline CA; the private keys written here are plain PEM files.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509NameBuilder};

/// What a certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A bundle signing certificate (digitalSignature, codeSigning).
    CodeSigning,
    /// A TLS server certificate: the wrong usage for bundles (for tests).
    TlsServer,
}

/// Validity of a certificate, as Unix times.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start.
    pub not_before: i64,
    /// End.
    pub not_after: i64,
}

impl Validity {
    /// From now for `days` days.
    pub fn days_from_now(days: u32) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Validity {
            not_before: now - 3600,
            not_after: now + i64::from(days) * 86_400,
        }
    }
}

/// A key with its certificate.
pub struct KeyPair {
    /// Private key.
    pub key: PKey<Private>,
    /// Certificate.
    pub cert: X509,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").finish_non_exhaustive()
    }
}

fn new_key() -> Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn serial() -> Result<Asn1Integer> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    Ok(bn.to_asn1_integer()?)
}

fn name(org: &str, cn: &str) -> Result<openssl::x509::X509Name> {
    let mut n = X509NameBuilder::new()?;
    n.append_entry_by_nid(Nid::ORGANIZATIONNAME, org)?;
    n.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    Ok(n.build())
}

/// A self-signed CA.
pub fn create_ca(org: &str, validity: Validity) -> Result<KeyPair> {
    let key = new_key()?;
    let subject = name(org, &format!("{org} CA"))?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let sn = serial()?;
    b.set_serial_number(&sn)?;
    b.set_subject_name(&subject)?;
    b.set_issuer_name(&subject)?;
    b.set_pubkey(&key)?;
    let (nb, na) = (
        Asn1Time::from_unix(validity.not_before)?,
        Asn1Time::from_unix(validity.not_after)?,
    );
    b.set_not_before(&nb)?;
    b.set_not_after(&na)?;
    b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(
        KeyUsage::new()
            .critical()
            .key_cert_sign()
            .crl_sign()
            .build()?,
    )?;
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    b.sign(&key, MessageDigest::sha256())?;
    Ok(KeyPair {
        key,
        cert: b.build(),
    })
}

/// A leaf certificate issued by `ca`.
pub fn create_leaf(
    ca: &KeyPair,
    org: &str,
    cn: &str,
    usage: Usage,
    validity: Validity,
) -> Result<KeyPair> {
    let key = new_key()?;
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let sn = serial()?;
    b.set_serial_number(&sn)?;
    let subject = name(org, cn)?;
    b.set_subject_name(&subject)?;
    b.set_issuer_name(ca.cert.subject_name())?;
    b.set_pubkey(&key)?;
    let (nb, na) = (
        Asn1Time::from_unix(validity.not_before)?,
        Asn1Time::from_unix(validity.not_after)?,
    );
    b.set_not_before(&nb)?;
    b.set_not_after(&na)?;
    b.append_extension(BasicConstraints::new().critical().build()?)?;
    match usage {
        Usage::CodeSigning => {
            b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
            b.append_extension(ExtendedKeyUsage::new().code_signing().build()?)?;
        }
        Usage::TlsServer => {
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .digital_signature()
                    .key_agreement()
                    .build()?,
            )?;
            b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
        }
    }
    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(ski)?;
    let aki = AuthorityKeyIdentifier::new()
        .keyid(true)
        .build(&b.x509v3_context(Some(&ca.cert), None))?;
    b.append_extension(aki)?;
    b.sign(&ca.key, MessageDigest::sha256())?;
    Ok(KeyPair {
        key,
        cert: b.build(),
    })
}

/// Files written by [`write_dev_keys`].
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DevKeys {
    /// CA certificate: the device keyring.
    pub ca_cert: PathBuf,
    /// CA private key.
    pub ca_key: PathBuf,
    /// Signing certificate.
    pub signing_cert: PathBuf,
    /// Signing private key.
    pub signing_key: PathBuf,
}

fn write_file(path: &Path, data: &[u8], private: bool) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("unable to create {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("unable to write {}", path.display()))
}

/// Creates a development CA and signing certificate in `dir`.
pub fn write_dev_keys(
    dir: &Path,
    org: &str,
    ca_days: u32,
    signing_days: u32,
    force: bool,
) -> Result<DevKeys> {
    fs::create_dir_all(dir).with_context(|| format!("unable to create {}", dir.display()))?;
    let keys = DevKeys {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        signing_cert: dir.join("signing.crt"),
        signing_key: dir.join("signing.key"),
    };
    for p in [
        &keys.ca_cert,
        &keys.ca_key,
        &keys.signing_cert,
        &keys.signing_key,
    ] {
        if p.exists() {
            if !force {
                bail!(
                    "{} already exists; pass --force to replace the keys in {}",
                    p.display(),
                    dir.display()
                );
            }
            fs::remove_file(p).with_context(|| format!("unable to remove {}", p.display()))?;
        }
    }
    let ca = create_ca(org, Validity::days_from_now(ca_days))?;
    let leaf = create_leaf(
        &ca,
        org,
        &format!("{org} signing"),
        Usage::CodeSigning,
        Validity::days_from_now(signing_days),
    )?;
    write_file(&keys.ca_key, &ca.key.private_key_to_pem_pkcs8()?, true)?;
    write_file(&keys.ca_cert, &ca.cert.to_pem()?, false)?;
    write_file(
        &keys.signing_key,
        &leaf.key.private_key_to_pem_pkcs8()?,
        true,
    )?;
    write_file(&keys.signing_cert, &leaf.cert.to_pem()?, false)?;
    Ok(keys)
}
