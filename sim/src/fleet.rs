//! The fleet: N simulated devices (`device`) that enroll, poll,
//! download with Range requests at their link's rate, install, reboot,
//! commit or revert, roll back on command and report — over real HTTP
//! against a running kernex-server whose test clock the fleet steps (one
//! simulated second per step while anything downloads, longer jumps while
//! all are idle). The operator's side is [`crate::operator`]; what a run
//! prints and returns is [`crate::report`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use kernex_protocol::api::{NewEnrollmentToken, ReportState};
use serde_json::{Value, json};

use crate::device::{Ctx, Phase, Plan, SimDevice, ms};
pub use crate::device::{LinkProfile, default_profiles};
use crate::operator::Operator;
use crate::releases::{LocalRelease, Rng};
pub use crate::report::{DeviceSummary, Summary, TimelineRow, print_row};

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Server base URL, e.g. http://127.0.0.1:8080.
    pub server: String,
    /// Organisation.
    pub organization: String,
    /// Admin email.
    pub email: String,
    /// Admin password.
    pub password: String,
    /// Or an operator token (admin) to use instead of logging in.
    pub token: Option<String>,
    /// Set the server clock to this before anything else (unix ms; only
    /// forward).
    pub start_at_ms: Option<i64>,
    /// CA certificate to install as the organisation's keyring.
    pub ca_pem: PathBuf,
    /// The release devices run at the start.
    pub from_bundle: PathBuf,
    /// The release the rollout installs.
    pub to_bundle: PathBuf,
    /// Number of devices.
    pub devices: usize,
    /// Link profiles and their shares of the fleet.
    pub profiles: Vec<(LinkProfile, f64)>,
    /// Number of sites devices are spread over.
    pub sites: usize,
    /// Time zones devices are spread over.
    pub time_zones: Vec<String>,
    /// Share of the devices that install the new release and crash-loop on
    /// it (spread evenly over installs, so runs are reproducible).
    pub crash_probability: f64,
    /// Share of the devices that go offline for a while.
    pub offline_fraction: f64,
    /// When (seconds after the rollout starts) they go offline.
    pub offline_after_secs: u64,
    /// For how long.
    pub offline_secs: u64,
    /// Poll interval of an idle device, seconds.
    pub poll_secs: u64,
    /// Install time after the download, seconds.
    pub install_secs: u64,
    /// Reboot and health check until commit or revert, seconds.
    pub health_secs: u64,
    /// A rollback's reboot into the other slot, seconds.
    pub rollback_secs: u64,
    /// Progress report interval while downloading, seconds.
    pub report_every_secs: u64,
    /// The rollout spec (release_id and selector are filled in).
    pub spec: Value,
    /// Stop after this much simulated time.
    pub max_sim_secs: u64,
    /// RNG seed.
    pub seed: u64,
    /// Print the per-minute timeline while running.
    pub print_timeline: bool,
    /// Device id prefix (unique per run against a shared server).
    pub prefix: String,
    /// Hardware class of the simulated devices (the bundles' compatible).
    pub hardware_class: Option<String>,
    /// Run on the wall clock against a server with its real clock and its
    /// own scheduler (no `test-clock`): one step per second, every delay
    /// (poll, install, reboot) really waited.
    pub real_time: bool,
}

