//! A simulated device's link: its class, rate, drops and daily budget, and
//! one step of a download over it — HTTP Range requests for the byte
//! ranges the device lacks, no more than the link carries in the step.

use std::sync::atomic::Ordering;

use kernex_protocol::api::{self, Report, ReportState};
use reqwest::StatusCode;
use serde::Serialize;

use super::{Ctx, Phase, SimDevice, ms, progress};
use crate::releases::Rng;

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

/// Where a download stands (the fields of [`Phase::Downloading`] but the
/// window flag).
pub(crate) struct Download {
    pub release_id: String,
    pub range: usize,
    pub offset: u64,
    pub done: u64,
    pub total: u64,
    pub last_report: i64,
}

impl SimDevice {
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

    /// One step of a download at the link's rate; returns bytes moved.
    pub(crate) async fn download(&mut self, ctx: &Ctx<'_>, d: Download) -> u64 {
        let Download {
            release_id,
            mut range,
            mut offset,
            mut done,
            total,
            last_report,
        } = d;
        let now = ctx.now;
        let profile = &ctx.opts.profiles[self.profile].0;
        let mut moved = 0u64;
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
        let report_due =
            finished || exhausted || now - last_report >= ms(ctx.opts.report_every_secs);
        let last_report = if report_due {
            self.send(ctx, progress(&release_id, done, total)).await;
            now
        } else {
            last_report
        };
        if finished {
            let mut installed = Report::new(ReportState::Installed);
            installed.release_id = Some(release_id.clone());
            self.send(ctx, installed).await;
            self.phase = Phase::Installing {
                release_id,
                until: now + ms(ctx.opts.install_secs),
            };
        } else {
            if exhausted {
                self.next_poll = now + ms(ctx.opts.poll_secs);
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
        moved
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
        .get(format!("{}{}", ctx.base, api::paths::bundle(release_id)))
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
