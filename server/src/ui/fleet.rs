//! The fleet: overview, device list, device detail.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use maud::{Markup, html};
use serde::Deserialize;

use super::charts::{self, Series};
use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::devices::fleet::{self, Device, DeviceFilter, LogFilter, STATUSES};
use crate::service::rollouts::progress;
use crate::store::now_ms;

/// Statuses that need an operator's attention.
const ATTENTION: [&str; 4] = ["offline", "degraded", "reverted", "error"];

// The API's list, so the UI's numbers are the API's.
async fn all_devices(state: &AppState, s: &Session, filter: DeviceFilter) -> UiResult<Vec<Device>> {
    Ok(fleet::list(state, &s.op, &filter).await?)
}

fn no_filter() -> DeviceFilter {
    DeviceFilter {
        tag: None,
        hardware_class: None,
        version: None,
        status: None,
        limit: Some(5000),
    }
}

fn count_by<'a>(items: impl Iterator<Item = &'a str>) -> Vec<(String, u64)> {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for i in items {
        *m.entry(i.to_string()).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

async fn overview_body(state: &AppState, s: &Session) -> UiResult<Markup> {
    let list = all_devices(state, s, no_filter()).await?;
    let by_status: Vec<(String, u64)> = STATUSES
        .iter()
        .map(|st| {
            (
                st.to_string(),
                list.iter().filter(|d| d.status == *st).count() as u64,
            )
        })
        .collect();
    let by_version = count_by(
        list.iter()
            .map(|d| d.current_version.as_deref().unwrap_or("unknown")),
    );
    let by_class = count_by(list.iter().map(|d| d.hardware_class.as_str()));
    let attention: Vec<&Device> = list
        .iter()
        .filter(|d| ATTENTION.contains(&d.status.as_str()) && !d.revoked)
        .collect();
    let rollouts = progress::list(state, &s.op).await?;
    let active: Vec<_> = rollouts
        .into_iter()
        .filter(|r| matches!(r.status.as_str(), "scheduled" | "running" | "paused"))
        .collect();
    Ok(html! {
        div.cards {
            div.card data-count="total" {
                span.big { (list.len()) } span { "devices" }
            }
            @for (st, n) in &by_status {
                a.card href={ "/ui/devices?status=" (st) } data-count=(st) {
                    span.big { (n) } span { (status_badge(st)) }
                }
            }
        }
        div.grid3 {
            (charts::bars("Devices by status", &by_status))
            (charts::bars("Devices by version", &by_version))
            (charts::bars("Devices by hardware class", &by_class))
        }
        @if !active.is_empty() {
            section {
                h2 { "Rollouts in progress" }
                ul.plain { @for r in &active {
                    @let committed = r.states.get("committed").copied().unwrap_or(0);
                    li { a href={ "/ui/rollouts/" (r.id) } { @if r.name.is_empty() { (r.id.get(..8).unwrap_or(&r.id)) } @else { (r.name) } }
                        " " (status_badge(&r.status)) " wave " (r.current_wave) "/" (r.spec.waves.len()) " "
                        (charts::progress(committed, r.devices_total, "committed")) }
                } }
            }
        }
        section {
            h2 { "Needs attention (" (attention.len()) ")" }
            @if attention.is_empty() {
                p.empty { "Every device is online and healthy." }
            } @else {
                (device_table(&attention))
            }
        }
        p.small.updated { "Updated " (format::time(now_ms())) }
    })
}

/// `GET /ui/`: the fleet overview.
pub async fn overview(State(state): State<AppState>, s: Session) -> UiResult {
    let body = overview_body(&state, &s).await?;
    Ok(layout::page(
        &s,
        Nav::Overview,
        "Fleet overview",
        html! {
            (heading("Fleet overview", None))
            div data-refresh="/ui/live/overview" data-interval="10" aria-live="polite" { (body) }
        },
    ))
}

/// `GET /ui/live/overview`: the overview's content, for live refresh.
pub async fn overview_live(State(state): State<AppState>, s: Session) -> UiResult {
    Ok(layout::fragment(overview_body(&state, &s).await?))
}

fn device_table(list: &[&Device]) -> Markup {
    html! {
        div.table-wrap {
            table {
                thead { tr {
                    th scope="col" { "Device" } th scope="col" { "Status" } th scope="col" { "Version" }
                    th scope="col" { "Hardware class" } th scope="col" { "Tags" } th scope="col" { "Last seen" }
                } }
                tbody {
                    @for d in list {
                        tr {
                            td { a href={ "/ui/devices/" (d.id) } { (d.device_id) } }
                            td {
                                @if d.revoked { (status_badge("revoked")) } @else { (status_badge(&d.status)) }
                                @if d.attestation.state != "unattested" { " " (status_badge(&d.attestation.state)) }
                                @if let Some(r) = &d.status_reason { br; span.small { (r) } }
                            }
                            td { (d.current_version.as_deref().unwrap_or("—"))
                                @if let Some(v) = &d.desired_version {
                                    @if d.current_version.as_deref() != Some(v.as_str()) { span.small { " → " (v) } }
                                }
                            }
                            td { (d.hardware_class) }
                            td { @for t in &d.tags { span.tag { (t) } " " } }
                            td { @match d.last_seen_at { Some(t) => span title=(format::time(t)) { (format::ago(t)) }, None => "never" } }
                        }
                    }
                }
            }
        }
    }
}

/// Device list filters (all optional; empty = any).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    tag: Option<String>,
    hardware_class: Option<String>,
    version: Option<String>,
    q: Option<String>,
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `GET /ui/devices`: the device list with filters and search.
pub async fn devices(
    State(state): State<AppState>,
    s: Session,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let Query(q) = query.map_err(|e| UiError::bad_request(e.body_text()))?;
    let status = nonempty(q.status);
    if let Some(st) = &status
        && !STATUSES.contains(&st.as_str())
    {
        return Err(UiError::bad_request(format!(
            "Unknown status {st:?}: one of {}.",
            STATUSES.join(", ")
        )));
    }
    let filter = DeviceFilter {
        tag: nonempty(q.tag),
        hardware_class: nonempty(q.hardware_class),
        version: nonempty(q.version),
        status,
        limit: Some(5000),
    };
    let search = nonempty(q.q);
    let selected = (
        filter.status.clone(),
        filter.tag.clone(),
        filter.hardware_class.clone(),
        filter.version.clone(),
    );
    let mut list = all_devices(&state, &s, filter).await?;
    if let Some(needle) = &search {
        let needle = needle.to_lowercase();
        list.retain(|d| {
            d.device_id.to_lowercase().contains(&needle)
                || d.id.contains(&needle)
                || d.tags.iter().any(|t| t.to_lowercase().contains(&needle))
        });
    }
    let fleet::FilterValues {
        hardware_classes: classes,
        tags,
        versions,
    } = fleet::filter_values(&state, &s.op).await?;
    let refs: Vec<&Device> = list.iter().collect();
    let select = |name: &'static str,
                  label: &'static str,
                  options: &[String],
                  current: &Option<String>| {
        html! {
            div.field {
                label for=(name) { (label) }
                select #(name) name=(name) {
                    option value="" { "any" }
                    @for o in options {
                        option value=(o) selected[current.as_deref() == Some(o.as_str())] { (o) }
                    }
                }
            }
        }
    };
    let statuses: Vec<String> = STATUSES.iter().map(|s| s.to_string()).collect();
    let requests = super::enrollment_requests::section(&state, &s).await?;
    Ok(layout::page(
        &s,
        Nav::Devices,
        "Devices",
        html! {
            (heading("Devices", None))
            (requests)
            form.filters method="get" action="/ui/devices" role="search" {
                div.field {
                    label for="q" { "Search" }
                    input #q type="search" name="q" value=(search.as_deref().unwrap_or("")) placeholder="device id or tag";
                }
                (select("status", "Status", &statuses, &selected.0))
                (select("tag", "Tag", &tags, &selected.1))
                (select("hardware_class", "Hardware class", &classes, &selected.2))
                (select("version", "Version", &versions, &selected.3))
                div.field.actions {
                    button type="submit" { "Filter" }
                    a href="/ui/devices" { "Clear" }
                }
            }
            p.small { (refs.len()) " device(s)" }
            @if refs.is_empty() { p.empty { "No device matches." } } @else { (device_table(&refs)) }
        },
    ))
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
    let Query(q) = query.map_err(|e| UiError::bad_request(e.body_text()))?;
    let level = nonempty(q.level);
    if let Some(l) = &level
        && !["debug", "info", "warn", "error"].contains(&l.as_str())
    {
        return Err(UiError::bad_request(format!(
            "Unknown log level {l:?}: one of debug, info, warn, error."
        )));
    }
    let d = load_device(&state, &s, &id).await?;
    let logs = fleet::logs(
        &state,
        &s.op,
        &id,
        &LogFilter {
            level: level.clone(),
            before: None,
            limit: Some(200),
        },
    )
    .await?;
    let history = fleet::deployments(&state, &s.op, &id).await?;
    let rollout_rows = fleet::rollouts(&state, &s.op, &id).await?;
    let live = device_live_body(&state, &s, &d).await?;
    let link = super::link::panel(&state, &s, &d.id).await?;
    Ok(layout::page(
        &s,
        Nav::Devices,
        &d.device_id,
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/devices" { "Devices" } " / " (d.device_id) }
            (heading(&d.device_id, Some(html! { (d.hardware_class) " · enrolled " (format::time(d.registered_at))
                @for t in &d.tags { " " span.tag { (t) } } })))
            div data-refresh={ "/ui/devices/" (d.id) "/live" } data-interval="10" aria-live="polite" { (live) }
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
                                td { (charts::progress(r.bytes_done, r.delta_bytes, "download")) " " span.small { (format::ibytes(r.delta_bytes)) " delta" } }
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
                                td { @if let (Some(d), Some(t)) = (r.bytes_done, r.bytes_total) { (charts::progress(d, t, "download")) } }
                                td { (format::time(r.updated_at)) }
                            }
                        } }
                    } }
                }
            }
            @if s.can(Role::Ops) && !d.revoked {
                section.danger {
                    h2 { "Revoke" }
                    p { "A revoked device's credential stops working at once; it cannot re-enroll." }
                    form method="post" action={ "/ui/devices/" (d.id) "/revoke" } data-confirm={ "Revoke device " (d.device_id) "? This cannot be undone." } {
                        (csrf_field(&s))
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
