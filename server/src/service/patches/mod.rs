//! The delta planner: per device, the cheapest way from the release it
//! runs to the one it is given, and the chunk patches the server builds
//! itself so that the cheapest way exists without a vendor flag.
//!
//! Methods ([`Method`]), for a device running release F installing T:
//!
//! * `full`: nothing to seed from (F unknown): the whole archive.
//! * `chunk-delta`: the chunks of T that F's image lacks, from the archive
//!   (and, when T's bundle carries a vendor patch from F's image, its
//!   frames: `bundle-patch`).
//! * `server-patch`: as `chunk-delta`, plus a patch the server built from
//!   F's image for every image T's bundle carries no patch from.
//!
//! Bytes are exact: each is the sum of the range requests the updater makes
//! (`Bundle::delta_from_offered`, the protocol's request plan). The planner
//! picks the fewest bytes; on a tie the method with less work on the device
//! (no patch frame to decode against the booted slot, fewer requests):
//! `chunk-delta`/`bundle-patch` before `server-patch`. A seeded delta is
//! never more than `full` (it fetches a subset of the same requests), so a
//! device with a known release never gets `full`.
//!
//! * [`enqueue`]: when a rollout or a deployment is made, one job per
//!   (T, F, image class) that needs a patch, in the same transaction that
//!   targets the devices (so no device can be admitted before its job
//!   exists).
//! * [`build`]: the background builder (one job at a time per replica,
//!   claimed with a lease), progress in `done_bytes`/`total_bytes`.
//! * [`plan`]: the method and bytes for a pair; [`offers`]: what a device's
//!   poll answer offers; [`waiting`]: a patch of the pair is still being
//!   built (the device is not started).
//! * [`gc`]: patches of base releases no device runs any more.
//! * [`retry`]: an operator puts a failed job back in the queue.
//! * [`per_device`]: a deployment's preview, the choice per device.

pub mod build;
mod gc;
pub mod per_device;
mod retry;

pub use gc::gc;
pub use retry::retry;

use kernex_protocol::Manifest;
use kernex_protocol::api::{ServerPatch, paths};
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::AppState;
use crate::service::rollouts::scheduler::Tx;
use crate::service::{Error, Result};
use crate::store::new_id;

/// How a device gets a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The whole archive (nothing to seed from).
    Full,
    /// The chunks it lacks, from the archive.
    ChunkDelta,
    /// The chunks it lacks, patched by the vendor's patch in the bundle.
    BundlePatch,
    /// The chunks it lacks, patched by a patch the server built.
    ServerPatch,
}

impl Method {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::ChunkDelta => "chunk-delta",
            Method::BundlePatch => "bundle-patch",
            Method::ServerPatch => "server-patch",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Method::Full,
            Method::ChunkDelta,
            Method::BundlePatch,
            Method::ServerPatch,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// The planner's choice for a pair of releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// How.
    pub method: Method,
    /// Exact bytes the device downloads that way.
    pub bytes: u64,
    /// A patch of the pair is still being built: `method` and `bytes` are
    /// what the device would get now (the chunk delta), not yet final.
    pub building: bool,
}

/// A patch job, as operators see it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PatchJob {
    /// Id.
    pub id: String,
    /// The release it installs.
    pub to_release_id: String,
    /// The release it is from (the base).
    pub from_release_id: String,
    /// Its version.
    pub from_version: String,
    /// Image class.
    pub slot_class: String,
    /// `pending`, `building`, `ready`, `empty` (nothing of the new image
    /// resembles the base), `failed`.
    pub status: String,
    /// Patch size (ready).
    pub size: Option<i64>,
    /// Progress: image bytes read so far.
    pub done_bytes: i64,
    /// Image bytes to read.
    pub total_bytes: i64,
    /// Why it failed.
    pub error: Option<String>,
}

fn parse_manifest(text: &str) -> Result<Manifest> {
    Manifest::from_slice(text.as_bytes())
        .map_err(|e| Error::Internal(anyhow::anyhow!("stored manifest unreadable: {e}")))
}

