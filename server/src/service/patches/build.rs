//! The background patch builder: claims one pending job at a time (a
//! lease in the row, so replicas share the queue and a job whose builder
//! died is taken over), extracts the base and the new image from their
//! bundles in the blob store (both verified against the organisation's
//! keyring), builds the patch with the protocol's builder
//! (`kernex_protocol::patch::build_patch_from`, as `kernex-image bundle create
//! --patch-from` does) on a blocking thread, and stores it as a
//! content-addressed blob (`patches/<sha256>`). Progress (image bytes
//! read) is written to the row as it goes.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Mutex;

use futures_util::StreamExt;
use kernex_protocol::SlotClass;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::patch::build_patch_from;
use kernex_protocol::signature::{Keyring, VerifyOptions};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::AppState;
use crate::service::{Error, Result};

/// zstd level of server-made frames (as `kernex-image`'s default: made
/// once, fetched by every device on the base).
pub const PATCH_LEVEL: i32 = 19;
/// How long a claim holds, ms; renewed with each progress write.
const LEASE_MS: i64 = 10 * 60 * 1000;

/// Replicas (by instance id) whose builder loop runs in this process.
static RUNNING: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Starts the builder loop of this replica unless it runs already: it
/// builds pending jobs until none is left.
pub fn spawn(state: &AppState) {
    if !state.config.server_patches {
        return;
    }
    {
        let Ok(mut running) = RUNNING.lock() else {
            return;
        };
        if !running
            .get_or_insert_with(HashSet::new)
            .insert(state.instance_id.clone())
        {
            return;
        }
    }
    let state = state.clone();
    tokio::spawn(async move {
        let failed = loop {
            match work(&state).await {
                Ok(true) => continue,
                Ok(false) => break false,
                Err(e) => {
                    tracing::warn!(error = format!("{e}"), "patch builder pass failed");
                    break true;
                }
            }
        };
        // Done: step out, then look once more (a job enqueued while this
        // loop was finishing would otherwise wait for the next scheduler
        // pass). After a failure the next scheduler pass tries again.
        if let Ok(mut running) = RUNNING.lock()
            && let Some(r) = running.as_mut()
        {
            r.remove(&state.instance_id);
        }
        if !failed && matches!(next(&state).await, Ok(Some(_))) {
            spawn(&state);
        }
    });
}

/// Runs [`super::gc`] at most once a minute per replica (the scheduler
/// pass calls it); failures are logged.
pub async fn collect_now_and_then(state: &AppState) {
    static LAST: Mutex<Option<std::collections::HashMap<String, i64>>> = Mutex::new(None);
    let now = crate::store::now_ms();
    {
        let Ok(mut last) = LAST.lock() else { return };
        let map = last.get_or_insert_with(Default::default);
        if map
            .get(&state.instance_id)
            .is_some_and(|&t| now - t < 60_000)
        {
            return;
        }
        map.insert(state.instance_id.clone(), now);
    }
    if let Err(e) = super::gc(state).await {
        tracing::warn!(error = %e, "server patch collection failed");
    }
}

/// The next job this replica may claim.
async fn next(state: &AppState) -> Result<Option<String>> {
    let now = crate::store::now_ms();
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT id FROM server_patches WHERE status = 'pending' OR (status = 'building' AND claimed_until < $1) ORDER BY created_at LIMIT 1",
    )
    .bind(now)
    .fetch_optional(state.store.pool())
    .await?;
    Ok(row.map(|(id,)| id))
}

