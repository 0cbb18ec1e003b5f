//! The fleet: N simulated devices that enroll, poll, download with Range
//! requests at their link's rate, install, reboot, commit or revert, roll
//! back on command and report — over real HTTP against a running
//! kernex-server whose test clock the fleet steps (one simulated second
//! per step while anything downloads, longer jumps while all are idle).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};

use crate::releases::{LocalRelease, Rng};

/// A link class as the simulator models it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkProfile {
    /// Class name sent to the server.
    pub class: String,
    /// Download rate limit, bytes/s.
    pub rate: u64,
    /// Probability that the link drops in a given second (nothing moves).
    pub drop_probability: f64,
    /// Daily byte budget (metered), enforced by the device itself.
    pub budget_per_day: Option<u64>,
    /// Cost per GB.
    pub cost_per_gb: f64,
}

/// Default profiles: ethernet, wifi, metered 4G.
pub fn default_profiles() -> Vec<LinkProfile> {
    vec![
        LinkProfile {
            class: "ethernet".into(),
            rate: 12_500_000,
            drop_probability: 0.0,
            budget_per_day: None,
            cost_per_gb: 0.0,
        },
        LinkProfile {
            class: "wifi".into(),
            rate: 2_500_000,
            drop_probability: 0.01,
            budget_per_day: None,
            cost_per_gb: 0.0,
        },
        LinkProfile {
            class: "metered-4g".into(),
            rate: 250_000,
            drop_probability: 0.05,
            budget_per_day: Some(50_000_000),
            cost_per_gb: 5.0,
        },
    ]
}

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

#[derive(Debug, Clone)]
enum Phase {
    Idle,
    Waiting {
        release_id: String,
        nb: i64,
        na: i64,
    },
    Downloading {
        release_id: String,
        range: usize,
        offset: u64,
        done: u64,
        total: u64,
        needs_window: bool,
        last_report: i64,
    },
    Installing {
        release_id: String,
        until: i64,
    },
    Rebooting {
        release_id: String,
        until: i64,
        crash: bool,
    },
    RollingBack {
        release_id: String,
        version: String,
        until: i64,
    },
}

#[derive(Debug)]
struct SimDevice {
    device_id: String,
    pk: String,
    credential: String,
    profile: usize,
    site: String,
    tz: String,
    offline: Option<(i64, i64)>,
    version: String,
    other: Option<String>,
    phase: Phase,
    next_poll: i64,
    reports: VecDeque<Value>,
    day: i64,
    day_bytes: u64,
    max_day_bytes: u64,
    downloaded: u64,
    last_state: String,
}

/// One line of the timeline (one simulated minute).
#[derive(Debug, Clone, Serialize)]
pub struct TimelineRow {
    /// Simulated seconds since the rollout started.
    pub t_secs: i64,
    /// Rollout status.
    pub status: String,
    /// 1-based current wave.
    pub wave: i64,
    /// Devices per state (server's view).
    pub states: BTreeMap<String, i64>,
    /// Busiest second of the minute, bytes (counted by the devices).
    pub peak_egress_bytes_per_sec: u64,
    /// Average over the minute, bytes/s.
    pub avg_egress_bytes_per_sec: u64,
    /// The cap.
    pub egress_cap_bytes_per_sec: u64,
    /// Most bytes any metered device downloaded today.
    pub metered_max_device_day_bytes: u64,
    /// Metered budget per device and day.
    pub metered_budget_per_day: Option<u64>,
}

