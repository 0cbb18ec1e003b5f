//! `kernex-sim`: simulate a fleet against a running kernex-server.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kernex_sim::fleet::{Fleet, FleetOptions, LinkProfile};
use kernex_sim::releases::make_releases;
use kernex_sim::report::{print_preview, print_summary};
use serde_json::{Value, json};

/// Fleet simulator for Kernex rollouts.
///
/// `make-releases` writes a development CA and signed bundles whose images
/// share most chunks. `run` enrolls N simulated devices on the first
/// release against a running kernex-server, creates a rollout of the
/// second, previews it, starts it and steps the server's test clock: one
/// simulated second per step while anything downloads, longer jumps while
/// the fleet is idle. Every device polls, downloads exactly the byte
/// ranges it lacks with HTTP Range requests at its link's rate (dropping
/// with the link's probability, stopping at its metered daily budget),
/// installs, reboots, commits or reverts (crash loop), rolls back on
/// command and reports, queueing reports while offline.
///
/// The server must run with `test-clock = true` (never in production) and
/// without device and enrollment rate limits (`device-requests-per-minute
/// = 0`; `[limits] enrollments-per-token-per-minute = 0`,
/// `enrollments-per-address-per-minute = 0`,
/// `unauthenticated-per-address-per-minute = 0`): simulated
/// minutes pass in real milliseconds. With `--real-time` the server runs on
/// its real clock with its own scheduler instead, and every delay is
/// really waited (times are wall-clock seconds).
///
/// It prints a line per simulated minute (devices per state, egress
/// bytes/s against the cap, metered bytes against the daily budget) and a
/// summary; `--json` prints the summary as JSON instead.
///
/// EXAMPLES:
///     kernex-sim make-releases --out /tmp/sim
///     kernex-server --config sim.toml &    # test-clock = true
///     kernex-sim run --server http://127.0.0.1:8080 --password PW \
///         --ca /tmp/sim/ca.crt --from /tmp/sim/sim-x86-1.0.0.kxb \
///         --to /tmp/sim/sim-x86-1.1.0.kxb --devices 200
#[derive(Debug, Parser)]
#[command(name = "kernex-sim", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a development CA and signed test bundles.
    MakeReleases(MakeArgs),
    /// Simulate a fleet through one rollout.
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
struct MakeArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Hardware class.
    #[arg(long, default_value = "sim-x86")]
    compatible: String,
    /// Versions, oldest first.
    #[arg(long, value_delimiter = ',', default_value = "1.0.0,1.1.0")]
    versions: Vec<semver::Version>,
    /// Image size in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    size: usize,
    /// Share of 64 KiB blocks each version rewrites.
    #[arg(long, default_value_t = 0.1)]
    change: f64,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Server base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Organisation.
    #[arg(long, default_value = "default")]
    organization: String,
    /// Admin email.
    #[arg(long, default_value = "admin@localhost")]
    email: String,
    /// Admin password.
    #[arg(long, env = "KERNEX_SIM_PASSWORD")]
    password: String,
    /// CA certificate the bundles are signed under (set as the keyring).
    #[arg(long)]
    ca: PathBuf,
    /// Bundle the devices run at the start.
    #[arg(long)]
    from: PathBuf,
    /// Bundle the rollout installs.
    #[arg(long)]
    to: PathBuf,
    /// Devices.
    #[arg(long, default_value_t = 200)]
    devices: usize,
    /// Shares of ethernet, wifi and metered-4g devices.
    #[arg(long, value_delimiter = ',', default_value = "60,30,10")]
    mix: Vec<f64>,
    /// Ethernet rate, bytes/s.
    #[arg(long, default_value_t = 12_500_000)]
    ethernet_rate: u64,
    /// Wifi rate, bytes/s.
    #[arg(long, default_value_t = 2_500_000)]
    wifi_rate: u64,
    /// Wifi drop probability per second.
    #[arg(long, default_value_t = 0.01)]
    wifi_drop: f64,
    /// Metered 4G rate, bytes/s.
    #[arg(long, default_value_t = 250_000)]
    metered_rate: u64,
    /// Metered 4G drop probability per second.
    #[arg(long, default_value_t = 0.05)]
    metered_drop: f64,
    /// Metered 4G budget, bytes per device per UTC day.
    #[arg(long, default_value_t = 50_000_000)]
    metered_budget: u64,
    /// Metered 4G cost per GB.
    #[arg(long, default_value_t = 5.0)]
    metered_cost: f64,
    /// Sites.
    #[arg(long, default_value_t = 20)]
    sites: usize,
    /// Time zones (IANA).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "UTC,Europe/Berlin,America/New_York,Asia/Tokyo"
    )]
    time_zones: Vec<String>,
    /// Share of installs that crash-loop on the new release (spread evenly).
    #[arg(long, default_value_t = 0.0)]
    crash_probability: f64,
    /// Share of devices that go offline for a while.
    #[arg(long, default_value_t = 0.0)]
    offline_fraction: f64,
    /// They go offline this long after the start, seconds.
    #[arg(long, default_value_t = 60)]
    offline_after: u64,
    /// For this long, seconds.
    #[arg(long, default_value_t = 1800)]
    offline_secs: u64,
    /// Idle poll interval, seconds.
    #[arg(long, default_value_t = 30)]
    poll_secs: u64,
    /// Install time, seconds.
    #[arg(long, default_value_t = 20)]
    install_secs: u64,
    /// Reboot and health check, seconds.
    #[arg(long, default_value_t = 30)]
    health_secs: u64,
    /// Rollback reboot, seconds.
    #[arg(long, default_value_t = 10)]
    rollback_secs: u64,
    /// Waves: counts or percentages, e.g. 5,10%,50%,100%.
    #[arg(long, value_delimiter = ',', default_value = "5,10%,50%,100%")]
    waves: Vec<String>,
    /// Soak per wave, seconds.
    #[arg(long, default_value_t = 300)]
    soak_secs: u64,
    /// Promote gate: error rate below this.
    #[arg(long, default_value_t = 0.01)]
    promote_max_error_rate: f64,
    /// Rollback gate: error rate above this.
    #[arg(long, default_value_t = 0.05)]
    rollback_error_rate: f64,
    /// Fleet egress cap, bytes/s.
    #[arg(long, default_value_t = 50_000_000)]
    egress_cap: u64,
    /// Most downloads at once.
    #[arg(long, default_value_t = 50)]
    max_concurrent: u64,
    /// Most downloads at once per site.
    #[arg(long, default_value_t = 2)]
    per_site: u64,
    /// Maintenance window, local time HH:MM-HH:MM (repeatable; none: any time).
    #[arg(long = "window")]
    windows: Vec<String>,
    /// A full rollout spec (JSON) instead of the wave/gate/bandwidth flags.
    #[arg(long)]
    spec: Option<PathBuf>,
    /// Stop after this much simulated time, seconds.
    #[arg(long, default_value_t = 172_800)]
    max_sim_secs: u64,
    /// After the rollout completes, roll it back and time it.
    #[arg(long)]
    rollback_after_complete: bool,
    /// Device id prefix (default: a fresh one per run).
    #[arg(long)]
    prefix: Option<String>,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the summary as JSON (no timeline).
    #[arg(long)]
    json: bool,
    /// Run on the wall clock against a server with its real clock and its
    /// own scheduler (`test-clock = false`): every poll interval, install
    /// and reboot is really waited; times are real seconds.
    #[arg(long)]
    real_time: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::MakeReleases(a) => make(a),
        Command::Run(a) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("unable to start the async runtime")
            .and_then(|rt| rt.block_on(run(*a))),
    };
    if let Err(e) = result {
        eprintln!("kernex-sim: {e:#}");
        std::process::exit(1);
    }
}