/// Claims and builds one job; false when there was none.
pub async fn work(state: &AppState) -> Result<bool> {
    let Some(id) = next(state).await? else {
        return Ok(false);
    };
    let now = crate::store::now_ms();
    let claimed = sqlx::query(
        "UPDATE server_patches SET status = 'building', claimed_by = $1, claimed_until = $2, updated_at = $3 \
         WHERE id = $4 AND (status = 'pending' OR (status = 'building' AND claimed_until < $3))",
    )
    .bind(&state.instance_id)
    .bind(now + LEASE_MS)
    .bind(now)
    .bind(&id)
    .execute(state.store.pool())
    .await?;
    if claimed.rows_affected() != 1 {
        return Ok(true); // another replica took it
    }
    let outcome = build_job(state, &id).await;
    let now = crate::store::now_ms();
    match outcome {
        Ok(Some((key, size, table_size, table_sha256))) => {
            sqlx::query(
                "UPDATE server_patches SET status = 'ready', blob_key = $1, size = $2, table_size = $3, table_sha256 = $4, done_bytes = total_bytes, error = NULL, updated_at = $5 WHERE id = $6",
            )
            .bind(&key)
            .bind(i64::try_from(size).map_err(|e| Error::Internal(e.into()))?)
            .bind(i64::try_from(table_size).map_err(|e| Error::Internal(e.into()))?)
            .bind(&table_sha256)
            .bind(now)
            .bind(&id)
            .execute(state.store.pool())
            .await?;
        }
        Ok(None) => {
            sqlx::query(
                "UPDATE server_patches SET status = 'empty', done_bytes = total_bytes, updated_at = $1 WHERE id = $2",
            )
            .bind(now)
            .bind(&id)
            .execute(state.store.pool())
            .await?;
        }
        Err(e) => {
            tracing::warn!(patch = %id, error = %e, "server patch not built; devices get the chunk delta");
            sqlx::query(
                "UPDATE server_patches SET status = 'failed', error = $1, updated_at = $2 WHERE id = $3",
            )
            .bind(e.to_string())
            .bind(now)
            .bind(&id)
            .execute(state.store.pool())
            .await?;
        }
    }
    replan(state, &id).await?;
    Ok(true)
}

/// Once the last job of a pair is done: the pair's plan is final; the
/// pending devices of its rollouts get its bytes, and polls see it.
async fn replan(state: &AppState, id: &str) -> Result<()> {
    let row =
        sqlx::query("SELECT from_release_id, to_release_id FROM server_patches WHERE id = $1")
            .bind(id)
            .fetch_one(state.store.pool())
            .await?;
    let from: String = row.try_get("from_release_id")?;
    let to: String = row.try_get("to_release_id")?;
    if super::waiting(state, &from, &to).await? {
        return Ok(());
    }
    let plan = super::plan(state, Some(&from), &to).await?;
    tracing::info!(%from, %to, method = plan.method.as_str(), bytes = plan.bytes, "update planned");
    sqlx::query(
        "UPDATE rollout_devices SET delta_bytes = $1 WHERE from_release_id = $2 AND state = 'pending' \
         AND rollout_id IN (SELECT id FROM rollouts WHERE release_id = $3)",
    )
    .bind(i64::try_from(plan.bytes).map_err(|e| Error::Internal(e.into()))?)
    .bind(&from)
    .bind(&to)
    .execute(state.store.pool())
    .await?;
    crate::poll_cache::forget_all(state).await;
    Ok(())
}

/// Reads `range` of blob `key`.
pub async fn read_blob(
    state: &AppState,
    key: &str,
    range: std::ops::Range<u64>,
) -> Result<Vec<u8>> {
    let mut stream = state.blobs.get(key, Some(range)).await?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(|e| Error::Internal(e.into()))?);
    }
    Ok(out)
}

/// A built patch: blob key, size, table size and table SHA-256 (hex);
/// None when nothing of the new image resembles the base.
type Built = Option<(String, u64, u64, String)>;

