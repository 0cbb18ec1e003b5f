//! Releases: signed bundles uploaded by operators, verified against the
//! organisation's keyring before anything is stored (`service::releases`),
//! served with `Range`.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::AppState;
use crate::auth::{Operator, Role};
use crate::http::{ApiJson, Error, Result};
use crate::service::releases;
pub use crate::service::releases::Release;
use crate::service::users::require;

/// Routes. The upload route lifts the JSON body limit to the bundle limit.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/releases", post(upload).get(list))
        .route("/releases/{id}", get(detail).delete(remove))
        .route("/releases/{id}/bundle", get(download_operator))
        .route("/releases/{id}/patches", get(patch_jobs))
        .route("/releases/{id}/patches/{job}/retry", post(retry_patch_job))
}

/// Build a failed server patch job again (ops, audited): devices of its
/// pair that have not started wait for it, then get the cheaper method.
#[utoipa::path(post, path = "/api/v1/releases/{id}/patches/{job}/retry",
    responses((status = 204), (status = 403), (status = 404), (status = 409)))]
pub async fn retry_patch_job(
    State(state): State<AppState>,
    op: Operator,
    Path((id, job)): Path<(String, String)>,
) -> Result<StatusCode> {
    crate::service::patches::retry(&state, &op, &id, &job).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The patches the server builds for devices installing this release
/// (the delta planner), with their progress.
#[utoipa::path(get, path = "/api/v1/releases/{id}/patches",
    responses((status = 200, body = [crate::service::patches::PatchJob]), (status = 404)))]
pub async fn patch_jobs(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Vec<crate::service::patches::PatchJob>>> {
    releases::detail(&state, &op, &id).await?;
    Ok(ApiJson(
        crate::service::patches::jobs(&state, &op.org_id, &id).await?,
    ))
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
    require(&op, Role::Ops)?;
    state.limits.check(
        &format!("upload:{}", op.user_id),
        state.config.uploads_per_minute,
    )?;
    let release = releases::upload(&state, &op, body.into_data_stream()).await?;
    Ok((StatusCode::CREATED, ApiJson(release)))
}

/// List releases, newest first.
#[utoipa::path(get, path = "/api/v1/releases", responses((status = 200, body = [Release])))]
pub async fn list(State(state): State<AppState>, op: Operator) -> Result<ApiJson<Vec<Release>>> {
    Ok(ApiJson(releases::list(&state, &op).await?))
}

/// Inspect a release, with its manifest.
#[utoipa::path(get, path = "/api/v1/releases/{id}", responses((status = 200, body = Release), (status = 404)))]
pub async fn detail(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Release>> {
    Ok(ApiJson(releases::detail(&state, &op, &id).await?))
}

/// Delete a release (ops): only if no device and no deployment uses it.
#[utoipa::path(delete, path = "/api/v1/releases/{id}",
    responses((status = 204), (status = 403), (status = 404), (status = 409)))]
pub async fn remove(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    releases::remove(&state, &op, &id).await?;
    Ok(StatusCode::NO_CONTENT)
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
    let releases::BundleBlob { key, size, sha256 } = releases::bundle(state, org_id, id).await?;
    serve_blob(state, &key, size, &sha256, headers).await
}

/// Serves blob `key` (`size` bytes, ETag `sha256`) with `Range` support:
/// from the blob store, or a redirect to a presigned URL (S3).
pub async fn serve_blob(
    state: &AppState,
    key: &str,
    size: u64,
    sha256: &str,
    headers: &HeaderMap,
) -> Result<Response> {
    let key = key.to_string();
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
