//! `kernex-updater install`.
//!
//! On a terminal, a progress bar on stderr (bytes written, rate, ETA, and
//! what was downloaded or read); with `--json`, progress events as JSON
//! lines on stdout (`{"event":"progress",...}`), then the report as the
//! last line.

use std::io::{IsTerminal, Write};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::Context;
use crate::install::{InstallOptions, InstallProgress, InstallReport, MAX_FETCH_CONCURRENCY};
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
    /// Print progress events and the install report as JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Range requests in flight at once (default: `[link]
    /// fetch-concurrency`, else 4).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_FETCH_CONCURRENCY as i64))]
    pub fetch_concurrency: Option<u32>,
}

/// One progress event of `install --json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct ProgressEvent<'a> {
    event: &'static str,
    #[serde(flatten)]
    progress: InstallProgress,
    /// What `downloaded-bytes` means: "read" from a local file or
    /// "downloaded".
    transfer: &'a str,
}

/// The report line of `install --json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
struct ReportEvent<'a> {
    event: &'static str,
    #[serde(flatten)]
    report: &'a InstallReport,
}

/// Shows an install's progress: a bar on a terminal, JSON lines with
/// `--json`, nothing otherwise.
enum ProgressView {
    Bar(ProgressBar),
    Json,
    Quiet,
}

impl ProgressView {
    fn new(json: bool) -> Self {
        if json {
            return ProgressView::Json;
        }
        if !std::io::stderr().is_terminal() {
            return ProgressView::Quiet;
        }
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {prefix}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("installing");
        ProgressView::Bar(bar)
    }

    fn show(&self, p: InstallProgress, local: bool) {
        let verb = if local { "read" } else { "downloaded" };
        match self {
            ProgressView::Bar(bar) => {
                bar.set_length(p.total_bytes);
                bar.set_position(p.done_bytes);
                bar.set_prefix(format!(
                    "({} {verb})",
                    indicatif::HumanBytes(p.downloaded_bytes)
                ));
            }
            ProgressView::Json => {
                let event = ProgressEvent {
                    event: "progress",
                    progress: p,
                    transfer: verb,
                };
                if let Ok(line) = serde_json::to_string(&event) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
            }
            ProgressView::Quiet => {}
        }
    }

    fn finish(&self) {
        if let ProgressView::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Installs, then reboots if asked.
pub fn run(ctx: &mut Context, args: InstallArgs) -> Result<()> {
    let data = DataDir::new(&ctx.config.data_dir);
    let link = Link::new(&ctx.config.link, &data).context("unable to read the link budget")?;
    let mut source = source::open(&args.bundle, link)
        .with_context(|| format!("unable to open {}", args.bundle))?;
    if let Some(n) = args.fetch_concurrency {
        ctx.config.link.fetch_concurrency = Some(n);
    }
    let options = InstallOptions {
        allow_downgrade: args.allow_downgrade,
        at_time: None,
    };
    let local = source.is_local();
    let display = ProgressView::new(args.json);
    let result = crate::install::install_with_progress(
        &ctx.config,
        ctx.flow.as_mut(),
        source.as_mut(),
        &options,
        &|p| display.show(p, local),
    );
    display.finish();
    let report = result.with_context(|| format!("unable to install {}", args.bundle))?;
    if args.json {
        let line = serde_json::to_string(&ReportEvent {
            event: "installed",
            report: &report,
        })?;
        println!("{line}");
    } else if report.already_installed {
        println!(
            "{} was already in slot {}; it boots next",
            report.version,
            report.target.map(|s| s.name()).unwrap_or("?")
        );
    } else {
        let transfer = if report.local {
            format!(
                "read {} bytes from {} in {} reads",
                report.bytes_fetched, args.bundle, report.requests
            )
        } else {
            format!(
                "downloaded {} bytes in {} requests",
                report.bytes_fetched, report.requests
            )
        };
        println!(
            "installed {} into slot {}; it boots next ({transfer}; chunks: {} from the bundle, {} from the booted slot, {} patched, {} resumed)",
            report.version,
            report.target.map(|s| s.name()).unwrap_or("?"),
            report.chunks_fetched,
            report.chunks_from_seed,
            report.chunks_patched,
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
