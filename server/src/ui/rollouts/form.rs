//! The rollout form: its fields, their defaults in the units an operator
//! types, and the API's `RolloutSpec` built from them (each bad field
//! named).

use std::collections::BTreeMap;

use maud::{Markup, html};
use serde_json::json;

use super::super::format;
use super::super::{Form, Session, csrf_field};
use crate::service::releases::Release;
use crate::service::rollouts::spec::RolloutSpec;

/// The form's fields with their defaults (the API's defaults, in the
/// units an operator types: decimal MB, as `format::bytes` shows them).
const FIELDS: &[(&str, &str)] = &[
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
    ("metered_cost_per_gb", "5"),
];

/// Fields an older form (or a script) may leave out: absent, they take
/// their default.
const OPTIONAL: &[(&str, &str)] = &[
    ("window_days", ""),
    ("max_concurrent", "100"),
    ("max_per_site", "2"),
    ("ethernet_rate_mb_s", "12.5"),
    ("ethernet_budget_mb_day", "0"),
    ("ethernet_cost_per_gb", "0"),
    ("wifi_rate_mb_s", "2.5"),
    ("wifi_budget_mb_day", "0"),
    ("wifi_cost_per_gb", "0"),
    ("metered_rate_mb_s", "0.5"),
];

/// The link classes of the form: (class, field prefix, label).
const CLASSES: [(&str, &str, &str); 3] = [
    ("ethernet", "ethernet", "Ethernet"),
    ("wifi", "wifi", "Wi-Fi"),
    ("metered-4g", "metered", "Metered 4G"),
];

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A refused field: its name and what is wrong.
#[derive(Debug, Clone)]
pub struct FieldError {
    /// The form field.
    pub field: &'static str,
    /// What is wrong, naming it.
    pub message: String,
}

