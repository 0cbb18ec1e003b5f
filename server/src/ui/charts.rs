//! Inline SVG charts rendered on the server: no script, no external
//! library. Each chart has a text alternative (a title and, where it
//! matters, the numbers next to it).

use kernex_protocol::api::ReportState;
use maud::{Markup, html};

use super::format;

/// Horizontal bars, one per `(label, value)`, for counts.
pub fn bars(title: &str, items: &[(String, u64)]) -> Markup {
    bars_with(title, items, |v| v.to_string())
}

/// Horizontal bars with each value written by `show`.
pub fn bars_with(title: &str, items: &[(String, u64)], show: impl Fn(u64) -> String) -> Markup {
    let max = items.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let row = 26u32;
    let height = (items.len() as u32).max(1) * row + 4;
    let label_w = 120u32;
    let bar_w = 190u32;
    html! {
        figure.chart {
            figcaption { (title) }
            @if items.is_empty() {
                p.empty { "Nothing yet." }
            } @else {
                svg role="img" aria-label=(title) viewBox={ "0 0 " (label_w + bar_w + 60) " " (height) }
                    width="100%" preserveAspectRatio="xMinYMin meet" {
                    title { (title) }
                    @for (i, (label, value)) in items.iter().enumerate() {
                        @let y = i as u32 * row + 2;
                        @let w = ((*value as f64 / max as f64) * f64::from(bar_w)).round().max(2.0);
                        text x=(label_w - 8) y=(y + 17) text-anchor="end" class="label" { (truncate(label, 18)) }
                        rect x=(label_w) y=(y + 4) width=(w) height=(row - 8) rx="3" class={ "bar " (bar_class(label)) } {}
                        text x={ (f64::from(label_w) + w + 6.0) } y=(y + 17) class="value" { (show(*value)) }
                    }
                }
            }
        }
    }
}