/// Makes the patch jobs a device on each of `from_ids` needs to install
/// `to_release_id`: one per image class whose image changed and which
/// the new bundle carries no patch from. Existing jobs are kept. Runs in
/// the caller's transaction (the one that targets the devices). Returns
/// how many were added; start [`build::spawn`] once it commits.
pub async fn enqueue(
    tx: &mut Tx,
    server_patches: bool,
    org_id: &str,
    to_release_id: &str,
    from_ids: &[String],
    now: i64,
) -> Result<u64> {
    if !server_patches {
        return Ok(0);
    }
    let Some((to_text,)): Option<(String,)> =
        sqlx::query_as("SELECT manifest FROM releases WHERE id = $1 AND org_id = $2")
            .bind(to_release_id)
            .bind(org_id)
            .fetch_optional(&mut **tx)
            .await?
    else {
        return Ok(0);
    };
    let to = parse_manifest(&to_text)?;
    let mut ids: Vec<&String> = from_ids.iter().filter(|f| *f != to_release_id).collect();
    ids.sort();
    ids.dedup();
    let mut added = 0;
    for from in ids {
        let Some((text, version)): Option<(String, String)> = sqlx::query_as(
            "SELECT manifest, version FROM releases WHERE id = $1 AND org_id = $2 AND compatible = $3",
        )
        .bind(from)
        .bind(org_id)
        .bind(&to.compatible)
        .fetch_optional(&mut **tx)
        .await?
        else {
            continue;
        };
        let base = parse_manifest(&text)?;
        for image in &to.images {
            let Some(old) = base.image(image.slot_class) else {
                continue;
            };
            if old.sha256 == image.sha256 || image.patch_from(&old.sha256).is_some() {
                continue;
            }
            let inserted = sqlx::query(
                "INSERT INTO server_patches (id, org_id, to_release_id, from_release_id, slot_class, base_sha256, base_version, status, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $8) ON CONFLICT (to_release_id, from_release_id, slot_class) DO NOTHING",
            )
            .bind(new_id()?)
            .bind(org_id)
            .bind(to_release_id)
            .bind(from)
            .bind(image.slot_class.as_str())
            .bind(old.sha256.to_hex())
            .bind(&version)
            .bind(now)
            .execute(&mut **tx)
            .await?;
            added += inserted.rows_affected();
        }
    }
    Ok(added)
}

/// True while a patch a device on `from` needs to install `to` is being
/// built: the device must not start yet.
pub async fn waiting(state: &AppState, from: &str, to: &str) -> Result<bool> {
    let row = sqlx::query(
        "SELECT 1 AS one FROM server_patches WHERE from_release_id = $1 AND to_release_id = $2 AND status IN ('pending', 'building')",
    )
    .bind(from)
    .bind(to)
    .fetch_optional(state.store.pool())
    .await?;
    Ok(row.is_some())
}

/// A ready patch of a pair.
struct Ready {
    id: String,
    class: kernex_protocol::SlotClass,
    patch: kernex_protocol::manifest::PatchRef,
    blob_key: String,
}

async fn ready(state: &AppState, from: &str, to: &str) -> Result<Vec<Ready>> {
    let rows = sqlx::query(
        "SELECT id, slot_class, base_sha256, base_version, size, table_size, table_sha256, blob_key FROM server_patches \
         WHERE from_release_id = $1 AND to_release_id = $2 AND status = 'ready' ORDER BY slot_class",
    )
    .bind(from)
    .bind(to)
    .fetch_all(state.store.pool())
    .await?;
    let bad = |what: &str| Error::Internal(anyhow::anyhow!("server patch row: bad {what}"));
    let mut out = Vec::new();
    for r in rows {
        let class: String = r.try_get("slot_class")?;
        let digest = |col: &str| -> Result<kernex_protocol::Sha256Digest> {
            let hex: String = r.try_get(col)?;
            hex.parse().map_err(|_| bad(col))
        };
        let size = |col: &str| -> Result<u64> {
            let n: i64 = r.try_get(col)?;
            u64::try_from(n).map_err(|_| bad(col))
        };
        let version: String = r.try_get("base_version")?;
        out.push(Ready {
            id: r.try_get("id")?,
            class: class.parse().map_err(|_| bad("slot_class"))?,
            patch: kernex_protocol::manifest::PatchRef {
                base_sha256: digest("base_sha256")?,
                base_version: version.parse().map_err(|_| bad("base_version"))?,
                size: size("size")?,
                table_size: size("table_size")?,
                table_sha256: digest("table_sha256")?,
            },
            blob_key: r.try_get("blob_key")?,
        });
    }
    Ok(out)
}

