//! Rollouts: a release delivered to a selected part of the fleet in
//! staggered waves, each gated on the health of the previous one, with
//! downloads scheduled into maintenance windows under a fleet egress cap,
//! a concurrency limit and metered daily budgets.
//!
//! * [`spec`]: what the operator asks for, and its validation.
//! * [`plan`]: wave membership (diversity first) and the projection the
//!   preview shows.
//! * [`time`]: the injectable clock, the egress meter, maintenance windows.
//! * [`scheduler`]: the background pass that starts, gates, promotes,
//!   pauses, rolls back and admits downloads (one replica at a time).
//! * [`device`]: what poll and report do for a device in a rollout.
//! * [`preview`]: what a rollout will take, before it starts.
//! * [`transitions`]: create, start, pause, resume, abort, roll back.
//! * [`progress`]: what operators see of rollouts (list, detail, samples).
//! * [`link`]: a device's link class, site and time zone.
//! * [`test_clock`]: the clock the simulator steps (`test-clock = true`).
//!
//! Targets and their exact delta bytes are computed here, from the chunk
//! indexes of the two releases' bundles in the blob store.

pub mod device;
pub mod edit;
pub mod link;
pub mod plan;
pub mod preview;
pub mod progress;
pub mod scheduler;
pub mod spec;
pub mod test_clock;
pub mod time;
pub mod transitions;

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use kernex_protocol::bundle::{Bundle, BundleError};
use kernex_protocol::reader::{RangeRead, Sink};
use sqlx::Row;

use crate::AppState;
use crate::blobs::Blobs;
use crate::service::{Error, Result};
use plan::Target;
use spec::{DEFAULT_LINK_CLASS, RolloutSpec};

/// Per-device states. `offline` is not stored: it is shown for a device
/// that has not been seen for `offline-after-secs` while not done.
pub const STATES: &[&str] = &[
    "pending",
    "scheduled",
    "downloading",
    "installed",
    "rebooting",
    "committed",
    "reverted",
    "failed",
    "rolling_back",
    "rolled_back",
    "cancelled",
];

/// Order of progress: a report never moves a device backwards.
pub fn rank(state: &str) -> u8 {
    match state {
        "pending" | "cancelled" => 0,
        "scheduled" => 1,
        "downloading" => 2,
        "installed" => 3,
        "rebooting" => 4,
        "committed" | "reverted" | "failed" => 5,
        "rolling_back" => 6,
        "rolled_back" => 7,
        _ => 0,
    }
}

/// A release as the planner needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReleaseRef {
    /// Id.
    pub id: String,
    /// Version.
    pub version: String,
    /// Hardware class.
    pub compatible: String,
    /// Anti-rollback generation.
    pub security_version: i64,
}

