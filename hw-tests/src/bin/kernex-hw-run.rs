//! `kernex-hw-run`: the hw-tests scenarios on a real board (hw-tests/README.md,
//! "On a real Raspberry Pi 4").

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use kernex_hw_tests::machine::{DEFAULT_BUNDLE_DIR, Lab, SshTarget};
use kernex_hw_tests::scenarios::{LabRig, scenario_1, scenario_2};

/// Runs a Kernex whole-system scenario on a real board (a Raspberry Pi 4
/// with U-Boot, or any board laid out like the hw-tests boards).
///
/// The runner reads U-Boot's and the kernel's lines on the board's serial
/// console, cuts and restores its power with the operator's commands, and
/// runs commands in Linux over ssh. It cannot flash the board: the factory
/// image must be on its card (slot A committed or fresh, BOOT_ORDER=A B),
/// and its ssh server must let root in with the given key once the health
/// watchdog has decided. Scenario s1 leaves the board in the state s2
/// starts from; after s2 the card must be reflashed.
///
/// Every option can also be given in the environment variable named in
/// its help (the variables the `real_board_*` tests read). Exit status 0:
/// the scenario passed; 1: it failed (the reason on stderr; the console
/// log and every ssh command in --out); 2: bad usage.
#[derive(Debug, Parser)]
#[command(name = "kernex-hw-run", version, verbatim_doc_comment)]
struct Cli {
    /// The board's ssh address, ssh://user@host[:port].
    #[arg(long, env = "KERNEX_HW_TARGET", value_name = "URL")]
    target: String,
    /// Private key for ssh (default: ssh's own configuration).
    #[arg(long, env = "KERNEX_HW_SSH_IDENTITY", value_name = "FILE")]
    identity: Option<PathBuf>,
    /// The serial console: a serial device (set to 115200 8N1 raw with
    /// stty, opened before the power comes on) or a Unix socket.
    #[arg(long, env = "KERNEX_HW_CONSOLE", value_name = "PATH")]
    console: PathBuf,
    /// Shell command that cuts the board's power and returns once it is
    /// off; must succeed when it is already off. Example: 'usbrelay
    /// HURTM_1=0 && sleep 2'.
    #[arg(long, env = "KERNEX_HW_POWER_OFF", value_name = "CMD")]
    power_off: String,
    /// Shell command that restores the power and returns.
    #[arg(long, env = "KERNEX_HW_POWER_ON", value_name = "CMD")]
    power_on: String,
    /// Where bundles are copied to on the board (on its data partition).
    #[arg(long, env = "KERNEX_HW_BUNDLE_DIR", value_name = "DIR", default_value = DEFAULT_BUNDLE_DIR)]
    bundle_dir: String,
    /// s2: the next release's bundle, signed with a key the board's
    /// keyring trusts.
    #[arg(long, env = "KERNEX_HW_BUNDLE", value_name = "FILE")]
    bundle: Option<PathBuf>,
    /// s2: the version of --bundle.
    #[arg(long, env = "KERNEX_HW_BUNDLE_VERSION", default_value = "2.0.0")]
    bundle_version: String,
    /// Directory for the console log (console.log) and the ssh log (ssh.log).
    #[arg(long, value_name = "DIR", default_value = "kernex-hw-run")]
    out: PathBuf,
    /// The scenario.
    #[arg(value_enum)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Scenario {
    /// The factory image boots slot A and commits it; the commit reaches
    /// the env file U-Boot reads.
    S1,
    /// --bundle installed into B over ssh, B boots on trial, is committed
    /// and stays primary across a reboot.
    S2,
}

fn run(cli: Cli) -> Result<()> {
    let ssh = SshTarget {
        identity: cli.identity,
        ..SshTarget::parse(&cli.target)?
    };
    std::fs::create_dir_all(&cli.out).with_context(|| format!("create {}", cli.out.display()))?;
    let rig = LabRig {
        lab: Lab {
            ssh,
            console: cli.console,
            power_off: cli.power_off,
            power_on: cli.power_on,
            bundle_dir: cli.bundle_dir,
        },
        dir: cli.out,
    };
    eprintln!(
        "kernex-hw-run: {:?} on {} (console {}); logs in {}",
        cli.scenario,
        rig.lab.ssh,
        rig.lab.console.display(),
        rig.dir.display()
    );
    match cli.scenario {
        Scenario::S1 => scenario_1(&rig),
        Scenario::S2 => {
            let bundle = cli
                .bundle
                .context("s2 needs --bundle (or KERNEX_HW_BUNDLE)")?;
            scenario_2(&rig, &bundle, &cli.bundle_version)
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => {
            eprintln!("kernex-hw-run: passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kernex-hw-run: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}