/// The planner's choice for a device running `from` (None: unknown, or
/// nothing to seed from) installing `to`: computed from the bundles once
/// every patch of the pair is built, and kept.
pub async fn plan(state: &AppState, from: Option<&str>, to: &str) -> Result<Plan> {
    let chunk = crate::service::rollouts::release_delta(state, from, to).await?;
    let Some(from) = from else {
        return Ok(Plan {
            method: Method::Full,
            bytes: chunk,
            building: false,
        });
    };
    if let Some(row) = sqlx::query(
        "SELECT method, bytes FROM release_plans WHERE from_release_id = $1 AND to_release_id = $2",
    )
    .bind(from)
    .bind(to)
    .fetch_optional(state.store.pool())
    .await?
        && let Some(method) = Method::parse(&row.try_get::<String, _>("method")?)
    {
        return Ok(Plan {
            method,
            bytes: u64::try_from(row.try_get::<i64, _>("bytes")?).unwrap_or(0),
            building: false,
        });
    }
    let (base_text,): (String,) = sqlx::query_as("SELECT manifest FROM releases WHERE id = $1")
        .bind(from)
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::NotFound("no such release"))?;
    let (to_text,): (String,) = sqlx::query_as("SELECT manifest FROM releases WHERE id = $1")
        .bind(to)
        .fetch_optional(state.store.pool())
        .await?
        .ok_or(Error::NotFound("no such release"))?;
    let (base, new) = (parse_manifest(&base_text)?, parse_manifest(&to_text)?);
    let vendor = new.images.iter().any(|i| {
        base.image(i.slot_class)
            .is_some_and(|b| i.patch_from(&b.sha256).is_some())
    });
    // Images the server makes a patch of ([`enqueue`]'s rule).
    let needed = new
        .images
        .iter()
        .filter(|i| {
            base.image(i.slot_class)
                .is_some_and(|b| b.sha256 != i.sha256 && i.patch_from(&b.sha256).is_none())
        })
        .count() as i64;
    let delta = Plan {
        method: if vendor {
            Method::BundlePatch
        } else {
            Method::ChunkDelta
        },
        bytes: chunk,
        building: false,
    };
    // Not final while a job of the pair is not done, or not even made
    // yet (a preview before the rollout exists): nothing is kept then.
    let (jobs,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) AS n FROM server_patches WHERE from_release_id = $1 AND to_release_id = $2",
    )
    .bind(from)
    .bind(to)
    .fetch_one(state.store.pool())
    .await?;
    if (state.config.server_patches && jobs < needed) || waiting(state, from, to).await? {
        return Ok(Plan {
            building: true,
            ..delta
        });
    }
    let ready = ready(state, from, to).await?;
    let chosen = if ready.is_empty() {
        delta
    } else {
        let offered = offered_tables(state, &ready).await?;
        let patched = offered_delta(state, from, to, offered).await?;
        // Fewest bytes; on a tie the device's work decides (no frames to
        // decode, no extra requests): the plain delta.
        if patched < chunk {
            Plan {
                method: Method::ServerPatch,
                bytes: patched,
                building: false,
            }
        } else {
            delta
        }
    };
    let inserted = sqlx::query(
        "INSERT INTO release_plans (from_release_id, to_release_id, method, bytes) VALUES ($1, $2, $3, $4)",
    )
    .bind(from)
    .bind(to)
    .bind(chosen.method.as_str())
    .bind(i64::try_from(chosen.bytes).map_err(|e| Error::Internal(e.into()))?)
    .execute(state.store.pool())
    .await;
    match inserted {
        Ok(_) => {}
        Err(e) if crate::store::is_unique_violation(&e) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(chosen)
}

/// The ready patches with their tables, read from the blob store.
async fn offered_tables(
    state: &AppState,
    ready: &[Ready],
) -> Result<Vec<kernex_protocol::offered::Offered>> {
    let mut out = Vec::new();
    for r in ready {
        let table = build::read_blob(state, &r.blob_key, 0..r.patch.table_size).await?;
        out.push(kernex_protocol::offered::Offered {
            class: r.class,
            patch: r.patch.clone(),
            table,
        });
    }
    Ok(out)
}

