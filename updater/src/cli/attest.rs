//! `kernex-updater attest`: this device's TPM identity, the booted slot's
//! measurement, and quotes over a verifier's nonce. See attest/README.md.
//!
//! The `[tpm]` table of the config names the TPM and the slot PCR; the TPM
//! code is compiled in with the `tpm` cargo feature (it links tpm2-tss).

use serde::{Deserialize, Serialize};

/// The `[tpm]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TpmConfig {
    /// tpm2-tss TCTI: `device:/dev/tpmrm0` (the kernel's resource manager)
    /// on hardware, `swtpm:host=127.0.0.1,port=2321` for swtpm.
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// The PCR the booted slot's measurement is extended into (0–15).
    #[serde(default = "default_pcr")]
    pub pcr: u8,
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".to_owned()
}

/// Same as `kernex_attest::DEFAULT_SLOT_PCR` (not linked without `tpm`).
fn default_pcr() -> u8 {
    14
}

impl Default for TpmConfig {
    fn default() -> Self {
        Self {
            tcti: default_tcti(),
            pcr: default_pcr(),
        }
    }
}

/// `attest` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum AttestCommand {
    /// Print this TPM's identity for enrollment as JSON: EK public key, EK
    /// certificate (from NV, when the manufacturer wrote one) and AK public
    /// key. The AK is created under the EK on first use and kept in
    /// <data-dir>/attest/ak.json (its private part is wrapped by the TPM).
    Identity {
        /// Replace the stored AK with a new one (the server must then
        /// re-enroll the device's TPM identity).
        #[arg(long)]
        new_ak: bool,
    },
    /// Answer a credential-activation challenge: read the server's JSON
    /// (`{"id-object": HEX, "encrypted-secret": HEX}`) from FILE, or stdin
    /// for `-`, run TPM2_ActivateCredential with the EK and the stored AK,
    /// print the recovered credential in hex. Fails when the challenge was
    /// made for another TPM or another AK.
    Activate {
        /// The challenge JSON (`-`: stdin).
        challenge: std::path::PathBuf,
    },
    /// Extend the booted slot's measurement (the SHA-256 of its rootfs
    /// image, from the verified manifest recorded at install) into the slot
    /// PCR. Run once per boot, early; refuses when the PCR was already
    /// extended in this boot.
    Measure {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Quote the slot PCR over NONCE (hex, up to 64 bytes) with the AK and
    /// print the quote as JSON (`attest`, `signature`, `pcrs`), for the
    /// verifier.
    Quote {
        /// The verifier's nonce, hex.
        nonce: String,
    },
}

/// The long help of `attest`.
pub const ABOUT: &str = "TPM-rooted identity and attestation of the booted image.\n\n\
Enrollment: `attest identity` prints the EK and a new AK; the server answers \
with a credential-activation challenge that only this TPM can open for this \
AK, and `attest activate` opens it. At boot: `attest measure` extends the \
booted release's rootfs digest into the slot PCR ([tpm] pcr, default 14). \
On request: `attest quote NONCE` signs the PCR with the AK over the server's \
nonce.\n\n\
CONFIG:\n    [tpm]\n    tcti = \"device:/dev/tpmrm0\"   # or swtpm:host=127.0.0.1,port=2321\n    pcr = 14\n\n\
This build must include the `tpm` cargo feature (it links tpm2-tss).";

#[cfg(not(feature = "tpm"))]
pub fn run(_ctx: &mut super::Context, _cmd: AttestCommand) -> anyhow::Result<()> {
    anyhow::bail!("this kernex-updater was built without TPM support (cargo feature `tpm`)")
}

#[cfg(feature = "tpm")]
pub use with_tpm::run;

#[cfg(feature = "tpm")]
mod with_tpm {
    use std::io::Read as _;
    use std::path::Path;

    use anyhow::{Context as _, Result, bail};
    use kernex_attest::{Activation, AkBlob, Tpm, TpmIdentity};
    use serde::Serialize;

    use super::{AttestCommand, TpmConfig};
    use crate::cli::Context;
    use crate::store::{DataDir, read_limited, write_atomically};

    /// Largest challenge or AK file read.
    const MAX_INPUT: u64 = 64 * 1024;

