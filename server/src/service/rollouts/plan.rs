//! Planning: which devices go in which wave (diversity first), and the
//! projection the preview shows — every device's download simulated
//! forward in time under the same admission rules the scheduler applies
//! (egress cap, concurrency, per-site limit, metered daily budget,
//! maintenance windows in the device's time zone).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};

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
    /// Bound to a TPM (credential activation done): it can be attested.
    pub tpm: bool,
}

/// Targets split into waves, with the attestation gate applied.
#[derive(Debug, Default)]
pub struct WaveAssignment {
    /// In wave order (each wave in diversity order).
    pub targets: Vec<Target>,
    /// Devices per wave.
    pub sizes: Vec<usize>,
    /// Per wave: devices without a TPM that the diversity order put in it
    /// while it requires attestation; they moved to a later wave without
    /// the gate, or were left out.
    pub cannot_attest: Vec<u64>,
    /// Per wave: the wave they moved to (0-based), `None` when left out.
    pub moved_to: Vec<Option<usize>>,
    /// Devices without a TPM left out: no wave without the gate follows.
    pub left_out: Vec<Target>,
}

/// Splits `targets` (diversity order) into the spec's waves. A wave that
/// requires attestation takes only devices bound to a TPM (a device
/// without one would hold it forever: it can never be attested); the
/// devices without a TPM it passes over go to the next wave without the
/// gate, and are left out when none follows. Without any such gate this is
/// the plain split by `wave_sizes`.
pub fn assign_waves(spec: &RolloutSpec, targets: Vec<Target>) -> WaveAssignment {
    let quotas = spec.wave_sizes(targets.len());
    let gated: Vec<bool> = spec
        .waves
        .iter()
        .map(|w| w.gates.require_attestation)
        .collect();
    if !gated.iter().any(|g| *g) {
        return WaveAssignment {
            cannot_attest: vec![0; quotas.len()],
            moved_to: vec![None; quotas.len()],
            sizes: quotas,
            targets,
            left_out: Vec::new(),
        };
    }
    let n_waves = quotas.len();
    let mut queue: VecDeque<Target> = targets.into();
    // Devices without a TPM passed over by gated waves, in order.
    let mut deferred: VecDeque<Target> = VecDeque::new();
    let mut out = WaveAssignment {
        cannot_attest: vec![0; n_waves],
        moved_to: vec![None; n_waves],
        ..WaveAssignment::default()
    };
    let mut pending_moves: Vec<usize> = Vec::new();
    for (w, &quota) in quotas.iter().enumerate() {
        let last = w + 1 == n_waves;
        let mut taken = 0usize;
        if gated[w] {
            while (last || taken < quota)
                && let Some(t) = queue.pop_front()
            {
                if t.tpm {
                    out.targets.push(t);
                    taken += 1;
                } else {
                    out.cannot_attest[w] += 1;
                    deferred.push_back(t);
                }
            }
            if out.cannot_attest[w] > 0 {
                pending_moves.push(w);
            }
        } else {
            // The passed-over devices first (they were due earlier).
            while (last || taken < quota)
                && let Some(t) = deferred.pop_front().or_else(|| queue.pop_front())
            {
                out.targets.push(t);
                taken += 1;
            }
            for from in pending_moves.drain(..) {
                out.moved_to[from] = Some(w);
            }
        }
        out.sizes.push(taken);
    }
    out.left_out = deferred.into_iter().chain(queue).collect();
    out
}