/// The simulated fleet and its view of the run.
#[derive(Debug)]
pub struct Fleet {
    pub(crate) opts: FleetOptions,
    http: reqwest::Client,
    pub(crate) operator: Operator,
    pub(crate) devices: Vec<SimDevice>,
    from: LocalRelease,
    pub(crate) to: LocalRelease,
    from_id: String,
    to_id: String,
    ranges: Vec<(u64, u64)>,
    ranges_total: u64,
    /// Rollout id once created.
    pub rollout_id: Option<String>,
    /// The simulated now (server clock), ms.
    pub now_ms: i64,
    pub(crate) start_ms: i64,
    /// Bytes the devices downloaded per second (unix s).
    pub(crate) egress: BTreeMap<i64, u64>,
    crash_acc: Mutex<f64>,
    pub(crate) drops: AtomicU64,
    pub(crate) preview: Value,
    /// Last rollout summary fetched.
    pub rollout: Value,
    pub(crate) waves_promoted: Vec<Option<i64>>,
    last_wave: i64,
    pub(crate) timeline: Vec<TimelineRow>,
    pub(crate) all_committed_at: Option<i64>,
    rollback_started: Option<i64>,
    pub(crate) rollback_done: Option<i64>,
    pub(crate) wall: Instant,
    /// Wall clock at the simulated `start_ms` (real-time runs).
    pub(crate) real_origin: Option<(Instant, i64)>,
    last_row_minute: i64,
    /// The rollout's egress cap, bytes/s.
    pub(crate) cap: u64,
    /// The rollout's metered budget per device and day.
    pub(crate) budget: Option<u64>,
}

