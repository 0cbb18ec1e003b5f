//! Rollouts: create with a preview (bytes, metered cost and projected
//! duration per wave, as a table and charts), then watch each wave live,
//! and pause, resume, abort or roll back (each confirmed). Everything goes
//! through the rollouts service, as the API does.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, State};
use maud::{Markup, html};
use serde_json::json;

use super::charts::{self, Series};
use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field, see_other};
use crate::AppState;
use crate::auth::Role;
use crate::service::releases::{self, Release};
use crate::service::rollouts::preview::{self as previews, Preview};
use crate::service::rollouts::progress::{self, Rollout};
use crate::service::rollouts::spec::RolloutSpec;
use crate::service::rollouts::transitions::{self, Action};

/// The form's fields with their defaults (the API's defaults, in the
/// units an operator types).
const FIELDS: [(&str, &str); 15] = [
    ("name", ""),
    ("release_id", ""),
    ("tags", ""),
    ("versions", ""),
    ("waves", "5, 10%, 50%, 100%"),
    ("soak_minutes", "30"),
    ("promote_max_error_pct", "1"),
    ("rollback_error_pct", "5"),
    ("promote_min_committed_pct", "90"),
    ("require_attestation", ""),
    ("start_at", ""),
    ("window_start", ""),
    ("window_end", ""),
    ("egress_cap_mb_s", "125"),
    ("metered_budget_mb_day", "50"),
];
/// Metered cost per GB (a separate constant: FIELDS is a fixed array).
const COST_FIELD: (&str, &str) = ("metered_cost_per_gb", "5");

/// The rollout form as submitted (or its defaults).
#[derive(Debug, Clone)]
struct SpecForm(BTreeMap<String, String>);

impl SpecForm {
    fn defaults() -> Self {
        SpecForm(
            FIELDS
                .iter()
                .chain(std::iter::once(&COST_FIELD))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn from_form(form: &Form) -> Self {
        let mut f = Self::defaults();
        for (k, v) in f.0.iter_mut() {
            *v = form.get(k).unwrap_or("").to_string();
        }
        f
    }

    fn get(&self, k: &str) -> &str {
        self.0.get(k).map(String::as_str).unwrap_or("")
    }

    fn number(&self, k: &str, label: &str, min: f64, max: f64) -> UiResult<f64> {
        let v = self.get(k);
        v.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && (min..=max).contains(n))
            .ok_or_else(|| {
                UiError::bad_request(format!("{label}: a number from {min} to {max}, not {v:?}."))
            })
    }

    fn words(&self, k: &str) -> Vec<String> {
        self.get(k)
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The API's spec; every bad field is a 400 that names it.
    fn spec(&self) -> UiResult<RolloutSpec> {
        let release_id = self.get("release_id");
        if release_id.is_empty() {
            return Err(UiError::bad_request("Choose a release."));
        }
        let soak = self.number("soak_minutes", "Soak time (minutes)", 0.0, 10_080.0)?;
        let gates = json!({
            "promote_max_error_rate": self.number("promote_max_error_pct", "Promote below error rate (%)", 0.0, 100.0)? / 100.0,
            "rollback_error_rate": self.number("rollback_error_pct", "Roll back above error rate (%)", 0.0, 100.0)? / 100.0,
            "promote_min_committed": self.number("promote_min_committed_pct", "Committed share to promote (%)", 0.0, 100.0)? / 100.0,
            "require_attestation": !self.get("require_attestation").is_empty(),
        });
        let mut waves = Vec::new();
        for w in self.words("waves") {
            let wave = if let Some(p) = w.strip_suffix('%') {
                let p: f64 = p
                    .parse()
                    .ok()
                    .filter(|p: &f64| *p > 0.0 && *p <= 100.0)
                    .ok_or_else(|| {
                        UiError::bad_request(format!("Wave {w:?}: a share from 1% to 100%."))
                    })?;
                json!({"percent": p})
            } else {
                let n: u64 = w.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    UiError::bad_request(format!(
                        "Wave {w:?}: a device count (e.g. 5) or a share (e.g. 10%)."
                    ))
                })?;
                json!({"count": n})
            };
            let mut wave = wave;
            wave["soak_secs"] = json!((soak * 60.0).round() as u64);
            wave["gates"] = gates.clone();
            waves.push(wave);
        }
        if waves.is_empty() {
            return Err(UiError::bad_request(
                "Waves: at least one, e.g. 5, 10%, 100%.",
            ));
        }
        let start_at_ms = match self.get("start_at") {
            "" => None,
            s => Some(parse_local(s).ok_or_else(|| {
                UiError::bad_request(format!("Start: a date and time (UTC), not {s:?}."))
            })?),
        };
        let windows = match (self.get("window_start"), self.get("window_end")) {
            ("", "") => vec![],
            (s, e) if !s.is_empty() && !e.is_empty() => vec![json!({"start": s, "end": e})],
            _ => {
                return Err(UiError::bad_request(
                    "Maintenance window: give both its start and its end, or neither.",
                ));
            }
        };
        let cap = self.number("egress_cap_mb_s", "Egress cap (MB/s)", 0.001, 1_000_000.0)?;
        let budget = self.number(
            "metered_budget_mb_day",
            "Metered budget (MB per device and day)",
            0.0,
            1_000_000.0,
        )?;
        let cost = self.number(
            "metered_cost_per_gb",
            "Metered cost per GB",
            0.0,
            1_000_000.0,
        )?;
        let mut metered = json!({"rate_bytes_per_sec": 500_000, "cost_per_gb": cost});
        if budget > 0.0 {
            metered["budget_bytes_per_day"] = json!((budget * 1e6).round() as u64);
        }
        let spec = json!({
            "name": self.get("name"),
            "release_id": release_id,
            "selector": {"tags": self.words("tags"), "current_versions": self.words("versions")},
            "waves": waves,
            "start_at_ms": start_at_ms,
            "maintenance_windows": windows,
            "bandwidth": {
                "egress_cap_bytes_per_sec": (cap * 1e6).round() as u64,
                "link_classes": {"metered-4g": metered},
            },
        });
        serde_json::from_value(spec)
            .map_err(|e| UiError::bad_request(format!("The rollout is not valid: {e}.")))
    }

