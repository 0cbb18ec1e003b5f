//! Planning: which devices go in which wave (diversity first), and the
//! projection the preview shows — every device's download simulated
//! forward in time under the same admission rules the scheduler applies
//! (egress cap, concurrency, per-site limit, metered daily budget,
//! maintenance windows in the device's time zone).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};

use jiff::tz::TimeZone;
use sha2::{Digest, Sha256};

use super::spec::RolloutSpec;
use super::time::{Openness, Windows, time_zone};

/// One UTC day in ms.
pub const DAY_MS: i64 = 86_400_000;

/// A targeted device with what it needs to download.
#[derive(Debug, Clone)]
pub struct Target {
    /// Internal id.
    pub pk: String,
    /// The device's own id.
    pub device_id: String,
    /// Hardware class.
    pub hardware_class: String,
    /// Link class.
    pub link_class: String,
    /// Site tag.
    pub site: Option<String>,
    /// IANA time zone.
    pub time_zone: Option<String>,
    /// The release it runs now, when known.
    pub from_release_id: Option<String>,
    /// The version it runs now.
    pub from_version: Option<String>,
    /// Exact bytes it must download.
    pub bytes: u64,
}

fn stable_hash(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Orders targets so that every prefix is as diverse as it can be:
/// devices are grouped by (hardware class, link class, site), groups are
/// interleaved so consecutive picks come from different link classes and
/// sites, and within a group the order is a stable hash of the device id,
/// never creation order.
pub fn diversity_order(targets: &mut Vec<Target>) {
    // (hardware class, link class, site)
    type Group = (String, String, String);
    let mut groups: BTreeMap<Group, Vec<Target>> = BTreeMap::new();
    for t in targets.drain(..) {
        let key = (
            t.hardware_class.clone(),
            t.link_class.clone(),
            t.site.clone().unwrap_or_default(),
        );
        groups.entry(key).or_default().push(t);
    }
    let mut ranked: Vec<((u64, String, u64), Vec<Target>)> = Vec::new();
    // Rank of a group within its (hardware class, link class): by hash.
    let mut by_class: BTreeMap<(String, String), Vec<(u64, Group)>> = BTreeMap::new();
    for key in groups.keys() {
        let h = stable_hash(&format!("{}/{}/{}", key.0, key.1, key.2));
        by_class
            .entry((key.0.clone(), key.1.clone()))
            .or_default()
            .push((h, key.clone()));
    }
    for (class, mut keys) in by_class {
        keys.sort();
        for (rank, (h, key)) in keys.into_iter().enumerate() {
            if let Some(mut members) = groups.remove(&key) {
                members.sort_by_cached_key(|t| (stable_hash(&t.pk), t.pk.clone()));
                ranked.push((
                    (rank as u64, format!("{}/{}", class.0, class.1), h),
                    members,
                ));
            }
        }
    }
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    let mut queues: Vec<VecDeque<Target>> = ranked.into_iter().map(|(_, m)| m.into()).collect();
    // The early picks (the first waves) greedily take a group whose
    // hardware class, site and link class are not yet represented, least
    // recently picked first; the rest is plain round robin.
    let total: usize = queues.iter().map(VecDeque::len).sum();
    let mut seen_hw: HashSet<String> = HashSet::new();
    let mut seen_site: HashSet<String> = HashSet::new();
    let mut seen_link: HashSet<String> = HashSet::new();
    let mut last = vec![0usize; queues.len()];
    for tick in 1..=total.min(EARLY_PICKS) {
        let heads: Vec<(usize, &Target)> = queues
            .iter()
            .enumerate()
            .filter_map(|(g, q)| q.front().map(|t| (g, t)))
            .collect();
        let site = |t: &Target| t.site.clone().unwrap_or_default();
        if heads
            .iter()
            .all(|(_, t)| seen_hw.contains(&t.hardware_class))
        {
            seen_hw.clear();
        }
        if heads
            .iter()
            .all(|(_, t)| seen_site.contains(t.site.as_deref().unwrap_or("")))
        {
            seen_site.clear();
        }
        if heads.iter().all(|(_, t)| seen_link.contains(&t.link_class)) {
            seen_link.clear();
        }
        let best = heads
            .iter()
            .map(|(g, t)| {
                let score = 4 * u8::from(!seen_hw.contains(&t.hardware_class))
                    + 2 * u8::from(!seen_site.contains(t.site.as_deref().unwrap_or("")))
                    + u8::from(!seen_link.contains(&t.link_class));
                (score, Reverse(last[*g]), Reverse(*g))
            })
            .max()
            .map(|(_, _, Reverse(g))| g);
        let Some(g) = best else { break };
        let Some(t) = queues[g].pop_front() else {
            break;
        };
        seen_hw.insert(t.hardware_class.clone());
        seen_site.insert(site(&t));
        seen_link.insert(t.link_class.clone());
        last[g] = tick;
        targets.push(t);
    }
    loop {
        let mut any = false;
        for q in queues.iter_mut() {
            if let Some(t) = q.pop_front() {
                targets.push(t);
                any = true;
            }
        }
        if !any {
            break;
        }
    }
}

/// How many of the first devices are picked for diversity (covers the
/// early waves of any realistic rollout).
const EARLY_PICKS: usize = 2000;

/// Where one device's download lands in the projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct DevicePlan {
    /// First window start (ms); `None` when it can never start (no window).
    pub start_ms: Option<i64>,
    /// End of its last window (ms).
    pub end_ms: Option<i64>,
    /// Windows it needs (more than one when a metered budget splits it
    /// over days).
    pub windows: u32,
}