fn make(a: MakeArgs) -> Result<()> {
    let made = make_releases(&a.out, &a.compatible, &a.versions, a.size, a.change, a.seed)?;
    println!("CA: {}", made.ca_pem.display());
    for b in &made.bundles {
        println!("bundle: {}", b.display());
    }
    Ok(())
}

fn spec_from_flags(a: &RunArgs) -> Result<Value> {
    if let Some(path) = &a.spec {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("unable to read {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()));
    }
    let mut waves = Vec::new();
    for w in &a.waves {
        let gates = json!({"promote_max_error_rate": a.promote_max_error_rate, "rollback_error_rate": a.rollback_error_rate});
        let wave = match w.strip_suffix('%') {
            Some(p) => {
                json!({"percent": p.parse::<f64>().with_context(|| format!("wave {w:?}"))?, "soak_secs": a.soak_secs, "gates": gates})
            }
            None => {
                json!({"count": w.parse::<u64>().with_context(|| format!("wave {w:?}"))?, "soak_secs": a.soak_secs, "gates": gates})
            }
        };
        waves.push(wave);
    }
    let mut windows = Vec::new();
    for w in &a.windows {
        let Some((start, end)) = w.split_once('-') else {
            bail!("--window {w:?}: expected HH:MM-HH:MM");
        };
        windows.push(json!({"start": start, "end": end}));
    }
    Ok(json!({
        "waves": waves,
        "maintenance_windows": windows,
        "bandwidth": {
            "egress_cap_bytes_per_sec": a.egress_cap,
            "max_concurrent_downloads": a.max_concurrent,
            "max_concurrent_per_site": a.per_site,
            "link_classes": {
                "ethernet": {"rate_bytes_per_sec": a.ethernet_rate},
                "wifi": {"rate_bytes_per_sec": a.wifi_rate},
                "metered-4g": {"rate_bytes_per_sec": a.metered_rate, "budget_bytes_per_day": a.metered_budget, "cost_per_gb": a.metered_cost}
            }
        }
    }))
}

async fn run(a: RunArgs) -> Result<()> {
    if a.mix.len() != 3 {
        bail!("--mix takes three shares: ethernet,wifi,metered-4g");
    }
    let spec = spec_from_flags(&a)?;
    let profiles = vec![
        (
            LinkProfile {
                class: "ethernet".into(),
                rate: a.ethernet_rate,
                drop_probability: 0.0,
                budget_per_day: None,
                cost_per_gb: 0.0,
            },
            a.mix[0],
        ),
        (
            LinkProfile {
                class: "wifi".into(),
                rate: a.wifi_rate,
                drop_probability: a.wifi_drop,
                budget_per_day: None,
                cost_per_gb: 0.0,
            },
            a.mix[1],
        ),
        (
            LinkProfile {
                class: "metered-4g".into(),
                rate: a.metered_rate,
                drop_probability: a.metered_drop,
                budget_per_day: Some(a.metered_budget),
                cost_per_gb: a.metered_cost,
            },
            a.mix[2],
        ),
    ];
    let prefix = a.prefix.clone().unwrap_or_else(|| {
        format!(
            "sim{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        )
    });
    let opts = FleetOptions {
        server: a.server.clone(),
        organization: a.organization.clone(),
        email: a.email.clone(),
        password: a.password.clone(),
        token: None,
        start_at_ms: None,
        ca_pem: a.ca.clone(),
        from_bundle: a.from.clone(),
        to_bundle: a.to.clone(),
        devices: a.devices,
        profiles,
        sites: a.sites,
        time_zones: a.time_zones.clone(),
        crash_probability: a.crash_probability,
        offline_fraction: a.offline_fraction,
        offline_after_secs: a.offline_after,
        offline_secs: a.offline_secs,
        poll_secs: a.poll_secs,
        install_secs: a.install_secs,
        health_secs: a.health_secs,
        rollback_secs: a.rollback_secs,
        report_every_secs: 10,
        spec,
        max_sim_secs: a.max_sim_secs,
        seed: a.seed,
        print_timeline: !a.json,
        prefix,
        hardware_class: None,
        real_time: a.real_time,
    };
    let mut fleet = Fleet::setup(opts).await?;
    let preview = fleet.start_rollout().await?;
    if !a.json {
        print_preview(&preview);
    }
    fleet
        .run_until(|f| f.rollout_stopped() && f.quiet())
        .await?;
    if a.rollback_after_complete && fleet.status() == "completed" {
        fleet.rollback().await?;
        fleet.run_until(|f| f.rolled_back() && f.quiet()).await?;
    }
    let summary = fleet.summary().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
}