/// Per device, at the end.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSummary {
    /// Device id.
    pub device_id: String,
    /// Internal id.
    pub id: String,
    /// Link class.
    pub link_class: String,
    /// Version it runs.
    pub version: String,
    /// Bytes the server planned for it (preview / rollout record).
    pub planned_bytes: i64,
    /// Bytes it downloaded (counted at the HTTP layer by the device).
    pub downloaded_bytes: u64,
    /// Most bytes downloaded in one UTC day.
    pub max_day_bytes: u64,
    /// Server-side state.
    pub state: String,
    /// Site.
    pub site: String,
    /// Time zone.
    pub time_zone: String,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Rollout id.
    pub rollout_id: String,
    /// Final status.
    pub status: String,
    /// Why (pause, rollback).
    pub status_reason: Option<String>,
    /// Devices.
    pub devices: usize,
    /// Wall-clock seconds the run took.
    pub wall_secs: f64,
    /// Simulated seconds from start to the end.
    pub sim_secs: i64,
    /// Simulated seconds from start until each wave was promoted.
    pub waves_promoted_at_secs: Vec<Option<i64>>,
    /// Bytes the preview announced.
    pub preview_total_bytes: u64,
    /// Metered cost the preview announced.
    pub preview_metered_cost: f64,
    /// Projected duration the preview announced, seconds.
    pub preview_duration_secs: u64,
    /// Bytes devices downloaded.
    pub downloaded_total_bytes: u64,
    /// The largest compressed chunk (tolerance per device).
    pub max_chunk_bytes: u64,
    /// Egress cap.
    pub egress_cap_bytes_per_sec: u64,
    /// Busiest second, bytes (device-side count).
    pub peak_egress_bytes_per_sec: u64,
    /// Busiest second / cap.
    pub peak_egress_over_cap: f64,
    /// Busiest second, bytes, as the server's HTTP layer counted it
    /// (`GET /rollouts/egress`).
    pub server_peak_egress_bytes_per_sec: u64,
    /// The server's busiest second / cap.
    pub server_peak_egress_over_cap: f64,
    /// Ran on the wall clock (no test clock): simulated = real seconds.
    pub real_time: bool,
    /// Most bytes a metered device downloaded in one day.
    pub metered_max_device_day_bytes: u64,
    /// Metered budget.
    pub metered_budget_per_day: Option<u64>,
    /// Simulated seconds until every device of the rollout committed.
    pub all_committed_after_secs: Option<i64>,
    /// Simulated seconds from the rollback until every committed device
    /// reported its previous version.
    pub rollback_secs: Option<i64>,
    /// Devices per version at the end.
    pub versions: BTreeMap<String, usize>,
    /// Link drops simulated.
    pub link_drops: u64,
    /// Per device.
    pub per_device: Vec<DeviceSummary>,
    /// Per minute.
    pub timeline: Vec<TimelineRow>,
    /// Bytes per simulated second (device-side count), seconds with traffic.
    pub egress_per_second: Vec<(i64, u64)>,
}

/// The simulated fleet and its view of the run.
#[derive(Debug)]
pub struct Fleet {
    opts: FleetOptions,
    http: reqwest::Client,
    token: String,
    devices: Vec<SimDevice>,
    from: LocalRelease,
    to: LocalRelease,
    from_id: String,
    to_id: String,
    ranges: Vec<(u64, u64)>,
    ranges_total: u64,
    /// Rollout id once created.
    pub rollout_id: Option<String>,
    /// The simulated now (server clock), ms.
    pub now_ms: i64,
    start_ms: i64,
    egress: BTreeMap<i64, u64>,
    crash_acc: Mutex<f64>,
    drops: AtomicU64,
    preview: Value,
    /// Last rollout summary fetched.
    pub rollout: Value,
    waves_promoted: Vec<Option<i64>>,
    last_wave: i64,
    timeline: Vec<TimelineRow>,
    all_committed_at: Option<i64>,
    rollback_started: Option<i64>,
    rollback_done: Option<i64>,
    wall: Instant,
    /// Wall clock at the simulated `start_ms` (real-time runs).
    real_origin: Option<(Instant, i64)>,
    last_row_minute: i64,
    cap: u64,
    budget: Option<u64>,
}

fn is_ok(s: StatusCode) -> bool {
    s.is_success()
}

