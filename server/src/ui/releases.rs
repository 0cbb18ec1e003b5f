//! Releases: list, upload (the script sends the file to `upload`, which
//! runs the API's upload), manifest, and the delta between two releases.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kernex_protocol::manifest::Manifest;
use maud::{Markup, html};
use serde::Deserialize;

use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{CsrfHeader, Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::http::Error;
use crate::service::Error as ServiceError;
use crate::service::releases::{self, Release};
use crate::service::users::require;

async fn all(state: &AppState, s: &Session) -> UiResult<Vec<Release>> {
    Ok(releases::list(state, &s.op).await?)
}

fn release_select(name: &str, label: &str, list: &[Release], current: Option<&str>) -> Markup {
    html! {
        div.field {
            label for=(name) { (label) }
            select #(name) name=(name) required {
                @for r in list {
                    option value=(r.id) selected[current == Some(r.id.as_str())] { (r.version) " (" (r.compatible) ")" }
                }
            }
        }
    }
}

/// `GET /ui/releases`.
pub async fn list(State(state): State<AppState>, s: Session) -> UiResult {
    let list = all(&state, &s).await?;
    let limit = state.config.max_bundle_bytes;
    Ok(layout::page(
        &s,
        Nav::Releases,
        "Releases",
        html! {
            (heading("Releases", None))
            @if s.can(Role::Ops) {
                section.panel {
                    h2 { "Upload a release" }
                    form #upload method="post" action="/ui/releases/upload" enctype="application/octet-stream" data-upload {
                        div.field {
                            label for="bundle" { "Signed bundle (.kxb), at most " (format::bytes(limit)) }
                            input #bundle type="file" name="bundle" accept=".kxb,application/octet-stream" required;
                        }
                        div.field.actions { button.primary type="submit" { "Upload" } }
                        div.upload-status {
                            progress #upload-progress value="0" max="1" aria-label="Upload progress" hidden {}
                            output #upload-result for="bundle" aria-live="polite" {}
                        }
                        noscript { p.small { "Uploading needs JavaScript; without it use the API: "
                            code { "curl --data-binary @release.kxb -H 'authorization: Bearer …' /api/v1/releases" } } }
                    }
                    p.small { "The bundle is verified against the organisation's keyring and every image is checked before it is stored." }
                }
            }
            @if list.is_empty() { p.empty { "No release yet." } } @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Version" } th scope="col" { "Hardware class" } th scope="col" { "Size" }
                        th scope="col" { "Signer" } th scope="col" { "State" } th scope="col" { "Uploaded" } } }
                    tbody { @for r in &list { tr {
                        td { a href={ "/ui/releases/" (r.id) } { (r.version) } }
                        td { (r.compatible) }
                        td { (format::ibytes(r.size)) }
                        td.small { (r.signer) }
                        td { @if r.unstable { (status_badge("unstable")) } @else { (status_badge("ok")) } }
                        td { (format::time(r.created_at)) }
                    } } }
                } }
                @if list.len() >= 2 {
                    section.panel {
                        h2 { "Delta between two releases" }
                        p.small { "What a device running the first release downloads to install the second: the chunks it does not hold, from the stored chunk indexes." }
                        form.filters method="get" action="/ui/releases/delta" {
                            (release_select("from", "From", &list, list.get(1).map(|r| r.id.as_str())))
                            (release_select("to", "To", &list, list.first().map(|r| r.id.as_str())))
                            div.field.actions { button type="submit" { "Compute delta" } }
                        }
                    }
                }
            }
        },
    ))
}

/// `POST /ui/releases/upload`: the body is the bundle; the CSRF token is in
/// the `X-CSRF-Token` header. Answers the API's JSON (the script shows
/// it), under the API's role check and upload rate limit.
pub async fn upload(
    State(state): State<AppState>,
    s: Session,
    _csrf: CsrfHeader,
    body: Body,
) -> Response {
    let admitted = require(&s.op, Role::Ops)
        .map_err(Error::from)
        .and_then(|()| {
            state
                .limits
                .check(
                    &format!("upload:{}", s.op.user_id),
                    state.config.uploads_per_minute,
                )
                .map_err(Error::from)
        });
    if let Err(e) = admitted {
        return e.into_response();
    }
    match releases::upload(&state, &s.op, body.into_data_stream()).await {
        Ok(created) => (StatusCode::CREATED, axum::Json(created)).into_response(),
        Err(e) => Error::from(e).into_response(),
    }
}