async fn build_job(state: &AppState, id: &str) -> Result<Built> {
    let row = sqlx::query(
        "SELECT org_id, to_release_id, from_release_id, slot_class FROM server_patches WHERE id = $1",
    )
    .bind(id)
    .fetch_one(state.store.pool())
    .await?;
    let org: String = row.try_get("org_id")?;
    let to: String = row.try_get("to_release_id")?;
    let from: String = row.try_get("from_release_id")?;
    let class: String = row.try_get("slot_class")?;
    let class: SlotClass = class
        .parse()
        .map_err(|e: String| Error::Internal(anyhow::anyhow!(e)))?;
    let pem = crate::service::users::keyring_pem(state, &org)
        .await?
        .ok_or_else(|| Error::Conflict("the organisation has no keyring".into()))?;
    let base = crate::service::rollouts::open_release(state, &from).await?;
    let new = crate::service::rollouts::open_release(state, &to).await?;
    let spool = state.spool.clone();
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
    let task = tokio::task::spawn_blocking(move || {
        build_blocking(&pem, base, new, class, &spool, &|done, total| {
            let _ = progress_tx.send((done, total));
        })
    });
    // Progress into the row as it arrives, every 8 MiB of image read.
    let mut last = 0u64;
    while let Some((done, total)) = progress_rx.recv().await {
        if done < last + (8 << 20) && done < total {
            continue;
        }
        last = done;
        sqlx::query(
            "UPDATE server_patches SET done_bytes = $1, total_bytes = $2, claimed_until = $3 WHERE id = $4",
        )
        .bind(i64::try_from(done).unwrap_or(i64::MAX))
        .bind(i64::try_from(total).unwrap_or(i64::MAX))
        .bind(crate::store::now_ms() + LEASE_MS)
        .bind(id)
        .execute(state.store.pool())
        .await?;
    }
    let member = task.await.map_err(|e| Error::Internal(e.into()))??;
    let Some((member, table_size)) = member else {
        return Ok(None);
    };
    let sha = hex::encode(Sha256::digest(member.as_slice()));
    let table_sha = hex::encode(Sha256::digest(&member.as_slice()[..table_size as usize]));
    let key = format!("patches/{sha}");
    if !state.blobs.exists(&key).await? {
        let mut file = tempfile::NamedTempFile::new_in(&state.spool)?;
        file.write_all(&member)?;
        file.flush()?;
        state.blobs.put_file(&key, file.path()).await?;
    }
    Ok(Some((key, member.len() as u64, table_size, table_sha)))
}

/// The patch member (table then frames) and its table size; None when it
/// would be empty.
fn build_blocking(
    keyring_pem: &str,
    mut base: Bundle<crate::service::rollouts::BlobRange>,
    mut new: Bundle<crate::service::rollouts::BlobRange>,
    class: SlotClass,
    spool: &std::path::Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Option<(Vec<u8>, u64)>> {
    let fail = |what: &str, e: &dyn std::fmt::Display| Error::Unprocessable(format!("{what}: {e}"));
    let keyring = Keyring::from_pem(keyring_pem.as_bytes()).map_err(|e| fail("keyring", &e))?;
    let vb = base
        .verify(&keyring, VerifyOptions::default())
        .map_err(|e| fail("base bundle", &e))?;
    let vn = new
        .verify(&keyring, VerifyOptions::default())
        .map_err(|e| fail("new bundle", &e))?;
    let base_size = vb.image(class).map_or(0, |e| e.size);
    let new_size = vn.image(class).map_or(0, |e| e.size);
    let total = base_size + new_size;
    // Both images in spool files: the builder reads the base by ranges
    // and the new image chunk by chunk, so memory stays bounded whatever
    // the image size.
    let mut base_image = tempfile::tempfile_in(spool)?;
    base.extract_image(&vb, class, &mut base_image, &|n| progress(n, total))
        .map_err(|e| fail("base image", &e))?;
    let mut file = tempfile::tempfile_in(spool)?;
    new.extract_image(&vn, class, &mut file, &|n| progress(base_size + n, total))
        .map_err(|e| fail("new image", &e))?;
    let base_index = base
        .read_index(vb.manifest(), class)
        .map_err(|e| fail("base index", &e))?;
    let new_index = new
        .read_index(vn.manifest(), class)
        .map_err(|e| fail("new index", &e))?;
    let read_chunk = |at: u64, len: u32| -> std::io::Result<Vec<u8>> {
        file.seek(SeekFrom::Start(at))?;
        let mut buf = vec![0u8; len as usize];
        file.read_exact(&mut buf)?;
        Ok(buf)
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let (table, data, _) = build_patch_from(
        &base_image,
        &base_index,
        &new_index,
        read_chunk,
        PATCH_LEVEL,
        threads,
        &|_, _| {},
    )
    .map_err(|e| fail("building the patch", &e))?;
    progress(total, total);
    if table.entries.is_empty() {
        return Ok(None);
    }
    let mut member = table.encode();
    let table_size = member.len() as u64;
    member.extend_from_slice(&data);
    Ok(Some((member, table_size)))
}
