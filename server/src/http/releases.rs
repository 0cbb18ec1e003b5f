//! Releases: signed bundles uploaded by operators, verified against the
//! organisation's keyring before anything is stored, served with `Range`.

use std::fs::File;
use std::path::PathBuf;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::signature::{Keyring, VerifyOptions};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::{Operator, Role};
use crate::blobs::bundle_key;
use crate::http::{ApiJson, Error, Result, audited};
use crate::store::{new_id, now_ms};

/// Routes. The upload route lifts the JSON body limit to the bundle limit.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/releases", post(upload).get(list))
        .route("/releases/{id}", get(detail).delete(remove))
        .route("/releases/{id}/bundle", get(download_operator))
}

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
    /// Uploaded, unix ms.
    pub created_at: i64,
    /// The signed manifest (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub manifest: Option<serde_json::Value>,
}

const COLUMNS: &str =
    "id, version, compatible, signer, size, sha256, unstable, created_at, manifest, blob_key";

fn release(r: &sqlx::any::AnyRow, with_manifest: bool) -> Result<Release> {
    let manifest = if with_manifest {
        let text: String = r.try_get("manifest")?;
        Some(serde_json::from_str(&text).map_err(|e| Error::Internal(e.into()))?)
    } else {
        None
    };
    Ok(Release {
        id: r.try_get("id")?,
        version: r.try_get("version")?,
        compatible: r.try_get("compatible")?,
        signer: r.try_get("signer")?,
        size: r.try_get("size")?,
        sha256: r.try_get("sha256")?,
        unstable: r.try_get::<i64, _>("unstable")? != 0,
        created_at: r.try_get("created_at")?,
        manifest,
    })
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
}

/// Upload a bundle (ops). The body is the `.kxb` file. It is spooled to
/// disk (size-limited), opened, its signature verified against the
/// organisation's keyring and every image checked; only then is it stored.
#[utoipa::path(post, path = "/api/v1/releases", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Release), (status = 403), (status = 409), (status = 413), (status = 422)))]
pub async fn upload(
    State(state): State<AppState>,
    op: Operator,
    body: Body,
) -> Result<(StatusCode, ApiJson<Release>)> {
    op.require(Role::Ops)?;
    state.limits.check(
        &format!("upload:{}", op.user_id),
        state.config.uploads_per_minute,
    )?;
    audited(&state, &op, "release.upload", "release", async {
        let keyring_pem: Option<String> =
            sqlx::query("SELECT keyring_pem FROM organizations WHERE id = $1")
                .bind(&op.org_id)
                .fetch_one(state.store.pool())
                .await?
                .try_get("keyring_pem")?;
        let keyring_pem = keyring_pem.ok_or_else(|| {
            Error::Conflict("the organisation has no keyring: an admin must PUT /api/v1/org/keyring first".into())
        })?;

        // Spool, counting and hashing.
        let limit = state.config.max_bundle_bytes;
        let path = state.spool.join(format!("{}.kxb", new_id()?));
        let spooled = Spooled(path.clone());
        let mut file = tokio::fs::File::create(&path).await?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::BadRequest(format!("upload interrupted: {e}")))?;
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
            let keyring = Keyring::from_pem(keyring_pem.as_bytes())
                .map_err(|e| Error::Conflict(format!("the organisation's keyring is unusable: {e}")))?;
            let file = File::open(&verify_path)?;
            let reject = |e: kernex_protocol::bundle::BundleError| Error::Unprocessable(e.to_string());
            let mut bundle = Bundle::open(file).map_err(reject)?;
            let verified = bundle.verify(&keyring, VerifyOptions::default()).map_err(reject)?;
            bundle.verify_contents(&verified, &|_| {}).map_err(reject)?;
            let m = verified.manifest();
            Ok(Verified {
                version: m.version.to_string(),
                compatible: m.compatible.clone(),
                signer: verified.signer().subject.clone(),
                manifest: String::from_utf8_lossy(verified.bytes()).into_owned(),
            })
        })
        .await
        .map_err(|e| Error::Internal(e.into()))??;

        let exists: i64 = sqlx::query("SELECT COUNT(*) AS n FROM releases WHERE org_id = $1 AND version = $2")
            .bind(&op.org_id)
            .bind(&verified.version)
            .fetch_one(state.store.pool())
            .await?
            .try_get("n")?;
        if exists > 0 {
            return Err(Error::Conflict(format!("release {} already exists", verified.version)));
        }
        let key = bundle_key(&sha256);
        if !state.blobs.exists(&key).await? {
            state.blobs.put_file(&key, &path).await?;
        }
        drop(spooled);
        let id = new_id()?;
        let now = now_ms();
        let size = i64::try_from(size).map_err(|e| Error::Internal(e.into()))?;
        let inserted = sqlx::query(
            "INSERT INTO releases (id, org_id, version, compatible, manifest, signer, blob_key, size, sha256, unstable, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11)",
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
        .execute(state.store.pool())
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if crate::http::error::is_unique_violation(&e) => {
                return Err(Error::Conflict(format!("release {} already exists", verified.version)));
            }
            Err(e) => return Err(e.into()),
        }
        let manifest = serde_json::from_str(&verified.manifest).ok();
        let target = format!("release:{id}");
        Ok((
            (
                StatusCode::CREATED,
                ApiJson(Release {
                    id,
                    version: verified.version,
                    compatible: verified.compatible,
                    signer: verified.signer,
                    size,
                    sha256,
                    unstable: false,
                    created_at: now,
                    manifest,
                }),
            ),
            target,
        ))
    })
    .await
}

