//! The device side of rollouts: what `GET /device/poll` answers a device
//! that a live rollout governs, and how `POST /device/report` moves its
//! per-device state (late and out-of-order reports never move it back).

use sqlx::FromRow;

use super::plan::DAY_MS;
use super::rank;
use super::scheduler::Tx;
use super::spec::RolloutSpec;
use crate::AppState;
use crate::auth::Device;
use kernex_protocol::api::{
    DesiredAction, DesiredState, DownloadWindow, Report, ReportState, paths,
};

use crate::service::devices::poll::Answer;
use crate::service::{Error, Result};

/// Rollouts completed since this time (server clock) still give their
/// committed devices the poll hint (`rollback-watch-secs`).
pub fn watch_since(state: &AppState) -> i64 {
    let watch =
        i64::try_from(state.config.rollback_watch_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    state.clock.now_ms().saturating_sub(watch)
}

/// The device's record in the rollout that governs it, for poll.
#[derive(FromRow)]
struct Governed {
    rollout_id: String,
    state: String,
    wave: i64,
    position: i64,
    window_start: Option<i64>,
    window_end: Option<i64>,
    from_release_id: Option<String>,
    status: String,
    release_id: String,
    current_wave: i64,
    poll_horizon: i64,
}

/// The device's poll answer when a rollout governs it (`desired: None` is
/// "nothing to do now", 204), with the poll hint when the rollout acts on
/// the device; `None` is "no rollout: ask deployments".
pub async fn poll(state: &AppState, device: &Device) -> Result<Option<Answer>> {
    let now = state.clock.now_ms();
    let Some(row) = sqlx::query_as::<_, Governed>(
        "SELECT rd.rollout_id, rd.state, rd.wave, rd.position, rd.window_start, rd.window_end, rd.from_release_id, r.status, r.release_id, r.current_wave, r.poll_horizon \
         FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
         WHERE rd.device_pk = $1 AND (r.status IN ('scheduled', 'running', 'paused', 'rolled_back') OR (r.status = 'completed' AND (r.completed_at >= $2 OR rd.state IN ('pending', 'scheduled', 'downloading', 'installed', 'rebooting')))) \
         ORDER BY r.created_at DESC LIMIT 1",
    )
    .bind(&device.pk)
    .bind(watch_since(state))
    .fetch_optional(state.store.pool())
    .await?
    else {
        return Ok(None);
    };
    let Governed {
        rollout_id,
        state: dev_state,
        wave,
        position,
        window_start,
        window_end,
        from_release_id,
        status,
        release_id,
        current_wave,
        poll_horizon: horizon,
    } = row;
    let hint = (state.config.rollout_poll_secs > 0).then_some(state.config.rollout_poll_secs);
    // The rollout acts on this device soon: it is next in line for a
    // window (pending in the current wave or the next one, within the
    // scheduler's horizon: the next wave's first devices hear of the
    // promotion within the hint, not a whole poll interval later), holds
    // a window, or is installing: the hint. Committed, a rollback may
    // come: twice the hint. Devices further back, and devices that are
    // done otherwise, poll at their own pace.
    let acting = match dev_state.as_str() {
        "pending" => {
            (status == "running" && wave <= current_wave + 1 && position < horizon)
                || status == "completed"
        }
        "scheduled" | "downloading" | "installed" | "rebooting" => true,
        _ => false,
    };
    // The rollout has not reached this device yet, or is installing on it.
    let open = matches!(
        dev_state.as_str(),
        "pending" | "scheduled" | "downloading" | "installed" | "rebooting"
    );
    let nothing = Answer {
        desired: None,
        poll_after_secs: if dev_state == "committed" {
            hint.map(|h| h.saturating_mul(2))
        } else {
            hint.filter(|_| acting)
        },
        // A completed rollout watches for a rollback, and still updates a
        // device that was offline when its wave closed.
        governs: status != "completed" || open,
    };
    if dev_state == "rolling_back" {
        let Some(from) = from_release_id else {
            return Ok(Some(nothing));
        };
        let mut d = desired(state, &from).await?;
        d.action = Some(DesiredAction::Rollback);
        d.rollout_id = Some(rollout_id);
        d.poll_after_secs = Some(hint.unwrap_or(60));
        return Ok(Some(Answer {
            poll_after_secs: d.poll_after_secs,
            desired: Some(d),
            governs: true,
        }));
    }
    let live = status == "running" || status == "paused" || (status == "completed" && open);
    let installing = matches!(
        dev_state.as_str(),
        "scheduled" | "downloading" | "installed" | "rebooting"
    );
    if !live || !installing {
        return Ok(Some(nothing));
    }
    let mut d = desired(state, &release_id).await?;
    // The planner's server-made patches from the release it runs.
    d.patches =
        crate::service::patches::offers(state, from_release_id.as_deref(), &release_id).await?;
    d.action = Some(DesiredAction::Install);
    d.rollout_id = Some(rollout_id);
    if let (Some(not_before_ms), Some(not_after_ms)) = (window_start, window_end) {
        d.download_window = Some(DownloadWindow {
            not_before_ms,
            not_after_ms,
        });
        d.poll_after_secs = Some(if now < not_before_ms {
            u64::try_from((not_before_ms - now).div_euclid(1000).max(1)).unwrap_or(60)
        } else {
            hint.unwrap_or(60)
        });
    } else {
        d.poll_after_secs = hint;
    }
    Ok(Some(Answer {
        poll_after_secs: d.poll_after_secs,
        desired: Some(d),
        governs: true,
    }))
}

async fn desired(state: &AppState, release_id: &str) -> Result<DesiredState> {
    let (id, version, size, sha256): (String, String, i64, String) =
        sqlx::query_as("SELECT id, version, size, sha256 FROM releases WHERE id = $1")
            .bind(release_id)
            .fetch_optional(state.store.pool())
            .await?
            .ok_or(Error::NotFound("no such release"))?;
    Ok(DesiredState {
        url: paths::bundle(&id),
        release_id: id,
        version,
        size,
        sha256,
        action: None,
        rollout_id: None,
        download_window: None,
        poll_after_secs: None,
        patches: Vec::new(),
    })
}

/// The rollout record a report applies to.
#[derive(FromRow)]
struct Record {
    rollout_id: String,
    state: String,
    bytes_done: i64,
    link_class: String,
    status: String,
    spec: String,
    release_id: String,
    from_version: Option<String>,
}

/// Applies a report to the rollout record it names (if any). Returns the
/// version the device now runs when the report implies one.
pub async fn report(
    tx: &mut Tx,
    device: &Device,
    r: &Report,
    reason: Option<&str>,
    now: i64,
) -> Result<Option<String>> {
    // The record: for rolled_back, the rollout whose previous release the
    // device now runs again; otherwise the newest rollout of the named
    // release (or the newest live one when no release is named).
    let row = if r.state == ReportState::RolledBack {
        sqlx::query_as::<_, Record>(
            "SELECT rd.rollout_id, rd.state, rd.bytes_done, rd.link_class, r.status, r.spec, r.release_id, rd.from_version FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
             WHERE rd.device_pk = $1 AND ($2 IS NULL OR rd.from_release_id = $2) AND rd.state IN ('rolling_back', 'committed', 'rolled_back') ORDER BY r.created_at DESC LIMIT 1",
        )
        .bind(&device.pk)
        .bind(&r.release_id)
        .fetch_optional(&mut **tx)
        .await?
    } else {
        sqlx::query_as::<_, Record>(
            "SELECT rd.rollout_id, rd.state, rd.bytes_done, rd.link_class, r.status, r.spec, r.release_id, rd.from_version FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
             WHERE rd.device_pk = $1 AND (($2 IS NULL AND r.status IN ('running', 'paused', 'rolled_back')) OR r.release_id = $2) ORDER BY r.created_at DESC LIMIT 1",
        )
        .bind(&device.pk)
        .bind(&r.release_id)
        .fetch_optional(&mut **tx)
        .await?
    };
    let Some(row) = row else {
        return Ok(None);
    };
    let rollout_id = &row.rollout_id;
    let old = row.state.as_str();
    let status = row.status.as_str();
    let release_id = &row.release_id;
    // The rollout record's states are the report states, but for
    // `rebooting` (the device's `rebooted`).
    let mut new = match r.state {
        ReportState::Rebooted => "rebooting".to_string(),
        s => s.as_str().to_string(),
    };
    // A device of a rolled-back rollout that commits later is sent back.
    if new == "committed" && status == "rolled_back" {
        new = "rolling_back".into();
    }
    let progress = new == "downloading" && old == "downloading";
    if rank(&new) < rank(old) || (rank(&new) == rank(old) && new != old && !progress) {
        // Late: about an earlier step than the record shows. Nothing to move.
        tracing::debug!(device = %device.pk, rollout = %rollout_id, old, new, "late report ignored");
        return Ok(None);
    }
    let old_done = row.bytes_done;
    let done = r.bytes_done.map(|b| b.max(0));
    if let Some(done) = done
        && done > old_done
    {
        let link = &row.link_class;
        let spec: RolloutSpec =
            serde_json::from_str(&row.spec).map_err(|e| Error::Internal(e.into()))?;
        let day = now.div_euclid(DAY_MS);
        sqlx::query(
            "INSERT INTO device_daily_bytes (device_pk, day, granted, reported) VALUES ($1, $2, 0, $3) \
             ON CONFLICT (device_pk, day) DO UPDATE SET reported = device_daily_bytes.reported + excluded.reported",
        )
        .bind(&device.pk)
        .bind(day)
        .bind(done - old_done)
        .execute(&mut **tx)
        .await?;
        // A metered device that used up today's budget gives its
        // bandwidth back; it gets a new window on another day.
        if let Some(budget) = spec.bandwidth.class(link).budget_bytes_per_day {
            let (used,): (i64,) = sqlx::query_as(
                "SELECT reported FROM device_daily_bytes WHERE device_pk = $1 AND day = $2",
            )
            .bind(&device.pk)
            .bind(day)
            .fetch_one(&mut **tx)
            .await?;
            if u64::try_from(used).unwrap_or(0) >= budget {
                sqlx::query(
                    "UPDATE rollout_devices SET active = 0 WHERE rollout_id = $1 AND device_pk = $2",
                )
                .bind(rollout_id)
                .bind(&device.pk)
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    // Bandwidth is held while downloading, given back after it.
    let active_sql = match new.as_str() {
        "downloading" => "active",
        _ => "0",
    };
    sqlx::query(&format!(
        "UPDATE rollout_devices SET state = $1, active = {active_sql}, bytes_done = CASE WHEN $2 IS NULL OR $2 < bytes_done THEN bytes_done ELSE $2 END, bytes_total = COALESCE($3, bytes_total), reason = COALESCE($4, reason), last_progress_at = $5, updated_at = $5 WHERE rollout_id = $6 AND device_pk = $7"
    ))
    .bind(&new)
    .bind(done)
    .bind(r.bytes_total)
    .bind(reason)
    .bind(now)
    .bind(rollout_id)
    .bind(&device.pk)
    .execute(&mut **tx)
    .await?;
    let version = match new.as_str() {
        "committed" | "rolling_back" if r.state == ReportState::Committed => {
            sqlx::query("UPDATE devices SET desired_release_id = $1 WHERE id = $2")
                .bind(release_id)
                .bind(&device.pk)
                .execute(&mut **tx)
                .await?;
            let (version,): (String,) =
                sqlx::query_as("SELECT version FROM releases WHERE id = $1")
                    .bind(release_id)
                    .fetch_one(&mut **tx)
                    .await?;
            Some(version)
        }
        "rolled_back" => {
            sqlx::query(
                "UPDATE devices SET desired_release_id = (SELECT from_release_id FROM rollout_devices WHERE rollout_id = $1 AND device_pk = $2) WHERE id = $2",
            )
            .bind(rollout_id)
            .bind(&device.pk)
            .execute(&mut **tx)
            .await?;
            row.from_version.clone()
        }
        _ => None,
    };
    Ok(version)
}
