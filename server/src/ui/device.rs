//! A device's page: status, inventory and load (live), what rollouts use
//! (tags, link class, site, time zone), editable in place with errors next
//! to the field, its logs, rollouts, deployments and the history of what
//! was done to it.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use super::charts::{self, Series};
use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::audit;
use crate::service::devices::fleet::{self, Device, LogFilter};
use crate::store::now_ms;

/// What an edit form sent and why it was refused, to show it again.
#[derive(Debug, Default, Clone)]
pub struct Edit {
    /// Which form: "tags" or "link".
    pub form: &'static str,
    /// The values as typed.
    pub values: Vec<(String, String)>,
    /// The refusal.
    pub error: String,
}

impl Edit {
    /// The value typed for `field` in `form`, if this edit is that form's.
    pub fn value(&self, form: &str, field: &str) -> Option<&str> {
        (self.form == form)
            .then(|| {
                self.values
                    .iter()
                    .find(|(k, _)| k == field)
                    .map(|(_, v)| v.as_str())
            })
            .flatten()
    }

    /// The error for `form`, if this edit is that form's.
    pub fn error(&self, form: &str) -> Option<&str> {
        (self.form == form && !self.error.is_empty()).then_some(self.error.as_str())
    }
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Device detail query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceQuery {
    level: Option<String>,
}

async fn heartbeat_chart(state: &AppState, s: &Session, pk: &str) -> UiResult<Markup> {
    let since = now_ms().saturating_sub(24 * 3600 * 1000);
    let history = fleet::load_history(state, &s.op, pk, since).await?;
    let mut cpu = Vec::new();
    let mut mem = Vec::new();
    for h in &history {
        if let Some(v) = h.cpu_percent {
            cpu.push((h.at, v));
        }
        if let Some(v) = h.memory_percent {
            mem.push((h.at, v));
        }
    }
    Ok(charts::lines(
        "CPU and memory, last 24 hours",
        &[
            Series {
                name: "CPU",
                class: "s1",
                points: cpu,
            },
            Series {
                name: "Memory",
                class: "s2",
                points: mem,
            },
        ],
        100.0,
        "%",
    ))
}

async fn device_live_body(state: &AppState, s: &Session, d: &Device) -> UiResult<Markup> {
    let chart = heartbeat_chart(state, s, &d.id).await?;
    let inv = d.inventory.as_ref();
    let num = |k: &str| {
        inv.and_then(|i| i.get(k))
            .and_then(serde_json::Value::as_f64)
    };
    let text = |k: &str| {
        inv.and_then(|i| i.get(k))
            .and_then(serde_json::Value::as_str)
            .map(str::to_string)
    };
    let mut facts: Vec<(&str, String)> = Vec::new();
    if let Some(v) = num("uptime_secs") {
        facts.push(("Uptime", format!("{:.1} h", v / 3600.0)));
    }
    if let Some(v) = num("temperature_celsius") {
        facts.push(("Temperature", format!("{v:.1} °C")));
    }
    if let (Some(u), Some(t)) = (num("memory_used_bytes"), num("memory_total_bytes")) {
        facts.push((
            "Memory",
            format!("{} of {}", format::bytes(u as u64), format::bytes(t as u64)),
        ));
    }
    if let (Some(u), Some(t)) = (num("disk_used_bytes"), num("disk_total_bytes")) {
        facts.push((
            "Disk",
            format!("{} of {}", format::bytes(u as u64), format::bytes(t as u64)),
        ));
    }
    if let Some(v) = text("updater_version") {
        facts.push(("Updater", v));
    }
    Ok(html! {
        dl.facts {
            dt { "Status" } dd { @if d.revoked { (status_badge("revoked")) } @else { (status_badge(&d.status)) }
                @if let Some(r) = &d.status_reason { " " span { (r) } } }
            dt { "Version" } dd { (d.current_version.as_deref().unwrap_or("unknown")) }
            dt { "Assigned" } dd { (d.desired_version.as_deref().unwrap_or("—")) }
            dt { "Booted slot" } dd { (d.booted_slot.as_deref().unwrap_or("unknown")) }
            dt { "Primary slot" } dd { (d.primary_slot.as_deref().unwrap_or("unknown")) }
            dt { "Security floor" } dd { @match d.security_floor {
                Some(f) => { (f) " " span.small { "(refuses releases of a lower security version)" } },
                None => "not reported" } }
            dt { "Attestation" } dd { (status_badge(&d.attestation.state))
                @match d.attestation.state.as_str() {
                    "unattested" => { " " span.small { "(no TPM bound to this device)" } }
                    "pending" => { " " span.small { "(TPM bound, no quote verified yet)" } }
                    _ => {
                        @if let Some(v) = &d.attestation.version { " " span.small { "quote for " (v) } }
                        @if let Some(t) = d.attestation.at { " " span.small title=(format::time(t)) { (format::ago(t)) } }
                    }
                }
                @if let Some(r) = &d.attestation.reason { br; span.small { (r) } }
                @if let Some(ek) = &d.attestation.ek_fingerprint { br; span.small { "EK " code { (ek) } } } }
            dt { "Last seen" } dd { @match d.last_seen_at { Some(t) => { (format::time(t)) " (" (format::ago(t)) ")" }, None => "never" } }
            @for (label, v) in &facts { dt { (label) } dd { (v) } }
        }
        (chart)
    })
}

async fn load_device(state: &AppState, s: &Session, id: &str) -> UiResult<Device> {
    Ok(fleet::detail(state, &s.op, id).await?)
}

/// `GET /ui/devices/{id}`.
pub async fn device(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
    query: Result<Query<DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let Ok(Query(q)) = query else {
        return Err(UiError::bad_request(
            "This address has a parameter the device page does not know; its only one is level.",
        ));
    };
    let level = nonempty(q.level);
    if let Some(l) = &level
        && !["debug", "info", "warn", "error"].contains(&l.as_str())
    {
        return Err(UiError::bad_request(format!(
            "Unknown log level {l:?}: one of debug, info, warn, error."
        )));
    }
    render(&state, &s, &id, level, &Edit::default()).await
}

async fn render(
    state: &AppState,
    s: &Session,
    id: &str,
    level: Option<String>,
    edit: &Edit,
) -> UiResult {
    let d = load_device(state, s, id).await?;
    let logs = fleet::logs(
        state,
        &s.op,
        id,
        &LogFilter {
            level: level.clone(),
            before: None,
            limit: Some(200),
        },
    )
    .await?;
    let history = fleet::deployments(state, &s.op, id).await?;
    let rollout_rows = fleet::rollouts(state, &s.op, id).await?;
    let live = device_live_body(state, s, &d).await?;
    let link = super::link::panel(state, s, &d.id, edit).await?;
    let actions = audit::for_target(state, &s.op, &format!("device:{}", d.id), 50).await?;
    let typed_tags = edit
        .value("tags", "tags")
        .map(str::to_string)
        .unwrap_or_else(|| d.tags.join(", "));
    Ok(layout::page(
        s,
        Nav::Devices,
        &d.device_id,
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/devices" { "Devices" } " / " (d.device_id) }
            (heading(&d.device_id, Some(html! { (d.hardware_class) " · enrolled " (format::time(d.registered_at))
                @for t in &d.tags { " " span.tag { (t) } } })))
            div data-refresh={ "/ui/devices/" (d.id) "/live" } data-interval="10" aria-live="polite" { (live) }
            section #tags {
                h2 { "Tags" }
                p { @if d.tags.is_empty() { span.empty { "No tag." } } @for t in &d.tags { span.tag { (t) } " " } }
                @if s.can(Role::Ops) {
                    form.filters method="post" action={ "/ui/devices/" (d.id) "/tags" } {
                        (csrf_field(s))
                        div.field {
                            label for="tags-input" { "Tags (comma or space separated; rollout selectors match them)" }
                            input #tags-input type="text" name="tags" value=(typed_tags) maxlength="4200"
                                aria-invalid=[edit.error("tags").map(|_| "true")]
                                aria-describedby=[edit.error("tags").map(|_| "tags-error")];
                            @if let Some(e) = edit.error("tags") { span.error #tags-error role="alert" { (e) } }
                        }
                        div.field.actions { button type="submit" { "Save tags" } }
                    }
                }
            }
            (link)
            section {
                h2 { "Logs" }
                form.filters method="get" action={ "/ui/devices/" (d.id) } {
                    div.field {
                        label for="level" { "Level" }
                        select #level name="level" {
                            option value="" { "all" }
                            @for l in ["debug", "info", "warn", "error"] {
                                option value=(l) selected[level.as_deref() == Some(l)] { (l) }
                            }
                        }
                    }
                    div.field.actions { button type="submit" { "Show" } }
                }
                @if logs.is_empty() { p.empty { "No log lines." } } @else {
                    div.table-wrap { table.logs {
                        thead { tr { th scope="col" { "Time" } th scope="col" { "Level" } th scope="col" { "Message" } } }
                        tbody { @for l in &logs { tr class={ "lvl-" (l.level) } {
                            td.nowrap { (format::time(l.at)) } td { span class={ "lvl lvl-" (l.level) } { (l.level) } } td.msg { (l.message) }
                        } } }
                    } }
                }
            }
            section {
                h2 { "Rollouts" }
                @if rollout_rows.is_empty() { p.empty { "In no rollout." } } @else {
                    div.table-wrap { table {
                        thead { tr { th scope="col" { "Rollout" } th scope="col" { "Version" } th scope="col" { "Wave" } th scope="col" { "State" } th scope="col" { "Download" } th scope="col" { "Updated" } } }
                        tbody { @for r in &rollout_rows {
                            @let rid = &r.rollout_id;
                            tr {
                                td { a href={ "/ui/rollouts/" (rid) } { @if r.name.is_empty() { (rid.get(..8).unwrap_or(rid)) } @else { (r.name) } } }
                                td { (r.from_version.as_deref().unwrap_or("?")) " → " (r.version) }
                                td { (r.wave + 1) }
                                td { (status_badge(&r.state)) @if let Some(why) = &r.reason { br; span.small { (why) } } }
                                @let (done, planned) = charts::download_share(&r.state, r.bytes_done, r.delta_bytes);
                                td { (charts::progress(done, planned, "download")) " " span.small { (format::ibytes(done)) " / " (format::ibytes(planned)) " planned" } }
                                td { (format::time(r.updated_at)) }
                            }
                        } }
                    } }
                }
            }
            section {
                h2 { "Deployment history" }
                @if history.is_empty() { p.empty { "Never deployed to." } } @else {
                    div.table-wrap { table {
                        thead { tr { th scope="col" { "Deployment" } th scope="col" { "Version" } th scope="col" { "State" } th scope="col" { "Progress" } th scope="col" { "Updated" } } }
                        tbody { @for r in &history {
                            @let dep = &r.deployment_id;
                            tr {
                                td { a href={ "/ui/deployments/" (dep) } { (dep.get(..8).unwrap_or(dep)) } }
                                td { (r.version) }
                                td { (status_badge(&r.state)) @if let Some(why) = &r.reason { br; span.small { (why) } } }
                                td { @if let (Some(d), Some(t)) = (r.bytes_done, r.bytes_total) {
                                    @let (done, total) = charts::download_share(&r.state, d, t);
                                    (charts::progress(done, total, "download")) } }
                                td { (format::time(r.updated_at)) }
                            }
                        } }
                    } }
                }
            }
            section #history {
                h2 { "What was done to it" }
                @if actions.is_empty() { p.empty { "Nothing recorded yet." } } @else {
                    div.table-wrap { table {
                        thead { tr { th scope="col" { "Time" } th scope="col" { "Who" } th scope="col" { "Action" } th scope="col" { "Result" } } }
                        tbody { @for e in &actions { tr {
                            td.nowrap { (format::time(e.at)) } td { (e.actor) } td { (e.action) } td.msg { (e.result) }
                        } } }
                    } }
                }
            }
            @if s.can(Role::Ops) && !d.revoked {
                section.danger {
                    h2 { "Revoke" }
                    p { "A revoked device's credential stops working at once; it cannot re-enroll." }
                    form method="post" action={ "/ui/devices/" (d.id) "/revoke" } data-confirm={ "Revoke device " (d.device_id) "? This cannot be undone." } {
                        (csrf_field(s))
                        button.danger type="submit" { "Revoke device" }
                    }
                }
            }
        },
    ))
}

