//! One simulated device: it enrolls, heartbeats, polls, downloads the byte
//! ranges it lacks with HTTP Range requests at its link's rate, installs,
//! reboots, commits or reverts, rolls back on command, and reports —
//! queueing its reports while offline and delivering them in order. It
//! speaks the device API of [`kernex_protocol::api`], as kernex-updater
//! does.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use anyhow::{Result, bail};
use kernex_protocol::api::{
    self, DesiredAction, DesiredState, EnrollRequest, EnrollResponse, Heartbeat, Report,
    ReportState,
};
use kernex_protocol::device_key::DeviceKey;
use reqwest::StatusCode;

mod link;

use link::Download;
pub use link::{LinkProfile, default_profiles};

use crate::fleet::FleetOptions;
use crate::releases::LocalRelease;

/// Where a simulated device's install stands.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// Nothing to do: polls every poll interval.
    Idle,
    /// Told to install inside a download window that has not opened yet.
    Waiting {
        release_id: String,
        nb: i64,
        na: i64,
    },
    /// Fetching `ranges[range]` from `offset` on.
    Downloading {
        release_id: String,
        range: usize,
        offset: u64,
        done: u64,
        total: u64,
        /// Stopped at the metered budget: waits for a new window.
        needs_window: bool,
        last_report: i64,
    },
    /// Writing the slot until `until`.
    Installing { release_id: String, until: i64 },
    /// Booted the new slot, health check until `until`.
    Rebooting {
        release_id: String,
        until: i64,
        crash: bool,
    },
    /// Booting the other slot (which holds `version`) until `until`.
    RollingBack {
        release_id: String,
        version: String,
        until: i64,
    },
}

/// A simulated device.
#[derive(Debug)]
pub(crate) struct SimDevice {
    /// Its own id (serial).
    pub device_id: String,
    /// The server's id for it.
    pub pk: String,
    /// Its key, as `kernex-updater` makes one: the identity it signs
    /// server nonces with for access tokens.
    key: DeviceKey,
    /// The current access token.
    credential: String,
    /// When to sign for a new one (a minute before it expires).
    renew_at: std::time::Instant,
    /// Index into the options' link profiles.
    pub profile: usize,
    pub site: String,
    pub tz: String,
    /// Offline from, until (unix ms); `(0, 0)` until the rollout starts.
    pub offline: Option<(i64, i64)>,
    /// The version it runs.
    pub version: String,
    /// The version in its other slot.
    other: Option<String>,
    pub phase: Phase,
    pub next_poll: i64,
    /// Reports not yet delivered, oldest first.
    pub reports: VecDeque<Report>,
    /// The UTC day `day_bytes` counts.
    pub day: i64,
    pub day_bytes: u64,
    pub max_day_bytes: u64,
    /// Bytes downloaded in all.
    pub downloaded: u64,
}

/// What a device is told about itself when it enrolls.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub device_id: String,
    pub profile: usize,
    pub site: String,
    pub tz: String,
    pub offline: bool,
}

/// What every device of a step shares.
pub(crate) struct Ctx<'a> {
    pub http: &'a reqwest::Client,
    pub base: &'a str,
    pub opts: &'a FleetOptions,
    pub to: &'a LocalRelease,
    pub to_id: &'a str,
    pub ranges: &'a [(u64, u64)],
    pub ranges_total: u64,
    pub crash_acc: &'a Mutex<f64>,
    pub drops: &'a AtomicU64,
    pub now: i64,
    pub dt: i64,
}

/// When to renew a token valid `secs` from now: a minute early (at
/// once for tokens shorter than two minutes' half).
fn renew_at(secs: u64) -> std::time::Instant {
    let secs = if secs > 120 { secs - 60 } else { secs / 2 };
    let now = std::time::Instant::now();
    now.checked_add(std::time::Duration::from_secs(secs))
        .unwrap_or(now + std::time::Duration::from_secs(86_400 * 365))
}

/// `secs` in ms, at most a century: a longer delay means "never", and
/// adding it to a time stays in range.
pub(crate) fn ms(secs: u64) -> i64 {
    const CENTURY_MS: u64 = 100 * 365 * 86_400_000;
    i64::try_from(secs.saturating_mul(1000).min(CENTURY_MS)).unwrap_or(i64::MAX)
}

