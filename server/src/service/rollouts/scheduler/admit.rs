//! Admission (step 4 of a pass): which pending devices get a download
//! window now, under the egress cap, the concurrency and site limits, the
//! maintenance windows in each device's time zone and, on metered links,
//! the daily budget. A device whose planned patch is still being built
//! (`service::patches`) is not admitted: it never starts on a plan that
//! is not final.

use std::collections::HashMap;

use anyhow::Result;
use sqlx::FromRow;

use super::Tx;
use crate::service::rollouts::plan::DAY_MS;
use crate::service::rollouts::spec::RolloutSpec;
use crate::service::rollouts::time::{Openness, Windows, time_zone};

/// A device that may get a window.
#[derive(FromRow)]
struct Candidate {
    device_pk: String,
    link_class: String,
    site: Option<String>,
    delta_bytes: i64,
    bytes_done: i64,
    bytes_total: Option<i64>,
    rate: i64,
    time_zone: Option<String>,
}

/// Gives download windows to pending devices of the waves up to `wave`
/// that were seen after `seen_after`, within the policy's caps (step 4).
pub(super) async fn admit(
    tx: &mut Tx,
    spec: &RolloutSpec,
    id: &str,
    wave: i64,
    now: i64,
    seen_after: i64,
) -> Result<()> {
    let policy = &spec.bandwidth;
    let cap = policy.egress_cap_bytes_per_sec;
    let mut rate_sum = 0u64;
    let mut count = 0u64;
    let mut sites: HashMap<String, u64> = HashMap::new();
    let holding: Vec<(i64, Option<String>)> = sqlx::query_as(
        "SELECT rate, site FROM rollout_devices WHERE rollout_id = $1 AND active = 1",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    for (rate, site) in holding {
        rate_sum += u64::try_from(rate).unwrap_or(0);
        count += 1;
        if let Some(s) = site {
            *sites.entry(s).or_default() += 1;
        }
    }
    if count >= policy.max_concurrent_downloads || rate_sum >= cap {
        return Ok(());
    }
    let candidates = sqlx::query_as::<_, Candidate>(
        "SELECT rd.device_pk, rd.link_class, rd.site, rd.delta_bytes, rd.bytes_done, rd.bytes_total, rd.rate, d.time_zone \
         FROM rollout_devices rd JOIN devices d ON d.id = rd.device_pk \
         WHERE rd.rollout_id = $1 AND rd.wave <= $2 AND rd.active = 0 AND rd.state IN ('pending', 'downloading') AND d.last_seen_at >= $3 \
         AND NOT EXISTS (SELECT 1 FROM server_patches sp WHERE sp.from_release_id = rd.from_release_id \
              AND sp.to_release_id = (SELECT release_id FROM rollouts WHERE id = $1) AND sp.status IN ('pending', 'building')) \
         ORDER BY rd.wave, rd.position LIMIT 5000",
    )
    .bind(id)
    .bind(wave)
    .bind(seen_after)
    .fetch_all(&mut **tx)
    .await?;
    let windows = Windows::new(&spec.maintenance_windows);
    let mut openness: HashMap<String, Openness> = HashMap::new();
    let day = now.div_euclid(DAY_MS);
    let grace = i64::try_from(policy.window_grace_secs.saturating_mul(1000))?;
    for r in candidates {
        if count >= policy.max_concurrent_downloads {
            break;
        }
        let rate = u64::try_from(r.rate).unwrap_or(1);
        if rate_sum + rate > cap {
            continue;
        }
        let site = r.site;
        if let Some(s) = &site
            && sites.get(s).copied().unwrap_or(0) >= policy.max_concurrent_per_site
        {
            continue;
        }
        let tz_key = r.time_zone.unwrap_or_default();
        let open = match openness.get(&tz_key) {
            Some(o) => *o,
            None => {
                let tz = time_zone(&tz_key).unwrap_or(jiff::tz::TimeZone::UTC);
                let o = windows.at(&tz, now);
                openness.insert(tz_key, o);
                o
            }
        };
        let Openness::OpenUntil(close) = open else {
            continue;
        };
        let device = r.device_pk;
        let link = r.link_class;
        let total = r.bytes_total.unwrap_or(r.delta_bytes);
        let done = r.bytes_done;
        let remaining = u64::try_from((total - done).max(0)).unwrap_or(0);
        let mut grant = remaining;
        if let Some(budget) = policy.class(&link).budget_bytes_per_day {
            let used = sqlx::query_as::<_, (i64, i64)>(
                "SELECT granted, reported FROM device_daily_bytes WHERE device_pk = $1 AND day = $2",
            )
            .bind(&device)
            .bind(day)
            .fetch_optional(&mut **tx)
            .await?
            .map_or(0, |(granted, reported)| granted.max(reported));
            let left = budget.saturating_sub(u64::try_from(used).unwrap_or(0));
            if left == 0 || (remaining > 0 && left < remaining.min(64 * 1024)) {
                continue;
            }
            grant = remaining.min(left);
        }
        let not_after = (now + grace).min(close);
        let updated = sqlx::query(
            "UPDATE rollout_devices SET state = CASE WHEN state = 'pending' THEN 'scheduled' ELSE state END, active = 1, window_start = $1, window_end = $2, windows_given = windows_given + 1, last_progress_at = $1, updated_at = $1 WHERE rollout_id = $3 AND device_pk = $4 AND active = 0",
        )
        .bind(now)
        .bind(not_after)
        .bind(id)
        .bind(&device)
        .execute(&mut **tx)
        .await?;
        if updated.rows_affected() != 1 {
            continue;
        }
        if grant > 0 {
            sqlx::query(
                "INSERT INTO device_daily_bytes (device_pk, day, granted, reported) VALUES ($1, $2, $3, 0) \
                 ON CONFLICT (device_pk, day) DO UPDATE SET granted = device_daily_bytes.granted + excluded.granted",
            )
            .bind(&device)
            .bind(day)
            .bind(i64::try_from(grant)?)
            .execute(&mut **tx)
            .await?;
        }
        rate_sum += rate;
        count += 1;
        if let Some(s) = site {
            *sites.entry(s).or_default() += 1;
        }
    }
    Ok(())
}
