//! The device list: server-side search and filters, keyset pages of
//! [`PAGE`] devices with the count of all that match (from the database),
//! shareable URLs, and bulk actions on a selection or on the whole filter.

use axum::extract::{Query, State};
use maud::{Markup, html};
use serde::Deserialize;

use super::format;
use super::layout::{self, Nav, heading, status_badge};
use super::{Form, Session, UiError, UiResult, csrf_field};
use crate::AppState;
use crate::auth::Role;
use crate::service::devices::bulk::{self, Action, Target};
use crate::service::devices::fleet::{self, Device, DeviceFilter, STATUSES};
use crate::service::releases;
use crate::service::rollouts::link::DeviceLink;

/// Devices per page of the list.
pub const PAGE: i64 = 100;

/// The list's filters as in its URL (all optional; empty = any).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    tag: Option<String>,
    hardware_class: Option<String>,
    version: Option<String>,
    link_class: Option<String>,
    site: Option<String>,
    q: Option<String>,
    after: Option<String>,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl ListQuery {
    fn filter(&self, after: bool) -> DeviceFilter {
        DeviceFilter {
            tag: nonempty(&self.tag),
            hardware_class: nonempty(&self.hardware_class),
            version: nonempty(&self.version),
            status: nonempty(&self.status),
            link_class: nonempty(&self.link_class),
            site: nonempty(&self.site),
            q: nonempty(&self.q),
            after: if after { nonempty(&self.after) } else { None },
            limit: Some(PAGE),
            ..DeviceFilter::default()
        }
    }

    fn from_form(form: &Form) -> Self {
        let get = |k: &str| form.get(&format!("f_{k}")).map(str::to_string);
        ListQuery {
            status: get("status"),
            tag: get("tag"),
            hardware_class: get("hardware_class"),
            version: get("version"),
            link_class: get("link_class"),
            site: get("site"),
            q: get("q"),
            after: get("after"),
        }
    }

    fn pairs(&self) -> Vec<(&'static str, String)> {
        [
            ("q", &self.q),
            ("status", &self.status),
            ("tag", &self.tag),
            ("hardware_class", &self.hardware_class),
            ("version", &self.version),
            ("link_class", &self.link_class),
            ("site", &self.site),
        ]
        .into_iter()
        .filter_map(|(k, v)| nonempty(v).map(|v| (k, v)))
        .collect()
    }

    /// The list's URL for this filter (first page).
    fn url(&self) -> String {
        let q: Vec<String> = self
            .pairs()
            .iter()
            .map(|(k, v)| format!("{k}={}", format::url_encode(v)))
            .collect();
        if q.is_empty() {
            "/ui/devices".into()
        } else {
            format!("/ui/devices?{}", q.join("&"))
        }
    }

    fn hidden(&self) -> Markup {
        html! { @for (k, v) in self.pairs() { input type="hidden" name={ "f_" (k) } value=(v); } }
    }
}

