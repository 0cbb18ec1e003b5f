//! The command line: one module per command.

pub mod attest;
pub mod daemon;
pub mod health;
pub mod install;
pub mod mark;
pub mod rollback;
pub mod status;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use kernex_bootloader::BootFlow;

use crate::config::{DEFAULT_CONFIG, SystemConfig};

/// Install signed Kernex releases into the inactive A/B slot.
#[derive(Debug, Parser)]
#[command(
    name = "kernex-updater",
    version,
    about = "Install signed Kernex releases into the inactive A/B slot",
    after_help = "EXAMPLES:\n\
    kernex-updater status --json\n\
    kernex-updater install http://updates.example/releases/1.3.0.kxb\n\
    kernex-updater install /media/usb/1.3.0.kxb --reboot\n\
    kernex-updater mark-good\n\n\
EXIT STATUS:\n    0 on success, 1 on any error (the error names what failed), 2 on a usage error.\n\n\
ENVIRONMENT:\n    RUST_LOG    log filter for diagnostics on stderr (default: info)."
)]
pub struct Cli {
    /// The system config.
    #[arg(long, global = true, env = "KERNEX_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the A/B state, what each slot holds and the install in progress.
    Status(status::StatusArgs),
    /// Install a bundle (file path or http(s) URL) into the inactive slot.
    Install(install::InstallArgs),
    /// Commit the booted slot: it passed its health checks.
    MarkGood,
    /// Mark the booted slot bad: the next boot goes to the other slot
    /// (refused when that slot holds a release below the anti-rollback
    /// floor).
    MarkBad,
    /// Boot the other slot next, if it holds a verified image (no download).
    Rollback,
    /// The health watchdog: commit the booted slot on trial, or revert it.
    #[command(subcommand)]
    Health(health::HealthCommand),
    /// Talk to the control plane: enroll, heartbeat, poll, install what it
    /// assigns, report every step; run the health watchdog at boot.
    #[command(long_about = DAEMON_ABOUT)]
    Daemon(daemon::DaemonArgs),
    /// TPM identity (EK, AK, credential activation), slot measurement, quotes.
    #[command(subcommand, long_about = attest::ABOUT)]
    Attest(attest::AttestCommand),
}

const DAEMON_ABOUT: &str = "Talk to the control plane named by the [server] table of the config.\n\n\
At start (after every boot): report whether the slot an install or rollback \
rebooted into came up, or that the bootloader fell back; if the booted slot \
is on trial, run the health watchdog (as `health run`) and report its \
verdict.\n\n\
Then every poll interval (60 s, jittered by 10 %): enroll once with the \
enrollment token (the credential is kept in the data dir, mode 0600), \
deliver queued reports and log lines in order, send a heartbeat with \
inventory, and poll. When the server assigns a release, install it into \
the inactive slot (only missing chunks are downloaded, resumable) inside \
the download window the server gives, report progress, then run the \
reboot command. A `rollback` from the server boots the other slot after \
re-verifying it: no download.\n\n\
Offline, reports and logs wait on disk and the daemon retries after 1, 2, \
4 ... 60 s; the running slot is never touched.";

/// What every command gets: the config and the boot-state backend.
#[derive(Debug)]
pub struct Context {
    /// The config.
    pub config: SystemConfig,
    /// Its path.
    pub config_path: PathBuf,
    /// The bootloader.
    pub flow: Box<dyn BootFlow>,
}

impl Context {
    /// Loads the config and opens the bootloader backend.
    pub fn load(path: PathBuf) -> Result<Self> {
        let config = SystemConfig::load(&path)
            .with_context(|| format!("unable to load the config {}", path.display()))?;
        let flow = config
            .bootloader
            .open()
            .context("unable to open the bootloader environment")?;
        Ok(Self {
            config,
            config_path: path,
            flow,
        })
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    if let Command::Daemon(args) = cli.command {
        // The daemon loads the config again after every (simulated) boot.
        return daemon::run(&cli.config, args);
    }
    let mut ctx = Context::load(cli.config)?;
    match cli.command {
        Command::Status(args) => status::run(&mut ctx, args),
        Command::Install(args) => install::run(&mut ctx, args),
        Command::MarkGood => mark::good(&mut ctx),
        Command::MarkBad => mark::bad(&mut ctx),
        Command::Rollback => rollback::run(&mut ctx),
        Command::Health(cmd) => health::run(&mut ctx, cmd),
        Command::Attest(cmd) => attest::run(&mut ctx, cmd),
        Command::Daemon(_) => Ok(()),
    }
}