    fn hidden(&self) -> Markup {
        html! { @for (k, v) in &self.0 { input type="hidden" name=(k) value=(v); } }
    }
}

/// `YYYY-MM-DDTHH:MM` (a datetime-local input), read as UTC.
fn parse_local(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let day = format::parse_date(date)?;
    let (h, m) = time.split_once(':')?;
    let h: i64 = h.parse().ok().filter(|h| (0..24).contains(h))?;
    let m: i64 = m.get(..2)?.parse().ok().filter(|m| (0..60).contains(m))?;
    Some(day + (h * 60 + m) * 60_000)
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{:.1} h", s as f64 / 3600.0),
        s => format!("{:.1} d", s as f64 / 86_400.0),
    }
}

fn money(v: f64) -> String {
    format!("{v:.2}")
}

async fn release_list(state: &AppState, s: &Session) -> UiResult<Vec<Release>> {
    Ok(releases::list(state, &s.op).await?)
}

fn spec_form(s: &Session, f: &SpecForm, releases: &[Release]) -> Markup {
    let field = |k: &'static str, label: &'static str, kind: &'static str, hint: &'static str| {
        html! {
            div.field {
                label for=(k) { (label) }
                input id=(k) name=(k) type=(kind) value=(f.get(k)) step=[(kind == "number").then_some("any")];
                @if !hint.is_empty() { span.small { (hint) } }
            }
        }
    };
    html! {
        form.rollout method="post" action="/ui/rollouts/preview" {
            (csrf_field(s))
            div.grid3 {
                div {
                    div.field {
                        label for="release_id" { "Release" }
                        select #release_id name="release_id" required {
                            @for r in releases {
                                option value=(r.id) selected[f.get("release_id") == r.id] {
                                    (r.version) " (" (r.compatible) ")" @if r.unstable { " — unstable" }
                                }
                            }
                        }
                    }
                    (field("name", "Name", "text", ""))
                    (field("tags", "Devices with all these tags", "text", "empty: every device of the release's hardware class"))
                    (field("versions", "Only devices running these versions", "text", "empty: any other version"))
                }
                div {
                    (field("waves", "Waves", "text", "device counts or cumulative shares, e.g. 5, 10%, 50%, 100%"))
                    (field("soak_minutes", "Soak per wave (minutes)", "number", ""))
                    (field("promote_max_error_pct", "Promote below error rate (%)", "number", ""))
                    (field("rollback_error_pct", "Roll back above error rate (%)", "number", "between the two the rollout pauses for you"))
                    (field("promote_min_committed_pct", "Committed share to promote (%)", "number", ""))
                    div.field {
                        label {
                            input type="checkbox" name="require_attestation" value="1" checked[!f.get("require_attestation").is_empty()];
                            " Count a device only when committed and attested (a TPM quote shows it runs the release)"
                        }
                    }
                }
                div {
                    (field("start_at", "Start (UTC)", "datetime-local", "empty: when started"))
                    (field("window_start", "Maintenance window from (device local time)", "time", ""))
                    (field("window_end", "… to", "time", "empty: any time"))
                    (field("egress_cap_mb_s", "Fleet egress cap (MB/s)", "number", ""))
                    (field("metered_budget_mb_day", "Metered 4G budget (MB per device and day)", "number", "0: no budget"))
                    (field("metered_cost_per_gb", "Metered 4G cost per GB", "number", ""))
                }
            }
            div.field.actions {
                button type="submit" { "Preview" }
            }
        }
    }
}

