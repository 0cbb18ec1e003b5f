//! What an operator asks for: the rollout spec (selector, waves with gates,
//! maintenance windows, bandwidth policy), its defaults and its validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::service::{Error, Result};

/// Link class of a device that reports none.
pub const DEFAULT_LINK_CLASS: &str = "ethernet";

/// A rollout as the operator describes it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Free text shown in lists.
    #[serde(default)]
    pub name: String,
    /// The release to install.
    pub release_id: String,
    /// Which devices.
    #[serde(default)]
    pub selector: Selector,
    /// Waves, in order (default: 5 canaries, then 10 %, 50 %, 100 %).
    #[serde(default = "default_waves")]
    pub waves: Vec<Wave>,
    /// Do not start before this time (unix ms); default: when started.
    #[serde(default)]
    pub start_at_ms: Option<i64>,
    /// Downloads start only inside one of these, in each device's own
    /// time zone. Empty: any time.
    #[serde(default)]
    pub maintenance_windows: Vec<MaintenanceWindow>,
    /// Bandwidth and cost limits.
    #[serde(default)]
    pub bandwidth: BandwidthPolicy,
}

/// Which devices a rollout targets (all conditions hold).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// The device has every one of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Hardware class (must be the release's; default: the release's).
    #[serde(default)]
    pub hardware_class: Option<String>,
    /// The device runs one of these versions (empty: any other version).
    #[serde(default)]
    pub current_versions: Vec<String>,
}

/// One wave: a number of devices or a cumulative share of the target.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    /// This many devices.
    #[serde(default)]
    pub count: Option<u64>,
    /// Up to this share of all targeted devices, cumulative (e.g. 10, 50, 100).
    #[serde(default)]
    pub percent: Option<f64>,
    /// Time the wave runs after its last device settled, before promotion.
    #[serde(default = "default_soak")]
    pub soak_secs: u64,
    /// Health gates.
    #[serde(default)]
    pub gates: Gates,
}

/// Health gates of a wave. Error rate = (failed + reverted) / wave size.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// Promote only if the error rate is below this (seed: 0.01).
    pub promote_max_error_rate: f64,
    /// Roll the rollout back automatically above this (seed: 0.05).
    /// Between the two the rollout pauses for the operator.
    pub rollback_error_rate: f64,
    /// Promote only when at least this share of the wave committed
    /// (devices that stay offline hold promotion back below it).
    pub promote_min_committed: f64,
    /// Count a device as committed only once a TPM quote proved it runs
    /// the release ("committed and attested"); a quote showing another
    /// image counts as a failure. Such a wave takes only devices bound to
    /// a TPM: the others move to the next wave without the gate, or are
    /// left out of the rollout when none follows (the preview says so).
    pub require_attestation: bool,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            promote_max_error_rate: 0.01,
            rollback_error_rate: 0.05,
            promote_min_committed: 0.9,
            require_attestation: false,
        }
    }
}

fn default_soak() -> u64 {
    1800
}

/// The seed's waves: 5 canaries, then 10 %, 50 %, 100 %.
pub fn default_waves() -> Vec<Wave> {
    let wave = |count: Option<u64>, percent: Option<f64>| Wave {
        count,
        percent,
        soak_secs: default_soak(),
        gates: Gates::default(),
    };
    vec![
        wave(Some(5), None),
        wave(None, Some(10.0)),
        wave(None, Some(50.0)),
        wave(None, Some(100.0)),
    ]
}

/// A recurring window in the device's local time, e.g. 01:00–05:00.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    /// Local start, `HH:MM`.
    pub start: String,
    /// Local end, `HH:MM` (before `start`: the window crosses midnight).
    pub end: String,
    /// Days it opens (`mon`..`sun`); empty: every day.
    #[serde(default)]
    pub days: Vec<String>,
}

