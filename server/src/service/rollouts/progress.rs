//! What operators see of rollouts: the list, a rollout with per-wave and
//! per-device state, the scheduler's samples and the egress the HTTP layer
//! counted.

use std::collections::BTreeMap;

use kernex_protocol::api::DownloadWindow;
use serde::Serialize;
use sqlx::FromRow;
use utoipa::ToSchema;

use super::spec::RolloutSpec;
use crate::AppState;
use crate::auth::Operator;
use crate::service::{Error, Result};

/// A device in a rollout.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolloutDevice {
    /// Internal id.
    pub id: String,
    /// The device's own id.
    pub device_id: String,
    /// 1-based wave.
    pub wave: i64,
    /// pending, scheduled, downloading, installed, rebooting, committed,
    /// reverted, failed, rolling_back, rolled_back, cancelled — or offline
    /// (not seen for offline-after-secs while not done).
    pub state: String,
    /// The stored state behind `offline`.
    pub stored_state: String,
    /// Link class.
    pub link_class: String,
    /// Site.
    pub site: Option<String>,
    /// Version it ran when the rollout started.
    pub from_version: Option<String>,
    /// Exact bytes planned.
    pub delta_bytes: i64,
    /// Bytes downloaded (reported).
    pub bytes_done: i64,
    /// Bytes to download (reported).
    pub bytes_total: Option<i64>,
    /// Current or last download window.
    pub download_window: Option<DownloadWindow>,
    /// Windows granted so far.
    pub windows_given: i64,
    /// Why (reverted, failed).
    pub reason: Option<String>,
    /// Last change (unix ms).
    pub updated_at: i64,
}

/// One wave's progress.
#[derive(Debug, Serialize, ToSchema)]
pub struct WaveState {
    /// 1-based.
    pub wave: i64,
    /// done, current or waiting.
    pub status: String,
    /// Devices.
    pub devices: i64,
    /// Devices per state.
    pub states: BTreeMap<String, i64>,
    /// (failed + reverted) / devices.
    pub error_rate: f64,
    /// committed / devices.
    pub committed_ratio: f64,
}

/// A rollout.
#[derive(Debug, Serialize, ToSchema)]
pub struct Rollout {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Release.
    pub release_id: String,
    /// draft, scheduled, running, paused, completed, aborted, rolled_back.
    pub status: String,
    /// Why it paused, waits or was rolled back.
    pub status_reason: Option<String>,
    /// 1-based current wave (0 before start).
    pub current_wave: i64,
    /// Devices.
    pub devices_total: i64,
    /// Devices per state.
    pub states: BTreeMap<String, i64>,
    /// The spec.
    pub spec: RolloutSpec,
    /// Created (unix ms).
    pub created_at: i64,
    /// Last change (unix ms).
    pub updated_at: i64,
    /// Completed, aborted or rolled back (unix ms).
    pub completed_at: Option<i64>,
    /// Devices the selector matched that the start left out, by reason:
    /// `no_tpm` (no TPM, and every wave they could join requires
    /// attestation), `unactivated` (enrolled under a TPM policy, credential
    /// activation not done). Empty before the start.
    pub left_out: BTreeMap<String, i64>,
    /// Per wave (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<WaveState>>,
    /// Per device (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<RolloutDevice>>,
}

/// A stored rollout.
#[derive(Debug, FromRow)]
pub struct RolloutRow {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Release.
    pub release_id: String,
    /// The spec, JSON.
    pub spec: String,
    /// Status.
    pub status: String,
    /// Why.
    pub status_reason: Option<String>,
    /// 0-based current wave.
    pub current_wave: i64,
    /// Created (unix ms).
    pub created_at: i64,
    /// Last change (unix ms).
    pub updated_at: i64,
    /// Completed (unix ms).
    pub completed_at: Option<i64>,
    /// Left out at the start, by reason (JSON).
    pub left_out: Option<String>,
}

const COLUMNS: &str = "id, name, release_id, spec, status, status_reason, current_wave, created_at, updated_at, completed_at, left_out";