/// `GET /ui/rollouts`.
pub async fn list(State(state): State<AppState>, s: Session) -> UiResult {
    let list = progress::list(&state, &s.op).await?;
    let releases = release_list(&state, &s).await?;
    let versions: HashMap<&str, &str> = releases
        .iter()
        .map(|r| (r.id.as_str(), r.version.as_str()))
        .collect();
    Ok(layout::page(
        &s,
        Nav::Rollouts,
        "Rollouts",
        html! {
            (heading("Rollouts", Some(html! { "Staged waves with health gates, maintenance windows and a bandwidth budget." })))
            @if s.can(Role::Ops) {
                section.panel {
                    h2 { "New rollout" }
                    @if releases.is_empty() { p.empty { "Upload a release first." } }
                    @else { (spec_form(&s, &SpecForm::defaults(), &releases)) }
                }
            }
            @if list.is_empty() { p.empty { "No rollout yet." } } @else {
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Rollout" } th scope="col" { "Release" } th scope="col" { "Status" } th scope="col" { "Wave" }
                        th scope="col" { "Committed" } th scope="col" { "Created" } } }
                    tbody { @for r in &list {
                        @let committed = r.states.get("committed").copied().unwrap_or(0);
                        tr {
                            td { a href={ "/ui/rollouts/" (r.id) } { @if r.name.is_empty() { (r.id.get(..8).unwrap_or(&r.id)) } @else { (r.name) } } }
                            td { (versions.get(r.release_id.as_str()).copied().unwrap_or("deleted")) }
                            td { (status_badge(&r.status)) @if let Some(why) = &r.status_reason { br; span.small { (why) } } }
                            td { (r.current_wave) " / " (r.spec.waves.len()) }
                            td { (charts::progress(committed, r.devices_total, "committed")) " " span.small { (committed) " / " (r.devices_total) } }
                            td { (format::time(r.created_at)) }
                        }
                    } }
                } }
            }
        },
    ))
}