/// Exact bytes a device on `from` fetches to install `to` using `offered`.
async fn offered_delta(
    state: &AppState,
    from: &str,
    to: &str,
    offered: Vec<kernex_protocol::offered::Offered>,
) -> Result<u64> {
    let new = crate::service::rollouts::open_release(state, to).await?;
    let old = crate::service::rollouts::open_release(state, from).await?;
    tokio::task::spawn_blocking(move || {
        let (mut new, mut old) = (new, old);
        new.delta_from_offered(Some(&mut old), &offered)
            .map(|d| d.total_bytes)
    })
    .await
    .map_err(|e| Error::Internal(e.into()))?
    .map_err(|e| Error::Internal(anyhow::anyhow!("planning {from} -> {to}: {e}")))
}

/// What a device on `from` is offered with `to` in its poll answer: the
/// server's patches of the pair, when the planner chose them.
pub async fn offers(state: &AppState, from: Option<&str>, to: &str) -> Result<Vec<ServerPatch>> {
    let Some(from) = from else {
        return Ok(Vec::new());
    };
    if plan(state, Some(from), to).await?.method != Method::ServerPatch {
        return Ok(Vec::new());
    }
    Ok(ready(state, from, to)
        .await?
        .into_iter()
        .map(|r| ServerPatch {
            slot_class: r.class,
            url: paths::server_patch(to, &r.id),
            base_sha256: r.patch.base_sha256,
            base_version: r.patch.base_version,
            size: r.patch.size,
            table_size: r.patch.table_size,
            table_sha256: r.patch.table_sha256,
        })
        .collect())
}

/// The release id of the version a device runs (its hardware class's).
pub async fn running_release(
    state: &AppState,
    org_id: &str,
    version: Option<&str>,
    compatible: &str,
) -> Result<Option<String>> {
    let Some(version) = version else {
        return Ok(None);
    };
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT id FROM releases WHERE org_id = $1 AND version = $2 AND compatible = $3",
    )
    .bind(org_id)
    .bind(version)
    .bind(compatible)
    .fetch_optional(state.store.pool())
    .await?;
    Ok(row.map(|(id,)| id))
}

/// The patch jobs of the releases a device installs `to` from, for
/// operators (progress).
pub async fn jobs(state: &AppState, org_id: &str, to: &str) -> Result<Vec<PatchJob>> {
    let rows = sqlx::query(
        "SELECT p.id, p.to_release_id, p.from_release_id, p.base_version, p.slot_class, p.status, p.size, p.done_bytes, p.total_bytes, p.error \
         FROM server_patches p WHERE p.org_id = $1 AND p.to_release_id = $2 ORDER BY p.created_at, p.slot_class",
    )
    .bind(org_id)
    .bind(to)
    .fetch_all(state.store.pool())
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(PatchJob {
                id: r.try_get("id")?,
                to_release_id: r.try_get("to_release_id")?,
                from_release_id: r.try_get("from_release_id")?,
                from_version: r.try_get("base_version")?,
                slot_class: r.try_get("slot_class")?,
                status: r.try_get("status")?,
                size: r.try_get("size")?,
                done_bytes: r.try_get("done_bytes")?,
                total_bytes: r.try_get("total_bytes")?,
                error: r.try_get("error")?,
            })
        })
        .collect()
}

/// The blob of the ready patch `id` of release `to` in the organisation:
/// (key, size, sha256 of the patch for its ETag).
pub async fn blob(
    state: &AppState,
    org_id: &str,
    to: &str,
    id: &str,
) -> Result<(String, u64, String)> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT blob_key, size FROM server_patches WHERE id = $1 AND org_id = $2 AND to_release_id = $3 AND status = 'ready'",
    )
    .bind(id)
    .bind(org_id)
    .bind(to)
    .fetch_optional(state.store.pool())
    .await?;
    let (key, size) = row.ok_or(Error::NotFound("no such patch"))?;
    let sha = key.rsplit('/').next().unwrap_or_default().to_string();
    Ok((
        key,
        u64::try_from(size).map_err(|e| Error::Internal(e.into()))?,
        sha,
    ))
}
