//! `kernex-updater install`.

use anyhow::{Context as _, Result, bail};
use clap::Args;

use super::Context;
use crate::install::InstallOptions;
use crate::source::{self, Link};
use crate::store::DataDir;

/// `install` arguments.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The bundle: a file path or an http(s) URL.
    pub bundle: String,
    /// Install even if the bundle's version is lower than the booted slot's.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// Run the configured reboot command after a successful install.
    #[arg(long)]
    pub reboot: bool,
    /// Print the install report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Installs, then reboots if asked.
pub fn run(ctx: &mut Context, args: InstallArgs) -> Result<()> {
    let data = DataDir::new(&ctx.config.data_dir);
    let link = Link::new(&ctx.config.link, &data).context("unable to read the link budget")?;
    let mut source = source::open(&args.bundle, link)
        .with_context(|| format!("unable to open {}", args.bundle))?;
    let options = InstallOptions {
        allow_downgrade: args.allow_downgrade,
        at_time: None,
    };
    let report = crate::install::install(&ctx.config, ctx.flow.as_mut(), source.as_mut(), &options)
        .with_context(|| format!("unable to install {}", args.bundle))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.already_installed {
        println!(
            "{} was already in slot {}; it boots next",
            report.version,
            report.target.map(|s| s.name()).unwrap_or("?")
        );
    } else {
        println!(
            "installed {} into slot {}; it boots next ({} bytes in {} requests; chunks: {} fetched, {} from the booted slot, {} resumed)",
            report.version,
            report.target.map(|s| s.name()).unwrap_or("?"),
            report.bytes_fetched,
            report.requests,
            report.chunks_fetched,
            report.chunks_from_seed,
            report.chunks_resumed
        );
    }
    if args.reboot {
        let cmd = &ctx.config.reboot_command;
        let Some((program, rest)) = cmd.split_first() else {
            bail!("reboot-command is empty");
        };
        let status = std::process::Command::new(program)
            .args(rest)
            .status()
            .with_context(|| format!("unable to run the reboot command {cmd:?}"))?;
        if !status.success() {
            bail!("the reboot command {cmd:?} failed: {status}");
        }
    }
    Ok(())
}
