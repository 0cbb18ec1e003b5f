//! The planner's choice per device for a deployment: what each device
//! will fetch (method and exact bytes), before and after the deployment is
//! made, as the rollout preview shows it per wave.
//!
//! Before a deployment exists its patch jobs do not exist either: a device
//! whose pair needs a server-made patch is shown with the chunk delta and
//! `patch_building` (it will wait for the patch). Once every job of its
//! pair is done, the choice is final and is what the device fetches, to
//! the byte (`server/tests/planner.rs`).

use std::collections::HashMap;

use serde::Serialize;
use utoipa::ToSchema;

use super::{Method, Plan, plan, running_release};
use crate::AppState;
use crate::service::{Error, Result};

/// Most devices one preview plans (a deployment's own limit).
pub const MAX_DEVICES: usize = 10_000;

/// One device's plan.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DevicePlan {
    /// Internal id (the `id` of `/devices`).
    pub id: String,
    /// The device's own id.
    pub device_id: String,
    /// The version it runs (none: unknown, it gets the whole archive).
    pub from_version: Option<String>,
    /// How it gets the release.
    pub method: Method,
    /// Exact bytes it downloads that way.
    pub bytes: u64,
    /// A patch of its pair is still being built: `bytes` is the chunk
    /// delta until then, and it does not start before.
    pub patch_building: bool,
}

/// What assigning a release to devices takes.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentPreview {
    /// Release.
    pub release_id: String,
    /// Its version.
    pub version: String,
    /// Devices that install it.
    pub targets: u64,
    /// Devices that already run the version (they fetch nothing).
    pub already_current: u64,
    /// Targets still waiting for a server-made patch.
    pub patches_building: u64,
    /// Bytes all targets download.
    pub total_bytes: u64,
    /// Targets per method.
    pub methods: std::collections::BTreeMap<String, u64>,
    /// Per device, in the order given.
    pub devices: Vec<DevicePlan>,
}

/// Plans release `release_id` for the devices `device_pks` of `org_id`:
/// 404 for an unknown release or device, 422 for a device of another
/// hardware class.
pub async fn preview(
    state: &AppState,
    org_id: &str,
    release_id: &str,
    device_pks: &[String],
) -> Result<DeploymentPreview> {
    if device_pks.is_empty() || device_pks.len() > MAX_DEVICES {
        return Err(Error::Invalid(format!(
            "devices: 1 to {MAX_DEVICES} device ids"
        )));
    }
    let (compatible, version): (String, String) =
        sqlx::query_as("SELECT compatible, version FROM releases WHERE id = $1 AND org_id = $2")
            .bind(release_id)
            .bind(org_id)
            .fetch_optional(state.store.pool())
            .await?
            .ok_or(Error::NotFound("no such release"))?;
    let mut plans: HashMap<Option<String>, Plan> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut out = DeploymentPreview {
        release_id: release_id.to_string(),
        version: version.clone(),
        targets: 0,
        already_current: 0,
        patches_building: 0,
        total_bytes: 0,
        methods: Default::default(),
        devices: Vec::new(),
    };
    for pk in device_pks {
        if !seen.insert(pk.as_str()) {
            continue;
        }
        let (device_id, class, current): (String, String, Option<String>) = sqlx::query_as(
            "SELECT device_id, hardware_class, current_version FROM devices WHERE id = $1 AND org_id = $2",
        )
        .bind(pk)
        .bind(org_id)
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::NotFound("no such device"))?;
        if class != compatible {
            return Err(Error::Unprocessable(format!(
                "device {pk} is {class}, the release is for {compatible}"
            )));
        }
        if current.as_deref() == Some(version.as_str()) {
            out.already_current += 1;
            continue;
        }
        let from = running_release(state, org_id, current.as_deref(), &compatible).await?;
        let p = match plans.get(&from) {
            Some(p) => *p,
            None => {
                let p = plan(state, from.as_deref(), release_id).await?;
                plans.insert(from.clone(), p);
                p
            }
        };
        out.targets += 1;
        out.total_bytes += p.bytes;
        out.patches_building += u64::from(p.building);
        *out.methods
            .entry(p.method.as_str().to_string())
            .or_default() += 1;
        out.devices.push(DevicePlan {
            id: pk.clone(),
            device_id,
            from_version: current,
            method: p.method,
            bytes: p.bytes,
            patch_building: p.building,
        });
    }
    Ok(out)
}