impl SimDevice {
    /// Enrolls with `token` and sends a first heartbeat from slot A
    /// running `version`.
    pub async fn enroll(
        http: &reqwest::Client,
        base: &str,
        token: &str,
        hardware_class: &str,
        version: &str,
        profiles: &[LinkProfile],
        plan: Plan,
    ) -> Result<Self> {
        let Plan {
            device_id,
            profile,
            site,
            tz,
            offline,
        } = plan;
        let key = DeviceKey::generate()?;
        let challenge: api::Challenge = http
            .post(format!("{base}{}", api::paths::CHALLENGE))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let request = EnrollRequest {
            enrollment_token: token.to_string(),
            device_id: device_id.clone(),
            hardware_class: hardware_class.to_string(),
            hardware_metadata: Default::default(),
            tags: Vec::new(),
            link_class: profiles.get(profile).map(|p| p.class.clone()),
            site: Some(site.clone()),
            time_zone: Some(tz.clone()),
            tpm: None,
            tpm_slot_pcr: None,
            key: Some(key.proof(&device_id, &challenge.nonce)?),
        };
        let resp = http
            .post(format!("{base}{}", api::paths::ENROLL))
            .json(&request)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("enrolling {device_id}: {}", resp.status());
        }
        let enrolled: EnrollResponse = resp.json().await?;
        let heartbeat = Heartbeat {
            version: Some(version.to_string()),
            booted_slot: Some("A".into()),
            primary_slot: Some("A".into()),
            ..Heartbeat::default()
        };
        let hb = http
            .post(format!("{base}{}", api::paths::HEARTBEAT))
            .bearer_auth(&enrolled.credential)
            .json(&heartbeat)
            .send()
            .await?;
        if !hb.status().is_success() {
            bail!("heartbeat of {device_id}: {}", hb.status());
        }
        Ok(SimDevice {
            pk: enrolled.id,
            device_id,
            key,
            credential: enrolled.credential,
            renew_at: renew_at(enrolled.expires_in_secs.unwrap_or(u64::MAX / 2000)),
            profile,
            site,
            tz,
            offline: offline.then_some((0, 0)),
            version: version.to_string(),
            other: None,
            phase: Phase::Idle,
            next_poll: 0,
            reports: VecDeque::new(),
            day: 0,
            day_bytes: 0,
            max_day_bytes: 0,
            downloaded: 0,
        })
    }

    /// Signs a fresh nonce for a new access token when the current one is
    /// about to expire (wall-clock time: the server's test clock does not
    /// age tokens). A failure is retried at the next step.
    async fn renew(&mut self, ctx: &Ctx<'_>) {
        if std::time::Instant::now() < self.renew_at {
            return;
        }
        let renewed: Result<api::AccessToken> = async {
            let challenge: api::Challenge = ctx
                .http
                .post(format!("{}{}", ctx.base, api::paths::CHALLENGE))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let auth = self.key.auth(&self.pk, &challenge.nonce)?;
            Ok(ctx
                .http
                .post(format!("{}{}", ctx.base, api::paths::AUTH))
                .json(&auth)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?)
        }
        .await;
        match renewed {
            Ok(token) => {
                self.credential = token.token;
                self.renew_at = renew_at(token.expires_in_secs);
            }
            Err(e) => {
                tracing::debug!(device = %self.device_id, error = %format!("{e:#}"), "unable to renew the access token")
            }
        }
    }

    /// Reachable at `now`.
    pub fn online(&self, now: i64) -> bool {
        self.offline.is_none_or(|(a, b)| now < a || now >= b)
    }

    pub(crate) async fn send(&mut self, ctx: &Ctx<'_>, report: Report) {
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
                .post(format!("{}{}", ctx.base, api::paths::REPORT))
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

    /// One step; returns bytes downloaded.
    pub async fn act(&mut self, ctx: &Ctx<'_>) -> u64 {
        let now = ctx.now;
        if !self.online(now) {
            return 0;
        }
        self.renew(ctx).await;
        self.flush(ctx).await;
        match self.phase.clone() {
            Phase::Downloading {
                release_id,
                range,
                offset,
                done,
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
                return self
                    .download(
                        ctx,
                        Download {
                            release_id,
                            range,
                            offset,
                            done,
                            total,
                            last_report,
                        },
                    )
                    .await;
            }
            Phase::Installing { release_id, until } if now >= until => {
                let mut rebooted = Report::new(ReportState::Rebooted);
                rebooted.release_id = Some(release_id.clone());
                rebooted.booted_slot = Some("B".into());
                self.send(ctx, rebooted).await;
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
                    until: now + ms(ctx.opts.health_secs),
                    crash,
                };
            }
            Phase::Rebooting {
                release_id,
                until,
                crash,
            } if now >= until => {
                let new_version = ctx.to.version.clone();
                let report = if crash {
                    self.other = Some(new_version.clone());
                    let mut r = Report::new(ReportState::Reverted);
                    r.version = Some(self.version.clone());
                    r.booted_slot = Some("A".into());
                    r.reason = Some(format!(
                        "crash loop on {new_version}: agent restarted 5 times in 60 s"
                    ));
                    r
                } else {
                    self.other = Some(std::mem::replace(&mut self.version, new_version.clone()));
                    let mut r = Report::new(ReportState::Committed);
                    r.version = Some(new_version);
                    r.booted_slot = Some("B".into());
                    r
                };
                self.send(
                    ctx,
                    Report {
                        release_id: Some(release_id),
                        ..report
                    },
                )
                .await;
                self.phase = Phase::Idle;
                self.next_poll = now + ms(ctx.opts.poll_secs);
            }
            Phase::RollingBack {
                release_id,
                version,
                until,
            } if now >= until => {
                let previous = std::mem::replace(&mut self.version, version.clone());
                self.other = Some(previous);
                let mut r = Report::new(ReportState::RolledBack);
                r.release_id = Some(release_id);
                r.version = Some(version);
                r.booted_slot = Some("A".into());
                self.send(ctx, r).await;
                self.phase = Phase::Idle;
                self.next_poll = now + ms(ctx.opts.poll_secs);
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
        0
    }

    async fn start_download(&mut self, ctx: &Ctx<'_>, release_id: String) {
        self.send(ctx, progress(&release_id, 0, ctx.ranges_total))
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
        let poll_ms = ms(ctx.opts.poll_secs);
        self.next_poll = now + poll_ms;
        let resp = ctx
            .http
            .get(format!("{}{}", ctx.base, api::paths::POLL))
            .bearer_auth(&self.credential)
            .send()
            .await;
        let Ok(resp) = resp else { return };
        // The server's hint (a rollout acts on this device) only ever
        // makes it poll sooner, as kernex-updater does.
        if let Some(after) = resp
            .headers()
            .get(api::POLL_AFTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(api::parse_poll_after)
        {
            self.next_poll = now + ms(after.as_secs()).clamp(1000, poll_ms.max(1000));
        }
        if resp.status() != StatusCode::OK {
            return;
        }
        let Ok(desired) = resp.json::<DesiredState>().await else {
            return;
        };
        if let Some(s) = desired.poll_after_secs {
            self.next_poll = now + ms(s).clamp(1000, poll_ms.max(1000));
        }
        let action = desired.action();
        let DesiredState {
            release_id,
            version,
            download_window,
            ..
        } = desired;
        match action {
            DesiredAction::Rollback => return self.roll_back(ctx, release_id, version).await,
            DesiredAction::Install => {}
            // An action this device does not know: ignored, as
            // kernex-updater does.
            DesiredAction::Unknown => return,
        }
        if version == self.version || release_id != ctx.to_id {
            return;
        }
        if self.other.as_deref() == Some(version.as_str()) && self.version != version {
            // It reverted from this release already; a real device would
            // try again, the simulator keeps its verdict.
            return;
        }
        let window = download_window.map(|w| (w.not_before_ms, w.not_after_ms));
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

    /// The server asks for a rollback to `version`: boot the other slot if
    /// it holds it.
    async fn roll_back(&mut self, ctx: &Ctx<'_>, release_id: String, version: String) {
        if matches!(self.phase, Phase::RollingBack { .. }) {
            return;
        }
        if self.other.as_deref() == Some(version.as_str()) && self.version != version {
            self.phase = Phase::RollingBack {
                release_id,
                version,
                until: ctx.now + ms(ctx.opts.rollback_secs),
            };
        } else if self.version == version {
            // Already there (e.g. it reverted): say so.
            let mut r = Report::new(ReportState::RolledBack);
            r.release_id = Some(release_id);
            r.version = Some(version);
            self.send(ctx, r).await;
        } else {
            let mut r = Report::new(ReportState::Failed);
            r.release_id = Some(release_id);
            r.reason = Some(format!(
                "rollback to {version}: the other slot does not hold it"
            ));
            self.send(ctx, r).await;
        }
    }
}

/// A `downloading` report.
pub(crate) fn progress(release_id: &str, done: u64, total: u64) -> Report {
    let mut r = Report::new(ReportState::Downloading);
    r.release_id = Some(release_id.to_string());
    r.bytes_done = Some(i64::try_from(done).unwrap_or(i64::MAX));
    r.bytes_total = Some(i64::try_from(total).unwrap_or(i64::MAX));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_report_is_the_contract_s_downloading_report() {
        let json = serde_json::to_value(progress("r1", 10, 20)).ok();
        assert_eq!(
            json,
            Some(serde_json::json!({
                "state": "downloading", "release_id": "r1", "bytes_done": 10,
                "bytes_total": 20, "version": null, "booted_slot": null, "reason": null
            }))
        );
    }

    #[test]
    fn delays_from_flags_never_overflow_a_time() {
        assert_eq!(ms(30), 30_000);
        assert_eq!(ms(0), 0);
        let never = ms(u64::MAX);
        let year_2100_ms = 4_102_444_800_000i64;
        assert!(never > 86_400_000 && year_2100_ms.checked_add(never).is_some());
    }
}