/// `GET /ui/releases/{id}`: the release and its signed manifest.
pub async fn detail(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> UiResult {
    detail_page(&state, &s, &id, None).await
}

/// `POST /ui/releases/{id}/delete` (ops): deletes a release no device and
/// no deployment uses; refused, the release page says why.
pub async fn delete(State(state): State<AppState>, Path(id): Path<String>, form: Form) -> UiResult {
    match releases::remove(&state, &form.session.op, &id).await {
        Ok(()) => Ok(see_other("/ui/releases")),
        Err(
            crate::service::Error::Conflict(why)
            | crate::service::Error::Invalid(why)
            | crate::service::Error::Refused(why),
        ) => {
            let page = detail_page(&state, &form.session, &id, Some(&why)).await?;
            Ok((axum::http::StatusCode::CONFLICT, page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

async fn detail_page(state: &AppState, s: &Session, id: &str, refusal: Option<&str>) -> UiResult {
    let r = releases::detail(state, &s.op, id).await?;
    let raw = r.manifest.clone().unwrap_or_default();
    let typed: Option<Manifest> = serde_json::from_value(raw.clone()).ok();
    let pretty = serde_json::to_string_pretty(&raw).unwrap_or_default();
    let jobs = super::patch_jobs::of(state, s, id).await?;
    Ok(layout::page(
        s,
        Nav::Releases,
        &r.version,
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/releases" { "Releases" } " / " (r.version) }
            (heading(&format!("Release {}", r.version), Some(html! { (r.compatible) " · uploaded " (format::time(r.created_at)) })))
            @if let Some(why) = refusal { p.notice #refused role="alert" { "Not deleted: " (why) "." } }
            @if s.can(Role::Ops) {
                div.actions-bar {
                    a.button #roll-out href={ "/ui/rollouts?release=" (r.id) "#new-rollout" } { "Roll out this release" }
                    " "
                    form.inline method="post" action={ "/ui/releases/" (r.id) "/delete" } data-confirm={ "Delete release " (r.version) "? Only a release no device and no deployment uses can go." } {
                        (csrf_field(s))
                        button.danger type="submit" { "Delete release" }
                    }
                }
            }
            dl.facts {
                dt { "State" } dd { @if r.unstable { (status_badge("unstable")) " failed installs were reported" } @else { (status_badge("ok")) } }
                dt { "Signer" } dd { (r.signer) }
                dt { "Bundle size" } dd { (format::ibytes(r.size)) }
                dt { "SHA-256" } dd.mono { (r.sha256) }
                @if let Some(m) = &typed {
                    dt { "Minimum updater" } dd { (m.min_updater_version) }
                }
            }
            @if let Some(m) = &typed {
                h2 { "Images" }
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Slot class" } th scope="col" { "Filesystem" } th scope="col" { "Size" } th scope="col" { "SHA-256" } th scope="col" { "Chunk index" } } }
                    tbody { @for i in &m.images { tr {
                        td { (i.slot_class.as_str()) }
                        td { (serde_json::to_value(i.filesystem).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()) }
                        td { (format::bytes(i.size)) }
                        td.mono.small { (i.sha256.to_string()) }
                        td { (format::bytes(i.index.size)) }
                    } } }
                } }
                @if !m.metadata.is_empty() {
                    h2 { "Metadata" }
                    dl.facts { @for (k, v) in &m.metadata { dt { (k) } dd { (v) } } }
                }
                @if let Some(h) = &m.health {
                    h2 { "Health spec" }
                    pre { (serde_json::to_string_pretty(h).unwrap_or_default()) }
                }
            }
            (super::patch_jobs::section(s, &r.id, &jobs))
            details {
                summary { "Signed manifest (JSON)" }
                pre { (pretty) }
            }
            p { a href={ "/api/v1/releases/" (r.id) "/bundle" } download { "Download the bundle" } }
        },
    ))
}

/// Delta query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaQuery {
    from: Option<String>,
    to: Option<String>,
}

/// `GET /ui/releases/delta?from=&to=`.
pub async fn delta(
    State(state): State<AppState>,
    s: Session,
    query: Result<Query<DeltaQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let Ok(Query(q)) = query else {
        return Err(UiError::bad_request(
            "This address has a parameter the delta page does not know; its parameters are from and to.",
        ));
    };
    let (Some(from), Some(to)) = (q.from, q.to) else {
        return Err(UiError::bad_request(
            "Choose the two releases (from and to).",
        ));
    };
    let releases::ReleaseDelta {
        from_version: old_version,
        from_class: old_class,
        to_version: new_version,
        to_class: new_class,
        delta: d,
    } = releases::delta(&state, &s.op, &from, &to)
        .await
        .map_err(|e| match e {
            ServiceError::Unprocessable(detail) => UiError::page(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Delta unavailable",
                detail,
            ),
            e => e.into(),
        })?;
    let list = all(&state, &s).await?;
    let saved = if d.full_bundle_bytes > 0 {
        100.0 - d.total_bytes as f64 * 100.0 / d.full_bundle_bytes as f64
    } else {
        0.0
    };
    Ok(layout::page(
        &s,
        Nav::Releases,
        "Delta",
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/releases" { "Releases" } " / delta" }
            (heading(&format!("{old_version} → {new_version}"), None))
            @if old_class != new_class {
                p.notice role="status" { "These releases are for different hardware classes (" (old_class) ", " (new_class) "): no device installs one over the other." }
            }
            div.cards {
                div.card data-delta-total=(d.total_bytes) { span.big { (format::bytes(d.total_bytes)) } span { "downloaded per device" } }
                div.card { span.big { (format::bytes(d.full_bundle_bytes)) } span { "full bundle" } }
                div.card { span.big { (format!("{saved:.0} %")) } span { "saved" } }
            }
            div.table-wrap { table {
                thead { tr { th scope="col" { "Image" } th scope="col" { "Image size" } th scope="col" { "Chunks fetched" }
                    th scope="col" { "Chunk bytes" } th scope="col" { "Chunks patched" } th scope="col" { "Patch bytes" }
                    th scope="col" { "Chunks reused" } th scope="col" { "Index bytes" } } }
                tbody { @for i in &d.images { tr {
                    td { (i.slot_class.as_str()) } td { (format::bytes(i.image_size)) }
                    td { (i.delta.chunks_fetched) } td { (format::bytes(i.delta.chunk_bytes)) }
                    td { (i.delta.chunks_patched) } td { (format::bytes(i.delta.patch_table_bytes + i.delta.patch_bytes)) }
                    td { (i.delta.chunks_reused) }
                    td { (format::bytes(i.delta.index_head_bytes + i.delta.index_page_bytes)) }
                } } }
            } }
            @if list.len() >= 2 {
                form.filters method="get" action="/ui/releases/delta" {
                    (release_select("from", "From", &list, Some(&from)))
                    (release_select("to", "To", &list, Some(&to)))
                    div.field.actions { button type="submit" { "Compute delta" } }
                }
            }
        },
    ))
}