fn stable_hash(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// Orders targets so that every prefix is as diverse as it can be.
/// Devices are put in buckets by (hardware class, link class, site); within
/// a bucket the order is a stable hash of the device id, never creation
/// order. The first [`EARLY_PICKS`] (the early waves) take turns between
/// the (hardware class, link class) pairs, each turn from the pair's next
/// bucket whose site is not represented yet (once every site is, sites
/// count as new again); the rest is a round robin over the buckets. Linear
/// in the targets, apart from the sort within buckets.
pub fn diversity_order(targets: &mut Vec<Target>) {
    struct Bucket {
        hw: usize,
        link: usize,
        site: usize,
        hash: u64,
        members: VecDeque<Target>,
    }
    fn intern(ids: &mut HashMap<String, usize>, names: &mut Vec<String>, s: &str) -> usize {
        if let Some(i) = ids.get(s) {
            return *i;
        }
        let i = names.len();
        ids.insert(s.to_string(), i);
        names.push(s.to_string());
        i
    }
    let (mut hw_ids, mut link_ids, mut site_ids) = (HashMap::new(), HashMap::new(), HashMap::new());
    let (mut hw_names, mut link_names, mut site_names) = (Vec::new(), Vec::new(), Vec::new());
    let mut bucket_ids: HashMap<(usize, usize, usize), usize> = HashMap::new();
    let mut buckets: Vec<Bucket> = Vec::new();
    for t in targets.drain(..) {
        let hw = intern(&mut hw_ids, &mut hw_names, &t.hardware_class);
        let link = intern(&mut link_ids, &mut link_names, &t.link_class);
        let site = intern(
            &mut site_ids,
            &mut site_names,
            t.site.as_deref().unwrap_or(""),
        );
        let b = *bucket_ids.entry((hw, link, site)).or_insert_with(|| {
            buckets.push(Bucket {
                hw,
                link,
                site,
                hash: stable_hash(&format!(
                    "{}/{}/{}",
                    hw_names[hw], link_names[link], site_names[site]
                )),
                members: VecDeque::new(),
            });
            buckets.len() - 1
        });
        buckets[b].members.push_back(t);
    }
    for b in &mut buckets {
        let mut keyed: Vec<(u64, Target)> = b
            .members
            .drain(..)
            .map(|t| (stable_hash(&t.pk), t))
            .collect();
        keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.pk.cmp(&b.1.pk)));
        b.members = keyed.into_iter().map(|(_, t)| t).collect();
    }
    // (hardware class, link class) pairs, each with its buckets ranked by
    // the bucket's hash.
    let mut pairs: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, b) in buckets.iter().enumerate() {
        pairs
            .entry((&hw_names[b.hw], &link_names[b.link]))
            .or_default()
            .push(i);
    }
    let mut rank = vec![0usize; buckets.len()];
    for list in pairs.values_mut() {
        list.sort_by(|&x, &y| {
            let (a, b) = (&buckets[x], &buckets[y]);
            (a.hash, &site_names[a.site]).cmp(&(b.hash, &site_names[b.site]))
        });
        for (r, &i) in list.iter().enumerate() {
            rank[i] = r;
        }
    }
    // Turns go round the pairs so that consecutive ones differ in hardware
    // class where they can: the first link class of every hardware class,
    // then the second, ...
    let mut nth_of_hw: HashMap<&str, usize> = HashMap::new();
    let mut turns: Vec<(usize, &str, &str, VecDeque<usize>)> = pairs
        .into_iter()
        .map(|((hw, link), list)| {
            let n = nth_of_hw.entry(hw).or_insert(0);
            *n += 1;
            (*n, hw, link, list.into())
        })
        .collect();
    turns.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
    let mut rotations: Vec<VecDeque<usize>> = turns.into_iter().map(|t| t.3).collect();

    let total: usize = buckets.iter().map(|b| b.members.len()).sum();
    // Buckets not yet empty per site, and the sites already represented.
    let mut live = vec![0usize; site_names.len()];
    for b in &buckets {
        live[b.site] += 1;
    }
    let mut seen = vec![false; site_names.len()];
    let mut unseen_live = live.iter().filter(|&&n| n > 0).count();
    let mut picked = 0usize;
    while picked < total.min(EARLY_PICKS) {
        rotations.retain(|r| !r.is_empty());
        if rotations.is_empty() {
            break;
        }
        for rotation in rotations.iter_mut() {
            if picked >= total.min(EARLY_PICKS) {
                break;
            }
            if rotation.is_empty() {
                continue;
            }
            if unseen_live == 0 {
                seen.iter_mut().for_each(|s| *s = false);
                unseen_live = live.iter().filter(|&&n| n > 0).count();
            }
            // The pair's next bucket on a site not seen yet (else its next).
            for _ in 0..rotation.len() {
                match rotation.front() {
                    Some(&b) if seen[buckets[b].site] => rotation.rotate_left(1),
                    _ => break,
                }
            }
            let Some(b) = rotation.pop_front() else {
                continue;
            };
            let bucket = &mut buckets[b];
            let Some(t) = bucket.members.pop_front() else {
                continue;
            };
            targets.push(t);
            picked += 1;
            if !seen[bucket.site] {
                seen[bucket.site] = true;
                unseen_live -= 1;
            }
            if bucket.members.is_empty() {
                live[bucket.site] -= 1;
            } else {
                rotation.push_back(b);
            }
        }
    }
    // The rest: round robin over the buckets in rank order (rank 0 of every
    // pair, then rank 1, ...).
    let mut order: Vec<usize> = (0..buckets.len()).collect();
    order.sort_by(|&x, &y| {
        let (a, b) = (&buckets[x], &buckets[y]);
        (rank[x], &hw_names[a.hw], &link_names[a.link], a.hash).cmp(&(
            rank[y],
            &hw_names[b.hw],
            &link_names[b.link],
            b.hash,
        ))
    });
    while !order.is_empty() {
        order.retain(|&b| {
            let bucket = &mut buckets[b];
            match bucket.members.pop_front() {
                Some(t) => {
                    targets.push(t);
                    true
                }
                None => false,
            }
        });
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
    let min_rate = devs.iter().map(|d| d.rate).min().unwrap_or(u64::MAX);
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
                if active.len() as u64 >= max_conc {
                    break 'admit;
                }
                // Nothing fits under the cap: skip the scan, which would
                // only pass over every candidate.
                if rate_sum.saturating_add(min_rate) > cap {
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
mod tests;