/// Bandwidth and cost limits of a rollout.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BandwidthPolicy {
    /// Fleet egress cap: the sum of the download rates of the devices
    /// holding a window never exceeds this.
    pub egress_cap_bytes_per_sec: u64,
    /// Most devices downloading at once.
    pub max_concurrent_downloads: u64,
    /// Most devices of one site downloading at once (a shared uplink).
    pub max_concurrent_per_site: u64,
    /// A granted window the device has not started within this many
    /// seconds is taken back.
    pub window_grace_secs: u64,
    /// A download with no progress report for this long gives its
    /// bandwidth back (the device resumes when it gets a new window).
    pub stall_secs: u64,
    /// Per link class: rate, daily budget, cost. Merged over the defaults
    /// (`ethernet`, `wifi`, `metered-4g`).
    pub link_classes: BTreeMap<String, LinkClassPolicy>,
}

/// What one link class costs and allows.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkClassPolicy {
    /// Download rate a device of this class uses (its link profile's rate
    /// limit); what the scheduler reserves against the cap.
    pub rate_bytes_per_sec: u64,
    /// Bytes one device may download per UTC day (metered links).
    #[serde(default)]
    pub budget_bytes_per_day: Option<u64>,
    /// Cost per GB (10^9 bytes), in the operator's currency.
    #[serde(default)]
    pub cost_per_gb: f64,
}

/// The link classes every policy knows.
pub fn default_link_classes() -> BTreeMap<String, LinkClassPolicy> {
    BTreeMap::from([
        (
            "ethernet".to_string(),
            LinkClassPolicy {
                rate_bytes_per_sec: 12_500_000,
                budget_bytes_per_day: None,
                cost_per_gb: 0.0,
            },
        ),
        (
            "wifi".to_string(),
            LinkClassPolicy {
                rate_bytes_per_sec: 2_500_000,
                budget_bytes_per_day: None,
                cost_per_gb: 0.0,
            },
        ),
        (
            "metered-4g".to_string(),
            LinkClassPolicy {
                rate_bytes_per_sec: 500_000,
                budget_bytes_per_day: Some(50_000_000),
                cost_per_gb: 5.0,
            },
        ),
    ])
}

impl Default for BandwidthPolicy {
    fn default() -> Self {
        BandwidthPolicy {
            egress_cap_bytes_per_sec: 125_000_000,
            max_concurrent_downloads: 100,
            max_concurrent_per_site: 2,
            window_grace_secs: 120,
            stall_secs: 300,
            link_classes: BTreeMap::new(),
        }
    }
}

impl BandwidthPolicy {
    /// The policy of a link class (defaults merged; unknown classes get
    /// the ethernet policy).
    pub fn class(&self, name: &str) -> LinkClassPolicy {
        if let Some(p) = self.link_classes.get(name) {
            return *p;
        }
        let defaults = default_link_classes();
        defaults
            .get(name)
            .or_else(|| defaults.get(DEFAULT_LINK_CLASS))
            .copied()
            .unwrap_or(LinkClassPolicy {
                rate_bytes_per_sec: 12_500_000,
                budget_bytes_per_day: None,
                cost_per_gb: 0.0,
            })
    }

    /// The rate reserved for a device of `class`: its class rate, never
    /// more than the cap.
    pub fn rate(&self, class: &str) -> u64 {
        self.class(class)
            .rate_bytes_per_sec
            .min(self.egress_cap_bytes_per_sec)
            .max(1)
    }
}

/// Checks a name-like field: 1-128 of letters, digits and `._:/+-`.
pub fn check_label(what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/+-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what} {v:?}: 1-128 characters of letters, digits and ._:/+-"
        )))
    }
}

/// Parses `HH:MM` into minutes after midnight.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Monday-zero day number of `mon`..`sun`.
pub fn parse_day(s: &str) -> Option<u8> {
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .iter()
        .position(|d| d.eq_ignore_ascii_case(s))
        .and_then(|p| u8::try_from(p).ok())
}

fn ratio(what: &str, v: f64) -> Result<()> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("{what}: a ratio from 0 to 1")))
    }
}