    /// Runs an `attest` subcommand.
    pub fn run(ctx: &mut Context, cmd: AttestCommand) -> Result<()> {
        let config = ctx.config.tpm.clone().unwrap_or_default();
        let ak_path = ctx.config.data_dir.join("attest").join("ak.json");
        match cmd {
            AttestCommand::Identity { new_ak } => identity(&config, &ak_path, new_ak),
            AttestCommand::Activate { challenge } => activate(&config, &ak_path, &challenge),
            AttestCommand::Measure { json } => measure(ctx, &config, json),
            AttestCommand::Quote { nonce } => quote(&config, &ak_path, &nonce),
        }
    }

    fn open(config: &TpmConfig) -> Result<Tpm> {
        Tpm::open(&config.tcti).with_context(|| format!("unable to open the TPM ({})", config.tcti))
    }

    fn load_ak(path: &Path) -> Result<AkBlob> {
        let bytes = read_limited(path, MAX_INPUT).with_context(|| {
            format!(
                "no attestation key at {} (run `kernex-updater attest identity` first)",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("unable to parse the attestation key {}", path.display()))
    }

    fn identity(config: &TpmConfig, ak_path: &Path, new_ak: bool) -> Result<()> {
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
        let identity = TpmIdentity {
            ek_public: endorsement.public,
            ek_certificate: endorsement.certificate,
            ak_public: ak.public,
        };
        println!("{}", serde_json::to_string_pretty(&identity)?);
        Ok(())
    }

    fn activate(config: &TpmConfig, ak_path: &Path, challenge: &Path) -> Result<()> {
        let bytes = if challenge.as_os_str() == "-" {
            let mut buf = Vec::new();
            std::io::stdin()
                .take(MAX_INPUT + 1)
                .read_to_end(&mut buf)
                .context("unable to read the challenge from stdin")?;
            if buf.len() as u64 > MAX_INPUT {
                bail!("challenge on stdin is larger than {MAX_INPUT} bytes");
            }
            buf
        } else {
            read_limited(challenge, MAX_INPUT)
                .with_context(|| format!("unable to read {}", challenge.display()))?
        };
        let activation: Activation =
            serde_json::from_slice(&bytes).context("unable to parse the challenge JSON")?;
        let ak = load_ak(ak_path)?;
        let credential = open(config)?
            .activate_credential(&ak, &activation.id_object, &activation.encrypted_secret)
            .context("credential activation failed (a challenge for another TPM or AK?)")?;
        println!("{}", hex::encode(credential));
        Ok(())
    }

    #[derive(Debug, Serialize)]
    #[serde(rename_all = "kebab-case")]
    struct Measured {
        slot: String,
        version: String,
        measurement: String,
        pcr: u8,
        value: String,
    }

    fn measure(ctx: &mut Context, config: &TpmConfig, json: bool) -> Result<()> {
        let slot = ctx
            .flow
            .booted_slot()
            .context("unable to tell the booted slot")?;
        let record = DataDir::new(&ctx.config.data_dir)
            .slot_record(slot)
            .with_context(|| format!("unable to read the record of slot {slot}"))?
            .with_context(|| {
                format!(
                    "slot {slot} has no recorded release (a factory image?): nothing to measure"
                )
            })?;
        let manifest = record
            .manifest()
            .with_context(|| format!("unable to parse slot {slot}'s recorded manifest"))?;
        let measurement = kernex_attest::slot_measurement(&manifest)?;
        let value = open(config)?
            .extend_slot_measurement(config.pcr, &measurement)
            .with_context(|| format!("unable to extend PCR {}", config.pcr))?;
        let out = Measured {
            slot: slot.to_string(),
            version: manifest.version.to_string(),
            measurement: measurement.to_hex(),
            pcr: config.pcr,
            value: value.to_hex(),
        };
        if json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            println!(
                "slot {} ({}) measured into PCR {}: {}",
                out.slot, out.version, out.pcr, out.value
            );
        }
        Ok(())
    }

    fn quote(config: &TpmConfig, ak_path: &Path, nonce: &str) -> Result<()> {
        let nonce = hex::decode(nonce).context("the nonce must be hex")?;
        let ak = load_ak(ak_path)?;
        let quote = open(config)?
            .quote(&ak, &nonce, &[config.pcr])
            .context("unable to quote")?;
        println!("{}", serde_json::to_string_pretty(&quote)?);
        Ok(())
    }
}
