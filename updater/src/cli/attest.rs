//! `kernex-updater attest`: this device's TPM identity, the booted slot's
//! measurement, and quotes over a verifier's nonce. See attest/README.md.
//!
//! The `[tpm]` table of the config names the TPM and the slot PCR; the TPM
//! code is compiled in with the `tpm` cargo feature (it links tpm2-tss).

/// The `[tpm]` table (`kernex-device`'s).
pub use kernex_device::TpmConfig;

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
    use kernex_protocol::api::Activation;

    use super::{AttestCommand, TpmConfig};
    use crate::attest;
    use crate::cli::Context;
    use crate::store::{DataDir, read_limited};

    /// Largest challenge file read.
    const MAX_INPUT: u64 = 64 * 1024;

    /// Runs an `attest` subcommand.
    pub fn run(ctx: &mut Context, cmd: AttestCommand) -> Result<()> {
        let config = ctx.config.tpm.clone().unwrap_or_default();
        let ak_path = attest::ak_path(&ctx.config.data_dir);
        match cmd {
            AttestCommand::Identity { new_ak } => {
                let identity = attest::identity(&config, &ak_path, new_ak)?;
                println!("{}", serde_json::to_string_pretty(&identity)?);
                Ok(())
            }
            AttestCommand::Activate { challenge } => activate(&config, &ak_path, &challenge),
            AttestCommand::Measure { json } => measure(ctx, &config, json),
            AttestCommand::Quote { nonce } => {
                let nonce = hex::decode(nonce).context("the nonce must be hex")?;
                let quote = attest::quote(&config, &ak_path, &nonce)?;
                println!("{}", serde_json::to_string_pretty(&quote)?);
                Ok(())
            }
        }
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
        let credential = attest::activate(config, ak_path, &activation)?;
        println!("{}", hex::encode(credential));
        Ok(())
    }

    fn measure(ctx: &mut Context, config: &TpmConfig, json: bool) -> Result<()> {
        let slot = ctx
            .flow
            .booted_slot()
            .context("unable to tell the booted slot")?;
        let data = DataDir::new(&ctx.config.data_dir);
        let out = attest::measure(config, &data, slot, None)?.with_context(|| {
            format!("slot {slot} has no recorded release (a factory image?): nothing to measure")
        })?;
        if json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else if out.already {
            println!(
                "slot {} ({}) was already measured into PCR {}: {}",
                out.slot, out.version, out.pcr, out.value
            );
        } else {
            println!(
                "slot {} ({}) measured into PCR {}: {}",
                out.slot, out.version, out.pcr, out.value
            );
        }
        Ok(())
    }
}