pub fn refuse(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// The rollout form as submitted (or its defaults).
#[derive(Debug, Clone)]
pub struct SpecForm(BTreeMap<String, String>);

impl SpecForm {
    /// The defaults.
    pub fn defaults() -> Self {
        SpecForm(
            FIELDS
                .iter()
                .chain(OPTIONAL)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// The form showing `spec` (one soak and one set of gates: the first
    /// wave's, as the form gives every wave the same).
    pub fn from_spec(spec: &RolloutSpec) -> Self {
        let mut f = Self::defaults();
        let mut set = |k: &str, v: String| {
            f.0.insert(k.to_string(), v);
        };
        let num = |v: f64| {
            let s = format!("{v:.6}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        };
        set("name", spec.name.clone());
        set("release_id", spec.release_id.clone());
        set("tags", spec.selector.tags.join(", "));
        set("versions", spec.selector.current_versions.join(", "));
        let waves: Vec<String> = spec
            .waves
            .iter()
            .map(|w| match (w.count, w.percent) {
                (Some(n), _) => n.to_string(),
                (None, Some(p)) => format!("{}%", num(p)),
                (None, None) => "100%".into(),
            })
            .collect();
        set("waves", waves.join(", "));
        if let Some(w) = spec.waves.first() {
            set("soak_minutes", num(w.soak_secs as f64 / 60.0));
            set(
                "promote_max_error_pct",
                num(w.gates.promote_max_error_rate * 100.0),
            );
            set(
                "rollback_error_pct",
                num(w.gates.rollback_error_rate * 100.0),
            );
            set(
                "promote_min_committed_pct",
                num(w.gates.promote_min_committed * 100.0),
            );
            set(
                "require_attestation",
                if w.gates.require_attestation {
                    "1".into()
                } else {
                    String::new()
                },
            );
        }
        set(
            "start_at",
            spec.start_at_ms
                .map(|t| format::time(t).replace(' ', "T").chars().take(16).collect())
                .unwrap_or_default(),
        );
        if let Some(w) = spec.maintenance_windows.first() {
            set("window_start", w.start.clone());
            set("window_end", w.end.clone());
            set("window_days", w.days.join(" "));
        }
        let b = &spec.bandwidth;
        set(
            "egress_cap_mb_s",
            num(b.egress_cap_bytes_per_sec as f64 / 1e6),
        );
        set("max_concurrent", b.max_concurrent_downloads.to_string());
        set("max_per_site", b.max_concurrent_per_site.to_string());
        for (class, prefix, _) in CLASSES {
            if let Some(p) = b.link_classes.get(class) {
                set(
                    class_field(prefix, "rate"),
                    num(p.rate_bytes_per_sec as f64 / 1e6),
                );
                set(
                    class_field(prefix, "budget"),
                    num(p.budget_bytes_per_day.unwrap_or(0) as f64 / 1e6),
                );
                set(class_field(prefix, "cost"), num(p.cost_per_gb));
            }
        }
        f
    }

    /// The form as submitted (the optional fields' defaults when absent).
    pub fn from_form(form: &Form) -> Self {
        let mut f = Self::defaults();
        for (k, v) in FIELDS {
            f.0.insert(k.to_string(), form.get(k).unwrap_or("").to_string());
            let _ = v;
        }
        for (k, v) in OPTIONAL {
            let days = (*k == "window_days").then(|| form.all("window_days").join(" "));
            let sent = days.or_else(|| form.get(k).map(str::to_string));
            f.0.insert(k.to_string(), sent.unwrap_or_else(|| v.to_string()));
        }
        f
    }

    /// Sets one field.
    pub fn set(&mut self, k: &str, v: &str) {
        self.0.insert(k.to_string(), v.to_string());
    }

    fn get(&self, k: &str) -> &str {
        self.0.get(k).map(String::as_str).unwrap_or("")
    }

    fn number(&self, k: &'static str, label: &str, min: f64, max: f64) -> Result<f64, FieldError> {
        let v = self.get(k);
        v.parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && (min..=max).contains(n))
            .ok_or_else(|| {
                refuse(
                    k,
                    format!("{label}: a number from {min} to {max}, not {v:?}."),
                )
            })
    }

    fn words(&self, k: &str) -> Vec<String> {
        self.get(k)
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The API's spec; a bad field is refused with what is wrong.
    pub fn spec(&self) -> Result<RolloutSpec, FieldError> {
        let release_id = self.get("release_id");
        if release_id.is_empty() {
            return Err(refuse("release_id", "Choose a release."));
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
                        refuse("waves", format!("Wave {w:?}: a share from 1% to 100%."))
                    })?;
                json!({"percent": p})
            } else {
                let n: u64 = w.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    refuse(
                        "waves",
                        format!("Wave {w:?}: a device count (e.g. 5) or a share (e.g. 10%)."),
                    )
                })?;
                json!({"count": n})
            };
            let mut wave = wave;
            wave["soak_secs"] = json!((soak * 60.0).round() as u64);
            wave["gates"] = gates.clone();
            waves.push(wave);
        }
        if waves.is_empty() {
            return Err(refuse("waves", "Waves: at least one, e.g. 5, 10%, 100%."));
        }
        let start_at_ms = match self.get("start_at") {
            "" => None,
            s => Some(parse_local(s).ok_or_else(|| {
                refuse(
                    "start_at",
                    format!("Start: a date and time (UTC), not {s:?}."),
                )
            })?),
        };
        let days = self.words("window_days");
        if let Some(d) = days.iter().find(|d| !DAYS.contains(&d.as_str())) {
            return Err(refuse(
                "window_days",
                format!("Window days: mon to sun, not {d:?}."),
            ));
        }
        let windows = match (self.get("window_start"), self.get("window_end")) {
            ("", "") if days.is_empty() => vec![],
            ("", "") => {
                return Err(refuse(
                    "window_start",
                    "Maintenance window: days need a window; give its start and end.",
                ));
            }
            (s, e) if !s.is_empty() && !e.is_empty() => {
                vec![json!({"start": s, "end": e, "days": days})]
            }
            _ => {
                return Err(refuse(
                    "window_start",
                    "Maintenance window: give both its start and its end, or neither.",
                ));
            }
        };
        let cap = self.number("egress_cap_mb_s", "Egress cap (MB/s)", 0.001, 1_000_000.0)?;
        let mut classes = serde_json::Map::new();
        for (class, prefix, label) in CLASSES {
            let key = |what: &str| class_field(prefix, what);
            let rate = self.number(
                key("rate"),
                &format!("{label} rate (MB/s per device)"),
                0.001,
                100_000.0,
            )?;
            let budget = self.number(
                key("budget"),
                &format!("{label} budget (MB per device and day)"),
                0.0,
                1_000_000.0,
            )?;
            let cost = self.number(
                key("cost"),
                &format!("{label} cost per GB"),
                0.0,
                1_000_000.0,
            )?;
            let mut policy =
                json!({"rate_bytes_per_sec": (rate * 1e6).round() as u64, "cost_per_gb": cost});
            if budget > 0.0 {
                policy["budget_bytes_per_day"] = json!((budget * 1e6).round() as u64);
            }
            classes.insert(class.to_string(), policy);
        }
        let concurrent = self.number("max_concurrent", "Downloads at once", 1.0, 1_000_000.0)?;
        let per_site = self.number(
            "max_per_site",
            "Downloads at once per site",
            0.0,
            1_000_000.0,
        )?;
        let spec = json!({
            "name": self.get("name"),
            "release_id": release_id,
            "selector": {"tags": self.words("tags"), "current_versions": self.words("versions")},
            "waves": waves,
            "start_at_ms": start_at_ms,
            "maintenance_windows": windows,
            "bandwidth": {
                "egress_cap_bytes_per_sec": (cap * 1e6).round() as u64,
                "max_concurrent_downloads": concurrent.round() as u64,
                "max_concurrent_per_site": per_site.round() as u64,
                "link_classes": classes,
            },
        });
        serde_json::from_value(spec)
            .map_err(|e| refuse("name", format!("The rollout is not valid: {e}.")))
    }

    /// The form's values as hidden fields (the "Create" button's form).
    pub fn hidden(&self) -> Markup {
        html! { @for (k, v) in &self.0 {
            @if k == "window_days" {
                @for d in self.words(k) { input type="hidden" name=(k) value=(d); }
            } @else {
                input type="hidden" name=(k) value=(v);
            }
        } }
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

/// The rollout form, with `error` next to its field and the values kept.
pub fn spec_form(
    s: &Session,
    f: &SpecForm,
    releases: &[Release],
    error: Option<&FieldError>,
) -> Markup {
    spec_form_to(s, f, releases, error, "/ui/rollouts/preview", "Preview")
}

/// [`spec_form`] posting to `action` with the button `submit`.
pub fn spec_form_to(
    s: &Session,
    f: &SpecForm,
    releases: &[Release],
    error: Option<&FieldError>,
    action: &str,
    submit: &str,
) -> Markup {
    let field = |k: &'static str, label: &str, kind: &'static str, hint: &str| {
        let err = error.filter(|e| e.field == k);
        html! {
            div.field {
                label for=(k) { (label) }
                input id=(k) name=(k) type=(kind) value=(f.get(k)) step=[(kind == "number").then_some("any")]
                    aria-invalid=[err.map(|_| "true")] aria-describedby=[err.map(|_| format!("{k}-error"))];
                @if let Some(e) = err { span.error id={ (k) "-error" } role="alert" { (e.message) } }
                @if !hint.is_empty() { span.small { (hint) } }
            }
        }
    };
    let days = f.words("window_days");
    html! {
        form.rollout method="post" action=(action) {
            (csrf_field(s))
            @if let Some(e) = error { p.notice #form-error role="alert" { "Not done: " (e.message) } }
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
                    (field("waves", "Waves", "text", "device counts or cumulative shares, e.g. 5, 10%, 50%, 100%"))
                    (field("soak_minutes", "Soak per wave (minutes)", "number", ""))
                }
                div {
                    (field("promote_max_error_pct", "Promote below error rate (%)", "number", ""))
                    (field("rollback_error_pct", "Roll back above error rate (%)", "number", "between the two the rollout pauses for you"))
                    (field("promote_min_committed_pct", "Committed share to promote (%)", "number", ""))
                    div.field {
                        label {
                            input type="checkbox" name="require_attestation" value="1" checked[!f.get("require_attestation").is_empty()];
                            " Count a device only when committed and attested (a TPM quote shows it runs the release)"
                        }
                    }
                    (field("start_at", "Start (UTC)", "datetime-local", "empty: when started"))
                    (field("window_start", "Maintenance window from (device local time)", "time", ""))
                    (field("window_end", "… to", "time", "empty: any time"))
                    fieldset #window_days {
                        legend { "Window days" }
                        @for d in DAYS {
                            label.check { input type="checkbox" name="window_days" value=(d) checked[days.iter().any(|x| x == d)]; " " (d) }
                        }
                        span.small { "none ticked: every day" }
                        @if let Some(e) = error.filter(|e| e.field == "window_days") { span.error role="alert" { (e.message) } }
                    }
                }
                div {
                    (field("egress_cap_mb_s", "Fleet egress cap (MB/s)", "number", "1 MB = 1,000,000 bytes, everywhere in this UI"))
                    (field("max_concurrent", "Downloads at once, fleet-wide", "number", ""))
                    (field("max_per_site", "Downloads at once per site", "number", "0: no limit"))
                    @for (_, prefix, label) in CLASSES {
                        fieldset {
                            legend { (label) }
                            (field(class_field(prefix, "rate"), &format!("{label} rate (MB/s per device)"), "number", ""))
                            (field(class_field(prefix, "budget"), &format!("{label} budget (MB per device and day)"), "number", "0: no budget"))
                            (field(class_field(prefix, "cost"), &format!("{label} cost per GB"), "number", ""))
                        }
                    }
                }
            }
            div.field.actions {
                button type="submit" { (submit) }
            }
        }
    }
}

/// The field name of a link class's rate, budget or cost.
fn class_field(prefix: &str, what: &str) -> &'static str {
    match (prefix, what) {
        ("ethernet", "rate") => "ethernet_rate_mb_s",
        ("ethernet", "budget") => "ethernet_budget_mb_day",
        ("ethernet", _) => "ethernet_cost_per_gb",
        ("wifi", "rate") => "wifi_rate_mb_s",
        ("wifi", "budget") => "wifi_budget_mb_day",
        ("wifi", _) => "wifi_cost_per_gb",
        (_, "rate") => "metered_rate_mb_s",
        (_, "budget") => "metered_budget_mb_day",
        _ => "metered_cost_per_gb",
    }
}
