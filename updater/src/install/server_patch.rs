//! Patches the server made ([`kernex_protocol::offered`]): chunk patches
//! from the booted release that the bundle does not carry, offered in the
//! poll answer ([`ServerPatch`]) and fetched from their own URL.
//!
//! They are used exactly like a bundle's own patch: [`Spliced`] makes each
//! one readable at its virtual place past the bundle
//! ([`kernex_protocol::offered::span`]), so the install's patch step (and
//! the protocol's request plan, which the server's preview counts) does
//! not change. Nothing in an offer is trusted: its table is checked
//! against the offer's SHA-256, decoded with the same bounds as a bundle's,
//! and every chunk a frame decodes to is checked against the signed chunk
//! index; a frame that fails costs its own bytes and the chunk comes from
//! the archive. An offer that cannot be used (404, bad table, another
//! base) is skipped with a warning: the install goes on without it.

use kernex_bootloader::BootFlow;
use kernex_protocol::api::ServerPatch;
use kernex_protocol::index::ChunkIndex;
use kernex_protocol::offered;
use kernex_protocol::patch::PatchTable;
use kernex_protocol::plan;
use kernex_protocol::reader::{Prefixed, RangeRead};
use kernex_protocol::{ImageEntry, Sha256Digest};

use super::{InstallOptions, InstallReport, ProgressFn};
use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::source::{Sink, Source};

/// The bundle, and past it ([`offered::OFFERED_AT`]) the offered patches:
/// reads route to the bundle's source or to a patch's, and the counts are
/// the sums.
#[derive(Debug)]
pub struct Spliced<'a> {
    bundle: Held<'a>,
    /// Per image of the manifest (by position): its offered patch's source.
    patches: Vec<Option<Box<dyn Source>>>,
}

/// The bundle's source: the caller's, or a fork owned by a worker thread.
#[derive(Debug)]
enum Held<'a> {
    Borrowed(&'a mut dyn Source),
    Owned(Box<dyn Source>),
}

impl Held<'_> {
    fn get(&self) -> &dyn Source {
        match self {
            Held::Borrowed(s) => &**s,
            Held::Owned(s) => s.as_ref(),
        }
    }

    fn get_mut(&mut self) -> &mut dyn Source {
        match self {
            Held::Borrowed(s) => &mut **s,
            Held::Owned(s) => s.as_mut(),
        }
    }
}

impl<'a> Spliced<'a> {
    /// `bundle`, with `patches[k]` readable at the virtual span of the
    /// `k`-th image's offered patch.
    pub fn new(bundle: &'a mut dyn Source, patches: Vec<Option<Box<dyn Source>>>) -> Self {
        Self {
            bundle: Held::Borrowed(bundle),
            patches,
        }
    }
}

impl RangeRead for Spliced<'_> {
    type Error = UpdateError;

    fn known_size(&mut self) -> Result<Option<u64>, UpdateError> {
        self.bundle.get_mut().known_size()
    }

    fn read_into(&mut self, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<(), UpdateError> {
        match offered::locate(offset) {
            None => self.bundle.get_mut().read_into(offset, len, sink),
            Some((k, at)) => match self.patches.get_mut(k).and_then(Option::as_mut) {
                Some(p) => p.read_into(at, len, sink),
                None => Err(UpdateError::Bundle(format!(
                    "no offered patch for image {k}"
                ))),
            },
        }
    }

    fn read_start(&mut self, len: u64) -> Result<Vec<u8>, UpdateError> {
        self.bundle.get_mut().read_start(len)
    }
}

impl Source for Spliced<'_> {
    fn name(&self) -> &str {
        self.bundle.get().name()
    }

    fn fetched_bytes(&self) -> u64 {
        self.bundle.get().fetched_bytes()
            + self
                .patches
                .iter()
                .flatten()
                .map(|p| p.fetched_bytes())
                .sum::<u64>()
    }

    fn requests(&self) -> u64 {
        self.bundle.get().requests()
            + self
                .patches
                .iter()
                .flatten()
                .map(|p| p.requests())
                .sum::<u64>()
    }

    fn is_local(&self) -> bool {
        self.bundle.get().is_local()
    }

    /// Forks the bundle's source and every offered patch's: the fork
    /// shares their counts, so the sums stay those of the whole install.
    fn fork(&self) -> Result<Box<dyn Source>, UpdateError> {
        let patches = self
            .patches
            .iter()
            .map(|p| p.as_ref().map(|p| p.fork()).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Box::new(Spliced {
            bundle: Held::Owned(self.bundle.get().fork()?),
            patches,
        }))
    }
}

/// The offered patch for the image `entry` from the booted image `base`
/// (`base_size` bytes), for when the bundle carries none from it: its
/// table, fetched and checked, and where its frames start (virtual
/// offsets: the `k`-th offer at the `k`-th span). None when there is no
/// such offer or it cannot be used.
pub(super) fn fetch_offered_table<S: Source + ?Sized>(
    source: &mut Prefixed<'_, S>,
    offers: &[ServerPatch],
    entry: &ImageEntry,
    base: &Sha256Digest,
    base_size: u64,
    index: &ChunkIndex,
) -> Option<(PatchTable, u64)> {
    let class = entry.slot_class;
    let (k, offer) = offers
        .iter()
        .enumerate()
        .find(|(_, o)| o.slot_class == class && &o.base_sha256 == base)?;
    let patch = offer.patch_ref();
    let span = offered::span(k, &patch);
    let request = plan::table_request(&patch, &span);
    let bytes = match source.read_range(request.offset, request.len) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(%class, url = %offer.url, error = %e, "server-made patch not fetched; fetching whole chunks");
            return None;
        }
    };
    match plan::usable_patch(&bytes, &patch, index, base_size) {
        Ok(table) => {
            tracing::info!(%class, from = %offer.base_version, entries = table.entries.len(), "using the server-made patch from the booted release");
            Some((table, span.offset + patch.table_size))
        }
        Err(reason) => {
            tracing::warn!(%class, %reason, "server-made patch not used; fetching whole chunks");
            None
        }
    }
}

/// [`super::install_with_progress`] with the patches the server offered
/// (`offers`, each with a source reading its URL): the bundle is read from
/// `bundle`, the patches through [`Spliced`].
pub fn install_offered(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    bundle: &mut dyn Source,
    offers: Vec<(ServerPatch, Box<dyn Source>)>,
    options: &InstallOptions,
    progress: &ProgressFn<'_>,
) -> Result<InstallReport, UpdateError> {
    // The `k`-th offer is read at the `k`-th virtual span (where it lies
    // changes no request's size: the preview's bytes hold).
    let (meta, sources): (Vec<ServerPatch>, Vec<Box<dyn Source>>) = offers.into_iter().unzip();
    let mut spliced = Spliced::new(bundle, sources.into_iter().map(Some).collect());
    super::install_inner(config, flow, &mut spliced, &meta, options, progress)
}
