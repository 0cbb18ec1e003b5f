//! Deployments (assign a release to devices, with a confirmation step).
//! Enrollment tokens are `ui::tokens`.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use maud::{Markup, html};
use serde::Deserialize;

use super::charts;
use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::deployments::{self, Deployment, NewDeployment};
use crate::service::devices::fleet::{self, Device, DeviceFilter};
use crate::service::releases::{self, Release};

async fn releases_of(state: &AppState, s: &Session) -> UiResult<Vec<Release>> {
    Ok(releases::list(state, &s.op).await?)
}

/// Devices the deployment picker lists at most (the device list selects
/// any number through its filters).
const PICKER: i64 = 500;

/// Query of the deployments page.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentsQuery {
    release: Option<String>,
}

/// `GET /ui/deployments`: the deployments and, for ops, the form to assign
/// a release (pick the release first: only compatible devices are listed).
pub async fn deployments(
    State(state): State<AppState>,
    s: Session,
    query: Result<Query<DeploymentsQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let Ok(Query(q)) = query else {
        return Err(UiError::bad_request(
            "This address has a parameter the deployments page does not know; its only one is release.",
        ));
    };
    deployments_page(&state, &s, q.release, None).await
}

/// The deployments and the form (with `error` above the device choice, a
/// 400, when the form was refused).
async fn deployments_page(
    state: &AppState,
    s: &Session,
    release: Option<String>,
    error: Option<&str>,
) -> UiResult {
    let list = deployments::list(state, &s.op).await?;
    let releases = releases_of(state, s).await?;
    let versions: HashMap<&str, &str> = releases
        .iter()
        .map(|r| (r.id.as_str(), r.version.as_str()))
        .collect();
    let chosen = release
        .as_deref()
        .and_then(|id| releases.iter().find(|r| r.id == id));
    let (candidates, matching): (Vec<Device>, i64) = match chosen {
        Some(r) => {
            let page = fleet::page(
                state,
                &s.op,
                &DeviceFilter {
                    hardware_class: Some(r.compatible.clone()),
                    limit: Some(PICKER),
                    ..DeviceFilter::default()
                },
            )
            .await?;
            let list = page.devices.into_iter().filter(|d| !d.revoked).collect();
            (list, page.total)
        }
        None => (Vec::new(), 0),
    };
    let page = layout::page(
        s,
        Nav::Deployments,
        "Deployments",
        html! {
            (heading("Deployments", Some(html! { "Assign a release to chosen devices at once. For staged waves with health gates and a bandwidth budget, use a rollout." })))
            @if s.can(Role::Ops) {
                section.panel {
                    h2 { "New deployment" }
                    @if releases.is_empty() {
                        p.empty { "Upload a release first." }
                    } @else {
                        @if let Some(e) = error { p.error #deploy-error role="alert" { (e) } }
                        form.filters method="get" action="/ui/deployments" {
                            div.field {
                                label for="release" { "Release" }
                                select #release name="release" {
                                    @for r in &releases {
                                        option value=(r.id) selected[chosen.is_some_and(|c| c.id == r.id)] {
                                            (r.version) " (" (r.compatible) ")" @if r.unstable { " — unstable" }
                                        }
                                    }
                                }
                            }
                            div.field.actions { button type="submit" { "Choose devices" } }
                        }
                        @if let Some(r) = chosen {
                            form method="post" action="/ui/deployments/confirm" {
                                (csrf_field(s))
                                input type="hidden" name="release_id" value=(r.id);
                                fieldset {
                                    legend { "Devices (" (r.compatible) ")" }
                                    @if candidates.is_empty() { p.empty { "No enrolled " (r.compatible) " device." } }
                                    @else {
                                        div.check {
                                            input #select-all type="checkbox" data-select-all="device";
                                            label for="select-all" { "Select all listed" }
                                        }
                                    }
                                    @if matching > PICKER {
                                        p.small { "The first " (PICKER) " of " (matching) " " (r.compatible) " devices. To choose among all, filter the "
                                            a href={ "/ui/devices?hardware_class=" (format::url_encode(&r.compatible)) } { "device list" } " and deploy from there." }
                                    }
                                    @for d in &candidates {
                                        div.check {
                                            input type="checkbox" name="device" value=(d.id) id={ "dev-" (d.id) };
                                            label for={ "dev-" (d.id) } { (d.device_id) " — " (d.current_version.as_deref().unwrap_or("unknown")) " " (status_badge(&d.status)) }
                                        }
                                    }
                                }
                                div.field {
                                    label for="description" { "Description" }
                                    input #description type="text" name="description" maxlength="500";
                                }
                                button.primary type="submit" disabled[candidates.is_empty()] { "Review deployment" }
                            }
                        }
                    }
                }
            }
            @if list.is_empty() { p.empty { "No deployment yet." } } @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Deployment" } th scope="col" { "Release" } th scope="col" { "Status" } th scope="col" { "Description" } th scope="col" { "Created" } } }
                    tbody { @for d in &list { tr {
                        td { a href={ "/ui/deployments/" (d.id) } { (d.id.get(..8).unwrap_or(&d.id)) } }
                        td { (versions.get(d.release_id.as_str()).copied().unwrap_or("deleted")) }
                        td { (status_badge(&d.status)) }
                        td { (d.description) }
                        td { (format::time(d.created_at)) }
                    } } }
                } }
            }
        },
    );
    Ok(if error.is_some() {
        (axum::http::StatusCode::BAD_REQUEST, page).into_response()
    } else {
        page
    })
}

