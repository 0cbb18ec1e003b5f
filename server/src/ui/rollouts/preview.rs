//! The rollout preview: bytes, metered cost and projected duration per
//! wave, as cards, charts and a table, with the planner's warnings.

use maud::{Markup, html};

use super::super::charts;
use super::super::format;
use crate::service::rollouts::preview::Preview;

pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{:.1} h", s as f64 / 3600.0),
        s => format!("{:.1} d", s as f64 / 86_400.0),
    }
}

pub fn money(v: f64) -> String {
    format!("{v:.2}")
}

pub fn preview_view(p: &Preview) -> Markup {
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
