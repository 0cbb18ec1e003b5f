//! The device's TPM work (cargo feature `tpm`), shared by `kernex-updater
//! attest` and the daemon: the identity sent at enrollment, credential
//! activation, the boot-time measurement of the booted slot, and quotes.
//! The protocol and the PCR map are in attest/README.md.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use kernex_attest::{AkBlob, DeviceError, SigningKeyBlob, Tpm};
use kernex_bootloader::Slot;
use kernex_device::layout;
use kernex_protocol::api::{Activation, Quote, TpmIdentity};
use serde::Serialize;

use crate::cli::attest::TpmConfig;
use crate::store::{DataDir, read_limited, write_atomically};

/// Largest AK file read.
const MAX_AK_FILE: u64 = 64 * 1024;

/// Where the AK is kept: `<data-dir>/attest/ak.json`.
pub fn ak_path(data_dir: &Path) -> PathBuf {
    data_dir.join(layout::ATTEST_AK)
}

/// Opens the configured TPM.
pub fn open(config: &TpmConfig) -> Result<Tpm> {
    Tpm::open(&config.tcti).with_context(|| format!("unable to open the TPM ({})", config.tcti))
}

/// Loads the stored AK.
pub fn load_ak(path: &Path) -> Result<AkBlob> {
    let bytes = read_limited(path, MAX_AK_FILE).with_context(|| {
        format!(
            "no attestation key at {} (run `kernex-updater attest identity` first)",
            path.display()
        )
    })?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("unable to parse the attestation key {}", path.display()))
}

/// This TPM's identity: its EK (and certificate) and the AK, created under
/// the EK and stored on first use (or anew with `new_ak`).
pub fn identity(config: &TpmConfig, ak_path: &Path, new_ak: bool) -> Result<TpmIdentity> {
    let mut tpm = open(config)?;
    let endorsement = tpm
        .endorsement()
        .context("unable to read the endorsement key")?;
    let ak = if !new_ak && ak_path.exists() {
        load_ak(ak_path)?
    } else {
        let ak = tpm
            .create_ak()
            .context("unable to create an attestation key")?;
        if let Some(dir) = ak_path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("unable to create {}", dir.display()))?;
        }
        write_atomically(ak_path, &serde_json::to_vec_pretty(&ak)?)
            .with_context(|| format!("unable to store the AK in {}", ak_path.display()))?;
        tracing::info!(path = %ak_path.display(), "created a new attestation key");
        ak
    };
    Ok(TpmIdentity {
        ek_public: endorsement.public,
        ek_certificate: endorsement.certificate,
        ak_public: ak.public,
    })
}

/// Opens a credential-activation challenge with the EK and the stored AK:
/// the credential the verifier encrypted. Fails for a challenge made for
/// another TPM or another AK.
pub fn activate(config: &TpmConfig, ak_path: &Path, challenge: &Activation) -> Result<Vec<u8>> {
    let ak = load_ak(ak_path)?;
    open(config)?
        .activate_credential(&ak, &challenge.id_object, &challenge.encrypted_secret)
        .context("credential activation failed (a challenge for another TPM or AK?)")
}

/// Where the daemon records which server credential is bound to this TPM:
/// `<data-dir>/attest/binding.json`.
pub fn binding_path(data_dir: &Path) -> PathBuf {
    data_dir.join(layout::ATTEST_BINDING)
}

/// The server bound this device (its id there) to this TPM and AK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Binding {
    /// The server.
    pub server: String,
    /// The server's id for this device.
    pub id: String,
    /// Hex SHA-256 of the AK's `TPMT_PUBLIC` the server holds.
    pub ak: String,
}

/// Whether the daemon recorded a binding of this device's current
/// credential and AK. Unreadable or stale records count as none (the
/// daemon then asks the server, which answers "bound" when nothing
/// changed).
pub fn is_bound(data_dir: &Path, server: &str, id: &str) -> bool {
    let recorded = read_limited(&binding_path(data_dir), 4096)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Binding>(&bytes).ok());
    let ak = load_ak(&ak_path(data_dir)).ok();
    match (recorded, ak) {
        (Some(b), Some(ak)) => b.server == server && b.id == id && b.ak == ak_digest(&ak.public),
        _ => false,
    }
}

