//! What a device's poll reads and answers. [`authenticate`] reads, in one
//! query, the device the credential authenticates (not revoked), its
//! current version, the release assigned to it, and whether a live rollout
//! governs it. A fleet polls all the time and mostly has nothing to do, so
//! the common answers (204, or the assigned release) cost one indexed
//! read, and none while the poll cache (`crate::poll_cache`) holds the
//! device; only a device in a rollout goes on to `rollouts::device::poll`.
//! [`answer`]: the rollout that governs the device, else the release
//! assigned to it (deployments), else nothing.

use kernex_protocol::api::{DesiredState, paths};

use crate::AppState;
use crate::auth::Device;
use crate::service::attestation::is_unproven;
use crate::service::devices::credential::Kind;
use crate::service::{Error, Result};

/// The release assigned to a device outside rollouts.
#[derive(Debug, Clone)]
pub struct Assigned {
    /// Release id.
    pub id: String,
    /// Its version.
    pub version: String,
    /// Bundle size.
    pub size: i64,
    /// SHA-256 of the bundle.
    pub sha256: String,
    /// The release of the version the device runs, if known (the
    /// planner's base).
    pub from_release_id: Option<String>,
}

/// An authenticated device and what its poll needs to know.
#[derive(Debug, Clone)]
pub struct Polled {
    /// The device.
    pub device: Device,
    /// The version it runs.
    pub current_version: Option<String>,
    /// The release assigned to it (deployments), if any.
    pub assigned: Option<Assigned>,
    /// A scheduled, running, paused or rolled-back rollout holds it.
    pub in_rollout: bool,
    /// Enrolled under a TPM policy, or bound to a TPM: the attestation
    /// side of the poll has work to do (most devices skip it).
    pub tpm: bool,
}

/// The poll's answer: `desired` is 200 with what to run, `None` is 204;
/// `poll_after_secs` is the hint sent as `Kernex-Poll-After`.
#[derive(Debug, Default)]
pub struct Answer {
    /// What to run.
    pub desired: Option<DesiredState>,
    /// Poll again after this many seconds (a rollout acts on the device).
    pub poll_after_secs: Option<u64>,
    /// A live (or rolled-back) rollout decides for the device, even "do
    /// nothing"; false for a completed rollout whose rollback watch only
    /// adds the hint: deployments still apply.
    pub governs: bool,
}

/// The row [`authenticate`] reads.
#[derive(Debug, sqlx::FromRow)]
struct PollRow {
    expires_at: Option<i64>,
    id: String,
    org_id: String,
    device_id: String,
    current_version: Option<String>,
    tpm_required: i64,
    ek_fingerprint: Option<String>,
    release_id: Option<String>,
    version: Option<String>,
    size: Option<i64>,
    sha256: Option<String>,
    from_release_id: Option<String>,
    in_rollout: i64,
}

/// The non-revoked device whose credential hashes to `hash`, and what its
/// poll needs to know; [`Error::Unauthorized`] when there is none.
pub async fn authenticate(state: &AppState, kind: Kind, hash: &str) -> Result<Polled> {
    let (from, filter, expires) = kind.from_where("$3");
    let sql = format!(
        "SELECT {expires} AS expires_at, d.id, d.org_id, d.device_id, d.current_version, d.tpm_required, d.ek_fingerprint, r.id AS release_id, r.version, r.size, r.sha256, cr.id AS from_release_id, \
         CAST(CASE WHEN EXISTS (SELECT 1 FROM rollout_devices rd JOIN rollouts ro ON ro.id = rd.rollout_id \
              WHERE rd.device_pk = d.id AND (ro.status IN ('scheduled', 'running', 'paused', 'rolled_back') \
              OR (ro.status = 'completed' AND (ro.completed_at >= $2 OR rd.state IN ('pending', 'scheduled', 'downloading', 'installed', 'rebooting'))))) \
         THEN 1 ELSE 0 END AS BIGINT) AS in_rollout \
         FROM {from} LEFT JOIN releases r ON r.id = d.desired_release_id \
         LEFT JOIN releases cr ON r.id IS NOT NULL AND cr.org_id = d.org_id AND cr.version = d.current_version AND cr.compatible = r.compatible \
         WHERE {filter}"
    );
    let row = sqlx::query_as::<_, PollRow>(&sql)
        .bind(hash)
        .bind(crate::service::rollouts::device::watch_since(state));
    let row = if kind == Kind::Access {
        row.bind(crate::store::now_ms())
    } else {
        row
    }
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    let assigned = match (row.release_id, row.version, row.size, row.sha256) {
        (Some(id), Some(version), Some(size), Some(sha256)) => Some(Assigned {
            id,
            version,
            size,
            sha256,
            from_release_id: row.from_release_id,
        }),
        (None, ..) => None,
        (Some(id), ..) => {
            return Err(Error::Internal(anyhow::anyhow!(
                "release {id} has no version, size or digest"
            )));
        }
    };
    Ok(Polled {
        device: Device {
            unproven: is_unproven(row.tpm_required, row.ek_fingerprint.as_deref()),
            pk: row.id,
            org_id: row.org_id,
            device_id: row.device_id,
            expires_at: row.expires_at,
        },
        current_version: row.current_version,
        assigned,
        in_rollout: row.in_rollout != 0,
        tpm: row.tpm_required != 0 || row.ek_fingerprint.is_some(),
    })
}

/// A rollout that governs the device decides; otherwise the assigned
/// release, unless the device already runs its version.
pub async fn answer(state: &AppState, polled: &Polled) -> Result<Answer> {
    let mut hint = None;
    if polled.in_rollout
        && let Some(answer) = crate::service::rollouts::device::poll(state, &polled.device).await?
    {
        if answer.governs || answer.desired.is_some() {
            return Ok(answer);
        }
        hint = answer.poll_after_secs;
    }
    let nothing = Answer {
        desired: None,
        poll_after_secs: hint,
        governs: false,
    };
    let Some(r) = &polled.assigned else {
        return Ok(nothing);
    };
    if polled.current_version.as_deref() == Some(r.version.as_str()) {
        return Ok(nothing);
    }
    // The planner: a patch the device needs is still being built: it
    // starts once it exists (never on a plan that is not final).
    let from = r.from_release_id.clone();
    if let Some(from) = &from
        && crate::service::patches::waiting(state, from, &r.id).await?
    {
        return Ok(Answer {
            desired: None,
            poll_after_secs: Some(state.config.rollout_poll_secs.max(1)),
            governs: false,
        });
    }
    let patches = crate::service::patches::offers(state, from.as_deref(), &r.id).await?;
    let desired = Some(DesiredState {
        url: paths::bundle(&r.id),
        release_id: r.id.clone(),
        version: r.version.clone(),
        size: r.size,
        sha256: r.sha256.clone(),
        action: None,
        rollout_id: None,
        download_window: None,
        poll_after_secs: None,
        patches,
    });
    Ok(Answer {
        desired,
        poll_after_secs: hint,
        governs: false,
    })
}