fn spec_of(row: &RolloutRow) -> Result<RolloutSpec> {
    serde_json::from_str(&row.spec).map_err(|e| Error::Internal(e.into()))
}

/// A rollout of the organisation and its spec (404 if none).
pub async fn load(state: &AppState, org_id: &str, id: &str) -> Result<(RolloutSpec, RolloutRow)> {
    let row = sqlx::query_as::<_, RolloutRow>(&format!(
        "SELECT {COLUMNS} FROM rollouts WHERE id = $1 AND org_id = $2"
    ))
    .bind(id)
    .bind(org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound("no such rollout"))?;
    Ok((spec_of(&row)?, row))
}

/// The rollout without waves and devices.
pub async fn summary(state: &AppState, spec: RolloutSpec, row: &RolloutRow) -> Result<Rollout> {
    let mut states = BTreeMap::new();
    let mut total = 0;
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, COUNT(*) AS n FROM rollout_devices WHERE rollout_id = $1 GROUP BY state",
    )
    .bind(&row.id)
    .fetch_all(state.store.pool())
    .await?;
    for (st, n) in counts {
        total += n;
        states.insert(st, n);
    }
    Ok(Rollout {
        id: row.id.clone(),
        name: row.name.clone(),
        release_id: row.release_id.clone(),
        current_wave: if row.status == "draft" {
            0
        } else {
            (row.current_wave + 1).min(spec.waves.len() as i64)
        },
        status: row.status.clone(),
        status_reason: row.status_reason.clone(),
        devices_total: total,
        states,
        spec,
        created_at: row.created_at,
        updated_at: row.updated_at,
        completed_at: row.completed_at,
        left_out: match &row.left_out {
            Some(text) => serde_json::from_str(text).map_err(|e| Error::Internal(e.into()))?,
            None => BTreeMap::new(),
        },
        waves: None,
        devices: None,
    })
}

/// The organisation's rollouts, newest first (at most 500).
pub async fn list(state: &AppState, op: &Operator) -> Result<Vec<Rollout>> {
    let rows = sqlx::query_as::<_, RolloutRow>(&format!(
        "SELECT {COLUMNS} FROM rollouts WHERE org_id = $1 ORDER BY created_at DESC LIMIT 500"
    ))
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(summary(state, spec_of(&row)?, &row).await?);
    }
    Ok(out)
}

/// A device's row in a rollout, with its last contact.
#[derive(FromRow)]
struct MemberRow {
    device_pk: String,
    device_id: String,
    last_seen_at: Option<i64>,
    wave: i64,
    state: String,
    link_class: String,
    site: Option<String>,
    from_version: Option<String>,
    delta_bytes: i64,
    bytes_done: i64,
    bytes_total: Option<i64>,
    window_start: Option<i64>,
    window_end: Option<i64>,
    windows_given: i64,
    reason: Option<String>,
    updated_at: i64,
}

fn member(d: MemberRow, shown: String, stored: String) -> RolloutDevice {
    let window = match (d.window_start, d.window_end) {
        (Some(not_before_ms), Some(not_after_ms)) => Some(DownloadWindow {
            not_before_ms,
            not_after_ms,
        }),
        _ => None,
    };
    RolloutDevice {
        id: d.device_pk,
        device_id: d.device_id,
        wave: d.wave + 1,
        state: shown,
        stored_state: stored,
        link_class: d.link_class,
        site: d.site,
        from_version: d.from_version,
        delta_bytes: d.delta_bytes,
        bytes_done: d.bytes_done,
        bytes_total: d.bytes_total,
        download_window: window,
        windows_given: d.windows_given,
        reason: d.reason,
        updated_at: d.updated_at,
    }
}

const MEMBER_COLUMNS: &str = "rd.device_pk, d.device_id, d.last_seen_at, rd.wave, rd.state, rd.link_class, rd.site, rd.from_version, rd.delta_bytes, rd.bytes_done, rd.bytes_total, rd.window_start, rd.window_end, rd.windows_given, rd.reason, rd.updated_at";

