//! Releases: signed bundles uploaded by operators, verified against the
//! organisation's keyring before anything is stored; listed, inspected,
//! removed when unused, and compared (the delta between two).

use std::fs::File;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use kernex_protocol::bundle::{Bundle, BundleDelta};
use kernex_protocol::signature::{Keyring, VerifyOptions};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::FromRow;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use super::audit::Audited;
use super::users::{keyring_pem, require};
use super::{Error, Result};
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::blobs::bundle_key;
use crate::store::{new_id, now_ms};

/// A release.
#[derive(Debug, Serialize, ToSchema)]
pub struct Release {
    /// Id.
    pub id: String,
    /// Version (semver, unique in the organisation).
    pub version: String,
    /// Hardware class.
    pub compatible: String,
    /// Signer certificate subject.
    pub signer: String,
    /// Bundle size in bytes.
    pub size: i64,
    /// SHA-256 of the bundle file.
    pub sha256: String,
    /// Marked unstable after failures.
    pub unstable: bool,
    /// The manifest's anti-rollback generation: devices whose floor is
    /// above it refuse the release.
    pub security_version: i64,
    /// Uploaded, unix ms.
    pub created_at: i64,
    /// The signed manifest (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub manifest: Option<serde_json::Value>,
}

const COLUMNS: &str = "id, version, compatible, signer, size, sha256, unstable, security_version, created_at, manifest, blob_key";

/// A stored release.
#[derive(Debug, FromRow)]
struct ReleaseRow {
    id: String,
    version: String,
    compatible: String,
    signer: String,
    size: i64,
    sha256: String,
    unstable: i64,
    security_version: i64,
    created_at: i64,
    manifest: String,
    blob_key: String,
}

impl ReleaseRow {
    fn release(self, with_manifest: bool) -> Result<Release> {
        let manifest = if with_manifest {
            Some(serde_json::from_str(&self.manifest).map_err(|e| Error::Internal(e.into()))?)
        } else {
            None
        };
        Ok(Release {
            id: self.id,
            version: self.version,
            compatible: self.compatible,
            signer: self.signer,
            size: self.size,
            sha256: self.sha256,
            unstable: self.unstable != 0,
            security_version: self.security_version,
            created_at: self.created_at,
            manifest,
        })
    }
}