/// `GET /ui/devices/{id}/live`: status and heartbeat chart, for refresh.
pub async fn device_live(
    State(state): State<AppState>,
    s: Session,
    Path(id): Path<String>,
) -> UiResult<Response> {
    let d = load_device(&state, &s, &id).await?;
    Ok(layout::fragment(device_live_body(&state, &s, &d).await?))
}

/// `POST /ui/devices/{id}/revoke` (ops).
pub async fn revoke(State(state): State<AppState>, Path(id): Path<String>, form: Form) -> UiResult {
    fleet::revoke(&state, &form.session.op, &id).await?;
    Ok(see_other(&format!("/ui/devices/{id}")))
}

/// Words of a tag field: split on commas and white space.
fn words(v: &str) -> Vec<String> {
    v.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// The device page again with `edit`'s error next to its form (422).
async fn refused(state: &AppState, s: &Session, id: &str, edit: Edit) -> UiResult {
    let page = render(state, s, id, None, &edit).await?;
    Ok((StatusCode::UNPROCESSABLE_ENTITY, page).into_response())
}

/// `POST /ui/devices/{id}/tags` (ops): replaces the tags.
pub async fn set_tags(
    State(state): State<AppState>,
    Path(id): Path<String>,
    form: Form,
) -> UiResult {
    let typed = form.get("tags").unwrap_or("").to_string();
    match fleet::set_tags(&state, &form.session.op, &id, words(&typed)).await {
        Ok(()) => Ok(see_other(&format!("/ui/devices/{id}#tags"))),
        Err(crate::service::Error::Invalid(why)) => {
            let edit = Edit {
                form: "tags",
                values: vec![("tags".into(), typed)],
                error: format!("Not saved: {why}."),
            };
            refused(&state, &form.session, &id, edit).await
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /ui/devices/{id}/link` (ops): sets link class, site, time zone
/// (an empty field clears it).
pub async fn set_link(
    State(state): State<AppState>,
    Path(id): Path<String>,
    form: Form,
) -> UiResult {
    let get = |k: &str| form.get(k).map(str::to_string);
    let link = crate::service::rollouts::link::DeviceLink {
        link_class: get("link_class"),
        site: get("site"),
        time_zone: get("time_zone"),
    };
    match crate::service::rollouts::link::set_link(&state, &form.session.op, &id, link).await {
        Ok(_) => Ok(see_other(&format!("/ui/devices/{id}#link"))),
        Err(crate::service::Error::Invalid(why)) => {
            let values = ["link_class", "site", "time_zone"]
                .iter()
                .map(|k| (k.to_string(), get(k).unwrap_or_default()))
                .collect();
            let edit = Edit {
                form: "link",
                values,
                error: format!("Not saved: {why}."),
            };
            refused(&state, &form.session, &id, edit).await
        }
        Err(e) => Err(e.into()),
    }
}
