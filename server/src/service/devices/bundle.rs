//! A device's bundle download: which blob of which release it may fetch.

use crate::AppState;
use crate::auth::Device;
use crate::service::{Error, Result};

/// A release's bundle in the blob store.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Its key in the blob store.
    pub blob_key: String,
    /// Its size, bytes.
    pub size: u64,
    /// Hex SHA-256 of the bundle (its ETag).
    pub sha256: String,
}

#[derive(Debug, sqlx::FromRow)]
struct BundleRow {
    blob_key: String,
    size: i64,
    sha256: String,
}

/// The bundle of release `release_id` of the device's organisation;
/// refused for a device that must prove its TPM first.
pub async fn find(state: &AppState, device: &Device, release_id: &str) -> Result<Bundle> {
    device.require_proven()?;
    let row = sqlx::query_as::<_, BundleRow>(
        "SELECT blob_key, size, sha256 FROM releases WHERE id = $1 AND org_id = $2",
    )
    .bind(release_id)
    .bind(&device.org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound("no such release"))?;
    Ok(Bundle {
        blob_key: row.blob_key,
        size: u64::try_from(row.size).map_err(|e| Error::Internal(e.into()))?,
        sha256: row.sha256,
    })
}
