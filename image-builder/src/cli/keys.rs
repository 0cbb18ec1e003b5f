//! `kernex-image keys`: development keys.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::keys;

/// Key commands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a development CA and a bundle signing certificate.
    #[command(
        long_about = "Create a development CA and a bundle signing certificate.\n\n\
Writes four files to the output directory: ca.crt (the keyring devices trust), ca.key, \
signing.crt (key usage digitalSignature, extended key usage codeSigning, issued by the CA) \
and signing.key. Keys are ECDSA P-256; private keys are written with mode 0600.\n\n\
NEVER use these keys in production: they are plain files on disk. Production signing keys \
belong in an HSM or an offline CA; rotate the signing certificate by issuing a new one under \
the same CA, revoke by shipping a new keyring in a later image."
    )]
    Create(CreateArgs),
}

/// Arguments of `keys create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Directory to write ca.crt, ca.key, signing.crt and signing.key to.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Organisation name in the certificates' subjects.
    #[arg(long, default_value = "Kernex development")]
    pub org: String,
    /// CA validity in days.
    #[arg(long, default_value_t = 3650)]
    pub ca_days: u32,
    /// Signing certificate validity in days.
    #[arg(long, default_value_t = 730)]
    pub signing_days: u32,
    /// Replace keys that already exist in the directory.
    #[arg(long)]
    pub force: bool,
    /// Print the written paths as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs a keys command.
pub fn run(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Create(args) => {
            let written = keys::write_dev_keys(
                &args.out,
                &args.org,
                args.ca_days,
                args.signing_days,
                args.force,
            )?;
            if args.json {
                return super::print_json(&written);
            }
            eprintln!(
                "warning: these are DEVELOPMENT keys; never sign production releases with them"
            );
            println!("keyring (CA certificate): {}", written.ca_cert.display());
            println!(
                "signing certificate:      {}",
                written.signing_cert.display()
            );
            println!(
                "signing key:              {}",
                written.signing_key.display()
            );
            println!("CA key:                   {}", written.ca_key.display());
            Ok(())
        }
    }
}