/// A spooled upload, removed when dropped.
struct Spooled(PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What verification found.
struct Verified {
    version: String,
    compatible: String,
    signer: String,
    manifest: String,
    security_version: i64,
}

/// Stores an uploaded bundle (ops). `body` is the `.kxb` file. It is
/// spooled to disk (size-limited), opened, its signature verified against
/// the organisation's keyring and every image checked; only then is it
/// stored.
pub async fn upload<S, E>(state: &AppState, op: &Operator, body: S) -> Result<Release>
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    require(op, Role::Ops)?;
    // Spooled and verified outside the transaction (it takes as long as
    // the upload); only the row is written in it.
    let prepare = async {
        let keyring_pem = keyring_pem(state, &op.org_id).await?.ok_or_else(|| {
            Error::Conflict(
                "the organisation has no keyring: an admin must PUT /api/v1/org/keyring first"
                    .into(),
            )
        })?;

        // Spool, counting and hashing.
        let limit = state.config.max_bundle_bytes;
        let path = state.spool.join(format!("{}.kxb", new_id()?));
        let spooled = Spooled(path.clone());
        let mut file = tokio::fs::File::create(&path).await?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut stream = body;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::Invalid(format!("upload interrupted: {e}")))?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(Error::TooLarge(limit));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        let sha256 = hex::encode(hasher.finalize());

        // Verify off the async threads.
        let verify_path = path.clone();
        let verified = tokio::task::spawn_blocking(move || -> Result<Verified> {
            let keyring = Keyring::from_pem(keyring_pem.as_bytes()).map_err(|e| {
                Error::Conflict(format!("the organisation's keyring is unusable: {e}"))
            })?;
            let file = File::open(&verify_path)?;
            let reject =
                |e: kernex_protocol::bundle::BundleError| Error::Unprocessable(e.to_string());
            let mut bundle = Bundle::open(file).map_err(reject)?;
            let verified = bundle
                .verify(&keyring, VerifyOptions::default())
                .map_err(reject)?;
            bundle.verify_contents(&verified, &|_| {}).map_err(reject)?;
            let m = verified.manifest();
            Ok(Verified {
                version: m.version.to_string(),
                compatible: m.compatible.clone(),
                signer: verified.signer().subject.clone(),
                manifest: String::from_utf8_lossy(verified.bytes()).into_owned(),
                // Bounded by the manifest's own limit, far below i64::MAX.
                security_version: i64::try_from(m.security_version)
                    .map_err(|e| Error::Unprocessable(format!("security-version: {e}")))?,
            })
        })
        .await
        .map_err(|e| Error::Internal(e.into()))??;

        let (exists,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) AS n FROM releases WHERE org_id = $1 AND version = $2")
                .bind(&op.org_id)
                .bind(&verified.version)
                .fetch_one(state.store.pool())
                .await?;
        if exists > 0 {
            return Err(Error::Conflict(format!(
                "release {} already exists",
                verified.version
            )));
        }
        let key = bundle_key(&sha256);
        if !state.blobs.exists(&key).await? {
            state.blobs.put_file(&key, &path).await?;
        }
        drop(spooled);
        Ok((verified, key, sha256, size))
    };
    let audit = Audited::new(state, op, "release.upload", "release");
    let (verified, key, sha256, size): (Verified, String, String, u64) = match prepare.await {
        Ok(prepared) => prepared,
        Err(e) => return audit.fail(e).await,
    };
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
            let id = new_id()?;
            let now = now_ms();
            let size = i64::try_from(size).map_err(|e| Error::Internal(e.into()))?;
            let inserted = sqlx::query(
            "INSERT INTO releases (id, org_id, version, compatible, manifest, signer, blob_key, size, sha256, unstable, created_by, created_at, security_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11, $12)",
        )
        .bind(&id)
        .bind(&op.org_id)
        .bind(&verified.version)
        .bind(&verified.compatible)
        .bind(&verified.manifest)
        .bind(&verified.signer)
        .bind(&key)
        .bind(size)
        .bind(&sha256)
        .bind(&op.user_id)
        .bind(now)
        .bind(verified.security_version)
        .execute(&mut *tx)
        .await;
            match inserted {
                Ok(_) => {}
                Err(e) if crate::store::is_unique_violation(&e) => {
                    return Err(Error::Conflict(format!(
                        "release {} already exists",
                        verified.version
                    )));
                }
                Err(e) => return Err(e.into()),
            }
            let manifest = serde_json::from_str(&verified.manifest).ok();
            let target = format!("release:{id}");
            Ok((
                Release {
                    id,
                    version: verified.version,
                    compatible: verified.compatible,
                    signer: verified.signer,
                    size,
                    sha256,
                    unstable: false,
                    security_version: verified.security_version,
                    created_at: now,
                    manifest,
                },
                target,
            ))
        }
    .await;
    audit.finish(tx, outcome).await
}

/// The organisation's releases, newest first.
pub async fn list(state: &AppState, op: &Operator) -> Result<Vec<Release>> {
    let rows = sqlx::query_as::<_, ReleaseRow>(&format!(
        "SELECT {COLUMNS} FROM releases WHERE org_id = $1 ORDER BY created_at DESC"
    ))
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    rows.into_iter().map(|r| r.release(false)).collect()
}

async fn find(state: &AppState, org_id: &str, id: &str) -> Result<ReleaseRow> {
    sqlx::query_as::<_, ReleaseRow>(&format!(
        "SELECT {COLUMNS} FROM releases WHERE id = $1 AND org_id = $2"
    ))
    .bind(id)
    .bind(org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound("no such release"))
}