/// List releases, newest first.
#[utoipa::path(get, path = "/api/v1/releases", responses((status = 200, body = [Release])))]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Vec<Release>>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM releases WHERE org_id = $1 ORDER BY created_at DESC"
    ))
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    Ok(ApiJson(
        rows.iter()
            .map(|r| release(r, false))
            .collect::<Result<_>>()?,
    ))
}

async fn find(state: &AppState, org_id: &str, id: &str) -> Result<sqlx::any::AnyRow> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM releases WHERE id = $1 AND org_id = $2"
    ))
    .bind(id)
    .bind(org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound("no such release"))
}

/// Inspect a release, with its manifest.
#[utoipa::path(get, path = "/api/v1/releases/{id}", responses((status = 200, body = Release), (status = 404)))]
pub async fn detail(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Release>> {
    Ok(ApiJson(release(
        &find(&state, &op.org_id, &id).await?,
        true,
    )?))
}

/// Delete a release (ops): only if no device and no deployment uses it.
#[utoipa::path(delete, path = "/api/v1/releases/{id}",
    responses((status = 204), (status = 403), (status = 404), (status = 409)))]
pub async fn remove(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    op.require(Role::Ops)?;
    audited(&state, &op, "release.delete", &format!("release:{id}"), async {
        let row = find(&state, &op.org_id, &id).await?;
        let key: String = row.try_get("blob_key")?;
        let used: i64 = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM devices WHERE desired_release_id = $1) + (SELECT COUNT(*) FROM deployments WHERE release_id = $1) AS n",
        )
        .bind(&id)
        .fetch_one(state.store.pool())
        .await?
        .try_get("n")?;
        if used > 0 {
            return Err(Error::Conflict("the release is used by a deployment or a device".into()));
        }
        sqlx::query("DELETE FROM releases WHERE id = $1 AND org_id = $2")
            .bind(&id)
            .bind(&op.org_id)
            .execute(state.store.pool())
            .await?;
        let others: i64 = sqlx::query("SELECT COUNT(*) AS n FROM releases WHERE blob_key = $1")
            .bind(&key)
            .fetch_one(state.store.pool())
            .await?
            .try_get("n")?;
        if others == 0 {
            state.blobs.delete(&key).await?;
        }
        Ok((StatusCode::NO_CONTENT, String::new()))
    })
    .await
}

/// Download a release's bundle (operator), with `Range`.
#[utoipa::path(get, path = "/api/v1/releases/{id}/bundle", responses((status = 200), (status = 206), (status = 416)))]
pub async fn download_operator(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    serve_bundle(&state, &op.org_id, &id, &headers).await
}

/// Serves a release's bundle with `Range` support.
pub async fn serve_bundle(
    state: &AppState,
    org_id: &str,
    id: &str,
    headers: &HeaderMap,
) -> Result<Response> {
    let row = find(state, org_id, id).await?;
    let key: String = row.try_get("blob_key")?;
    let size =
        u64::try_from(row.try_get::<i64, _>("size")?).map_err(|e| Error::Internal(e.into()))?;
    let sha256: String = row.try_get("sha256")?;
    // S3: send the client to a presigned URL; the bucket serves Range.
    let ttl = std::time::Duration::from_secs(state.config.presign_ttl_secs);
    if let Some(url) = state.blobs.presigned_get(&key, ttl).await? {
        let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
        let location = HeaderValue::from_str(&url).map_err(|e| Error::Internal(e.into()))?;
        response.headers_mut().insert(header::LOCATION, location);
        return Ok(response);
    }
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| Error::RangeNotSatisfiable(size))?;
            Some(parse_range(v, size).ok_or(Error::RangeNotSatisfiable(size))?)
        }
    };
    let stream = state.blobs.get(&key, range.clone()).await?;
    let mut response = Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{sha256}\"")) {
        h.insert(header::ETAG, etag);
    }
    let (status, length) = match &range {
        Some(r) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{size}", r.start, r.end - 1))
            {
                h.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, r.end - r.start)
        }
        None => (StatusCode::OK, size),
    };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    *response.status_mut() = status;
    Ok(response)
}

/// Parses one `bytes=` range against a resource of `size` bytes into a
/// half-open range; `None` when malformed, multiple or unsatisfiable.
pub fn parse_range(value: &str, size: u64) -> Option<std::ops::Range<u64>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        let n: u64 = end.parse().ok()?;
        if n == 0 {
            return None;
        }
        size.saturating_sub(n)..size
    } else {
        let s: u64 = start.parse().ok()?;
        let e: u64 = if end.is_empty() {
            size.checked_sub(1)?
        } else {
            end.parse::<u64>().ok()?.min(size.checked_sub(1)?)
        };
        if s > e || s >= size {
            return None;
        }
        s..e + 1
    };
    (range.start < range.end).then_some(range)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(0..10));
        assert_eq!(parse_range("bytes=90-", 100), Some(90..100));
        assert_eq!(parse_range("bytes=-5", 100), Some(95..100));
        assert_eq!(parse_range("bytes=50-500", 100), Some(50..100));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=9-3", 100), None);
        assert_eq!(parse_range("bytes=0-1,4-5", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=-0", 100), None);
        assert_eq!(parse_range("bytes=x-1", 100), None);
    }
}
