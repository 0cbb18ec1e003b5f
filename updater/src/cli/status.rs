//! `kernex-updater status`.

use anyhow::{Context as _, Result};
use clap::Args;

use super::Context;

/// `status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON (the machine interface).
    #[arg(long)]
    pub json: bool,
}

/// Prints the status.
pub fn run(ctx: &mut Context, args: StatusArgs) -> Result<()> {
    let status = crate::status::status(&ctx.config, ctx.flow.as_mut())
        .context("unable to read the device status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        println!("{status}");
    }
    Ok(())
}
