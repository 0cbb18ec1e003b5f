//! The rollout scheduler: one pass every `scheduler-interval-ms`, run by
//! whichever replica holds the lease row (`scheduler_lease`, renewed each
//! pass, taken over when it expires). A pass, per live rollout and in one
//! write transaction:
//!
//! 1. `scheduled` → `running` once the start time has come.
//! 2. Gates of the current wave (error rate = failed + reverted over the
//!    wave's size): above the rollback rate → roll back; at or above the
//!    promote rate → pause for the operator; once every device settled
//!    (committed, failed, reverted, or offline and not started) and the
//!    soak has passed with enough committed → promote to the next wave, or
//!    complete after the last.
//! 3. Bandwidth given back: windows not started within the grace, and
//!    downloads with no progress report for `stall_secs`.
//! 4. Admission (running, and completed while devices that were offline
//!    when their wave closed are still pending: they are updated when they
//!    come back, by the last wave's rules): pending devices of the waves
//!    reached so far, in diversity order, that were seen recently, whose maintenance
//!    window is open now in their time zone, get a download window as long
//!    as the sum of the rates of devices holding windows stays within the
//!    egress cap, the number within the concurrency limit and the site
//!    limit, and (metered) the bytes granted today within the budget.
//! 5. A sample of the reserved egress and states (`rollout_samples`).

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use sqlx::Row;

use super::plan::DAY_MS;
use super::spec::RolloutSpec;
use super::time::{Openness, Windows, time_zone};
use crate::AppState;

const LEASE: &str = "rollouts";

/// Runs passes forever (or not at all when the interval is 0).
pub async fn run(state: AppState) {
    let interval = state.config.scheduler_interval_ms;
    if interval == 0 {
        tracing::info!("rollout scheduler disabled (scheduler-interval-ms = 0)");
        return;
    }
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(interval));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(e) = tick(&state).await {
            tracing::warn!(error = format!("{e:#}"), "rollout scheduler pass failed");
        }
    }
}