/// Horizontal stacked bars: per row, segments `(name, count)` coloured by
/// `class(name)`, with a legend.
pub fn stacked(
    title: &str,
    rows: &[(String, Vec<(String, u64)>)],
    class: impl Fn(&str) -> &'static str,
) -> Markup {
    let max = rows
        .iter()
        .map(|(_, segs)| segs.iter().map(|s| s.1).sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let row = 28u32;
    let height = (rows.len() as u32).max(1) * row + 4;
    let (label_w, bar_w) = (80.0_f64, 330.0_f64);
    let mut names: Vec<&str> = rows
        .iter()
        .flat_map(|(_, segs)| segs.iter().map(|s| s.0.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    // Each row: its label, y, segments (name, count, x, width), end, total.
    type Seg<'s> = (&'s str, u64, f64, f64);
    let laid: Vec<(&str, f64, Vec<Seg<'_>>, f64, u64)> = rows
        .iter()
        .enumerate()
        .map(|(i, (label, segs))| {
            let mut x = label_w;
            let mut out = Vec::new();
            for (name, n) in segs {
                let w = *n as f64 / max as f64 * bar_w;
                out.push((name.as_str(), *n, x, w));
                x += w;
            }
            let total = segs.iter().map(|s| s.1).sum();
            (label.as_str(), f64::from(i as u32 * row + 2), out, x, total)
        })
        .collect();
    html! {
        figure.chart {
            figcaption { (title) }
            svg role="img" aria-label=(title) viewBox={ "0 0 " (label_w + bar_w + 50.0) " " (height) } width="100%" preserveAspectRatio="xMinYMin meet" {
                title { (title) }
                @for (label, y, segs, end, total) in &laid {
                    text x=(label_w - 8.0) y=(y + 18.0) text-anchor="end" class="label" { (label) }
                    @for (name, n, x, w) in segs {
                        rect x=(x) y=(y + 4.0) width=(w) height=(f64::from(row) - 8.0) class={ "bar " (class(name)) } {
                            title { (name) ": " (n) }
                        }
                    }
                    text x=(end + 6.0) y=(y + 18.0) class="value" { (total) }
                }
            }
            ul.legend {
                @for n in &names { li { span class={ "swatch bar-" (class(n)) } {} (n.replace('_', " ")) } }
            }
        }
    }
}

/// The colour class of a status or state.
pub fn bar_class(label: &str) -> &'static str {
    if let Some(state) = ReportState::parse(label) {
        // A rolled-back device is back on a release it ran: not a fault.
        return match state {
            ReportState::RolledBack => "neutral",
            state => report_class(state),
        };
    }
    match label {
        "online" => "good",
        "updating" | "assigned" => "busy",
        "degraded" | "offline" => "warn",
        "error" => "bad",
        _ => "neutral",
    }
}

/// The colour class of what a device reported about an install.
pub fn report_class(state: ReportState) -> &'static str {
    match state {
        ReportState::Committed => "good",
        ReportState::Downloading | ReportState::Installed | ReportState::Rebooted => "busy",
        ReportState::Reverted | ReportState::Failed | ReportState::RolledBack => "bad",
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// One line of a time chart.
#[derive(Debug)]
pub struct Series<'a> {
    /// Legend.
    pub name: &'a str,
    /// CSS class (colour).
    pub class: &'a str,
    /// (unix ms, value) points, oldest first.
    pub points: Vec<(i64, f64)>,
}

/// Lines over time, y from 0 to `y_max` (with `unit` on the axis).
pub fn lines(title: &str, series: &[Series<'_>], y_max: f64, unit: &str) -> Markup {
    let (w, h) = (640.0_f64, 200.0_f64);
    let (left, right, top, bottom) = (44.0, 10.0, 10.0, 24.0);
    let all = series.iter().flat_map(|s| s.points.iter());
    let t0 = all.clone().map(|p| p.0).min().unwrap_or(0);
    let t1 = all.map(|p| p.0).max().unwrap_or(0).max(t0 + 1);
    let x = |t: i64| left + (t - t0) as f64 / (t1 - t0) as f64 * (w - left - right);
    let y = |v: f64| top + (1.0 - (v / y_max).clamp(0.0, 1.0)) * (h - top - bottom);
    let empty = series.iter().all(|s| s.points.is_empty());
    let clock = if t1 - t0 < 3_600_000 {
        format::clock_secs
    } else {
        format::clock
    };
    html! {
        figure.chart.wide {
            figcaption { (title) }
            @if empty {
                p.empty { "No data yet." }
            } @else {
                svg role="img" aria-label=(title) viewBox={ "0 0 " (w) " " (h) } width="100%" preserveAspectRatio="xMinYMin meet" {
                    title { (title) }
                    @for frac in [0.0, 0.5, 1.0] {
                        line x1=(left) x2=(w - right) y1=(y(frac * y_max)) y2=(y(frac * y_max)) class="grid" {}
                        text x=(left - 6.0) y=(y(frac * y_max) + 4.0) text-anchor="end" class="label" {
                            (format!("{:.0}{unit}", frac * y_max))
                        }
                    }
                    text x=(left) y=(h - 6.0) class="label" { (clock(t0)) }
                    text x=(w - right) y=(h - 6.0) text-anchor="end" class="label" { (clock(t1)) " UTC" }
                    @for s in series {
                        @if s.points.len() == 1 {
                            circle cx=(x(s.points[0].0)) cy=(y(s.points[0].1)) r="3" class={ "dot " (s.class) } {}
                        } @else {
                            polyline class={ "line " (s.class) } points=(
                                s.points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect::<Vec<_>>().join(" ")
                            ) {}
                        }
                    }
                }
                ul.legend {
                    @for s in series {
                        li { span class={ "swatch " (s.class) } {} (s.name)
                            @if let Some((_, v)) = s.points.last() { " — latest " (format!("{v:.1}{unit}")) }
                        }
                    }
                }
            }
        }
    }
}

/// What a device downloaded of what was planned for it, as a progress
/// bar shows it: a committed device had everything it needed, and none
/// shows more than planned.
pub fn download_share(state: &str, done: i64, planned: i64) -> (i64, i64) {
    let planned = planned.max(0);
    if state == "committed" {
        (planned, planned)
    } else {
        (done.clamp(0, planned), planned)
    }
}

/// A progress bar with its text.
pub fn progress(done: i64, total: i64, label: &str) -> Markup {
    let total = total.max(0);
    let done = done.clamp(0, total.max(0));
    let pct = if total > 0 {
        done as f64 * 100.0 / total as f64
    } else {
        0.0
    };
    html! {
        progress value=(done) max=(total.max(1)) aria-label=(label) {}
        " " span.small { (format!("{pct:.0} %")) }
    }
}