impl RolloutSpec {
    /// Checks everything that does not need the store. Errors name the
    /// field that is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.name.chars().count() > 200 {
            return Err(Error::Invalid("name: at most 200 characters".into()));
        }
        crate::service::names::check_tags(&self.selector.tags)?;
        if let Some(c) = &self.selector.hardware_class {
            check_label("selector.hardware_class", c)?;
        }
        if self.selector.current_versions.len() > 64 {
            return Err(Error::Invalid(
                "selector.current_versions: at most 64".into(),
            ));
        }
        for v in &self.selector.current_versions {
            check_label("selector.current_versions", v)?;
        }
        if self.waves.is_empty() || self.waves.len() > 20 {
            return Err(Error::Invalid("waves: 1 to 20 waves".into()));
        }
        let mut last_percent = 0.0;
        for (i, w) in self.waves.iter().enumerate() {
            match (w.count, w.percent) {
                (Some(c), None) => {
                    if c == 0 || c > 1_000_000 {
                        return Err(Error::Invalid(format!("waves[{i}].count: 1 to 1000000")));
                    }
                }
                (None, Some(p)) => {
                    if !p.is_finite() || p <= 0.0 || p > 100.0 {
                        return Err(Error::Invalid(format!(
                            "waves[{i}].percent: more than 0, at most 100"
                        )));
                    }
                    if p < last_percent {
                        return Err(Error::Invalid(format!(
                            "waves[{i}].percent: percentages are cumulative and must not decrease"
                        )));
                    }
                    last_percent = p;
                }
                _ => {
                    return Err(Error::Invalid(format!(
                        "waves[{i}]: give exactly one of count or percent"
                    )));
                }
            }
            if w.soak_secs > 30 * 86_400 {
                return Err(Error::Invalid(format!(
                    "waves[{i}].soak_secs: at most 30 days"
                )));
            }
            let g = &w.gates;
            ratio(
                &format!("waves[{i}].gates.promote_max_error_rate"),
                g.promote_max_error_rate,
            )?;
            ratio(
                &format!("waves[{i}].gates.rollback_error_rate"),
                g.rollback_error_rate,
            )?;
            ratio(
                &format!("waves[{i}].gates.promote_min_committed"),
                g.promote_min_committed,
            )?;
            if g.promote_max_error_rate > g.rollback_error_rate {
                return Err(Error::Invalid(format!(
                    "waves[{i}].gates: promote_max_error_rate must not exceed rollback_error_rate"
                )));
            }
        }
        if self.waves.last().and_then(|w| w.percent) != Some(100.0) {
            return Err(Error::Invalid(
                "waves: the last wave must be percent 100 (every targeted device)".into(),
            ));
        }
        if let Some(t) = self.start_at_ms
            && t < 0
        {
            return Err(Error::Invalid(
                "start_at_ms: a unix time in milliseconds".into(),
            ));
        }
        if self.maintenance_windows.len() > 16 {
            return Err(Error::Invalid("maintenance_windows: at most 16".into()));
        }
        for (i, w) in self.maintenance_windows.iter().enumerate() {
            let (Some(s), Some(e)) = (parse_hhmm(&w.start), parse_hhmm(&w.end)) else {
                return Err(Error::Invalid(format!(
                    "maintenance_windows[{i}]: start and end are local times HH:MM"
                )));
            };
            if s == e {
                return Err(Error::Invalid(format!(
                    "maintenance_windows[{i}]: start and end are equal (leave windows empty for any time)"
                )));
            }
            for d in &w.days {
                if parse_day(d).is_none() {
                    return Err(Error::Invalid(format!(
                        "maintenance_windows[{i}].days: {d:?} is not one of mon tue wed thu fri sat sun"
                    )));
                }
            }
        }
        let b = &self.bandwidth;
        if b.egress_cap_bytes_per_sec == 0 {
            return Err(Error::Invalid(
                "bandwidth.egress_cap_bytes_per_sec: more than 0".into(),
            ));
        }
        if b.max_concurrent_downloads == 0 || b.max_concurrent_downloads > 1_000_000 {
            return Err(Error::Invalid(
                "bandwidth.max_concurrent_downloads: 1 to 1000000".into(),
            ));
        }
        if b.max_concurrent_per_site == 0 {
            return Err(Error::Invalid(
                "bandwidth.max_concurrent_per_site: at least 1".into(),
            ));
        }
        if b.window_grace_secs == 0 || b.window_grace_secs > 86_400 {
            return Err(Error::Invalid(
                "bandwidth.window_grace_secs: 1 to 86400".into(),
            ));
        }
        if b.stall_secs == 0 || b.stall_secs > 7 * 86_400 {
            return Err(Error::Invalid("bandwidth.stall_secs: 1 to 604800".into()));
        }
        if b.link_classes.len() > 32 {
            return Err(Error::Invalid("bandwidth.link_classes: at most 32".into()));
        }
        for (name, p) in &b.link_classes {
            check_label("bandwidth.link_classes", name)?;
            if p.rate_bytes_per_sec == 0 {
                return Err(Error::Invalid(format!(
                    "bandwidth.link_classes.{name}.rate_bytes_per_sec: more than 0"
                )));
            }
            if p.budget_bytes_per_day == Some(0) {
                return Err(Error::Invalid(format!(
                    "bandwidth.link_classes.{name}.budget_bytes_per_day: more than 0 (or absent)"
                )));
            }
            if !p.cost_per_gb.is_finite() || p.cost_per_gb < 0.0 {
                return Err(Error::Invalid(format!(
                    "bandwidth.link_classes.{name}.cost_per_gb: 0 or more"
                )));
            }
        }
        Ok(())
    }

    /// How many devices each wave gets, for `n` targeted devices.
    pub fn wave_sizes(&self, n: usize) -> Vec<usize> {
        let mut sizes = Vec::with_capacity(self.waves.len());
        let mut assigned = 0usize;
        for (i, w) in self.waves.iter().enumerate() {
            let left = n - assigned;
            let size = if i + 1 == self.waves.len() {
                left
            } else if let Some(c) = w.count {
                usize::try_from(c).unwrap_or(usize::MAX).min(left)
            } else {
                let p = w.percent.unwrap_or(100.0);
                let cumulative = ((n as f64) * p / 100.0).ceil() as usize;
                cumulative.min(n).saturating_sub(assigned)
            };
            sizes.push(size);
            assigned += size;
        }
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> RolloutSpec {
        serde_json::from_value(json).unwrap_or_else(|e| unreachable!("{e}"))
    }

    #[test]
    fn defaults_are_the_seed() {
        let s = spec(serde_json::json!({"release_id": "r"}));
        assert!(s.validate().is_ok());
        assert_eq!(s.wave_sizes(200), vec![5, 15, 80, 100]);
        assert_eq!(s.wave_sizes(3), vec![3, 0, 0, 0]);
        assert_eq!(s.waves[0].gates.promote_max_error_rate, 0.01);
        assert_eq!(s.waves[0].gates.rollback_error_rate, 0.05);
    }

    #[test]
    fn rejects_bad_specs() {
        for bad in [
            serde_json::json!({"release_id": "r", "waves": []}),
            serde_json::json!({"release_id": "r", "waves": [{"count": 5}]}),
            serde_json::json!({"release_id": "r", "waves": [{"percent": 50}, {"percent": 10}, {"percent": 100}]}),
            serde_json::json!({"release_id": "r", "waves": [{"count": 1, "percent": 5}, {"percent": 100}]}),
            serde_json::json!({"release_id": "r", "maintenance_windows": [{"start": "25:00", "end": "01:00"}]}),
            serde_json::json!({"release_id": "r", "maintenance_windows": [{"start": "01:00", "end": "02:00", "days": ["someday"]}]}),
            serde_json::json!({"release_id": "r", "bandwidth": {"egress_cap_bytes_per_sec": 0}}),
            serde_json::json!({"release_id": "r", "waves": [{"percent": 100, "gates": {"promote_max_error_rate": 0.5, "rollback_error_rate": 0.1}}]}),
        ] {
            assert!(spec(bad.clone()).validate().is_err(), "{bad}");
        }
    }
}
