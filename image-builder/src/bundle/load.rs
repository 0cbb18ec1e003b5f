//! Reading what a bundle is built from and checked against: the signing
//! key, keyrings, older bundles and health specs, each error naming the file.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kernex_protocol::bundle::Bundle;
use kernex_protocol::manifest::HealthSpec;
use kernex_protocol::signature::{Keyring, Signer};

/// Loads a PEM signing key and its certificate file (further certificates
/// in it are intermediates included in every signature).
pub fn load_signer(key: &Path, cert: &Path) -> Result<Signer> {
    let key_pem =
        fs::read(key).with_context(|| format!("unable to read signing key {}", key.display()))?;
    let cert_pem = fs::read(cert)
        .with_context(|| format!("unable to read signing certificate {}", cert.display()))?;
    Signer::from_pem(&key_pem, &cert_pem).with_context(|| {
        format!(
            "unable to load signing key {} with certificate {}",
            key.display(),
            cert.display()
        )
    })
}

/// The CA certificates of every PEM file in `paths`, as one keyring.
pub fn load_keyring(paths: &[PathBuf]) -> Result<Keyring> {
    let mut pem = Vec::new();
    for path in paths {
        let mut data =
            fs::read(path).with_context(|| format!("unable to read keyring {}", path.display()))?;
        pem.push(b'\n');
        pem.append(&mut data);
    }
    Keyring::from_pem(&pem).context("unable to load the keyring")
}

/// Opens the bundle file at `path` (its structure checked, not its
/// signature).
pub fn open(path: &Path) -> Result<Bundle<BufReader<File>>> {
    let file =
        File::open(path).with_context(|| format!("unable to open bundle {}", path.display()))?;
    Bundle::open(BufReader::new(file))
        .with_context(|| format!("{} is not a valid bundle", path.display()))
}

/// Reads and checks a health spec file: the keys of `system.toml`'s
/// `[health]` table at the top level, as TOML, or as JSON when the name
/// ends in `.json`; checked against the protocol's limits.
pub fn read_health_spec(path: &Path) -> Result<HealthSpec> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("unable to read health spec {}", path.display()))?;
    let spec: HealthSpec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .with_context(|| format!("invalid health spec {} (JSON)", path.display()))?
    } else {
        toml::from_str(&text)
            .with_context(|| format!("invalid health spec {} (TOML)", path.display()))?
    };
    spec.validate()
        .with_context(|| format!("invalid health spec {}", path.display()))?;
    Ok(spec)
}
