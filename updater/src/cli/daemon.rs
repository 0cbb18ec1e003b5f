//! `kernex-updater daemon`.

use anyhow::Result;
use clap::Args;

use crate::daemon::DaemonOptions;

/// `daemon` arguments.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Seconds between polls (overrides `[server] poll-interval`; default 60).
    #[arg(long, value_name = "SECS")]
    pub poll_interval: Option<u64>,
    /// Stop after this many poll cycles instead of running forever.
    #[arg(long, value_name = "N")]
    pub cycles: Option<u64>,
    /// A simulated device: at start and after each reboot command, do to
    /// the boot state what the boot script does at power-on, write the
    /// chosen slot to the `[bootloader] cmdline` file, and carry on as the
    /// freshly booted system.
    #[arg(long)]
    pub simulate_boot: bool,
}

/// Runs the daemon.
pub fn run(config: &std::path::Path, args: DaemonArgs) -> Result<()> {
    crate::daemon::run(
        config,
        &DaemonOptions {
            simulate_boot: args.simulate_boot,
            poll_interval: args.poll_interval,
            cycles: args.cycles,
        },
    )
}
