//! The patches the server builds for a release (the delta planner's jobs)
//! on the release page: progress, size, why one failed, and "Retry".

use axum::extract::{Path, State};
use maud::{Markup, html};

use super::layout::status_badge;
use super::{Form, Session, UiResult, csrf_field, format, see_other};
use crate::AppState;
use crate::service::patches::{self, PatchJob};

/// The section (nothing when the release has no job).
pub fn section(s: &Session, release: &str, jobs: &[PatchJob]) -> Markup {
    if jobs.is_empty() {
        return html! {};
    }
    let busy = jobs
        .iter()
        .any(|j| j.status == "pending" || j.status == "building");
    html! {
        section #patch-jobs data-busy=(busy) {
            h2 { "Server-made patches" }
            p.sub { "Built for devices that run an older release this bundle carries no patch from. A device waits for its patch, then fetches the fewest bytes." }
            div.table-wrap { table {
                thead { tr {
                    th scope="col" { "From" } th scope="col" { "Image" } th scope="col" { "State" }
                    th scope="col" { "Progress" } th scope="col" { "Patch size" } th scope="col" { "" }
                } }
                tbody { @for j in jobs { tr data-job=(j.id) data-status=(j.status) {
                    td { (j.from_version) }
                    td { (j.slot_class) }
                    td { (status_badge(&j.status)) @if let Some(e) = &j.error { " " span.sub { (e) } } }
                    td {
                        progress value=(j.done_bytes.max(0)) max=(j.total_bytes.max(1)) {}
                        " " (format::bytes(u64::try_from(j.done_bytes).unwrap_or(0))) " / " (format::bytes(u64::try_from(j.total_bytes).unwrap_or(0)))
                    }
                    td { @if let Some(size) = j.size { (format::bytes(u64::try_from(size).unwrap_or(0))) } @else { "—" } }
                    td { @if j.status == "failed" {
                        form method="post" action={ "/ui/releases/" (release) "/patches/" (j.id) "/retry" } {
                            (csrf_field(s))
                            button type="submit" { "Retry" }
                        }
                    } }
                } } }
            } }
            @if busy { p.sub { "Building: reload the page to see progress." } }
        }
    }
}

/// The jobs of a release, for its page.
pub async fn of(state: &AppState, s: &Session, release: &str) -> UiResult<Vec<PatchJob>> {
    Ok(patches::jobs(state, &s.op.org_id, release).await?)
}

/// `POST /ui/releases/{id}/patches/{job}/retry`.
pub async fn retry(
    State(state): State<AppState>,
    Path((release, job)): Path<(String, String)>,
    form: Form,
) -> UiResult {
    patches::retry(&state, &form.session.op, &release, &job).await?;
    Ok(see_other(&format!("/ui/releases/{release}#patch-jobs")))
}
