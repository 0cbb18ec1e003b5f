//! Fetching an image's index and its patch table, by the protocol's rules
//! (`kernex_protocol::reader` checks, `kernex_protocol::plan` requests):
//! exactly the requests the server's preview counts.

use kernex_protocol::bundle::BundleError;
use kernex_protocol::container::ImageSpans;
use kernex_protocol::index::ChunkIndex;
use kernex_protocol::patch::PatchTable;
use kernex_protocol::plan;
use kernex_protocol::reader::{Prefixed, RangeRead, check_index, check_index_head};
use kernex_protocol::{ImageEntry, Sha256Digest};

use super::{CHUNK_ATTEMPTS, InstallReport};
use crate::error::UpdateError;
use crate::source::Source;

/// Why one fetch of an index failed.
#[derive(Debug)]
enum IndexFailure {
    /// The bytes arrived but do not match the manifest's digests: corrupt
    /// on the way (fetched again) or on the server (after every attempt).
    Corrupt(BundleError),
    /// Anything else: the transport's own error, or an index whose digests
    /// match the signed manifest but which does not decode.
    Other(UpdateError),
}

impl From<UpdateError> for IndexFailure {
    fn from(e: UpdateError) -> Self {
        IndexFailure::Other(e)
    }
}

impl From<BundleError> for IndexFailure {
    fn from(e: BundleError) -> Self {
        match e {
            BundleError::Digest { .. } => IndexFailure::Corrupt(e),
            other => IndexFailure::Other(other.into()),
        }
    }
}

/// Gets an image's index: the head, pages the old index already holds, the
/// rest fetched (adjacent pages in one request), all checked against the
/// verified manifest ([`check_index_head`], [`check_index`]). An index that
/// does not match the manifest's digests is fetched again, whole, after a
/// backoff, like a chunk: up to [`CHUNK_ATTEMPTS`] times. An install calls
/// this before it touches the target slot, so an index corrupt for good
/// fails the install with the rollback slot as it was.
pub fn fetch_index<S: Source + ?Sized>(
    source: &mut Prefixed<'_, S>,
    spans: &ImageSpans,
    entry: &ImageEntry,
    old: Option<&[u8]>,
    report: &mut InstallReport,
) -> Result<(Vec<u8>, ChunkIndex), UpdateError> {
    let class = entry.slot_class;
    let mut old = old;
    let mut attempts = 1u32;
    loop {
        match fetch_index_once(source, spans, entry, old, report) {
            Ok(found) => return Ok(found),
            Err(IndexFailure::Other(e)) => return Err(e),
            Err(IndexFailure::Corrupt(e)) if attempts >= CHUNK_ATTEMPTS => {
                return Err(UpdateError::Bundle(format!(
                    "{e} (fetched {attempts} times)"
                )));
            }
            Err(IndexFailure::Corrupt(e)) => {
                let delay = crate::source::FIRST_BACKOFF
                    .saturating_mul(1 << (attempts - 1))
                    .min(crate::source::MAX_BACKOFF);
                tracing::warn!(%class, error = %e, attempt = attempts, ?delay, "fetching the index again");
                // The index may lie in the bundle's first read, and a page
                // kept from the booted slot's index may be the bad one:
                // fetch all of it anew.
                source.forget_prefix();
                old = None;
                report.index_refetched += 1;
                std::thread::sleep(delay);
                attempts += 1;
            }
        }
    }
}

/// One fetch of an index ([`fetch_index`]).
fn fetch_index_once<S: Source + ?Sized>(
    source: &mut Prefixed<'_, S>,
    spans: &ImageSpans,
    entry: &ImageEntry,
    old: Option<&[u8]>,
    report: &mut InstallReport,
) -> Result<(Vec<u8>, ChunkIndex), IndexFailure> {
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