/// Records that the server bound this device's credential to the AK now
/// stored.
pub fn record_binding(data_dir: &Path, server: &str, id: &str) -> Result<()> {
    let ak = load_ak(&ak_path(data_dir))?;
    let binding = Binding {
        server: server.to_owned(),
        id: id.to_owned(),
        ak: ak_digest(&ak.public),
    };
    let path = binding_path(data_dir);
    write_atomically(&path, &serde_json::to_vec_pretty(&binding)?)
        .with_context(|| format!("unable to record the TPM binding in {}", path.display()))
}

fn ak_digest(public: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(public))
}

/// What [`measure`] did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Measured {
    /// The booted slot.
    pub slot: String,
    /// Its recorded release.
    pub version: String,
    /// The measurement (rootfs SHA-256).
    pub measurement: String,
    /// The slot PCR.
    pub pcr: u8,
    /// Its value now.
    pub value: String,
    /// The PCR already held this measurement (extended earlier in this
    /// boot, e.g. by the boot loader): nothing was extended.
    pub already: bool,
}

/// Extends the booted slot's measurement (its recorded release's rootfs
/// digest) into the slot PCR. A PCR that already holds exactly this one
/// measurement (the boot loader measured it, or an earlier run in this
/// boot) is left alone; any other non-zero value is an error, since a
/// second extend would make it match no release. `Ok(None)` when the slot
/// has no recorded release (a factory image): nothing to measure.
pub fn measure(
    config: &TpmConfig,
    data: &DataDir,
    booted: Slot,
    tpm: Option<&mut Tpm>,
) -> Result<Option<Measured>> {
    let Some(record) = data
        .slot_record(booted)
        .with_context(|| format!("unable to read the record of slot {booted}"))?
    else {
        return Ok(None);
    };
    let manifest = record
        .manifest()
        .with_context(|| format!("unable to parse slot {booted}'s recorded manifest"))?;
    let measurement = kernex_attest::slot_measurement(&manifest)?;
    let mut opened;
    let tpm = match tpm {
        Some(t) => t,
        None => {
            opened = open(config)?;
            &mut opened
        }
    };
    let expected = kernex_attest::expected_slot_pcr(&measurement);
    let (value, already) = match tpm.extend_slot_measurement(config.pcr, &measurement) {
        Ok(v) => (v, false),
        Err(DeviceError::AlreadyMeasured { value, .. }) if value == expected => (value, true),
        Err(e) => {
            return Err(e).with_context(|| format!("unable to extend PCR {}", config.pcr));
        }
    };
    Ok(Some(Measured {
        slot: booted.to_string(),
        version: manifest.version.to_string(),
        measurement: measurement.to_hex(),
        pcr: config.pcr,
        value: value.to_hex(),
        already,
    }))
}

/// Quotes the slot PCR over `nonce` with the stored AK.
pub fn quote(config: &TpmConfig, ak_path: &Path, nonce: &[u8]) -> Result<Quote> {
    let ak = load_ak(ak_path)?;
    open(config)?
        .quote(&ak, nonce, &[config.pcr])
        .context("unable to quote")
}

/// Where the TPM-resident device key is kept:
/// `<data-dir>/attest/device-key.json` (public part and TPM-wrapped private
/// part: useless without this TPM).
pub fn device_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(layout::ATTEST_DEVICE_KEY)
}

/// The device key in the TPM: loaded from `path`, or created in the TPM
/// (ECDSA P-256, not exportable) and stored there the first time.
pub fn device_key(config: &TpmConfig, path: &Path) -> Result<SigningKeyBlob> {
    if path.exists() {
        let bytes = read_limited(path, MAX_AK_FILE)?;
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("unable to parse the TPM device key {}", path.display()));
    }
    let blob = open(config)?
        .create_signing_key()
        .context("unable to create the device key in the TPM")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("unable to create {}", dir.display()))?;
    }
    write_atomically(path, &serde_json::to_vec_pretty(&blob)?)
        .with_context(|| format!("unable to store the TPM device key in {}", path.display()))?;
    tracing::info!(path = %path.display(), "device key created in the TPM");
    Ok(blob)
}

/// Signs `message` with the TPM device key `blob`: DER ECDSA over SHA-256.
pub fn sign_with_device_key(
    config: &TpmConfig,
    blob: &SigningKeyBlob,
    message: &[u8],
) -> Result<Vec<u8>> {
    open(config)?
        .sign_with_key(blob, message)
        .context("the TPM refused to sign with the device key")
}