/// One wave in the projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct WavePlan {
    /// First download may start (ms).
    pub start_ms: i64,
    /// Last download done and installed (ms).
    pub end_ms: i64,
    /// Then soak until (ms): when the next wave may start.
    pub promote_ms: i64,
}

/// The projection.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Per target, in target order.
    pub devices: Vec<DevicePlan>,
    /// Per wave.
    pub waves: Vec<WavePlan>,
    /// When the last wave is done (ms).
    pub end_ms: i64,
    /// Highest sum of reserved rates at any instant.
    pub peak_reserved_bytes_per_sec: u64,
    /// Most downloads at once.
    pub peak_concurrent: u64,
    /// Targets that can never start (e.g. a window that never opens).
    pub unschedulable: u64,
}

/// Assumptions the projection makes about devices.
#[derive(Debug, Clone, Copy)]
pub struct Assumptions {
    /// Time between a window being granted and the device starting
    /// (its next poll).
    pub poll_latency_ms: i64,
    /// Install, reboot and health check after the download.
    pub install_ms: i64,
}

impl Default for Assumptions {
    fn default() -> Self {
        Assumptions {
            poll_latency_ms: 15_000,
            install_ms: 120_000,
        }
    }
}

struct Dev {
    tz: usize,
    site: Option<usize>,
    rate: u64,
    budget: Option<u64>,
    remaining: u64,
}

