//! Devices as operators see them: list with filters, detail, tags, revoke
//! (`service::devices::fleet`).

use axum::Router;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Operator;
use crate::http::{ApiJson, Result};
use crate::service::devices::fleet;
pub use crate::service::devices::fleet::{Device, DeviceFilter, DeviceLogEntry, LogFilter};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/devices", get(list))
        .route("/devices/{id}", get(detail))
        .route("/devices/{id}/revoke", post(revoke))
        .route("/devices/{id}/tags", put(set_tags))
        .route("/devices/{id}/logs", get(logs))
}

/// List devices, filtered and searched, in device id order, one page at a
/// time (keyset paging: the `Link: <...>; rel="next"` header carries the
/// next page's URL while there is one). `X-Total-Count` is how many
/// devices match the filter, on every page. Every filter value is a bound
/// parameter.
#[utoipa::path(get, path = "/api/v1/devices", params(DeviceFilter), responses(
    (status = 200, body = [Device], headers(
        ("X-Total-Count" = i64, description = "How many devices match the filter (all pages)"),
        ("Link" = String, description = "`<URL>; rel=\"next\"`: the next page, absent on the last"),
    )),
    (status = 400, description = "A bad filter value or cursor")))]
pub async fn list(
    State(state): State<AppState>,
    op: Operator,
    RawQuery(raw): RawQuery,
    filter: Result<Query<DeviceFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Response> {
    let Query(f) = filter?;
    let page = fleet::page(&state, &op, &f).await?;
    let mut headers = HeaderMap::new();
    headers.insert("x-total-count", HeaderValue::from(page.total));
    if let Some(next) = &page.next
        && let Ok(v) = HeaderValue::from_str(&format!(
            "<{}>; rel=\"next\"",
            next_url("/api/v1/devices", raw.as_deref(), next)
        ))
    {
        headers.insert(header::LINK, v);
    }
    Ok((headers, ApiJson(page.devices)).into_response())
}

/// `path?query` with `after` replaced by `cursor` (the other parameters
/// kept as sent, so the next page has the same filter).
pub fn next_url(path: &str, query: Option<&str>, cursor: &str) -> String {
    let mut parts: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("after=") && *p != "after")
        .collect();
    let after = format!("after={cursor}");
    parts.push(&after);
    format!("{path}?{}", parts.join("&"))
}

/// A device in detail, with its latest inventory.
#[utoipa::path(get, path = "/api/v1/devices/{id}", responses((status = 200, body = Device), (status = 404)))]
pub async fn detail(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<ApiJson<Device>> {
    Ok(ApiJson(fleet::detail(&state, &op, &id).await?))
}

/// Revoke a device's credential (ops): its requests get 401 from now on.
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", responses((status = 204), (status = 403), (status = 404)))]
pub async fn revoke(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    fleet::revoke(&state, &op, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A device's tags, replaced as a whole.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceTags {
    /// The tags (at most 64; 1-64 characters of letters, digits and ._:=-).
    pub tags: Vec<String>,
}

/// Replace a device's tags (ops): what rollout selectors and the device
/// list filter on.
#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", request_body = DeviceTags,
    responses((status = 204), (status = 400), (status = 403), (status = 404)))]
pub async fn set_tags(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<DeviceTags>,
) -> Result<StatusCode> {
    fleet::set_tags(&state, &op, &id, req.tags).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A device's log lines, newest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/logs", params(LogFilter),
    responses((status = 200, body = [DeviceLogEntry]), (status = 404)))]
pub async fn logs(
    State(state): State<AppState>,
    op: Operator,
    Path(id): Path<String>,
    filter: Result<Query<LogFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<Vec<DeviceLogEntry>>> {
    let Query(f) = filter?;
    Ok(ApiJson(fleet::logs(&state, &op, &id, &f).await?))
}