fn preview_view(p: &Preview) -> Markup {
    let label = |w: u64| format!("wave {w}");
    let bytes: Vec<(String, u64)> = p.waves.iter().map(|w| (label(w.wave), w.bytes)).collect();
    let cost: Vec<(String, u64)> = p
        .waves
        .iter()
        .map(|w| (label(w.wave), (w.cost * 100.0).round() as u64))
        .collect();
    let time: Vec<(String, u64)> = p
        .waves
        .iter()
        .map(|w| {
            (
                label(w.wave),
                u64::try_from((w.projected_promote_ms - w.projected_start_ms).max(0) / 1000)
                    .unwrap_or(0),
            )
        })
        .collect();
    html! {
        div.cards {
            div.card data-preview="targets" { span.big { (p.targets) } span { "devices" } }
            div.card data-preview="bytes" data-value=(p.total_bytes) { span.big { (format::bytes(p.total_bytes)) } span { "downloaded in all" } }
            div.card data-preview="cost" data-value=(p.metered_cost) { span.big { (money(p.metered_cost)) } span { "metered cost" } }
            div.card data-preview="duration" data-value=(p.projected_duration_secs) { span.big { (duration(p.projected_duration_secs)) } span { "projected duration" } }
            div.card { span.big { (p.peak_concurrent) } span { "downloads at once, at most" } }
        }
        @if p.unschedulable > 0 { p.notice role="alert" { (p.unschedulable) " device(s) never get a download window (check the maintenance window and budgets)." } }
        @for warning in &p.warnings { p.notice role="alert" data-preview="warning" { (warning) } }
        @if p.patches_building > 0 { p.notice data-preview="patches-building" { "The server is building patches for " (p.patches_building) " device(s): their bytes are the chunk delta until then, and they start once their patch exists." } }
        @if p.already_current > 0 || p.busy > 0 {
            p.small { (p.already_current) " matching device(s) already run " (p.version) "; " (p.busy) " are held by another rollout." }
        }
        p.small { "Projected " (format::time(p.projected_start_ms)) " → " (format::time(p.projected_end_ms))
            "; egress peak " (format::bytes(p.peak_reserved_bytes_per_sec)) "/s of a " (format::bytes(p.egress_cap_bytes_per_sec)) "/s cap." }
        div.grid3 {
            (charts::bars_with("Bytes per wave", &bytes, format::bytes))
            (charts::bars_with("Metered cost per wave", &cost, |v| money(v as f64 / 100.0)))
            (charts::bars_with("Projected duration per wave (with soak)", &time, duration))
        }
        div.table-wrap { table.preview {
            thead { tr { th scope="col" { "Wave" } th scope="col" { "Devices" } th scope="col" { "Bytes" } th scope="col" { "Metered cost" }
                th scope="col" { "Link classes" } th scope="col" { "Downloads from" } th scope="col" { "Installed by" } th scope="col" { "Promoted at" } } }
            tbody { @for w in &p.waves { tr data-wave=(w.wave) {
                td { (w.wave) @if w.requires_attestation { " " span.small { "(attested)" } } }
                td data-cannot-attest=(w.cannot_attest) { (w.devices) @if w.cannot_attest > 0 { br; span.small { (w.cannot_attest) " without a TPM moved on or left out" } } }
                td data-bytes=(w.bytes) { (format::bytes(w.bytes)) } td { (money(w.cost)) }
                td.small { @for (c, cp) in &w.link_classes { (c) ": " (cp.devices) " " } }
                td.nowrap { (format::time(w.projected_start_ms)) } td.nowrap { (format::time(w.projected_end_ms)) } td.nowrap { (format::time(w.projected_promote_ms)) }
            } } }
        } }
        @if let Some(devices) = &p.devices {
            details {
                summary { "Per device (" (devices.len()) ")" }
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Device" } th scope="col" { "Wave" } th scope="col" { "Link" } th scope="col" { "From" } th scope="col" { "Bytes" } th scope="col" { "Cost" } th scope="col" { "Windows" } th scope="col" { "Starts" } } }
                    tbody { @for d in devices { tr {
                        td { a href={ "/ui/devices/" (d.id) } { (d.device_id) } } td { (d.wave) } td { (d.link_class) }
                        td { (d.from_version.as_deref().unwrap_or("—")) } td data-method=(d.method.as_str()) { (format::bytes(d.bytes)) " " span.small { (d.method.as_str()) } } td { (money(d.cost)) } td { (d.windows) }
                        td.nowrap { @match d.projected_start_ms { Some(t) => (format::time(t)), None => "never" } }
                    } } }
                } }
            }
        }
    }
}