/// Takes or renews the lease; true when this replica holds it.
pub async fn acquire_lease(state: &AppState, now: i64) -> Result<bool> {
    let ttl = i64::try_from(state.config.scheduler_lease_secs.saturating_mul(1000))?;
    let renewed = sqlx::query(
        "UPDATE scheduler_lease SET holder = $1, expires_at = $2 WHERE name = $3 AND (holder = $1 OR expires_at <= $4)",
    )
    .bind(&state.instance_id)
    .bind(now + ttl)
    .bind(LEASE)
    .bind(now)
    .execute(state.store.pool())
    .await?;
    if renewed.rows_affected() == 1 {
        return Ok(true);
    }
    let inserted =
        sqlx::query("INSERT INTO scheduler_lease (name, holder, expires_at) VALUES ($1, $2, $3)")
            .bind(LEASE)
            .bind(&state.instance_id)
            .bind(now + ttl)
            .execute(state.store.pool())
            .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(e) if crate::store::is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Gives the lease up (clean shutdown), so another replica takes over at
/// once.
pub async fn release_lease(state: &AppState) -> Result<()> {
    sqlx::query("DELETE FROM scheduler_lease WHERE name = $1 AND holder = $2")
        .bind(LEASE)
        .bind(&state.instance_id)
        .execute(state.store.pool())
        .await?;
    Ok(())
}

/// One pass at the clock's now. Returns false when another replica holds
/// the lease (nothing done).
pub async fn tick(state: &AppState) -> Result<bool> {
    let now = state.clock.now_ms();
    if !acquire_lease(state, now).await? {
        return Ok(false);
    }
    // Offline detection reads last_seen_at: write the pending poll times.
    state.last_seen.flush(&state.store).await?;
    let ids: Vec<String> = sqlx::query(
        "SELECT id FROM rollouts WHERE status IN ('scheduled', 'running', 'paused') \
         OR (status = 'completed' AND EXISTS (SELECT 1 FROM rollout_devices rd WHERE rd.rollout_id = rollouts.id AND rd.state IN ('pending', 'scheduled', 'downloading'))) \
         ORDER BY created_at",
    )
    .fetch_all(state.store.pool())
    .await?
    .iter()
    .map(|r| r.try_get("id"))
    .collect::<sqlx::Result<_>>()?;
    let stepped = !ids.is_empty();
    for id in ids {
        if let Err(e) = step(state, &id, now).await {
            tracing::warn!(rollout = %id, error = format!("{e:#}"), "rollout pass failed");
        }
    }
    if stepped {
        // Waves admitted, devices scheduled, rollouts paused or completed:
        // the devices' cached poll states may be out of date.
        crate::poll_cache::forget_all(state).await;
    }
    Ok(true)
}

pub type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// The words of the "waiting for quotes" reason, by which a pass knows
/// the reason is its own and clears it once no device waits any more.
const QUOTE_WAIT: &str = "no TPM quote for this release yet";

fn is_quote_wait(reason: &str) -> bool {
    reason.starts_with("waiting: ") && reason.contains(QUOTE_WAIT)
}

struct Counts {
    size: i64,
    committed: i64,
    errors: i64,
    settled: i64,
    /// Committed, waiting for a quote (the attestation gate).
    unattested: i64,
}

/// Counts a wave's outcomes. With `attested_version` (the attestation
/// gate), a committed device counts once a quote for that version, verified
/// after its commit, says `attested`; as an error when it says `mismatch`;
/// and not yet otherwise.
async fn wave_counts(
    tx: &mut Tx,
    id: &str,
    wave: i64,
    offline_before: i64,
    attested_version: Option<&str>,
) -> Result<Counts> {
    let rows = sqlx::query(
        "SELECT rd.state, rd.active, rd.updated_at, d.last_seen_at, d.attestation, d.attested_version, d.attested_at FROM rollout_devices rd JOIN devices d ON d.id = rd.device_pk WHERE rd.rollout_id = $1 AND rd.wave = $2",
    )
    .bind(id)
    .bind(wave)
    .fetch_all(&mut **tx)
    .await?;
    let mut c = Counts {
        size: 0,
        committed: 0,
        errors: 0,
        settled: 0,
        unattested: 0,
    };
    for r in rows {
        let s: String = r.try_get("state")?;
        let active: i64 = r.try_get("active")?;
        let seen: Option<i64> = r.try_get("last_seen_at")?;
        c.size += 1;
        let quote = match attested_version {
            Some(want) => {
                let quoted: Option<String> = r.try_get("attested_version")?;
                let verdict: String = r.try_get("attestation")?;
                // Only a verdict on a quote made after the device reported
                // this state (its commit) counts: not an older one.
                let at: Option<i64> = r.try_get("attested_at")?;
                let since: i64 = r.try_get("updated_at")?;
                Some(
                    if quoted.as_deref() == Some(want) && at.is_some_and(|t| t >= since) {
                        verdict
                    } else {
                        "none".into()
                    },
                )
            }
            None => None,
        };
        match s.as_str() {
            "committed" if quote.as_deref().is_some_and(|q| q == "mismatch") => {
                c.errors += 1;
                c.settled += 1;
            }
            "committed" if quote.as_deref().is_some_and(|q| q != "attested") => {
                c.unattested += 1;
            }
            "committed" => {
                c.committed += 1;
                c.settled += 1;
            }
            "failed" | "reverted" => {
                c.errors += 1;
                c.settled += 1;
            }
            "cancelled" => c.settled += 1,
            "pending" | "downloading" if active == 0 && seen.is_none_or(|t| t < offline_before) => {
                c.settled += 1
            }
            _ => {}
        }
    }
    Ok(c)
}

/// Sets the rollout rolled back: committed devices get a rollback action
/// on their next poll, devices not yet installing are cancelled.
pub async fn roll_back(tx: &mut Tx, id: &str, now: i64, reason: &str) -> Result<()> {
    sqlx::query(
        "UPDATE rollouts SET status = 'rolled_back', status_reason = $1, updated_at = $2, completed_at = $2 WHERE id = $3",
    )
    .bind(reason)
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE rollout_devices SET state = 'rolling_back', updated_at = $1 WHERE rollout_id = $2 AND state = 'committed' AND from_release_id IS NOT NULL",
    )
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    cancel_unstarted(tx, id, now).await
}