/// Projects `targets` (in order, split by `sizes`) from `start_ms`.
pub fn project(
    spec: &RolloutSpec,
    targets: &[Target],
    sizes: &[usize],
    start_ms: i64,
    assume: Assumptions,
) -> Plan {
    let policy = &spec.bandwidth;
    let windows = Windows::new(&spec.maintenance_windows);
    let cap = policy.egress_cap_bytes_per_sec;
    let max_conc = policy.max_concurrent_downloads;
    let per_site = policy.max_concurrent_per_site;
    let mut tzs: Vec<TimeZone> = Vec::new();
    let mut tz_ids: HashMap<String, usize> = HashMap::new();
    let mut site_ids: HashMap<String, usize> = HashMap::new();
    let mut class_cache: HashMap<String, (u64, Option<u64>)> = HashMap::new();
    let mut devs: Vec<Dev> = Vec::with_capacity(targets.len());
    for t in targets {
        let tz_name = t.time_zone.clone().unwrap_or_default();
        let tz = match tz_ids.get(&tz_name) {
            Some(i) => *i,
            None => {
                let i = tzs.len();
                tzs.push(time_zone(&tz_name).unwrap_or(TimeZone::UTC));
                tz_ids.insert(tz_name, i);
                i
            }
        };
        let site = t.site.as_ref().map(|s| {
            let n = site_ids.len();
            *site_ids.entry(s.clone()).or_insert(n)
        });
        let (rate, budget) = *class_cache.entry(t.link_class.clone()).or_insert_with(|| {
            (
                policy.rate(&t.link_class),
                policy.class(&t.link_class).budget_bytes_per_day,
            )
        });
        devs.push(Dev {
            tz,
            site,
            rate,
            budget,
            remaining: t.bytes,
        });
    }
    let mut plan = Plan {
        devices: vec![DevicePlan::default(); targets.len()],
        ..Plan::default()
    };
    let mut site_active = vec![0u64; site_ids.len()];
    let mut day_used: HashMap<(usize, i64), u64> = HashMap::new();
    let mut wave_start = start_ms;
    let mut lo = 0usize;
    for (w, &size) in sizes.iter().enumerate() {
        let hi = (lo + size).min(targets.len());
        let mut queues: Vec<VecDeque<usize>> = vec![VecDeque::new(); tzs.len()];
        for d in lo..hi {
            queues[devs[d].tz].push_back(d);
        }
        let mut cache: Vec<Option<Openness>> = vec![None; tzs.len()];
        let mut active: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
        let mut deferred: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
        let mut rate_sum = 0u64;
        let mut t = wave_start;
        let mut wave_end = wave_start;
        loop {
            while let Some(Reverse((end, d))) = active.peek().copied() {
                if end > t {
                    break;
                }
                active.pop();
                rate_sum -= devs[d].rate;
                if let Some(s) = devs[d].site {
                    site_active[s] -= 1;
                }
                if devs[d].remaining > 0 {
                    deferred.push(Reverse(((end.div_euclid(DAY_MS) + 1) * DAY_MS, d)));
                } else {
                    wave_end = wave_end.max(end);
                }
            }
            while let Some(Reverse((at, d))) = deferred.peek().copied() {
                if at > t {
                    break;
                }
                deferred.pop();
                queues[devs[d].tz].push_back(d);
            }
            'admit: for (q, queue) in queues.iter_mut().enumerate() {
                if queue.is_empty() {
                    continue;
                }
                let open = match cache[q] {
                    Some(Openness::OpenUntil(u)) if t < u => true,
                    Some(Openness::ClosedUntil(u)) if t < u => false,
                    _ => {
                        let o = windows.at(&tzs[q], t);
                        cache[q] = Some(o);
                        matches!(o, Openness::OpenUntil(_))
                    }
                };
                if !open {
                    continue;
                }
                let mut i = 0usize;
                let mut scanned = 0usize;
                while i < queue.len() && scanned < 256 {
                    if active.len() as u64 >= max_conc {
                        break 'admit;
                    }
                    let d = queue[i];
                    let dev = &devs[d];
                    if rate_sum + dev.rate > cap
                        || dev.site.is_some_and(|s| site_active[s] >= per_site)
                    {
                        i += 1;
                        scanned += 1;
                        continue;
                    }
                    let day = t.div_euclid(DAY_MS);
                    let mut bytes = dev.remaining;
                    if let Some(budget) = dev.budget {
                        let used = day_used.get(&(d, day)).copied().unwrap_or(0);
                        let left = budget.saturating_sub(used);
                        if left == 0 {
                            queue.remove(i);
                            deferred.push(Reverse(((day + 1) * DAY_MS, d)));
                            continue;
                        }
                        bytes = bytes.min(left);
                        *day_used.entry((d, day)).or_default() += bytes;
                    }
                    let rate = dev.rate;
                    let hold = assume.poll_latency_ms
                        + i64::try_from(bytes.saturating_mul(1000).div_ceil(rate))
                            .unwrap_or(i64::MAX / 4);
                    let end = t.saturating_add(hold);
                    let p = &mut plan.devices[d];
                    p.start_ms.get_or_insert(t);
                    p.end_ms = Some(end);
                    p.windows += 1;
                    devs[d].remaining -= bytes;
                    rate_sum += rate;
                    if let Some(s) = devs[d].site {
                        site_active[s] += 1;
                    }
                    active.push(Reverse((end, d)));
                    queue.remove(i);
                }
            }
            plan.peak_reserved_bytes_per_sec = plan.peak_reserved_bytes_per_sec.max(rate_sum);
            plan.peak_concurrent = plan.peak_concurrent.max(active.len() as u64);
            let mut next = i64::MAX;
            if let Some(Reverse((end, _))) = active.peek() {
                next = next.min(*end);
            }
            if let Some(Reverse((at, _))) = deferred.peek() {
                next = next.min(*at);
            }
            for (q, queue) in queues.iter().enumerate() {
                if !queue.is_empty()
                    && let Some(Openness::ClosedUntil(u)) = cache[q]
                {
                    next = next.min(u);
                }
            }
            if next == i64::MAX {
                break;
            }
            t = next.max(t + 1);
        }
        for queue in &queues {
            plan.unschedulable += queue.len() as u64;
        }
        let end = if hi > lo {
            wave_end + assume.install_ms
        } else {
            wave_start
        };
        let soak = if hi > lo {
            i64::try_from(spec.waves[w].soak_secs.saturating_mul(1000)).unwrap_or(0)
        } else {
            0
        };
        plan.waves.push(WavePlan {
            start_ms: wave_start,
            end_ms: end,
            promote_ms: end + soak,
        });
        plan.end_ms = end;
        wave_start = end + soak;
        lo = hi;
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(i: usize, class: &str, site: &str, bytes: u64) -> Target {
        Target {
            pk: format!("pk{i:05}"),
            device_id: format!("d{i}"),
            hardware_class: "hw".into(),
            link_class: class.into(),
            site: Some(site.into()),
            time_zone: None,
            from_release_id: None,
            from_version: None,
            bytes,
        }
    }

    #[test]
    fn early_picks_are_diverse() {
        let mut ts: Vec<Target> = (0..100)
            .map(|i| {
                let class = ["ethernet", "wifi", "metered-4g"][i % 3];
                target(i, class, &format!("site{}", i % 10), 1000)
            })
            .collect();
        diversity_order(&mut ts);
        let first: std::collections::HashSet<_> = ts[..5].iter().map(|t| t.site.clone()).collect();
        assert_eq!(first.len(), 5, "five canaries from five sites");
        let classes: std::collections::HashSet<_> =
            ts[..3].iter().map(|t| t.link_class.clone()).collect();
        assert_eq!(classes.len(), 3, "first three from three link classes");
        assert_eq!(ts.len(), 100);
    }

    #[test]
    fn projection_respects_cap_and_budget() {
        let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
            "release_id": "r",
            "waves": [{"percent": 100, "soak_secs": 0}],
            "bandwidth": {"egress_cap_bytes_per_sec": 1000, "max_concurrent_downloads": 10,
              "link_classes": {"metered-4g": {"rate_bytes_per_sec": 100, "budget_bytes_per_day": 5000}}}
        }))
        .unwrap_or_else(|e| unreachable!("{e}"));
        let ts: Vec<Target> = (0..20)
            .map(|i| target(i, "metered-4g", &format!("s{i}"), 12_000))
            .collect();
        let plan = project(&spec, &ts, &[20], 0, Assumptions::default());
        assert!(plan.peak_reserved_bytes_per_sec <= 1000);
        assert_eq!(plan.unschedulable, 0);
        // 12 kB at 5 kB a day: three windows on three days.
        assert!(plan.devices.iter().all(|d| d.windows == 3));
        assert!(plan.end_ms >= 2 * DAY_MS);
    }
}