/// `POST /ui/rollouts/preview`: the preview of the form's rollout, and the
/// form again to adjust or create it.
pub async fn preview(State(state): State<AppState>, form: Form) -> UiResult {
    let s = &form.session;
    if !s.can(Role::Ops) {
        return Err(UiError::forbidden());
    }
    let f = SpecForm::from_form(&form);
    let spec = f.spec()?;
    let p = previews::preview(&state, &s.op, &spec, None, true).await?;
    let releases = release_list(&state, s).await?;
    Ok(layout::page(
        s,
        Nav::Rollouts,
        "Rollout preview",
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/rollouts" { "Rollouts" } " / preview" }
            (heading(&format!("Preview: {} to {} device(s)", p.version, p.targets), None))
            (preview_view(&p))
            section.panel {
                h2 { "Create it" }
                p { "The rollout is saved as a draft; it starts when you start it." }
                form method="post" action="/ui/rollouts" {
                    (csrf_field(s))
                    (f.hidden())
                    button.primary type="submit" disabled[p.targets == 0] { "Create rollout" }
                }
            }
            section.panel {
                h2 { "Adjust" }
                (spec_form(s, &f, &releases))
            }
        },
    ))
}

/// `POST /ui/rollouts`: creates the draft.
pub async fn create(State(state): State<AppState>, form: Form) -> UiResult {
    let spec = SpecForm::from_form(&form).spec()?;
    let r = transitions::create(&state, &form.session.op, spec).await?;
    Ok(see_other(&format!("/ui/rollouts/{}", r.id)))
}

fn state_class(state: &str) -> &'static str {
    match state {
        "committed" => "good",
        "downloading" | "installed" | "rebooting" | "scheduled" | "rolling_back" => "busy",
        "offline" => "warn",
        "failed" | "reverted" => "bad",
        _ => "neutral",
    }
}

async fn live_body(state: &AppState, s: &Session, id: &str) -> UiResult<(Rollout, Markup)> {
    let r = progress::detail(state, &s.op, id, true).await?;
    let samples = progress::samples(state, &s.op, id).await?;
    let waves = r.waves.as_deref().unwrap_or_default();
    let rows: Vec<(String, Vec<(String, u64)>)> = waves
        .iter()
        .map(|w| {
            (
                format!("wave {}", w.wave),
                w.states
                    .iter()
                    .map(|(k, v)| (k.clone(), u64::try_from(*v).unwrap_or(0)))
                    .collect(),
            )
        })
        .collect();
    let egress: Vec<(i64, f64)> = samples
        .iter()
        .map(|x| (x.at, x.reserved_bytes_per_sec as f64 / 1e6))
        .collect();
    let peak = egress.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let cap = r.spec.bandwidth.egress_cap_bytes_per_sec as f64 / 1e6;
    let devices = r.devices.as_deref().unwrap_or_default();
    let markup = html! {
        p data-status=(r.status) { "Status: " (status_badge(&r.status))
            @if let Some(why) = &r.status_reason { " " span { (why) } }
            " · wave " (r.current_wave) " of " (r.spec.waves.len()) " · " (r.devices_total) " device(s)" }
        @if !r.left_out.is_empty() {
            p.notice data-left-out { "Left out at the start: "
                @for (why, n) in &r.left_out { (n) " " (match why.as_str() {
                    "no_tpm" => "without a TPM (every wave they could join requires attestation)",
                    "unactivated" => "that have not activated their TPM",
                    other => other,
                }) "; " } }
        }
        @if !waves.is_empty() && r.status != "draft" {
            (charts::stacked("Progress per wave", &rows, state_class))
            div.table-wrap { table.waves {
                thead { tr { th scope="col" { "Wave" } th scope="col" { "Status" } th scope="col" { "Devices" } th scope="col" { "Committed" } th scope="col" { "Error rate" } th scope="col" { "States" } } }
                tbody { @for w in waves { tr data-wave=(w.wave) data-wave-status=(w.status) {
                    td { (w.wave) } td { (status_badge(&w.status)) } td { (w.devices) }
                    td { (charts::progress((w.committed_ratio * 1000.0).round() as i64, 1000, "committed")) }
                    td { (format!("{:.1} %", w.error_rate * 100.0)) }
                    td.small { @for (k, v) in &w.states { (k) ": " (v) " " } }
                } } }
            } }
        }
        @if egress.len() > 1 {
            (charts::lines("Reserved egress (MB/s)", &[Series { name: "reserved", class: "s1", points: egress }], cap.max(peak).max(0.001), ""))
        }
        @if !devices.is_empty() {
            details {
                summary { "Devices (" (devices.len()) ")" }
                div.table-wrap { table {
                    thead { tr { th scope="col" { "Device" } th scope="col" { "Wave" } th scope="col" { "State" } th scope="col" { "Link" } th scope="col" { "Download" } th scope="col" { "Window" } } }
                    tbody { @for d in devices { tr {
                        td { a href={ "/ui/devices/" (d.id) } { (d.device_id) } } td { (d.wave) }
                        td { (status_badge(&d.state)) @if let Some(why) = &d.reason { br; span.small { (why) } } }
                        td { (d.link_class) }
                        td { (charts::progress(d.bytes_done, d.bytes_total.unwrap_or(d.delta_bytes), "download")) " " span.small { (format::ibytes(d.bytes_done)) " / " (format::ibytes(d.bytes_total.unwrap_or(d.delta_bytes))) } }
                        td.small { @if let Some(w) = &d.download_window { (format::time(w.not_before_ms)) " – " (format::clock(w.not_after_ms)) } }
                    } } }
                } }
            }
        }
    };
    Ok((r, markup))
}