/// Cancels devices that have not installed yet (abort, rollback).
pub async fn cancel_unstarted(tx: &mut Tx, id: &str, now: i64) -> Result<()> {
    sqlx::query(
        "UPDATE rollout_devices SET state = 'cancelled', active = 0, updated_at = $1 WHERE rollout_id = $2 AND state IN ('pending', 'scheduled', 'downloading')",
    )
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Takes back windows of scheduled devices (pause).
pub async fn unschedule(tx: &mut Tx, id: &str, now: i64) -> Result<()> {
    sqlx::query(
        "UPDATE rollout_devices SET state = 'pending', active = 0, window_start = NULL, window_end = NULL, updated_at = $1 WHERE rollout_id = $2 AND state = 'scheduled'",
    )
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn set_status(
    tx: &mut Tx,
    id: &str,
    status: &str,
    reason: Option<&str>,
    now: i64,
) -> Result<()> {
    let done = matches!(status, "completed" | "aborted" | "rolled_back");
    sqlx::query(
        "UPDATE rollouts SET status = $1, status_reason = $2, updated_at = $3, completed_at = COALESCE($4, completed_at) WHERE id = $5",
    )
    .bind(status)
    .bind(reason)
    .bind(now)
    .bind(done.then_some(now))
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn release_version(tx: &mut Tx, release_id: &str) -> Result<String> {
    Ok(sqlx::query("SELECT version FROM releases WHERE id = $1")
        .bind(release_id)
        .fetch_one(&mut **tx)
        .await?
        .try_get("version")?)
}

async fn step(state: &AppState, id: &str, now: i64) -> Result<()> {
    let mut tx = state.store.begin_write().await?;
    let Some(row) = sqlx::query(
        "SELECT status, status_reason, spec, start_at, current_wave, wave_settled_at, gate_accepted FROM rollouts WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(());
    };
    let mut status: String = row.try_get("status")?;
    let mut reason: Option<String> = row.try_get("status_reason")?;
    let spec: RolloutSpec = serde_json::from_str(&row.try_get::<String, _>("spec")?)?;
    let start_at: Option<i64> = row.try_get("start_at")?;
    let mut wave: i64 = row.try_get("current_wave")?;
    let mut settled_at: Option<i64> = row.try_get("wave_settled_at")?;
    let mut accepted = row.try_get::<i64, _>("gate_accepted")? != 0;
    let offline_ms = i64::try_from(state.config.offline_after_secs.saturating_mul(1000))?;
    let offline_before = now - offline_ms;
    let n_waves = i64::try_from(spec.waves.len())?;

    if status == "scheduled" {
        if start_at.is_some_and(|t| now < t) {
            tx.commit().await?;
            return Ok(());
        }
        status = "running".into();
        reason = None;
        sqlx::query(
            "UPDATE rollouts SET status = 'running', status_reason = NULL, wave_started_at = $1, updated_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }

    // Gates, promoting through as many waves as are ready (empty ones).
    while wave < n_waves {
        let w = usize::try_from(wave)?;
        let gates = spec.waves[w].gates;
        let attested_version = if gates.require_attestation {
            Some(release_version(&mut tx, &spec.release_id).await?)
        } else {
            None
        };
        let c = wave_counts(
            &mut tx,
            id,
            wave,
            offline_before,
            attested_version.as_deref(),
        )
        .await?;
        let error_rate = if c.size > 0 {
            c.errors as f64 / c.size as f64
        } else {
            0.0
        };
        if c.size > 0 && error_rate > gates.rollback_error_rate {
            let reason = format!(
                "gate: wave {} error rate {:.1} % is above the rollback gate {:.1} %: rolled back automatically",
                wave + 1,
                error_rate * 100.0,
                gates.rollback_error_rate * 100.0
            );
            roll_back(&mut tx, id, now, &reason).await?;
            record_sample(&mut tx, id, now).await?;
            tx.commit().await?;
            tracing::warn!(rollout = %id, %reason, "rollout rolled back");
            return Ok(());
        }
        if status != "running" {
            break;
        }
        if c.errors > 0 && error_rate >= gates.promote_max_error_rate && !accepted {
            let reason = format!(
                "gate: wave {} error rate {:.1} % is at or above the promote gate {:.1} % (rollback at {:.1} %): paused for the operator",
                wave + 1,
                error_rate * 100.0,
                gates.promote_max_error_rate * 100.0,
                gates.rollback_error_rate * 100.0
            );
            set_status(&mut tx, id, "paused", Some(&reason), now).await?;
            unschedule(&mut tx, id, now).await?;
            status = "paused".into();
            tracing::warn!(rollout = %id, %reason, "rollout paused");
            break;
        }
        if c.unattested == 0 && reason.as_deref().is_some_and(is_quote_wait) {
            // The quotes it waited for arrived: the reason is stale.
            sqlx::query("UPDATE rollouts SET status_reason = NULL WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            reason = None;
        }
        if c.settled < c.size {
            if c.unattested > 0 {
                let waiting = format!(
                    "waiting: {} committed device(s) of wave {} have {QUOTE_WAIT} (the wave requires attestation)",
                    c.unattested,
                    wave + 1
                );
                if reason.as_deref() != Some(waiting.as_str()) {
                    sqlx::query("UPDATE rollouts SET status_reason = $1 WHERE id = $2")
                        .bind(&waiting)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            if settled_at.is_some() {
                sqlx::query("UPDATE rollouts SET wave_settled_at = NULL WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            break;
        }
        let since = match settled_at {
            Some(t) => t,
            None => {
                sqlx::query("UPDATE rollouts SET wave_settled_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                now
            }
        };
        let soak = if c.size > 0 {
            i64::try_from(spec.waves[w].soak_secs.saturating_mul(1000))?
        } else {
            0
        };
        if now < since + soak {
            break;
        }
        let committed_ratio = if c.size > 0 {
            c.committed as f64 / c.size as f64
        } else {
            1.0
        };
        if committed_ratio < gates.promote_min_committed && !accepted {
            let reason = format!(
                "waiting: wave {} has {:.1} % committed, the gate needs {:.1} % (devices offline?)",
                wave + 1,
                committed_ratio * 100.0,
                gates.promote_min_committed * 100.0
            );
            sqlx::query("UPDATE rollouts SET status_reason = $1 WHERE id = $2")
                .bind(&reason)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            break;
        }
        wave += 1;
        settled_at = None;
        accepted = false;
        sqlx::query(
            "UPDATE rollouts SET current_wave = $1, wave_started_at = $2, wave_settled_at = NULL, gate_accepted = 0, status_reason = NULL, updated_at = $2 WHERE id = $3",
        )
        .bind(wave)
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tracing::info!(rollout = %id, wave = wave + 1, "rollout promoted");
        if wave >= n_waves {
            set_status(&mut tx, id, "completed", None, now).await?;
            status = "completed".into();
        }
    }

    // Bandwidth given back.
    let grace_stall = i64::try_from(spec.bandwidth.stall_secs.saturating_mul(1000))?;
    sqlx::query(
        "UPDATE rollout_devices SET state = 'pending', active = 0, updated_at = $1 WHERE rollout_id = $2 AND state = 'scheduled' AND active = 1 AND window_end <= $1",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE rollout_devices SET active = 0, updated_at = $1 WHERE rollout_id = $2 AND state = 'downloading' AND active = 1 AND COALESCE(last_progress_at, 0) < $3",
    )
    .bind(now)
    .bind(id)
    .bind(now - grace_stall)
    .execute(&mut *tx)
    .await?;

    // A completed rollout still updates the devices that were offline when
    // their wave closed, when they come back, by the last wave's rules.
    if status == "running" || status == "completed" {
        admit(
            &mut tx,
            &spec,
            id,
            wave.min(n_waves - 1),
            now,
            offline_before,
        )
        .await?;
    }
    // Next in line: the pending devices the next passes will give windows
    // to (in wave and position order) poll at the rollout hint, the rest of
    // a big wave at their own pace.
    let first: Option<i64> = sqlx::query(
        "SELECT MIN(position) AS p FROM rollout_devices WHERE rollout_id = $1 AND state = 'pending' AND wave <= $2",
    )
    .bind(id)
    .bind(wave.min(n_waves - 1) + 1)
    .fetch_one(&mut *tx)
    .await?
    .try_get("p")?;
    let lookahead = i64::try_from(spec.bandwidth.max_concurrent_downloads.saturating_mul(2))
        .unwrap_or(i64::MAX);
    sqlx::query("UPDATE rollouts SET poll_horizon = $1 WHERE id = $2")
        .bind(first.map_or(0, |p| p.saturating_add(lookahead)))
        .bind(id)
        .execute(&mut *tx)
        .await?;
    record_sample(&mut tx, id, now).await?;
    tx.commit().await?;
    Ok(())
}

async fn admit(
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
    for r in
        sqlx::query("SELECT rate, site FROM rollout_devices WHERE rollout_id = $1 AND active = 1")
            .bind(id)
            .fetch_all(&mut **tx)
            .await?
    {
        rate_sum += u64::try_from(r.try_get::<i64, _>("rate")?).unwrap_or(0);
        count += 1;
        if let Some(s) = r.try_get::<Option<String>, _>("site")? {
            *sites.entry(s).or_default() += 1;
        }
    }
    if count >= policy.max_concurrent_downloads || rate_sum >= cap {
        return Ok(());
    }
    let candidates = sqlx::query(
        "SELECT rd.device_pk, rd.link_class, rd.site, rd.delta_bytes, rd.bytes_done, rd.bytes_total, rd.rate, d.time_zone \
         FROM rollout_devices rd JOIN devices d ON d.id = rd.device_pk \
         WHERE rd.rollout_id = $1 AND rd.wave <= $2 AND rd.active = 0 AND rd.state IN ('pending', 'downloading') AND d.last_seen_at >= $3 \
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
        let rate = u64::try_from(r.try_get::<i64, _>("rate")?).unwrap_or(1);
        if rate_sum + rate > cap {
            continue;
        }
        let site: Option<String> = r.try_get("site")?;
        if let Some(s) = &site
            && sites.get(s).copied().unwrap_or(0) >= policy.max_concurrent_per_site
        {
            continue;
        }
        let tz_name: Option<String> = r.try_get("time_zone")?;
        let tz_key = tz_name.clone().unwrap_or_default();
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
        let device: String = r.try_get("device_pk")?;
        let link: String = r.try_get("link_class")?;
        let total: i64 = r
            .try_get::<Option<i64>, _>("bytes_total")?
            .unwrap_or(r.try_get("delta_bytes")?);
        let done: i64 = r.try_get("bytes_done")?;
        let remaining = u64::try_from((total - done).max(0)).unwrap_or(0);
        let mut grant = remaining;
        if let Some(budget) = policy.class(&link).budget_bytes_per_day {
            let used = sqlx::query(
                "SELECT granted, reported FROM device_daily_bytes WHERE device_pk = $1 AND day = $2",
            )
            .bind(&device)
            .bind(day)
            .fetch_optional(&mut **tx)
            .await?
            .map(|u| -> sqlx::Result<i64> {
                Ok(u.try_get::<i64, _>("granted")?.max(u.try_get("reported")?))
            })
            .transpose()?
            .unwrap_or(0);
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

async fn record_sample(tx: &mut Tx, id: &str, now: i64) -> Result<()> {
    let mut states: BTreeMap<String, i64> = BTreeMap::new();
    let mut reserved = 0i64;
    let mut active = 0i64;
    for r in sqlx::query(
        "SELECT state, active, CAST(COALESCE(SUM(rate), 0) AS BIGINT) AS rate, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 GROUP BY state, active",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?
    {
        let n: i64 = r.try_get("n")?;
        *states.entry(r.try_get("state")?).or_default() += n;
        if r.try_get::<i64, _>("active")? == 1 {
            reserved += r.try_get::<Option<i64>, _>("rate")?.unwrap_or(0);
            active += n;
        }
    }
    sqlx::query(
        "INSERT INTO rollout_samples (rollout_id, at, reserved_bytes_per_sec, active, states) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (rollout_id, at) DO UPDATE SET reserved_bytes_per_sec = excluded.reserved_bytes_per_sec, active = excluded.active, states = excluded.states",
    )
    .bind(id)
    .bind(now)
    .bind(reserved)
    .bind(active)
    .bind(serde_json::to_string(&states)?)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
