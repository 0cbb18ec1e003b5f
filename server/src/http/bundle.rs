//! Serving a bundle over HTTP: a redirect to a presigned URL when the blob
//! store has them (S3: the bucket serves `Range`), else the bytes, whole
//! or one `Range`, with `Accept-Ranges`, an `ETag` (the SHA-256) and the
//! length.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::http::releases::parse_range;
use crate::http::{Error, Result};
use crate::service::devices::bundle::Bundle;

/// Answers a `GET` of `bundle` with the request's `headers` (`Range`).
pub async fn serve(state: &AppState, bundle: &Bundle, headers: &HeaderMap) -> Result<Response> {
    let size = bundle.size;
    let ttl = std::time::Duration::from_secs(state.config.presign_ttl_secs);
    if let Some(url) = state.blobs.presigned_get(&bundle.blob_key, ttl).await? {
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
    let stream = state.blobs.get(&bundle.blob_key, range.clone()).await?;
    let mut response = Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", bundle.sha256)) {
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