/// One page of a rollout's devices.
#[derive(Debug)]
pub struct DevicePage {
    /// The devices, in wave order.
    pub devices: Vec<RolloutDevice>,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

/// A rollout's devices in wave order, `limit` (1 to 5000) after the
/// cursor `after` (from the previous page's `next`): keyset on (wave,
/// position), so any page costs what the first does.
pub async fn devices_page(
    state: &AppState,
    op: &Operator,
    id: &str,
    after: Option<&str>,
    limit: i64,
) -> Result<DevicePage> {
    load(state, &op.org_id, id).await?;
    let bad = || Error::Invalid("after: not a cursor of this list".into());
    let (wave, position) = match after {
        None => (-1, -1),
        Some(c) => {
            let (w, p) = c.split_once('.').ok_or_else(bad)?;
            (
                w.parse::<i64>().map_err(|_| bad())?,
                p.parse::<i64>().map_err(|_| bad())?,
            )
        }
    };
    let limit = limit.clamp(1, 5000);
    state.last_seen.flush(&state.store).await?;
    let offline_before = state.clock.now_ms()
        - i64::try_from(state.config.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let rows: Vec<(i64, MemberRow)> = sqlx::query(&format!(
        "SELECT rd.position, {MEMBER_COLUMNS} FROM rollout_devices rd JOIN devices d ON d.id = rd.device_pk \
         WHERE rd.rollout_id = $1 AND (rd.wave > $2 OR (rd.wave = $2 AND rd.position > $3)) \
         ORDER BY rd.wave, rd.position LIMIT $4"
    ))
    .bind(id)
    .bind(wave)
    .bind(position)
    .bind(limit + 1)
    .fetch_all(state.store.pool())
    .await?
    .iter()
    .map(|row| Ok((sqlx::Row::try_get(row, "position")?, MemberRow::from_row(row)?)))
    .collect::<std::result::Result<_, sqlx::Error>>()?;
    let more = rows.len() as i64 > limit;
    let mut devices = Vec::new();
    let mut last = None;
    for (position, d) in rows.into_iter().take(usize::try_from(limit).unwrap_or(0)) {
        last = Some(format!("{}.{position}", d.wave));
        let stored = d.state.clone();
        let done = matches!(
            stored.as_str(),
            "committed" | "reverted" | "failed" | "rolled_back" | "cancelled"
        );
        let shown = if !done && d.last_seen_at.is_none_or(|t| t < offline_before) {
            "offline".to_string()
        } else {
            stored.clone()
        };
        devices.push(member(d, shown, stored));
    }
    Ok(DevicePage {
        devices,
        next: if more { last } else { None },
    })
}

/// A rollout with per-wave state and, `with_devices`, per-device state.
pub async fn detail(
    state: &AppState,
    op: &Operator,
    id: &str,
    with_devices: bool,
) -> Result<Rollout> {
    let (spec, row) = load(state, &op.org_id, id).await?;
    let n_waves = spec.waves.len();
    let mut r = summary(state, spec, &row).await?;
    state.last_seen.flush(&state.store).await?;
    let now = state.clock.now_ms();
    let offline_before = now
        - i64::try_from(state.config.offline_after_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut waves: Vec<WaveState> = (0..n_waves)
        .map(|w| WaveState {
            wave: w as i64 + 1,
            status: if r.status == "draft" || (w as i64 + 1) > r.current_wave {
                "waiting".into()
            } else if (w as i64 + 1) < r.current_wave || r.status == "completed" {
                "done".into()
            } else {
                "current".into()
            },
            devices: 0,
            states: BTreeMap::new(),
            error_rate: 0.0,
            committed_ratio: 0.0,
        })
        .collect();
    if !with_devices {
        // Counts only (the live view): one grouped query, not a row per
        // device.
        let counts: Vec<(i64, String, i64)> = sqlx::query_as(
            "SELECT rd.wave, CASE WHEN rd.state NOT IN ('committed', 'reverted', 'failed', 'rolled_back', 'cancelled') \
             AND (d.last_seen_at IS NULL OR d.last_seen_at < $2) THEN 'offline' ELSE rd.state END AS shown, COUNT(*) AS n \
             FROM rollout_devices rd JOIN devices d ON d.id = rd.device_pk WHERE rd.rollout_id = $1 GROUP BY 1, 2",
        )
        .bind(id)
        .bind(offline_before)
        .fetch_all(state.store.pool())
        .await?;
        for (wave, shown, n) in counts {
            if let Some(w) = usize::try_from(wave).ok().and_then(|w| waves.get_mut(w)) {
                w.devices += n;
                *w.states.entry(shown).or_default() += n;
            }
        }
    }
    let rows = if !with_devices {
        Vec::new()
    } else {
        sqlx::query_as::<_, MemberRow>(&format!(
            "SELECT {MEMBER_COLUMNS} FROM rollout_devices rd JOIN devices d ON d.id = rd.device_pk WHERE rd.rollout_id = $1 ORDER BY rd.wave, rd.position"
        ))
    .bind(id)
    .fetch_all(state.store.pool())
    .await?
    };
    let mut devices = Vec::new();
    for d in rows {
        let stored = d.state.clone();
        let done = matches!(
            stored.as_str(),
            "committed" | "reverted" | "failed" | "rolled_back" | "cancelled"
        );
        let shown = if !done && d.last_seen_at.is_none_or(|t| t < offline_before) {
            "offline".to_string()
        } else {
            stored.clone()
        };
        if let Some(w) = usize::try_from(d.wave).ok().and_then(|w| waves.get_mut(w)) {
            w.devices += 1;
            *w.states.entry(shown.clone()).or_default() += 1;
        }
        if with_devices {
            devices.push(member(d, shown, stored));
        }
    }
    for w in &mut waves {
        if w.devices > 0 {
            let errors = w.states.get("failed").copied().unwrap_or(0)
                + w.states.get("reverted").copied().unwrap_or(0);
            w.error_rate = errors as f64 / w.devices as f64;
            w.committed_ratio =
                w.states.get("committed").copied().unwrap_or(0) as f64 / w.devices as f64;
        }
    }
    r.waves = Some(waves);
    r.devices = with_devices.then_some(devices);
    Ok(r)
}

/// One scheduler sample: the server's own egress accounting.
#[derive(Debug, Serialize, ToSchema)]
pub struct Sample {
    /// When (unix ms, server clock).
    pub at: i64,
    /// Sum of the rates reserved by devices holding windows.
    pub reserved_bytes_per_sec: i64,
    /// Devices holding windows.
    pub active: i64,
    /// Devices per state.
    pub states: BTreeMap<String, i64>,
}

/// The scheduler's samples of a rollout, oldest first.
pub async fn samples(state: &AppState, op: &Operator, id: &str) -> Result<Vec<Sample>> {
    load(state, &op.org_id, id).await?;
    let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(
        "SELECT at, reserved_bytes_per_sec, active, states FROM rollout_samples WHERE rollout_id = $1 ORDER BY at",
    )
    .bind(id)
    .fetch_all(state.store.pool())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (at, reserved_bytes_per_sec, active, states) in rows {
        out.push(Sample {
            at,
            reserved_bytes_per_sec,
            active,
            states: serde_json::from_str(&states).map_err(|e| Error::Internal(e.into()))?,
        });
    }
    Ok(out)
}

/// Bundle bytes served per second.
#[derive(Debug, Serialize, ToSchema)]
pub struct Egress {
    /// `[second (unix), bytes]`, seconds with traffic only.
    pub seconds: Vec<(i64, u64)>,
    /// The busiest second's bytes.
    pub peak_bytes_per_sec: u64,
}

/// Bundle bytes the HTTP layer served to the organisation's devices, per
/// second of the server clock, from `since_ms` (default: all kept).
pub fn egress(state: &AppState, op: &Operator, since_ms: Option<i64>) -> Egress {
    let seconds = state
        .egress
        .since(&op.org_id, since_ms.unwrap_or(i64::MIN).div_euclid(1000));
    let peak = seconds.iter().map(|(_, b)| *b).max().unwrap_or(0);
    Egress {
        seconds,
        peak_bytes_per_sec: peak,
    }
}
