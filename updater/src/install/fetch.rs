//! Fetching an image's index and its patch table, by the protocol's rules
//! (`kernex_protocol::reader` checks, `kernex_protocol::plan` requests):
//! exactly the requests the server's preview counts.

use kernex_protocol::container::ImageSpans;
use kernex_protocol::index::ChunkIndex;
use kernex_protocol::patch::PatchTable;
use kernex_protocol::plan;
use kernex_protocol::reader::{Prefixed, RangeRead, check_index, check_index_head};
use kernex_protocol::{ImageEntry, Sha256Digest};

use super::InstallReport;
use crate::error::UpdateError;
use crate::source::Source;

/// Gets an image's index: the head, pages the old index already holds, the
/// rest fetched (adjacent pages in one request), all checked against the
/// verified manifest ([`check_index_head`], [`check_index`]).
pub fn fetch_index<S: Source + ?Sized>(
    source: &mut Prefixed<'_, S>,
    spans: &ImageSpans,
    entry: &ImageEntry,
    old: Option<&[u8]>,
    report: &mut InstallReport,
) -> Result<(Vec<u8>, ChunkIndex), UpdateError> {
    let head_bytes = source.read_range(spans.index.offset, entry.index.head_size)?;
    let head = check_index_head(entry, &head_bytes)?;
    let reused = plan::reusable_pages(&head, old);
    let mut pages: Vec<Option<Vec<u8>>> = reused
        .iter()
        .map(|r| {
            r.as_ref()
                .and_then(|r| old.and_then(|o| o.get(r.clone())))
                .map(<[u8]>::to_vec)
        })
        .collect();
    report.index_pages_reused += pages.iter().filter(|p| p.is_some()).count() as u64;
    for group in plan::page_groups(&head, &reused) {
        let request = plan::page_request(spans.index.offset, &head, &group);
        let bytes = source.read_range(request.offset, request.len)?;
        let mut at = 0usize;
        for k in group {
            let n = head.pages[k].len as usize;
            pages[k] = bytes.get(at..at + n).map(<[u8]>::to_vec);
            at += n;
            report.index_pages_fetched += 1;
        }
    }
    let mut bytes = head_bytes;
    for page in pages.into_iter().flatten() {
        bytes.extend_from_slice(&page);
    }
    let index = check_index(entry, &bytes)?;
    Ok((bytes, index))
}

/// Fetches and checks the table of the patch from the booted slot's image
/// `base` (`base_size` bytes), if the bundle carries one: the table and
/// where the patch's frames start in the bundle. A table that does not
/// match the manifest is not used (the chunks come from the archive), like
/// a chunk that does not verify: the install goes on.
pub fn fetch_patch_table<S: Source + ?Sized>(
    source: &mut Prefixed<'_, S>,
    spans: &ImageSpans,
    entry: &ImageEntry,
    base: &Sha256Digest,
    base_size: u64,
    index: &ChunkIndex,
) -> Result<Option<(PatchTable, u64)>, UpdateError> {
    let class = entry.slot_class;
    if entry.patch_from(base).is_none() {
        return Ok(None);
    }
    let Some((patch, span)) = plan::patch_from(entry, spans, base) else {
        return Err(UpdateError::Bundle(format!(
            "{class} patch from {base} is not in the layout"
        )));
    };
    let request = plan::table_request(patch, &span);
    let bytes = source.read_range(request.offset, request.len)?;
    match plan::usable_patch(&bytes, patch, index, base_size) {
        Ok(table) => {
            tracing::info!(%class, from = %patch.base_version, entries = table.entries.len(), "using the patch from the booted release");
            Ok(Some((table, span.offset + patch.table_size)))
        }
        Err(reason) => {
            tracing::warn!(%class, %reason, "patch not used; fetching whole chunks");
            Ok(None)
        }
    }
}