impl Fleet {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.opts.server.trim_end_matches('/'))
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{path}: request failed"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((status, value))
    }

    async fn admin_ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let (s, v) = self.admin(method, path, body).await?;
        if !is_ok(s) {
            bail!("{path}: {s}: {v}");
        }
        Ok(v)
    }

    /// Logs in, installs the keyring, uploads both releases, enrolls the
    /// devices on the first release and reads the server clock.
    pub async fn setup(opts: FleetOptions) -> Result<Fleet> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .context("unable to build the HTTP client")?;
        let token = match &opts.token {
            Some(t) => t.clone(),
            None => {
                let login = http
                    .post(format!("{}/api/v1/login", opts.server.trim_end_matches('/')))
                    .json(&json!({"organization": opts.organization, "email": opts.email, "password": opts.password}))
                    .send()
                    .await
                    .with_context(|| format!("unable to reach {}", opts.server))?;
                if !login.status().is_success() {
                    bail!("login as {} failed: {}", opts.email, login.status());
                }
                login.json::<Value>().await?["token"]
                    .as_str()
                    .context("login answered without a token")?
                    .to_string()
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
            token,
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
            let clock = fleet.admin_ok(reqwest::Method::GET, "/api/v1/test/clock", None).await.context(
                "the server has no test clock: start it with `test-clock = true` in its configuration (or run in real time)",
            )?;
            fleet.now_ms = clock["now_ms"].as_i64().context("clock without now_ms")?;
        }
        if let Some(t) = fleet.opts.start_at_ms {
            fleet
                .admin_ok(
                    reqwest::Method::POST,
                    "/api/v1/test/clock",
                    Some(json!({"set_ms": t, "tick": false})),
                )
                .await?;
            fleet.now_ms = t;
        }
        let pem = std::fs::read_to_string(&fleet.opts.ca_pem)
            .with_context(|| format!("unable to read {}", fleet.opts.ca_pem.display()))?;
        fleet
            .admin_ok(
                reqwest::Method::PUT,
                "/api/v1/org/keyring",
                Some(json!({"pem": pem})),
            )
            .await?;
        fleet.from_id = fleet.upload(true).await?;
        fleet.to_id = fleet.upload(false).await?;
        fleet.enroll().await?;
        Ok(fleet)
    }

    async fn upload(&self, from: bool) -> Result<String> {
        let release = if from { &self.from } else { &self.to };
        let resp = self
            .http
            .post(self.url("/api/v1/releases"))
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .body(release.bytes.clone())
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if status == StatusCode::CREATED {
            return Ok(v["id"].as_str().context("release without id")?.to_string());
        }
        if status != StatusCode::CONFLICT {
            bail!("uploading release {}: {status}: {v}", release.version);
        }
        let list = self
            .admin_ok(reqwest::Method::GET, "/api/v1/releases", None)
            .await?;
        list.as_array()
            .and_then(|a| a.iter().find(|r| r["version"] == release.version.as_str()))
            .and_then(|r| r["id"].as_str())
            .map(str::to_string)
            .with_context(|| format!("release {} exists but is not listed", release.version))
    }

    fn run_tag(&self) -> String {
        format!("sim-{}", self.opts.prefix)
    }

    async fn enroll(&mut self) -> Result<()> {
        let tag = self.run_tag();
        let tok = self
            .admin_ok(
                reqwest::Method::POST,
                "/api/v1/enrollment-tokens",
                Some(json!({"label": "kernex-sim", "tags": [tag]})),
            )
            .await?;
        let token = tok["token"]
            .as_str()
            .context("enrollment token missing")?
            .to_string();
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
            // Profiles by share, deterministically interleaved.
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
            plan.push((i, profile, site, tz, offline));
        }
        // Spread the profile order so that ids are not sorted by class.
        let prefix = self.opts.prefix.clone();
        let class = self
            .opts
            .hardware_class
            .clone()
            .unwrap_or_else(|| self.from.compatible.clone());
        let from_version = self.from.version.clone();
        let http = self.http.clone();
        let base = self.opts.server.trim_end_matches('/').to_string();
        let profiles: Vec<LinkProfile> =
            self.opts.profiles.iter().map(|(p, _)| p.clone()).collect();
        let enrolled: Vec<Result<SimDevice>> = futures_util::stream::iter(plan.into_iter().map(|(i, profile, site, tz, offline)| {
            let http = http.clone();
            let base = base.clone();
            let token = token.clone();
            let class = class.clone();
            let from_version = from_version.clone();
            let device_id = format!("{prefix}-{i:05}");
            let link = profiles[profile].class.clone();
            async move {
                let resp = http
                    .post(format!("{base}/api/v1/device/enroll"))
                    .json(&json!({"enrollment_token": token, "device_id": device_id, "hardware_class": class,
                        "link_class": link, "site": site, "time_zone": tz}))
                    .send()
                    .await?;
                if !resp.status().is_success() {
                    bail!("enrolling {device_id}: {}", resp.status());
                }
                let v: Value = resp.json().await?;
                let credential = v["credential"].as_str().context("no credential")?.to_string();
                let hb = http
                    .post(format!("{base}/api/v1/device/heartbeat"))
                    .bearer_auth(&credential)
                    .json(&json!({"version": from_version, "booted_slot": "A", "primary_slot": "A"}))
                    .send()
                    .await?;
                if !hb.status().is_success() {
                    bail!("heartbeat of {device_id}: {}", hb.status());
                }
                Ok(SimDevice {
                    pk: v["id"].as_str().context("no id")?.to_string(),
                    device_id,
                    credential,
                    profile,
                    site,
                    tz,
                    offline: offline.then_some((0, 0)),
                    version: from_version,
                    other: None,
                    phase: Phase::Idle,
                    next_poll: 0,
                    reports: VecDeque::new(),
                    day: 0,
                    day_bytes: 0,
                    max_day_bytes: 0,
                    downloaded: 0,
                    last_state: "pending".into(),
                })
            }
        }))
        .buffer_unordered(4)
        .collect()
        .await;
        for d in enrolled {
            self.devices.push(d?);
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
        let created = self
            .admin_ok(reqwest::Method::POST, "/api/v1/rollouts", Some(spec))
            .await?;
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
        self.preview = self
            .admin_ok(
                reqwest::Method::GET,
                &format!("/api/v1/rollouts/{id}/preview"),
                None,
            )
            .await?;
        self.admin_ok(
            reqwest::Method::POST,
            &format!("/api/v1/rollouts/{id}/start"),
            None,
        )
        .await?;
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
        let poll_ms = i64::try_from(self.opts.poll_secs * 1000).unwrap_or(60_000);
        let off_at = self.now_ms + i64::try_from(self.opts.offline_after_secs * 1000).unwrap_or(0);
        let off_until = off_at + i64::try_from(self.opts.offline_secs * 1000).unwrap_or(0);
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
    }

    /// Asks the server to roll the rollout back.
    pub async fn rollback(&mut self) -> Result<()> {
        let id = self.rollout_id.clone().context("no rollout")?;
        self.admin_ok(
            reqwest::Method::POST,
            &format!("/api/v1/rollouts/{id}/rollback"),
            None,
        )
        .await?;
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
        self.admin_ok(
            reqwest::Method::POST,
            &format!("/api/v1/rollouts/{id}/resume"),
            None,
        )
        .await?;
        Ok(())
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
            let (s, v) = self
                .admin(
                    reqwest::Method::POST,
                    "/api/v1/test/clock",
                    Some(json!({"set_ms": t, "tick": true})),
                )
                .await?;
            if !s.is_success() {
                bail!("stepping the server clock: {s}: {v}");
            }
            (t, dt)
        };
        self.now_ms = t;
        let ctx = Ctx {
            http: &self.http,
            base: self.opts.server.trim_end_matches('/').to_string(),
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
        let r = self
            .admin_ok(
                reqwest::Method::GET,
                &format!("/api/v1/rollouts/{id}?devices=false"),
                None,
            )
            .await?;
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
        let committed = states["committed"].as_i64().unwrap_or(0);
        if self.all_committed_at.is_none() && committed == r["devices_total"].as_i64().unwrap_or(-1)
        {
            self.all_committed_at = Some(since);
        }
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

    fn timeline_row(&self, r: &Value) -> TimelineRow {
        let end = self.now_ms.div_euclid(1000);
        let minute: Vec<u64> = self.egress.range(end - 59..=end).map(|(_, b)| *b).collect();
        let states = r["states"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let day = self.now_ms.div_euclid(86_400_000);
        let metered_max = self
            .devices
            .iter()
            .filter(|d| self.opts.profiles[d.profile].0.budget_per_day.is_some() && d.day == day)
            .map(|d| d.day_bytes)
            .max()
            .unwrap_or(0);
        TimelineRow {
            t_secs: (self.now_ms - self.start_ms) / 1000,
            status: r["status"].as_str().unwrap_or("").to_string(),
            wave: r["current_wave"].as_i64().unwrap_or(0),
            states,
            peak_egress_bytes_per_sec: minute.iter().copied().max().unwrap_or(0),
            avg_egress_bytes_per_sec: minute.iter().sum::<u64>() / 60,
            egress_cap_bytes_per_sec: self.cap,
            metered_max_device_day_bytes: metered_max,
            metered_budget_per_day: self.budget,
        }
    }

    /// Steps until `done` says so or the simulated time runs out.
    pub async fn run_until(&mut self, mut done: impl FnMut(&Fleet) -> bool) -> Result<bool> {
        let limit =
            self.start_ms + i64::try_from(self.opts.max_sim_secs * 1000).unwrap_or(i64::MAX);
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

    /// The summary, with per-device state from the server.
    pub async fn summary(&self) -> Result<Summary> {
        let id = self.rollout_id.clone().unwrap_or_default();
        let detail = self
            .admin_ok(
                reqwest::Method::GET,
                &format!("/api/v1/rollouts/{id}"),
                None,
            )
            .await?;
        let mut server: HashMap<String, (i64, String)> = HashMap::new();
        for d in detail["devices"].as_array().into_iter().flatten() {
            server.insert(
                d["id"].as_str().unwrap_or("").to_string(),
                (
                    d["delta_bytes"].as_i64().unwrap_or(0),
                    d["state"].as_str().unwrap_or("").to_string(),
                ),
            );
        }
        let per_device: Vec<DeviceSummary> = self
            .devices
            .iter()
            .map(|d| {
                let (planned, state) = server
                    .get(&d.pk)
                    .cloned()
                    .unwrap_or((0, "not targeted".into()));
                DeviceSummary {
                    device_id: d.device_id.clone(),
                    id: d.pk.clone(),
                    link_class: self.opts.profiles[d.profile].0.class.clone(),
                    version: d.version.clone(),
                    planned_bytes: planned,
                    downloaded_bytes: d.downloaded,
                    max_day_bytes: d.max_day_bytes,
                    state,
                    site: d.site.clone(),
                    time_zone: d.tz.clone(),
                }
            })
            .collect();
        let peak = self.egress.values().copied().max().unwrap_or(0);
        let server_egress = self
            .admin_ok(
                reqwest::Method::GET,
                &format!("/api/v1/rollouts/egress?since_ms={}", self.start_ms),
                None,
            )
            .await?;
        let server_peak = server_egress["peak_bytes_per_sec"].as_u64().unwrap_or(0);
        let over_cap = |b: u64| {
            if self.cap > 0 {
                b as f64 / self.cap as f64
            } else {
                0.0
            }
        };
        Ok(Summary {
            rollout_id: id,
            status: detail["status"].as_str().unwrap_or("").to_string(),
            status_reason: detail["status_reason"].as_str().map(str::to_string),
            devices: self.devices.len(),
            wall_secs: self.wall.elapsed().as_secs_f64(),
            sim_secs: (self.now_ms - self.start_ms) / 1000,
            waves_promoted_at_secs: self.waves_promoted.clone(),
            preview_total_bytes: self.preview["total_bytes"].as_u64().unwrap_or(0),
            preview_metered_cost: self.preview["metered_cost"].as_f64().unwrap_or(0.0),
            preview_duration_secs: self.preview["projected_duration_secs"]
                .as_u64()
                .unwrap_or(0),
            downloaded_total_bytes: self.devices.iter().map(|d| d.downloaded).sum(),
            max_chunk_bytes: self.to.max_chunk(),
            egress_cap_bytes_per_sec: self.cap,
            peak_egress_bytes_per_sec: peak,
            peak_egress_over_cap: over_cap(peak),
            server_peak_egress_bytes_per_sec: server_peak,
            server_peak_egress_over_cap: over_cap(server_peak),
            real_time: self.real_origin.is_some(),
            metered_max_device_day_bytes: self
                .devices
                .iter()
                .filter(|d| self.opts.profiles[d.profile].0.budget_per_day.is_some())
                .map(|d| d.max_day_bytes)
                .max()
                .unwrap_or(0),
            metered_budget_per_day: self.budget,
            all_committed_after_secs: self.all_committed_at,
            rollback_secs: self.rollback_done.map(|ms| ms / 1000),
            versions: self.versions(),
            link_drops: self.drops.load(Ordering::Relaxed),
            per_device,
            timeline: self.timeline.clone(),
            egress_per_second: self.egress.iter().map(|(k, v)| (*k, *v)).collect(),
        })
    }
}

/// Prints one timeline row.
pub fn print_row(r: &TimelineRow) {
    let states: Vec<String> = r.states.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let mb = |b: u64| b as f64 / 1e6;
    let metered = match r.metered_budget_per_day {
        Some(b) => format!(
            "metered max {:.2}/{:.2} MB/day",
            mb(r.metered_max_device_day_bytes),
            mb(b)
        ),
        None => String::new(),
    };
    println!(
        "t+{:02}:{:02}:{:02} {:<9} wave {} | {} | egress peak {:.2} avg {:.2} cap {:.2} MB/s | {}",
        r.t_secs / 3600,
        (r.t_secs / 60) % 60,
        r.t_secs % 60,
        r.status,
        r.wave,
        states.join(", "),
        mb(r.peak_egress_bytes_per_sec),
        mb(r.avg_egress_bytes_per_sec),
        mb(r.egress_cap_bytes_per_sec),
        metered
    );
}

struct Ctx<'a> {
    http: &'a reqwest::Client,
    base: String,
    opts: &'a FleetOptions,
    to: &'a LocalRelease,
    to_id: &'a str,
    ranges: &'a [(u64, u64)],
    ranges_total: u64,
    crash_acc: &'a Mutex<f64>,
    drops: &'a AtomicU64,
    now: i64,
    dt: i64,
}

impl SimDevice {
    fn online(&self, now: i64) -> bool {
        self.offline.is_none_or(|(a, b)| now < a || now >= b)
    }

    async fn send(&mut self, ctx: &Ctx<'_>, report: Value) {
        self.reports.push_back(report);
        self.flush(ctx).await;
    }

    async fn flush(&mut self, ctx: &Ctx<'_>) {
        if !self.online(ctx.now) {
            return;
        }
        while let Some(r) = self.reports.front() {
            let ok = ctx
                .http
                .post(format!("{}/api/v1/device/report", ctx.base))
                .bearer_auth(&self.credential)
                .json(r)
                .send()
                .await
                .is_ok_and(|resp| resp.status().is_success());
            if !ok {
                return;
            }
            self.reports.pop_front();
        }
    }

    fn add_bytes(&mut self, now: i64, n: u64) {
        let day = now.div_euclid(86_400_000);
        if day != self.day {
            self.day = day;
            self.day_bytes = 0;
        }
        self.day_bytes += n;
        self.max_day_bytes = self.max_day_bytes.max(self.day_bytes);
        self.downloaded += n;
    }

    /// One step; returns bytes downloaded.
    async fn act(&mut self, ctx: &Ctx<'_>) -> u64 {
        let now = ctx.now;
        if !self.online(now) {
            return 0;
        }
        self.flush(ctx).await;
        let profile = &ctx.opts.profiles[self.profile].0;
        let mut moved = 0u64;
        match self.phase.clone() {
            Phase::Downloading {
                release_id,
                mut range,
                mut offset,
                mut done,
                total,
                needs_window,
                last_report,
            } => {
                if needs_window {
                    if now >= self.next_poll {
                        self.poll(ctx).await;
                    }
                    return 0;
                }
                // The budget is the device's own (link profile), per UTC day.
                let day = now.div_euclid(86_400_000);
                let used_today = if day == self.day { self.day_bytes } else { 0 };
                let mut allowance = profile
                    .rate
                    .saturating_mul(u64::try_from(ctx.dt).unwrap_or(1000))
                    / 1000;
                if let Some(b) = profile.budget_per_day {
                    allowance = allowance.min(b.saturating_sub(used_today));
                }
                let dropped = profile.drop_probability > 0.0 && {
                    let mut rng = Rng::new(
                        (now as u64)
                            ^ self
                                .pk
                                .bytes()
                                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
                    );
                    rng.f64() < profile.drop_probability
                };
                if dropped {
                    ctx.drops.fetch_add(1, Ordering::Relaxed);
                    allowance = 0;
                }
                while allowance > 0 && range < ctx.ranges.len() {
                    let (s, e) = ctx.ranges[range];
                    let start = s + offset;
                    let take = (e - start).min(allowance);
                    let got = fetch(ctx, &self.credential, &release_id, start, take).await;
                    let Some(bytes) = got else { break };
                    let n = bytes.len() as u64;
                    let expected = usize::try_from(start)
                        .ok()
                        .and_then(|a| ctx.to.bytes.get(a..a + bytes.len()));
                    if expected != Some(bytes.as_slice()) {
                        tracing::error!(device = %self.device_id, start, "downloaded bytes differ from the bundle");
                    }
                    moved += n;
                    self.add_bytes(now, n);
                    allowance -= n.min(allowance);
                    done += n;
                    offset += n;
                    if start + n >= e {
                        range += 1;
                        offset = 0;
                    }
                    if n < take {
                        break;
                    }
                }
                let finished = range >= ctx.ranges.len();
                let exhausted = !finished
                    && profile
                        .budget_per_day
                        .is_some_and(|b| self.day_bytes >= b && self.day == day);
                let report_due = finished
                    || exhausted
                    || now - last_report
                        >= i64::try_from(ctx.opts.report_every_secs * 1000).unwrap_or(10_000);
                let last_report = if report_due {
                    self.send(ctx, json!({"state": "downloading", "release_id": release_id, "bytes_done": done, "bytes_total": total}))
                        .await;
                    now
                } else {
                    last_report
                };
                if finished {
                    self.send(ctx, json!({"state": "installed", "release_id": release_id}))
                        .await;
                    self.phase = Phase::Installing {
                        release_id,
                        until: now + i64::try_from(ctx.opts.install_secs * 1000).unwrap_or(0),
                    };
                } else {
                    if exhausted {
                        self.next_poll =
                            now + i64::try_from(ctx.opts.poll_secs * 1000).unwrap_or(60_000);
                    }
                    self.phase = Phase::Downloading {
                        release_id,
                        range,
                        offset,
                        done,
                        total,
                        needs_window: exhausted,
                        last_report,
                    };
                }
            }
            Phase::Installing { release_id, until } if now >= until => {
                self.send(
                    ctx,
                    json!({"state": "rebooted", "release_id": release_id, "booted_slot": "B"}),
                )
                .await;
                let crash = {
                    let mut acc = ctx.crash_acc.lock().unwrap_or_else(|e| e.into_inner());
                    *acc += ctx.opts.crash_probability;
                    if *acc >= 1.0 {
                        *acc -= 1.0;
                        true
                    } else {
                        false
                    }
                };
                self.phase = Phase::Rebooting {
                    release_id,
                    until: now + i64::try_from(ctx.opts.health_secs * 1000).unwrap_or(0),
                    crash,
                };
            }
            Phase::Rebooting {
                release_id,
                until,
                crash,
            } if now >= until => {
                let new_version = ctx.to.version.clone();
                if crash {
                    self.other = Some(new_version.clone());
                    self.send(ctx, json!({"state": "reverted", "release_id": release_id, "version": self.version,
                        "booted_slot": "A", "reason": format!("crash loop on {new_version}: agent restarted 5 times in 60 s")}))
                        .await;
                } else {
                    self.other = Some(std::mem::replace(&mut self.version, new_version.clone()));
                    self.send(ctx, json!({"state": "committed", "release_id": release_id, "version": new_version, "booted_slot": "B"}))
                        .await;
                }
                self.phase = Phase::Idle;
                self.next_poll = now + i64::try_from(ctx.opts.poll_secs * 1000).unwrap_or(60_000);
            }
            Phase::RollingBack {
                release_id,
                version,
                until,
            } if now >= until => {
                let previous = std::mem::replace(&mut self.version, version.clone());
                self.other = Some(previous);
                self.send(ctx, json!({"state": "rolled_back", "release_id": release_id, "version": version, "booted_slot": "A"}))
                    .await;
                self.phase = Phase::Idle;
                self.next_poll = now + i64::try_from(ctx.opts.poll_secs * 1000).unwrap_or(60_000);
            }
            Phase::Waiting { release_id, nb, na } => {
                if nb <= now && now < na {
                    self.start_download(ctx, release_id).await;
                } else if now >= na {
                    self.phase = Phase::Idle;
                    self.poll(ctx).await;
                } else if now >= self.next_poll {
                    self.poll(ctx).await;
                }
            }
            Phase::Idle if now >= self.next_poll => self.poll(ctx).await,
            _ => {}
        }
        let state = match &self.phase {
            Phase::Idle => "idle",
            Phase::Waiting { .. } => "waiting",
            Phase::Downloading { .. } => "downloading",
            Phase::Installing { .. } => "installing",
            Phase::Rebooting { .. } => "rebooting",
            Phase::RollingBack { .. } => "rolling_back",
        };
        self.last_state = state.to_string();
        moved
    }

    async fn start_download(&mut self, ctx: &Ctx<'_>, release_id: String) {
        self.send(ctx, json!({"state": "downloading", "release_id": release_id, "bytes_done": 0, "bytes_total": ctx.ranges_total}))
            .await;
        self.phase = Phase::Downloading {
            release_id,
            range: 0,
            offset: 0,
            done: 0,
            total: ctx.ranges_total,
            needs_window: false,
            last_report: ctx.now,
        };
    }

    async fn poll(&mut self, ctx: &Ctx<'_>) {
        let now = ctx.now;
        let poll_ms = i64::try_from(ctx.opts.poll_secs * 1000).unwrap_or(60_000);
        self.next_poll = now + poll_ms;
        let resp = ctx
            .http
            .get(format!("{}/api/v1/device/poll", ctx.base))
            .bearer_auth(&self.credential)
            .send()
            .await;
        let Ok(resp) = resp else { return };
        // The server's hint (a rollout acts on this device) only ever
        // makes it poll sooner, as kernex-updater does.
        if let Some(s) = resp
            .headers()
            .get("kernex-poll-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
        {
            self.next_poll = now + (s.saturating_mul(1000)).clamp(1000, poll_ms);
        }
        if resp.status() != StatusCode::OK {
            return;
        }
        let Ok(v) = resp.json::<Value>().await else {
            return;
        };
        let release_id = v["release_id"].as_str().unwrap_or("").to_string();
        let version = v["version"].as_str().unwrap_or("").to_string();
        if let Some(s) = v["poll_after_secs"].as_i64() {
            self.next_poll = now + (s * 1000).clamp(1000, poll_ms);
        }
        if v["action"] == "rollback" {
            if matches!(self.phase, Phase::RollingBack { .. }) {
                return;
            }
            if self.other.as_deref() == Some(version.as_str()) && self.version != version {
                self.phase = Phase::RollingBack {
                    release_id,
                    version,
                    until: now + i64::try_from(ctx.opts.rollback_secs * 1000).unwrap_or(0),
                };
            } else if self.version == version {
                // Already there (e.g. it reverted): say so.
                self.send(
                    ctx,
                    json!({"state": "rolled_back", "release_id": release_id, "version": version}),
                )
                .await;
            } else {
                self.send(
                    ctx,
                    json!({"state": "failed", "release_id": release_id,
                    "reason": format!("rollback to {version}: the other slot does not hold it")}),
                )
                .await;
            }
            return;
        }
        if version == self.version || release_id != ctx.to_id {
            return;
        }
        if self.other.as_deref() == Some(version.as_str()) && self.version != version {
            // It reverted from this release already; a real device would
            // try again, the simulator keeps its verdict.
            return;
        }
        let window = v["download_window"].as_object().map(|w| {
            (
                w["not_before_ms"].as_i64().unwrap_or(0),
                w["not_after_ms"].as_i64().unwrap_or(i64::MAX),
            )
        });
        if let Phase::Downloading {
            needs_window: true, ..
        } = self.phase
        {
            if let Some((nb, na)) = window
                && nb <= now
                && now < na
                && let Phase::Downloading { needs_window, .. } = &mut self.phase
            {
                *needs_window = false;
            }
            return;
        }
        match window {
            None => self.start_download(ctx, release_id).await,
            Some((nb, na)) if nb <= now && now < na => self.start_download(ctx, release_id).await,
            Some((nb, na)) if now < nb => {
                self.phase = Phase::Waiting { release_id, nb, na };
                self.next_poll = self.next_poll.min(nb);
            }
            Some(_) => {}
        }
    }
}

async fn fetch(
    ctx: &Ctx<'_>,
    credential: &str,
    release_id: &str,
    start: u64,
    len: u64,
) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let resp = ctx
        .http
        .get(format!(
            "{}/api/v1/device/releases/{release_id}/bundle",
            ctx.base
        ))
        .bearer_auth(credential)
        .header("range", format!("bytes={start}-{}", start + len - 1))
        .send()
        .await
        .ok()?;
    if resp.status() != StatusCode::PARTIAL_CONTENT {
        tracing::warn!(status = %resp.status(), "range request refused");
        return None;
    }
    resp.bytes().await.ok().map(|b| b.to_vec())
}

/// The wall clock, unix ms.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