impl Fleet {
    /// Logs in, installs the keyring, uploads both releases, enrolls the
    /// devices on the first release and reads the server clock.
    pub async fn setup(opts: FleetOptions) -> Result<Fleet> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .context("unable to build the HTTP client")?;
        let operator = match &opts.token {
            Some(t) => Operator::with_token(http.clone(), &opts.server, t),
            None => {
                Operator::login(
                    http.clone(),
                    &opts.server,
                    &opts.organization,
                    &opts.email,
                    &opts.password,
                )
                .await?
            }
        };
        let from = LocalRelease::open(&opts.from_bundle)?;
        let to = LocalRelease::open(&opts.to_bundle)?;
        if from.compatible != to.compatible {
            bail!(
                "the two bundles are for different hardware ({} and {})",
                from.compatible,
                to.compatible
            );
        }
        let ranges = to.fetch_ranges(Some(&from));
        let ranges_total = ranges.iter().map(|(s, e)| e - s).sum();
        let mut fleet = Fleet {
            http,
            operator,
            devices: Vec::new(),
            from,
            to,
            from_id: String::new(),
            to_id: String::new(),
            ranges,
            ranges_total,
            rollout_id: None,
            now_ms: 0,
            start_ms: 0,
            egress: BTreeMap::new(),
            crash_acc: Mutex::new(0.5),
            drops: AtomicU64::new(0),
            preview: Value::Null,
            rollout: Value::Null,
            waves_promoted: Vec::new(),
            last_wave: 1,
            timeline: Vec::new(),
            all_committed_at: None,
            rollback_started: None,
            rollback_done: None,
            wall: Instant::now(),
            real_origin: None,
            last_row_minute: -1,
            cap: 0,
            budget: None,
            opts,
        };
        if fleet.opts.real_time {
            if fleet.opts.start_at_ms.is_some() {
                bail!("a real-time run cannot set the server clock (start_at_ms)");
            }
            fleet.now_ms = wall_ms();
            fleet.real_origin = Some((Instant::now(), fleet.now_ms));
        } else {
            fleet.now_ms = fleet.operator.clock().await?;
        }
        if let Some(t) = fleet.opts.start_at_ms {
            fleet.operator.set_clock(t, false).await?;
            fleet.now_ms = t;
        }
        let pem = std::fs::read_to_string(&fleet.opts.ca_pem)
            .with_context(|| format!("unable to read {}", fleet.opts.ca_pem.display()))?;
        fleet.operator.set_keyring(&pem).await?;
        fleet.from_id = fleet.operator.upload(&fleet.from).await?;
        fleet.to_id = fleet.operator.upload(&fleet.to).await?;
        fleet.enroll().await?;
        Ok(fleet)
    }

    fn run_tag(&self) -> String {
        format!("sim-{}", self.opts.prefix)
    }

    /// Which link profile, site, time zone each device gets, and whether
    /// it goes offline: profiles by share, deterministically interleaved.
    fn plan(&self) -> Vec<Plan> {
        let mut rng = Rng::new(self.opts.seed);
        let total_share: f64 = self
            .opts
            .profiles
            .iter()
            .map(|(_, s)| s)
            .sum::<f64>()
            .max(f64::EPSILON);
        let n = self.opts.devices;
        let mut plan = Vec::new();
        let mut offline_acc = 0.0;
        for i in 0..n {
            let x = (i as f64 + 0.5) / n as f64 * total_share;
            let mut acc = 0.0;
            let mut profile = 0;
            for (p, (_, share)) in self.opts.profiles.iter().enumerate() {
                acc += share;
                if x < acc {
                    profile = p;
                    break;
                }
                profile = p;
            }
            let site = format!("site-{}", rng.next_u64() % self.opts.sites.max(1) as u64);
            let tz = self.opts.time_zones[(rng.next_u64()
                % self.opts.time_zones.len().max(1) as u64)
                as usize
                % self.opts.time_zones.len().max(1)]
            .clone();
            offline_acc += self.opts.offline_fraction;
            let offline = if offline_acc >= 1.0 {
                offline_acc -= 1.0;
                true
            } else {
                false
            };
            plan.push(Plan {
                device_id: format!("{}-{i:05}", self.opts.prefix),
                profile,
                site,
                tz,
                offline,
            });
        }
        plan
    }

    async fn enroll(&mut self) -> Result<()> {
        let token = self
            .operator
            .enrollment_token(&NewEnrollmentToken {
                label: "kernex-sim".into(),
                tags: vec![self.run_tag()],
                allowed_tags: Vec::new(),
                expires_at: None,
                expires_in_secs: Some(7 * 86_400),
                max_uses: None,
                link_class: None,
                site: None,
                time_zone: None,
                require_preauthorization: false,
                require_tpm: false,
            })
            .await?
            .token
            .context("enrollment token missing")?;
        let class = self
            .opts
            .hardware_class
            .clone()
            .unwrap_or_else(|| self.from.compatible.clone());
        let profiles: Vec<LinkProfile> =
            self.opts.profiles.iter().map(|(p, _)| p.clone()).collect();
        let (http, base, version) = (&self.http, self.operator.base(), &self.from.version);
        let enrolled: Vec<Result<SimDevice>> =
            futures_util::stream::iter(self.plan().into_iter().map(|plan| {
                SimDevice::enroll(http, base, &token, &class, version, &profiles, plan)
            }))
            .buffer_unordered(4)
            .collect()
            .await;
        for d in enrolled {
            self.devices.push(d?);
        }
        // The plan gave each device its link, site and time zone, which it
        // claims at enrollment: the operator accepts the claims.
        let operator = &self.operator;
        let pks: Vec<String> = self.devices.iter().map(|d| d.pk.clone()).collect();
        let accepted: Vec<Result<()>> = futures_util::stream::iter(
            pks.into_iter()
                .map(|pk| async move { operator.accept_link(&pk).await }),
        )
        .buffer_unordered(4)
        .collect()
        .await;
        for a in accepted {
            a?;
        }
        self.devices.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        Ok(())
    }

    /// Creates the rollout, fetches its preview and starts it.
    pub async fn start_rollout(&mut self) -> Result<Value> {
        let mut spec = self.opts.spec.clone();
        if !spec.is_object() {
            spec = json!({});
        }
        spec["release_id"] = json!(self.to_id);
        spec["selector"] = json!({"tags": [self.run_tag()]});
        if spec.get("name").is_none() {
            spec["name"] = json!(format!("kernex-sim {}", self.opts.prefix));
        }
        let created = self.operator.create_rollout(&spec).await?;
        let id = created["id"]
            .as_str()
            .context("rollout without id")?
            .to_string();
        self.cap = created["spec"]["bandwidth"]["egress_cap_bytes_per_sec"]
            .as_u64()
            .unwrap_or(0);
        self.budget =
            created["spec"]["bandwidth"]["link_classes"]["metered-4g"]["budget_bytes_per_day"]
                .as_u64();
        self.preview = self.operator.preview(&id).await?;
        self.operator.start(&id).await?;
        self.rollout_id = Some(id);
        if self.opts.real_time {
            self.now_ms = wall_ms();
            self.real_origin = Some((Instant::now(), self.now_ms));
        }
        self.start_ms = self.now_ms;
        let n_waves = created["spec"]["waves"].as_array().map_or(0, |w| w.len());
        self.waves_promoted = vec![None; n_waves];
        // Offline devices drop out a while after the start; polls are
        // staggered over one interval.
        let poll_ms = ms(self.opts.poll_secs);
        let off_at = self.now_ms + ms(self.opts.offline_after_secs);
        let off_until = off_at + ms(self.opts.offline_secs);
        let n = self.devices.len().max(1) as i64;
        for (i, d) in self.devices.iter_mut().enumerate() {
            d.next_poll = self.now_ms + poll_ms * i as i64 / n;
            if d.offline.is_some() {
                d.offline = Some((off_at, off_until));
            }
        }
        Ok(self.preview.clone())
    }

    /// Points the fleet at another server URL (a restarted server).
    pub fn set_server(&mut self, url: &str) {
        self.opts.server = url.to_string();
        self.operator.set_server(url);
    }

    /// Asks the server to roll the rollout back.
    pub async fn rollback(&mut self) -> Result<()> {
        let id = self.rollout_id.clone().context("no rollout")?;
        self.operator.rollback(&id).await?;
        self.rollback_started = Some(if self.real_origin.is_some() {
            wall_ms()
        } else {
            self.now_ms
        });
        self.rollback_done = None;
        Ok(())
    }

    /// Asks the server to resume a paused rollout.
    pub async fn resume(&mut self) -> Result<()> {
        let id = self.rollout_id.clone().context("no rollout")?;
        self.operator.resume(&id).await
    }

    fn busy(&self) -> bool {
        self.devices.iter().any(|d| {
            matches!(
                d.phase,
                Phase::Downloading {
                    needs_window: false,
                    ..
                }
            ) || matches!(d.phase, Phase::Waiting { nb, .. } if nb <= self.now_ms + 1000)
        })
    }

    fn next_event(&self) -> i64 {
        let mut next = i64::MAX;
        for d in &self.devices {
            next = next.min(d.next_poll);
            match &d.phase {
                Phase::Waiting { nb, .. } => next = next.min(*nb),
                Phase::Installing { until, .. }
                | Phase::Rebooting { until, .. }
                | Phase::RollingBack { until, .. } => next = next.min(*until),
                _ => {}
            }
            if let Some((a, b)) = d.offline {
                if a > self.now_ms {
                    next = next.min(a);
                }
                if b > self.now_ms {
                    next = next.min(b);
                }
            }
        }
        next
    }

    /// Advances the simulated time by one step and lets every device act.
    pub async fn step(&mut self) -> Result<()> {
        let minute = 60_000;
        let dt = if self.busy() {
            1000
        } else {
            let next = self.next_event();
            let to_minute = minute - (self.now_ms - self.start_ms).rem_euclid(minute);
            (next - self.now_ms)
                .clamp(1000, 30_000)
                .min(to_minute.max(1000))
        };
        let (t, dt) = if let Some((origin, origin_ms)) = self.real_origin {
            // The wall clock is the server's: wait for the next second, do
            // not jump (the server's own scheduler runs meanwhile).
            let due = self.now_ms + 1000;
            let wait = (due - origin_ms) - i64::try_from(origin.elapsed().as_millis())?;
            if wait > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(wait.unsigned_abs())).await;
            }
            let t = (origin_ms + i64::try_from(origin.elapsed().as_millis())?).max(due);
            (t, t - self.now_ms)
        } else {
            let t = self.now_ms + dt;
            self.operator.set_clock(t, true).await?;
            (t, dt)
        };
        self.now_ms = t;
        let ctx = Ctx {
            http: &self.http,
            base: self.operator.base(),
            opts: &self.opts,
            to: &self.to,
            to_id: &self.to_id,
            ranges: &self.ranges,
            ranges_total: self.ranges_total,
            crash_acc: &self.crash_acc,
            drops: &self.drops,
            now: t,
            dt,
        };
        let mut bytes = 0u64;
        for group in self.devices.chunks_mut(32) {
            let futures: Vec<_> = group.iter_mut().map(|d| d.act(&ctx)).collect();
            bytes += futures_util::future::join_all(futures)
                .await
                .iter()
                .sum::<u64>();
        }
        if bytes > 0 {
            *self.egress.entry(t.div_euclid(1000)).or_default() += bytes;
        }
        self.observe().await?;
        Ok(())
    }

    async fn observe(&mut self) -> Result<()> {
        let Some(id) = self.rollout_id.clone() else {
            return Ok(());
        };
        let r = self.operator.rollout(&id, false).await?;
        let wave = r["current_wave"].as_i64().unwrap_or(1);
        let since = (self.now_ms - self.start_ms) / 1000;
        let status = r["status"].as_str().unwrap_or("").to_string();
        while self.last_wave < wave
            || (status == "completed" && self.last_wave <= self.waves_promoted.len() as i64)
        {
            if let Some(slot) = usize::try_from(self.last_wave - 1)
                .ok()
                .and_then(|w| self.waves_promoted.get_mut(w))
                && slot.is_none()
            {
                *slot = Some(since);
            }
            self.last_wave += 1;
        }
        let states = &r["states"];
        let committed = states[ReportState::Committed.as_str()]
            .as_i64()
            .unwrap_or(0);
        if self.all_committed_at.is_none() && committed == r["devices_total"].as_i64().unwrap_or(-1)
        {
            self.all_committed_at = Some(since);
        }
        // `rolling_back` is the server's state of a rollout device between
        // the rollback order and the device's `rolled_back` report.
        if let Some(started) = self.rollback_started
            && self.rollback_done.is_none()
            && states["rolling_back"].as_i64().unwrap_or(0) == 0
            && self
                .devices
                .iter()
                .all(|d| !matches!(d.phase, Phase::RollingBack { .. }) && d.reports.is_empty())
        {
            self.rollback_done = Some(self.now_ms - started);
        }
        let minute = (self.now_ms - self.start_ms).div_euclid(60_000);
        if minute > self.last_row_minute
            && (self.real_origin.is_some() || (self.now_ms - self.start_ms).rem_euclid(60_000) == 0)
        {
            self.last_row_minute = minute;
            let row = self.timeline_row(&r);
            if self.opts.print_timeline {
                print_row(&row);
            }
            self.timeline.push(row);
        }
        self.rollout = r;
        Ok(())
    }

    /// Steps until `done` says so or the simulated time runs out.
    pub async fn run_until(&mut self, mut done: impl FnMut(&Fleet) -> bool) -> Result<bool> {
        let limit = self.start_ms + ms(self.opts.max_sim_secs);
        while self.now_ms < limit {
            self.step().await?;
            if done(self) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The rollout's status as last seen.
    pub fn status(&self) -> &str {
        self.rollout["status"].as_str().unwrap_or("")
    }

    /// True when the rollout has stopped moving on its own: completed,
    /// aborted, rolled back or paused (the operator API's rollout
    /// statuses).
    pub fn rollout_stopped(&self) -> bool {
        matches!(
            self.status(),
            "completed" | "aborted" | "rolled_back" | "paused"
        )
    }

    /// True when no device is mid-way (downloading, installing, rebooting,
    /// rolling back) and no report waits to be delivered.
    pub fn quiet(&self) -> bool {
        self.devices.iter().all(|d| {
            d.reports.is_empty()
                && matches!(d.phase, Phase::Idle | Phase::Waiting { .. })
                && d.offline.is_none_or(|(_, until)| until <= self.now_ms)
        })
    }

    /// True when the rollback finished.
    pub fn rolled_back(&self) -> bool {
        self.rollback_done.is_some()
    }

    /// Versions the simulated devices run.
    pub fn versions(&self) -> BTreeMap<String, usize> {
        let mut v = BTreeMap::new();
        for d in &self.devices {
            *v.entry(d.version.clone()).or_default() += 1;
        }
        v
    }
}

/// The wall clock, unix ms.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
