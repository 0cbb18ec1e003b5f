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

use std::collections::BTreeMap;

use anyhow::Result;
use sqlx::FromRow;

use super::spec::RolloutSpec;
use crate::AppState;

mod admit;

use admit::admit;

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
    // Patch jobs left by a restart or a replica that stopped; patches no
    // device needs any more.
    crate::service::patches::build::spawn(state);
    crate::service::patches::build::collect_now_and_then(state).await;
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM rollouts WHERE status IN ('scheduled', 'running', 'paused') \
         OR (status = 'completed' AND EXISTS (SELECT 1 FROM rollout_devices rd WHERE rd.rollout_id = rollouts.id AND rd.state IN ('pending', 'scheduled', 'downloading'))) \
         ORDER BY created_at",
    )
    .fetch_all(state.store.pool())
    .await?;
    let stepped = !ids.is_empty();
    for (id,) in ids {
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

/// A device of a wave, with what the gates read of it.
#[derive(FromRow)]
struct Member {
    state: String,
    active: i64,
    updated_at: i64,
    last_seen_at: Option<i64>,
    attestation: String,
    attested_version: Option<String>,
    attested_at: Option<i64>,
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
    let rows = sqlx::query_as::<_, Member>(
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
        let (active, seen) = (r.active, r.last_seen_at);
        c.size += 1;
        let quote = match attested_version {
            // Only a verdict on a quote made after the device reported
            // this state (its commit) counts: not an older one.
            Some(want) => Some(
                if r.attested_version.as_deref() == Some(want)
                    && r.attested_at.is_some_and(|t| t >= r.updated_at)
                {
                    r.attestation
                } else {
                    "none".into()
                },
            ),
            None => None,
        };
        match r.state.as_str() {
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
/// on their next poll, devices not yet installing are cancelled. A device
/// whose anti-rollback floor is above the release it came from would refuse
/// the rollback, so it stays committed (an operator's rollback is refused
/// with a 409 before it gets here; a gate's goes ahead for the others).
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
        "UPDATE rollout_devices SET state = 'rolling_back', updated_at = $1 WHERE rollout_id = $2 AND state = 'committed' AND from_release_id IS NOT NULL \
         AND NOT EXISTS (SELECT 1 FROM devices d JOIN releases r ON r.id = rollout_devices.from_release_id WHERE d.id = rollout_devices.device_pk AND d.security_floor > r.security_version)",
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
    let (version,): (String,) = sqlx::query_as("SELECT version FROM releases WHERE id = $1")
        .bind(release_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(version)
}

/// What a pass reads of a rollout.
#[derive(FromRow)]
struct Stored {
    status: String,
    status_reason: Option<String>,
    spec: String,
    start_at: Option<i64>,
    current_wave: i64,
    wave_settled_at: Option<i64>,
    gate_accepted: i64,
}

async fn step(state: &AppState, id: &str, now: i64) -> Result<()> {
    let mut tx = state.store.begin_write().await?;
    let Some(row) = sqlx::query_as::<_, Stored>(
        "SELECT status, status_reason, spec, start_at, current_wave, wave_settled_at, gate_accepted FROM rollouts WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(());
    };
    let spec: RolloutSpec = serde_json::from_str(&row.spec)?;
    let mut status = row.status;
    let mut reason = row.status_reason;
    let start_at = row.start_at;
    let mut wave = row.current_wave;
    let mut settled_at = row.wave_settled_at;
    let mut accepted = row.gate_accepted != 0;
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
    let (first,): (Option<i64>,) = sqlx::query_as(
        "SELECT MIN(position) AS p FROM rollout_devices WHERE rollout_id = $1 AND state = 'pending' AND wave <= $2",
    )
    .bind(id)
    .bind(wave.min(n_waves - 1) + 1)
    .fetch_one(&mut *tx)
    .await?;
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

async fn record_sample(tx: &mut Tx, id: &str, now: i64) -> Result<()> {
    let mut states: BTreeMap<String, i64> = BTreeMap::new();
    let mut reserved = 0i64;
    let mut active = 0i64;
    let groups: Vec<(String, i64, Option<i64>, i64)> = sqlx::query_as(
        "SELECT state, active, CAST(COALESCE(SUM(rate), 0) AS BIGINT) AS rate, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 GROUP BY state, active",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    for (state, is_active, rate, n) in groups {
        *states.entry(state).or_default() += n;
        if is_active == 1 {
            reserved += rate.unwrap_or(0);
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
