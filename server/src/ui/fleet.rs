//! The fleet overview: counts from the database, what needs attention,
//! rollouts in progress, and the first steps on an empty fleet.

use axum::extract::State;
use maud::{Markup, html};

use super::charts;
use super::devices::device_table;
use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Session, UiResult};
use crate::AppState;
use crate::auth::Role;
use crate::service::devices::fleet::{self, DeviceFilter};
use crate::service::rollouts::progress;
use crate::store::now_ms;

/// Devices listed under "Needs attention" (the rest are a link away).
const ATTENTION_SHOWN: i64 = 20;

fn as_bars(counts: &[(String, i64)]) -> Vec<(String, u64)> {
    counts
        .iter()
        .map(|(k, n)| (k.clone(), u64::try_from(*n).unwrap_or(0)))
        .collect()
}

/// The first steps, on an empty fleet.
fn getting_started(s: &Session) -> Markup {
    html! {
        section.panel #getting-started {
            h2 { "Getting started" }
            p { "No device has enrolled yet. Four steps to the first one:" }
            ol {
                li { a href="/ui/keyring" { "Set the keyring" } ": the CA certificates whose signatures releases must carry." }
                li { a href="/ui/releases" { "Upload a release" } ": a signed bundle made with " code { "kernex-image bundle create" } "." }
                li { a href="/ui/enrollment-tokens" { "Create an enrollment token" } ": the factory line or the device uses it once to enroll." }
                li { "Start " code { "kernex-updater daemon" } " on the first device with that token; it appears on this page." }
            }
            @if !s.can(Role::Ops) { p.small { "Your role can read but not change these; ask an operator." } }
        }
    }
}

async fn overview_body(state: &AppState, s: &Session) -> UiResult<Markup> {
    let summary = fleet::summary(state, &s.op).await?;
    let attention = fleet::page(
        state,
        &s.op,
        &DeviceFilter {
            status: Some("attention".into()),
            limit: Some(ATTENTION_SHOWN),
            ..DeviceFilter::default()
        },
    )
    .await?;
    let rollouts = progress::list(state, &s.op).await?;
    let active: Vec<_> = rollouts
        .into_iter()
        .filter(|r| matches!(r.status.as_str(), "scheduled" | "running" | "paused"))
        .collect();
    Ok(html! {
        div.cards {
            a.card href="/ui/devices" data-count="total" {
                span.big { (summary.total) } span { "devices" }
            }
            @for (st, n) in &summary.by_status {
                a.card href={ "/ui/devices?status=" (st) } data-count=(st) {
                    span.big { (n) } span { (status_badge(st)) }
                }
            }
        }
        @if summary.total == 0 {
            (getting_started(s))
        } @else {
            div.grid3 {
                (charts::bars("Devices by status", &as_bars(&summary.by_status)))
                (charts::bars("Devices by version", &as_bars(&summary.by_version)))
                (charts::bars("Devices by hardware class", &as_bars(&summary.by_class)))
            }
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
        @if summary.total > 0 {
            section {
                h2 { "Needs attention (" (attention.total) ")" }
                @if attention.devices.is_empty() {
                    p.empty { "Every one of the " (summary.total) " device(s) is online and healthy." }
                } @else {
                    (device_table(&attention.devices, None))
                    @if attention.total > ATTENTION_SHOWN {
                        p { a href="/ui/devices?status=attention" { "All " (attention.total) " devices that need attention →" } }
                    }
                }
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