/// The actions a rollout in `status` allows, in display order.
fn actions(status: &str) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut out = Vec::new();
    if status == "draft" {
        out.push((
            "start",
            "Start",
            "Start this rollout? Devices of the first wave get download windows.",
        ));
    }
    if matches!(status, "running" | "scheduled") {
        out.push((
            "pause",
            "Pause",
            "Pause this rollout? No new download windows; devices already installing finish.",
        ));
    }
    if status == "paused" {
        out.push((
            "resume",
            "Resume",
            "Resume this rollout? A wave a gate paused is promoted after its soak.",
        ));
    }
    if matches!(status, "draft" | "scheduled" | "running" | "paused") {
        out.push(("abort", "Abort", "Abort this rollout? Devices that have not started are cancelled; updated devices keep the new release."));
    }
    if matches!(
        status,
        "scheduled" | "running" | "paused" | "completed" | "aborted"
    ) {
        out.push(("rollback", "Roll back", "Roll back every updated device to its previous release? Each boots its other slot: no download."));
    }
    out
}

/// `GET /ui/rollouts/{id}`.
pub async fn detail(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> UiResult {
    let (r, live) = live_body(&state, &s, &id).await?;
    let draft_preview = if r.status == "draft" {
        let p = previews::preview_saved(&state, &s.op, &id, true).await?;
        Some(preview_view(&p))
    } else {
        None
    };
    let release = releases::detail(&state, &s.op, &r.release_id).await?;
    let title = if r.name.is_empty() {
        format!("Rollout of {}", release.version)
    } else {
        r.name.clone()
    };
    Ok(layout::page(
        &s,
        Nav::Rollouts,
        &title,
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/rollouts" { "Rollouts" } " / " (title) }
            (heading(&title, Some(html! { "release " a href={ "/ui/releases/" (release.id) } { (release.version) } " (" (release.compatible) ") · created " (format::time(r.created_at)) })))
            @if s.can(Role::Ops) {
                div.actions-bar {
                    @for (action, label, question) in actions(&r.status) {
                        form.inline method="post" action={ "/ui/rollouts/" (r.id) "/" (action) } data-confirm=(question) {
                            (csrf_field(&s))
                            button.{ @if action == "rollback" || action == "abort" { "danger" } @else { "primary" } } type="submit" data-action=(action) { (label) }
                        }
                        " "
                    }
                }
            }
            div #live data-refresh={ "/ui/rollouts/" (r.id) "/live" } data-interval="3" aria-live="polite" { (live) }
            @if let Some(p) = draft_preview {
                h2 { "Preview" }
                (p)
            }
        },
    ))
}

/// `GET /ui/rollouts/{id}/live`.
pub async fn live(State(state): State<AppState>, s: Session, Path(id): Path<String>) -> UiResult {
    let (_, body) = live_body(&state, &s, &id).await?;
    Ok(layout::fragment(body))
}

/// `POST /ui/rollouts/{id}/{action}`: start, pause, resume, abort,
/// rollback (ops, enforced by the service).
pub async fn act(
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    form: Form,
) -> UiResult {
    let Some(action) = Action::parse(&action) else {
        return Err(UiError::not_found(format!("No rollout action {action:?}.")));
    };
    transitions::act(&state, &form.session.op, &id, action).await?;
    Ok(see_other(&format!("/ui/rollouts/{id}")))
}