/// Loads a release of the organisation (404 if none).
pub async fn release(state: &AppState, org_id: &str, id: &str) -> Result<ReleaseRef> {
    sqlx::query_as::<_, ReleaseRef>(
        "SELECT id, version, compatible, security_version FROM releases WHERE id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound("no such release"))
}

/// A bundle in the blob store, read by ranges through the protocol's one
/// reader interface: each read is one ranged get. Used from a blocking
/// thread.
pub(crate) struct BlobRange {
    rt: tokio::runtime::Handle,
    blobs: Blobs,
    key: String,
    size: u64,
}

impl BlobRange {
    fn get(&self, range: std::ops::Range<u64>) -> Result<Vec<u8>, BundleError> {
        let (blobs, key) = (self.blobs.clone(), self.key.clone());
        let what = format!("reading bytes {}..{} of blob {key}", range.start, range.end);
        self.rt
            .block_on(async move {
                let mut stream = blobs.get(&key, Some(range)).await?;
                let mut buf = Vec::new();
                while let Some(chunk) = stream.next().await {
                    buf.extend_from_slice(&chunk?);
                }
                anyhow::Ok(buf)
            })
            .map_err(|e| BundleError::Io {
                context: what,
                source: std::io::Error::other(e),
            })
    }
}

impl RangeRead for BlobRange {
    type Error = BundleError;

    fn known_size(&mut self) -> Result<Option<u64>, BundleError> {
        Ok(Some(self.size))
    }

    fn read_into(
        &mut self,
        offset: u64,
        len: u64,
        sink: &mut Sink<'_, BundleError>,
    ) -> Result<(), BundleError> {
        let end = offset.saturating_add(len);
        if end > self.size {
            return Err(BundleError::Truncated {
                expected: end,
                found: self.size,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let bytes = self.get(offset..end)?;
        if bytes.len() as u64 != len {
            return Err(BundleError::Truncated {
                expected: end,
                found: offset + bytes.len() as u64,
            });
        }
        sink(&bytes)
    }

    fn read_start(&mut self, len: u64) -> Result<Vec<u8>, BundleError> {
        let n = len.min(self.size);
        self.read_range(0, n)
    }
}

/// Opens release `id`'s stored bundle for range reads from the blob store
/// (no copy: only the parts a caller reads are fetched).
pub(crate) async fn open_release(state: &AppState, id: &str) -> Result<Bundle<BlobRange>> {
    let row = sqlx::query("SELECT blob_key, size FROM releases WHERE id = $1")
        .bind(id)
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::NotFound("no such release"))?;
    let reader = BlobRange {
        rt: tokio::runtime::Handle::current(),
        blobs: state.blobs.clone(),
        key: row.try_get("blob_key")?,
        size: u64::try_from(row.try_get::<i64, _>("size")?)
            .map_err(|e| Error::Internal(e.into()))?,
    };
    tokio::task::spawn_blocking(move || Bundle::open(reader))
        .await
        .map_err(|e| Error::Internal(e.into()))?
        .map_err(|e| Error::Internal(anyhow::anyhow!("stored bundle {id} unreadable: {e}")))
}

/// The exact bytes a device running `from` (None: nothing to seed from)
/// downloads to install `to`: the sum of the range requests
/// `kernex-updater install` makes (`Bundle::delta_from`, by the protocol's
/// request plan: the first read, then per image the index head, the index
/// pages and the chunks it does not hold, as patch frames where the new
/// release carries a patch from the device's image) — what `kernex-image
/// bundle delta` prints. Computed once per pair from the bundles in the
/// blob store (read through `RangeRead`) and kept.
pub async fn release_delta(state: &AppState, from: Option<&str>, to: &str) -> Result<u64> {
    let from_key = from.unwrap_or("");
    if let Some(row) = sqlx::query(
        "SELECT bytes FROM release_deltas WHERE from_release_id = $1 AND to_release_id = $2",
    )
    .bind(from_key)
    .bind(to)
    .fetch_optional(state.store.pool())
    .await?
    {
        let b: i64 = row.try_get("bytes")?;
        return Ok(u64::try_from(b).unwrap_or(0));
    }
    let new = open_release(state, to).await?;
    let old = match from {
        Some(f) => Some(open_release(state, f).await?),
        None => None,
    };
    let (bytes, max_chunk) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64)> {
        let mut new = new;
        let mut old = old;
        let delta = new.delta_from(old.as_mut())?;
        let manifest = new.unverified_manifest().clone();
        let mut max_chunk = 0u64;
        for image in &manifest.images {
            let index = new.read_index(&manifest, image.slot_class)?;
            max_chunk = max_chunk.max(
                index
                    .stored_chunks()
                    .iter()
                    .map(|c| u64::from(c.archive_size))
                    .max()
                    .unwrap_or(0),
            );
        }
        Ok((delta.total_bytes, max_chunk))
    })
    .await
    .map_err(|e| Error::Internal(e.into()))??;
    let b = i64::try_from(bytes).map_err(|e| Error::Internal(e.into()))?;
    let m = i64::try_from(max_chunk).map_err(|e| Error::Internal(e.into()))?;
    let inserted = sqlx::query(
        "INSERT INTO release_deltas (from_release_id, to_release_id, bytes, max_chunk) VALUES ($1, $2, $3, $4)",
    )
    .bind(from_key)
    .bind(to)
    .bind(b)
    .bind(m)
    .execute(state.store.pool())
    .await;
    match inserted {
        Ok(_) => {}
        Err(e) if crate::store::is_unique_violation(&e) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(bytes)
}

/// The releases (ids) the devices of `t` run, for the patch jobs they need.
pub fn from_releases(t: &Targets) -> Vec<String> {
    let mut ids: Vec<String> = t
        .targets
        .iter()
        .filter_map(|d| d.from_release_id.clone())
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Who a spec targets, and why others were left out.
#[derive(Debug, Default)]
pub struct Targets {
    /// In wave order, each wave in diversity order.
    pub targets: Vec<Target>,
    /// Devices per wave.
    pub sizes: Vec<usize>,
    /// Per wave: devices without a TPM the wave passed over because it
    /// requires attestation.
    pub cannot_attest: Vec<u64>,
    /// Per wave: where those went (0-based wave), `None`: left out.
    pub moved_to: Vec<Option<usize>>,
    /// Left out: no TPM, and no wave without the attestation gate follows.
    pub no_tpm_left_out: u64,
    /// Already on the release's version.
    pub already_current: u64,
    /// In another scheduled, running or paused rollout.
    pub busy: u64,
    /// Enrolled under a TPM policy and not yet activated: served nothing,
    /// so never selected.
    pub unactivated: u64,
    /// Selected, but their anti-rollback floor is above the release's
    /// security version: they would refuse it (by device id).
    pub above_floor: Vec<crate::service::anti_rollback::AboveFloor>,
    /// The planner's choice per release the targets run (`None`: unknown),
    /// when computed with the deltas.
    pub plans: HashMap<Option<String>, crate::service::patches::Plan>,
}

/// A device the selector may take, with the columns a target needs.
#[derive(sqlx::FromRow)]
struct Candidate {
    id: String,
    device_id: String,
    current_version: Option<String>,
    link_class: Option<String>,
    site: Option<String>,
    time_zone: Option<String>,
    tpm_required: i64,
    ek_fingerprint: Option<String>,
    security_floor: Option<i64>,
}

/// Selects the devices `spec` targets, with their exact delta bytes
/// (`with_deltas`; else 0), in diversity order.
/// `exclude_rollout` is the rollout itself (not "busy").
pub async fn targets(
    state: &AppState,
    org_id: &str,
    spec: &RolloutSpec,
    release: &ReleaseRef,
    exclude_rollout: Option<&str>,
    with_deltas: bool,
) -> Result<Targets> {
    if let Some(c) = &spec.selector.hardware_class
        && c != &release.compatible
    {
        return Err(Error::Unprocessable(format!(
            "selector.hardware_class {c} does not match the release's {}",
            release.compatible
        )));
    }
    let pool = state.store.pool();
    // Only the columns a target needs (the hardware class is the
    // release's: it is in the WHERE).
    let rows = sqlx::query_as::<_, Candidate>(
        "SELECT id, device_id, current_version, link_class, site, time_zone, tpm_required, ek_fingerprint, security_floor FROM devices WHERE org_id = $1 AND revoked = 0 AND hardware_class = $2",
    )
    .bind(org_id)
    .bind(&release.compatible)
    .fetch_all(pool)
    .await?;
    let mut tags: HashMap<String, HashSet<String>> = HashMap::new();
    if !spec.selector.tags.is_empty() {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT device_pk, tag FROM device_tags WHERE org_id = $1")
                .bind(org_id)
                .fetch_all(pool)
                .await?;
        for (device, tag) in rows {
            tags.entry(device).or_default().insert(tag);
        }
    }
    let busy: Vec<(String,)> = sqlx::query_as(
        "SELECT rd.device_pk FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id WHERE r.org_id = $1 AND r.status IN ('scheduled', 'running', 'paused') AND r.id <> $2",
    )
    .bind(org_id)
    .bind(exclude_rollout.unwrap_or(""))
    .fetch_all(pool)
    .await?;
    let busy: HashSet<String> = busy.into_iter().map(|(pk,)| pk).collect();
    let releases: Vec<(String, String)> =
        sqlx::query_as("SELECT id, version FROM releases WHERE org_id = $1 AND compatible = $2")
            .bind(org_id)
            .bind(&release.compatible)
            .fetch_all(pool)
            .await?;
    let versions: HashMap<String, String> = releases
        .into_iter()
        .map(|(id, version)| (version, id))
        .collect();
    let mut out = Targets::default();
    // Per current version: the release it is and the exact delta from it,
    // computed once per distinct version (not per device).
    let mut deltas: HashMap<Option<String>, (Option<String>, u64)> = HashMap::new();
    let mut plans = HashMap::new();
    for r in rows {
        let pk = r.id;
        if !spec.selector.tags.is_empty() {
            let have = tags.get(&pk);
            if !spec
                .selector
                .tags
                .iter()
                .all(|t| have.is_some_and(|h| h.contains(t)))
            {
                continue;
            }
        }
        let current = r.current_version;
        if !spec.selector.current_versions.is_empty()
            && !current
                .as_ref()
                .is_some_and(|c| spec.selector.current_versions.contains(c))
        {
            continue;
        }
        if current.as_deref() == Some(release.version.as_str()) {
            out.already_current += 1;
            continue;
        }
        let tpm = r.ek_fingerprint.is_some();
        if !tpm && r.tpm_required != 0 {
            // Enrolled under a TPM policy, credential activation not done:
            // it is refused releases, so a wave would wait on it forever.
            out.unactivated += 1;
            continue;
        }
        if busy.contains(&pk) {
            out.busy += 1;
            continue;
        }
        if crate::service::anti_rollback::refuses(r.security_floor, release.security_version) {
            out.above_floor
                .push(crate::service::anti_rollback::AboveFloor {
                    device_id: r.device_id,
                    security_floor: r.security_floor.unwrap_or_default(),
                    version: release.version.clone(),
                    security_version: release.security_version,
                });
            continue;
        }
        let (from, bytes) = match deltas.get(&current) {
            // Only who is targeted was asked (rollout create).
            None if !with_deltas => (current.as_ref().and_then(|v| versions.get(v)).cloned(), 0),
            Some((from, bytes)) => (from.clone(), *bytes),
            None => {
                let from = current.as_ref().and_then(|v| versions.get(v)).cloned();
                // The planner's method and its exact bytes.
                let plan =
                    crate::service::patches::plan(state, from.as_deref(), &release.id).await?;
                plans.insert(from.clone(), plan);
                deltas.insert(current.clone(), (from.clone(), plan.bytes));
                (from, plan.bytes)
            }
        };
        out.targets.push(Target {
            pk,
            device_id: r.device_id,
            hardware_class: release.compatible.clone(),
            link_class: r
                .link_class
                .unwrap_or_else(|| DEFAULT_LINK_CLASS.to_string()),
            site: r.site,
            time_zone: r.time_zone,
            from_release_id: from,
            from_version: current,
            bytes,
            tpm,
        });
    }
    out.plans = plans;
    plan::diversity_order(&mut out.targets);
    let assigned = plan::assign_waves(spec, std::mem::take(&mut out.targets));
    out.targets = assigned.targets;
    out.sizes = assigned.sizes;
    out.cannot_attest = assigned.cannot_attest;
    out.moved_to = assigned.moved_to;
    out.no_tpm_left_out = assigned.left_out.len() as u64;
    Ok(out)
}
