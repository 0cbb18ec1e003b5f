//! `kernex-updater health run`.

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};

use super::Context;

/// `health` subcommands.
#[derive(Debug, Subcommand)]
pub enum HealthCommand {
    /// If the booted slot is on trial: run its health checks, then commit
    /// it, or mark it bad and run the reboot command.
    Run(RunArgs),
}

/// `health run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `health` subcommand.
pub fn run(ctx: &mut Context, cmd: HealthCommand) -> Result<()> {
    match cmd {
        HealthCommand::Run(args) => {
            let result = crate::health::run(&ctx.config, ctx.flow.as_mut())
                .context("health watchdog run failed")?;
            if args.json {
                println!("{}", result.to_json());
            } else {
                println!("{result}");
            }
            Ok(())
        }
    }
}