/// A table of devices; with `select`, each row has a checkbox named
/// `device` for the bulk form `form_id`.
pub fn device_table(list: &[Device], select: Option<&str>) -> Markup {
    html! {
        div.table-wrap {
            table {
                thead { tr {
                    @if let Some(form) = select { th scope="col" {
                        input #select-all type="checkbox" data-select-all="device" form=(form) aria-label="Select every device of this page";
                    } }
                    th scope="col" { "Device" } th scope="col" { "Status" } th scope="col" { "Version" }
                    th scope="col" { "Hardware class" } th scope="col" { "Tags" } th scope="col" { "Last seen" }
                } }
                tbody {
                    @for d in list {
                        tr data-device=(d.device_id) {
                            @if let Some(form) = select {
                                td { input type="checkbox" name="device" value=(d.id) form=(form) id={ "sel-" (d.id) } aria-label={ "Select " (d.device_id) }; }
                            }
                            td { a href={ "/ui/devices/" (d.id) } { (d.device_id) } }
                            td {
                                @if d.revoked { (status_badge("revoked")) } @else { (status_badge(&d.status)) }
                                @if d.attestation.state != "unattested" { " " (status_badge(&d.attestation.state)) }
                                @if let Some(r) = &d.status_reason { br; span.small.reason { (r) } }
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

/// The outcome of a bulk action, shown above the list.
enum Notice {
    Done(String),
    Failed(String),
}

/// The bulk form's values, kept when it is shown again.
#[derive(Default)]
struct BulkValues {
    action: String,
    value: String,
    scope: String,
}

/// `GET /ui/devices`: the device list with filters, search and pages.
pub async fn devices(
    State(state): State<AppState>,
    s: Session,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> UiResult {
    let Ok(Query(q)) = query else {
        return Err(UiError::bad_request(
            "This address has a parameter the device list does not know. \
             Its filters are q, status, tag, hardware_class, version, link_class, site and after.",
        ));
    };
    render(&state, &s, q, None, BulkValues::default()).await
}

async fn render(
    state: &AppState,
    s: &Session,
    q: ListQuery,
    notice: Option<Notice>,
    bulk_values: BulkValues,
) -> UiResult {
    let page = match fleet::page(state, &s.op, &q.filter(true)).await {
        Ok(p) => p,
        // A bad filter value is said next to the filters.
        Err(crate::service::Error::Invalid(why)) => {
            return Err(UiError::bad_request(format!(
                "The device list's filter: {why}."
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let values = fleet::filter_values(state, &s.op).await?;
    let releases = if s.can(Role::Ops) {
        releases::list(state, &s.op).await?
    } else {
        Vec::new()
    };
    let requests = super::enrollment_requests::section(state, s).await?;
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
    let mut statuses: Vec<String> = STATUSES.iter().map(|s| s.to_string()).collect();
    statuses.push("attention".into());
    let classes = ["ethernet", "wifi", "metered-4g"].map(String::from);
    let filtered = !q.pairs().is_empty();
    let next = page.next.as_deref().map(|c| {
        let base = q.url();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}after={c}")
    });
    let first_shown = page.devices.first().map(|d| d.device_id.clone());
    Ok(layout::page(
        s,
        Nav::Devices,
        "Devices",
        html! {
            (heading("Devices", None))
            (requests)
            form.filters method="get" action="/ui/devices" role="search" {
                div.field {
                    label for="q" { "Search" }
                    input #q type="search" name="q" value=(q.q.as_deref().unwrap_or("")) placeholder="device id, hostname or tag" maxlength="128";
                }
                (select("status", "Status", &statuses, &nonempty(&q.status)))
                (select("tag", "Tag", &values.tags, &nonempty(&q.tag)))
                (select("hardware_class", "Hardware class", &values.hardware_classes, &nonempty(&q.hardware_class)))
                (select("version", "Version", &values.versions, &nonempty(&q.version)))
                (select("link_class", "Link", &classes, &nonempty(&q.link_class)))
                div.field {
                    label for="site" { "Site" }
                    input #site type="text" name="site" value=(q.site.as_deref().unwrap_or("")) maxlength="128";
                }
                div.field.actions {
                    button type="submit" { "Filter" }
                    a href="/ui/devices" { "Clear" }
                }
            }
            @match &notice {
                Some(Notice::Done(m)) => p.ok #bulk-result role="status" { (m) },
                Some(Notice::Failed(m)) => p.notice #bulk-result role="alert" { (m) },
                None => {},
            }
            p.small #device-count data-total=(page.total) {
                (page.total) " device(s)" @if filtered { " match" }
                @if let Some(f) = &first_shown { @if q.after.is_some() { " · this page from " (f) } }
            }
            @if page.devices.is_empty() { p.empty { "No device matches." } } @else {
                (device_table(&page.devices, s.can(Role::Ops).then_some("bulk")))
            }
            nav.pager aria-label="Pages" {
                @if q.after.is_some() { a href=(q.url()) { "← First page" } " " }
                @if let Some(n) = &next { a #next-page href=(n) rel="next" { "Next " (PAGE) " →" } }
            }
            @if s.can(Role::Ops) && page.total > 0 {
                (bulk_form(s, &q, page.total, &bulk_values, &releases))
            }
        },
    ))
}

fn bulk_form(
    s: &Session,
    q: &ListQuery,
    total: i64,
    v: &BulkValues,
    releases: &[releases::Release],
) -> Markup {
    let scope_all = v.scope == "filter";
    html! {
        section.panel #bulk-panel {
            h2 { "Act on devices" }
            form #bulk method="post" action="/ui/devices/bulk" {
                (csrf_field(s))
                (q.hidden())
                @if let Some(a) = &q.after { input type="hidden" name="f_after" value=(a); }
                fieldset {
                    legend { "Which devices" }
                    div.check { input #scope-selected type="radio" name="scope" value="selected" checked[!scope_all];
                        label for="scope-selected" { "The devices ticked on this page" } }
                    div.check { input #scope-filter type="radio" name="scope" value="filter" checked[scope_all];
                        label for="scope-filter" { "All " (total) " device(s) this filter matches" } }
                }
                div.grid3 {
                    div.field {
                        label for="bulk-action" { "Action" }
                        select #bulk-action name="action" {
                            @for (k, label) in [("tag", "Add tag"), ("untag", "Remove tag"), ("link_class", "Set link class"), ("site", "Set site"), ("time_zone", "Set time zone"), ("revoke", "Revoke")] {
                                option value=(k) selected[v.action == k] { (label) }
                            }
                        }
                    }
                    div.field {
                        label for="bulk-value" { "Value" }
                        input #bulk-value type="text" name="value" value=(v.value) maxlength="128"
                            aria-describedby="bulk-value-hint";
                        span.small #bulk-value-hint { "the tag, link class, site or time zone (not used by Revoke)" }
                    }
                }
                div.field.actions {
                    button.primary type="submit" { "Apply" }
                }
                @if !releases.is_empty() {
                    div.field.actions {
                        label for="bulk-release" { "Or deploy the ticked devices to" }
                        select #bulk-release name="release_id" {
                            @for r in releases { option value=(r.id) { (r.version) " (" (r.compatible) ")" } }
                        }
                        button type="submit" formaction="/ui/deployments/confirm" { "Review deployment" }
                    }
                }
            }
        }
    }
}

/// `POST /ui/devices/bulk` (ops): a bulk action, then the list again
/// (same filter, same page) with what was done, or the refusal next to
/// the form with the values kept.
pub async fn bulk(State(state): State<AppState>, form: Form) -> UiResult {
    let s = form.session.clone();
    let q = ListQuery::from_form(&form);
    let values = BulkValues {
        action: form.get("action").unwrap_or("").to_string(),
        value: form.get("value").unwrap_or("").to_string(),
        scope: form.get("scope").unwrap_or("selected").to_string(),
    };
    let v = values.value.clone();
    let action = match values.action.as_str() {
        "tag" => Some(Action::Tag(v.clone())),
        "untag" => Some(Action::Untag(v.clone())),
        "link_class" => Some(Action::Link(DeviceLink {
            link_class: Some(v.clone()),
            ..Default::default()
        })),
        "site" => Some(Action::Link(DeviceLink {
            site: Some(v.clone()),
            ..Default::default()
        })),
        "time_zone" => Some(Action::Link(DeviceLink {
            time_zone: Some(v.clone()),
            ..Default::default()
        })),
        "revoke" => Some(Action::Revoke),
        _ => None,
    };
    let target = if values.scope == "filter" {
        Target::Filter(q.filter(false))
    } else {
        Target::Devices(form.all("device"))
    };
    let notice = match action {
        None => Notice::Failed("Choose an action.".into()),
        Some(Action::Tag(ref t) | Action::Untag(ref t)) if t.is_empty() => {
            Notice::Failed("Value: give the tag.".into())
        }
        Some(action) => match bulk::apply(&state, &s.op, &target, &action).await {
            Ok(n) => Notice::Done(match &action {
                Action::Tag(t) => format!("Tagged {n} device(s) with {t}."),
                Action::Untag(t) => format!("Removed tag {t} from {n} device(s)."),
                Action::Link(_) => format!("Changed the link of {n} device(s)."),
                Action::Revoke => format!("Revoked {n} device(s)."),
            }),
            Err(crate::service::Error::Invalid(why)) => Notice::Failed(format!("Not done: {why}.")),
            Err(e) => return Err(e.into()),
        },
    };
    let done = matches!(notice, Notice::Done(_));
    let kept = if done { BulkValues::default() } else { values };
    render(&state, &s, q, Some(notice), kept).await
}
