//! Garbage collection of server-made patches: a patch is kept while some
//! device of the organisation runs its base release (or a live rollout
//! still has a device from it that has not finished); then its row goes,
//! its pair's plan is forgotten, and its blob goes once no other row
//! shares it (blobs are content-addressed: two pairs can make the same
//! patch). Rows whose releases were deleted go too.

use sqlx::Row;

use crate::AppState;
use crate::service::Result;

/// Removes the patches no device needs any more; returns how many.
pub async fn gc(state: &AppState) -> Result<u64> {
    let rows = sqlx::query(
        "SELECT p.id, p.blob_key, p.from_release_id, p.to_release_id FROM server_patches p \
         LEFT JOIN releases fr ON fr.id = p.from_release_id \
         LEFT JOIN releases tr ON tr.id = p.to_release_id \
         WHERE p.status NOT IN ('pending', 'building') AND (fr.id IS NULL OR tr.id IS NULL OR ( \
           NOT EXISTS (SELECT 1 FROM devices d WHERE d.org_id = p.org_id AND d.revoked = 0 \
                       AND d.hardware_class = fr.compatible AND d.current_version = fr.version) \
           AND NOT EXISTS (SELECT 1 FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id \
                       WHERE rd.from_release_id = p.from_release_id AND r.release_id = p.to_release_id \
                       AND r.status IN ('scheduled', 'running', 'paused') \
                       AND rd.state IN ('pending', 'scheduled', 'downloading'))))",
    )
    .fetch_all(state.store.pool())
    .await?;
    let mut removed = 0;
    for r in rows {
        let id: String = r.try_get("id")?;
        let key: Option<String> = r.try_get("blob_key")?;
        let from: String = r.try_get("from_release_id")?;
        let to: String = r.try_get("to_release_id")?;
        sqlx::query("DELETE FROM server_patches WHERE id = $1")
            .bind(&id)
            .execute(state.store.pool())
            .await?;
        sqlx::query("DELETE FROM release_plans WHERE from_release_id = $1 AND to_release_id = $2")
            .bind(&from)
            .bind(&to)
            .execute(state.store.pool())
            .await?;
        removed += 1;
        let Some(key) = key else { continue };
        let (others,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) AS n FROM server_patches WHERE blob_key = $1")
                .bind(&key)
                .fetch_one(state.store.pool())
                .await?;
        if others == 0 {
            state.blobs.delete(&key).await?;
        }
        tracing::info!(patch = %id, %from, %to, "server patch collected: no device runs its base");
    }
    Ok(removed)
}