/// A release with its manifest.
pub async fn detail(state: &AppState, op: &Operator, id: &str) -> Result<Release> {
    find(state, &op.org_id, id).await?.release(true)
}

/// Deletes a release (ops): only if no device and no deployment uses it.
/// The bundle goes when no other release shares it.
pub async fn remove(state: &AppState, op: &Operator, id: &str) -> Result<()> {
    require(op, Role::Ops)?;
    let target = format!("release:{id}");
    let prepare = async { Ok(find(state, &op.org_id, id).await?.blob_key) };
    let audit_target = &target;
    let audit = Audited::new(state, op, "release.delete", audit_target);
    let key = match prepare.await {
        Ok(prepared) => prepared,
        Err(e) => return audit.fail(e).await,
    };
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let (used,): (i64,) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM devices WHERE desired_release_id = $1) + (SELECT COUNT(*) FROM deployments WHERE release_id = $1) AS n",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if used > 0 {
            return Err(Error::Conflict(
                "the release is used by a deployment or a device".into(),
            ));
        }
        sqlx::query("DELETE FROM releases WHERE id = $1 AND org_id = $2")
            .bind(id)
            .bind(&op.org_id)
            .execute(&mut *tx)
            .await?;
        let (others,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) AS n FROM releases WHERE blob_key = $1")
                .bind(&key)
                .fetch_one(&mut *tx)
                .await?;
        Ok(((others == 0).then_some(key), String::new()))
    }
    .await;
    let orphan = audit.finish(tx, outcome).await?;
    // Committed: the bundle goes when no release uses it any more.
    if let Some(key) = orphan {
        state.blobs.delete(&key).await?;
    }
    Ok(())
}

/// Where a release's bundle is stored.
#[derive(Debug)]
pub struct BundleBlob {
    /// Blob store key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the bundle.
    pub sha256: String,
}

/// The bundle of a release of the organisation `org_id` (404 if none).
pub async fn bundle(state: &AppState, org_id: &str, id: &str) -> Result<BundleBlob> {
    let row = find(state, org_id, id).await?;
    Ok(BundleBlob {
        size: u64::try_from(row.size).map_err(|e| Error::Internal(e.into()))?,
        key: row.blob_key,
        sha256: row.sha256,
    })
}

/// What a device running one release downloads to install another.
#[derive(Debug)]
pub struct ReleaseDelta {
    /// The installed release's version.
    pub from_version: String,
    /// Its hardware class.
    pub from_class: String,
    /// The new release's version.
    pub to_version: String,
    /// Its hardware class.
    pub to_class: String,
    /// Bytes per image and in total, from the chunk indexes.
    pub delta: BundleDelta,
}

/// The delta from release `from` to release `to`, from their stored
/// bundles' heads and chunk indexes, read by range from the blob store
/// (as the rollout preview does): nothing is copied, whatever the bundles'
/// size (422 when they cannot be compared).
pub async fn delta(state: &AppState, op: &Operator, from: &str, to: &str) -> Result<ReleaseDelta> {
    let old = find(state, &op.org_id, from).await?;
    let new = find(state, &op.org_id, to).await?;
    let unreadable =
        |e: Error| Error::Unprocessable(format!("The stored bundles could not be compared: {e}"));
    let old_bundle = super::rollouts::open_release(state, &old.id)
        .await
        .map_err(unreadable)?;
    let new_bundle = super::rollouts::open_release(state, &new.id)
        .await
        .map_err(unreadable)?;
    let delta = tokio::task::spawn_blocking(move || {
        let mut old = old_bundle;
        let mut new = new_bundle;
        // Both were verified at upload; the indexes are checked against
        // them.
        new.delta_from(Some(&mut old))
    })
    .await
    .map_err(|e| anyhow::anyhow!("delta task failed: {e}"))?
    .map_err(|e| Error::Unprocessable(format!("The stored bundles could not be compared: {e}")))?;
    Ok(ReleaseDelta {
        from_version: old.version,
        from_class: old.compatible,
        to_version: new.version,
        to_class: new.compatible,
        delta,
    })
}