fn new_deployment(form: &Form) -> UiResult<NewDeployment> {
    let release_id = form.required("release_id", "The release")?.to_string();
    let devices = form.all("device");
    if devices.is_empty() {
        return Err(UiError::bad_request("Choose at least one device."));
    }
    Ok(NewDeployment {
        release_id,
        devices,
        description: form.get("description").unwrap_or("").to_string(),
    })
}

/// `POST /ui/deployments/confirm`: shows what will happen, with a button
/// that really deploys.
pub async fn confirm_deploy(State(state): State<AppState>, form: Form) -> UiResult {
    let s = &form.session;
    if !s.can(Role::Ops) {
        return Err(UiError::forbidden());
    }
    if form.all("device").is_empty() {
        let release = form.get("release_id").map(str::to_string);
        return deployments_page(&state, s, release, Some("Choose at least one device.")).await;
    }
    let req = new_deployment(&form)?;
    let release = releases::detail(&state, &s.op, &req.release_id).await?;
    let all = fleet::named(&state, &s.op, &req.devices).await?;
    let by_id: BTreeMap<&str, &Device> = all.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut chosen = Vec::new();
    for id in &req.devices {
        match by_id.get(id.as_str()) {
            Some(d) => chosen.push(*d),
            None => {
                return Err(UiError::not_found(
                    "One of the chosen devices does not exist.",
                ));
            }
        }
    }
    Ok(layout::page(
        s,
        Nav::Deployments,
        "Confirm deployment",
        html! {
            (heading("Confirm deployment", None))
            section.panel.confirm {
                p { "Deploy release " strong { (release.version) } " (" (release.compatible) ", " (format::ibytes(release.size)) ") to "
                    strong { (chosen.len()) " device(s)" } "? Each downloads the chunks it lacks and installs at once." }
                @if release.unstable { p.notice role="alert" { "This release is marked unstable: devices reported failed installs." } }
                ul { @for d in &chosen { li { (d.device_id) " — now " (d.current_version.as_deref().unwrap_or("unknown")) } } }
                form method="post" action="/ui/deployments" {
                    (csrf_field(s))
                    input type="hidden" name="release_id" value=(req.release_id);
                    input type="hidden" name="description" value=(req.description);
                    @for d in &req.devices { input type="hidden" name="device" value=(d); }
                    button.primary type="submit" { "Deploy now" }
                    " "
                    a href={ "/ui/deployments?release=" (req.release_id) } { "Cancel" }
                }
            }
        },
    ))
}

/// `POST /ui/deployments`: the API's deployment.
pub async fn deploy(State(state): State<AppState>, form: Form) -> UiResult {
    let req = new_deployment(&form)?;
    let created = deployments::create(&state, &form.session.op, req).await?;
    Ok(see_other(&format!("/ui/deployments/{}", created.id)))
}

async fn deployment_body(
    state: &AppState,
    s: &Session,
    id: &str,
) -> UiResult<(Deployment, Markup)> {
    let d = deployments::detail(state, &s.op, id).await?;
    let ids: Vec<String> = d
        .devices
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|st| st.device.clone())
        .collect();
    let names: HashMap<String, String> = fleet::named(state, &s.op, &ids)
        .await?
        .into_iter()
        .map(|d| (d.id, d.device_id))
        .collect();
    let states = d.devices.as_deref().unwrap_or_default();
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    for st in states {
        *counts.entry(st.state.as_str()).or_default() += 1;
    }
    let counts: Vec<(String, u64)> = counts
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let markup = html! {
        p { "Status: " (status_badge(&d.status)) }
        (charts::stacked("Devices by state", &[("devices".to_string(), counts)], charts::bar_class))
        div.table-wrap { table {
            thead { tr { th scope="col" { "Device" } th scope="col" { "State" } th scope="col" { "Download" } th scope="col" { "Updated" } } }
            tbody { @for st in states { tr {
                td { a href={ "/ui/devices/" (st.device) } { (names.get(&st.device).map(String::as_str).unwrap_or(&st.device)) } }
                td { (status_badge(&st.state)) @if let Some(r) = &st.reason { br; span.small { (r) } } }
                td { @if let (Some(done), Some(total)) = (st.bytes_done, st.bytes_total) {
                    @let (done, total) = charts::download_share(&st.state, done, total);
                    (charts::progress(done, total, "download")) " " span.small { (format::ibytes(done)) " / " (format::ibytes(total)) }
                } }
                td { (format::time(st.updated_at)) }
            } } }
        } }
    };
    Ok((d, markup))
}

/// `GET /ui/deployments/{id}`.
pub async fn deployment(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
) -> UiResult {
    let (d, body) = deployment_body(&state, &s, &id).await?;
    let release = releases::detail(&state, &s.op, &d.release_id)
        .await
        .unwrap_or(Release {
            id: d.release_id.clone(),
            version: "deleted release".into(),
            compatible: String::new(),
            signer: String::new(),
            size: 0,
            sha256: String::new(),
            unstable: false,
            security_version: 0,
            created_at: 0,
            manifest: None,
        });
    Ok(layout::page(
        &s,
        Nav::Deployments,
        "Deployment",
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/deployments" { "Deployments" } " / " (d.id.get(..8).unwrap_or(&d.id)) }
            (heading(&format!("Deployment of {}", release.version), Some(html! { "created " (format::time(d.created_at)) @if !d.description.is_empty() { " · " (d.description) } })))
            div data-refresh={ "/ui/deployments/" (d.id) "/live" } data-interval="5" aria-live="polite" { (body) }
        },
    ))
}

/// `GET /ui/deployments/{id}/live`.
pub async fn deployment_live(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
) -> UiResult {
    let (_, body) = deployment_body(&state, &s, &id).await?;
    Ok(layout::fragment(body))
}
