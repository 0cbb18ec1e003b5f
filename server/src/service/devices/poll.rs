//! What a device's poll answers: the rollout that governs it, else the
//! release assigned to it (deployments), else nothing.

use kernex_protocol::api::{DesiredState, paths};

use crate::AppState;
use crate::auth::Device;
use crate::service::Result;

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
    });
    Ok(Answer {
        desired,
        poll_after_secs: hint,
        governs: false,
    })
}
