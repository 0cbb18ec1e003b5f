//! `install`: verify a bundle, clone its images into the inactive slot from
//! seeds and Range requests, verify the slot, and tell the bootloader to
//! try it.
//!
//! The bundle is read by the protocol's rules: `kernex_protocol::reader`
//! reads and checks its start and each index, `kernex_protocol::plan` says
//! which ranges to request, so what an install fetches is what the
//! server's preview (`Bundle::delta_from`) counts.
//!
//! * [`fetch`]: an image's index and its patch table.
//! * [`clone`]: the chunks, from the journal, the booted slot, patch
//!   frames and the archive, on a pool of worker threads with several
//!   requests in flight.
//! * [`writer`]: writing verified chunks, the journal's save points and
//!   the checkpoints that make them durable.

mod clone;
pub mod fetch;
mod readback;
pub mod server_patch;
mod writer;

use std::path::Path;

use kernex_bootloader::{BootFlow, DEFAULT_ATTEMPTS, Slot};
use kernex_protocol::reader::{BundleHead, Prefixed, check_members, read_head};
use kernex_protocol::{Manifest, Sha256Digest, SlotClass, VerifiedManifest, VerifyOptions};
use serde::Serialize;

pub use fetch::fetch_index;
pub use kernex_protocol::plan::{FIRST_READ, MAX_REQUEST};

use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::failpoints::failpoint;
use crate::journal::Journal;
use crate::slot::{SeedSlot, TargetSlot};
use crate::source::Source;
use crate::store::{DataDir, PendingInstall, SlotRecord};
use clone::{ImageJob, clone_image};

/// This updater's version, compared with a bundle's `min-updater-version`.
pub const UPDATER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Boot attempts a newly installed slot gets (the boot-state contract's).
pub use kernex_bootloader::DEFAULT_ATTEMPTS as TRY_ATTEMPTS;
pub use writer::{
    CHECKPOINT_EVERY, JOURNAL_BATCH_BYTES, JOURNAL_BATCH_CHUNKS, PROGRESS_EVERY, STATE_EVERY,
};
/// Range requests in flight at once (and threads cloning), unless
/// `[link] fetch-concurrency` says otherwise.
pub const DEFAULT_FETCH_CONCURRENCY: usize = 4;
/// Most requests in flight a config may ask for.
pub const MAX_FETCH_CONCURRENCY: usize = 32;
/// Times a chunk is fetched before a corrupt download is final: a bit
/// flipped on the way (a broken proxy, bad RAM in a router) is fetched
/// again, a chunk corrupt on the server fails the install.
pub const CHUNK_ATTEMPTS: u32 = 4;

/// Install settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct InstallOptions {
    /// Allow a version lower than the booted slot's.
    pub allow_downgrade: bool,
    /// Check certificate validity at this Unix time instead of now.
    pub at_time: Option<i64>,
}

/// How far an install is, given to the progress callback of
/// [`install_with_progress`] every [`PROGRESS_EVERY`] while chunks are
/// written, and at the end of each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct InstallProgress {
    /// Image bytes written and verified so far (all classes).
    pub done_bytes: u64,
    /// Image bytes in the bundle (all classes).
    pub total_bytes: u64,
    /// Bytes downloaded by this install so far (all runs).
    pub downloaded_bytes: u64,
}

impl InstallProgress {
    fn of(pending: &PendingInstall) -> Self {
        Self {
            done_bytes: pending.done_bytes,
            total_bytes: pending.total_bytes,
            downloaded_bytes: pending.downloaded_bytes,
        }
    }
}

/// Receives install progress ([`install_with_progress`]).
pub type ProgressFn<'a> = dyn Fn(InstallProgress) + 'a;

/// What an install did.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct InstallReport {
    /// Release version installed.
    pub version: String,
    /// Slot written.
    pub target: Option<Slot>,
    /// The slot already held this release (verified again, not rewritten).
    pub already_installed: bool,
    /// The bundle was read from local storage: `bytes-fetched` and
    /// `requests` count reads of a file, not downloads.
    pub local: bool,
    /// Bytes received from the source in this run.
    pub bytes_fetched: u64,
    /// Requests made (HTTP) or reads (file) in this run.
    pub requests: u64,
    /// Index pages reused from the booted slot's index.
    pub index_pages_reused: u64,
    /// Index pages fetched.
    pub index_pages_fetched: u64,
    /// Stored chunks fetched from the source.
    pub chunks_fetched: u64,
    /// Stored chunks copied from the booted slot.
    pub chunks_from_seed: u64,
    /// Stored chunks already in the target slot (from the journal).
    pub chunks_resumed: u64,
    /// Downloads of a chunk fetched again because it did not verify.
    pub chunks_refetched: u64,
    /// Downloads of an index fetched again because it did not match the
    /// manifest.
    pub index_refetched: u64,
    /// Chunks decoded from a patch against the booted slot.
    pub chunks_patched: u64,
    /// Patch frames that did not decode to their chunk (fetched from the
    /// archive instead).
    pub patch_failures: u64,
}

/// Checks the signature, then that the release is for this device, not
/// below its anti-rollback floor ([`crate::floor`]) and, unless
/// `allow_downgrade`, not older than the booted release.
pub fn verify_head(
    head: &BundleHead,
    config: &SystemConfig,
    booted: Option<&Manifest>,
    options: &InstallOptions,
) -> Result<VerifiedManifest, UpdateError> {
    let keyring = crate::boot::keyring(config)?;
    let verified = kernex_protocol::signature::verify_manifest(
        &keyring,
        &head.manifest_bytes,
        &head.signature,
        VerifyOptions {
            at_time: options.at_time,
        },
    )
    .map_err(|e| UpdateError::Bundle(e.to_string()))?;
    if verified.compatible != config.compatible {
        return Err(UpdateError::Refused(format!(
            "bundle is for {:?}, this device is {:?}",
            verified.compatible, config.compatible
        )));
    }
    let ours =
        semver::Version::parse(UPDATER_VERSION).map_err(|e| UpdateError::Refused(e.to_string()))?;
    if verified.min_updater_version > ours {
        return Err(UpdateError::Refused(format!(
            "bundle needs updater {} or later, this is {ours}",
            verified.min_updater_version
        )));
    }
    // Anti-rollback: no override, not even --allow-downgrade.
    crate::floor::Floor::for_device(config).check(
        verified.security_version,
        &format!("install {}", verified.version),
    )?;
    if let Some(booted) = booted
        && verified.version < booted.version
        && !options.allow_downgrade
    {
        return Err(UpdateError::Refused(format!(
            "bundle version {} is lower than the booted {} (use --allow-downgrade)",
            verified.version, booted.version
        )));
    }
    for image in &verified.images {
        if config.slots.pair(image.slot_class).is_none() {
            return Err(UpdateError::Refused(format!(
                "bundle carries a {} image but this device has no {} slots",
                image.slot_class, image.slot_class
            )));
        }
    }
    for class in config.slots.classes() {
        if verified.image(class).is_none() {
            return Err(UpdateError::Refused(format!(
                "this device has {class} slots but the bundle has no {class} image: a bundle must update every slot of the pair it boots"
            )));
        }
    }
    Ok(verified)
}

/// The slot to install into: the one not booted. Refused when the booted
/// slot is not committed (its counter is below [`DEFAULT_ATTEMPTS`]: the
/// boot script decremented it and no `mark-good` reset it) while the
/// bootloader would still fall back to the other slot (its counter is above
/// 0): overwriting that slot would leave an unproven image with no way back.
pub fn choose_target(flow: &mut dyn BootFlow) -> Result<(Slot, Slot), UpdateError> {
    let booted = flow.booted_slot()?;
    let target = booted.other();
    let state = flow.state()?;
    let booted_left = state.attempts_left(booted);
    let other_left = state.attempts_left(target);
    if booted_left < DEFAULT_ATTEMPTS && other_left > 0 {
        return Err(UpdateError::SlotState(format!(
            "slot {booted} is booted but not committed ({} is {booted_left}, mark-good sets it to {DEFAULT_ATTEMPTS}) and slot {target} is its only fallback; run `kernex-updater mark-good` once {booted} is healthy (or `mark-bad` to go back to {target}) before installing",
            booted.left_var()
        )));
    }
    Ok((booted, target))
}

/// Installs the bundle at `source` into the inactive slot.
pub fn install(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    source: &mut dyn Source,
    options: &InstallOptions,
) -> Result<InstallReport, UpdateError> {
    install_with_progress(config, flow, source, options, &|_| {})
}

/// [`install`], calling `progress` every [`PROGRESS_EVERY`] while chunks
/// are written and at the end of each step, on the install's own thread.
/// The same progress also lands in the data dir's pending install record
/// (`kernex-updater status`).
pub fn install_with_progress(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    source: &mut dyn Source,
    options: &InstallOptions,
    progress: &ProgressFn<'_>,
) -> Result<InstallReport, UpdateError> {
    install_inner(config, flow, source, &[], options, progress)
}

/// [`install_with_progress`], with the server's offered patches
/// ([`server_patch`]; `source` then reads them past the bundle).
fn install_inner(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    source: &mut dyn Source,
    offers: &[kernex_protocol::api::ServerPatch],
    options: &InstallOptions,
    progress: &ProgressFn<'_>,
) -> Result<InstallReport, UpdateError> {
    let data = DataDir::new(&config.data_dir);
    let result = run(config, flow, source, offers, options, &data, progress);
    let (outcome, reason, version, target) = match &result {
        Ok(r) => (
            crate::store::Outcome::Installed,
            format!(
                "{} installed into slot {}; boots next (fetched {} bytes)",
                r.version,
                r.target.map(|s| s.name()).unwrap_or("?"),
                r.bytes_fetched
            ),
            Some(r.version.clone()),
            r.target,
        ),
        Err(e) => {
            let pending = data.pending().ok().flatten();
            (
                crate::store::Outcome::Failed,
                e.to_string(),
                pending.as_ref().map(|p| p.version.clone()),
                pending.map(|p| p.target),
            )
        }
    };
    data.set_last_install(&crate::store::LastInstall {
        outcome,
        reason,
        version,
        target,
        at: crate::store::now(),
    })?;
    result
}

fn run(
    config: &SystemConfig,
    flow: &mut dyn BootFlow,
    source: &mut dyn Source,
    offers: &[kernex_protocol::api::ServerPatch],
    options: &InstallOptions,
    data: &DataDir,
    progress: &ProgressFn<'_>,
) -> Result<InstallReport, UpdateError> {
    let (booted, target) = choose_target(flow)?;
    // Whatever its path says, the target must not be the booted slot.
    crate::slot::check_target(config, booted, target)?;
    let booted_record = data.slot_record(booted)?;
    let booted_manifest = match &booted_record {
        Some(r) => Some(r.manifest()?),
        None => None,
    };
    let head = read_head(source)?;
    // Later reads of the bytes the first read holds are served from it.
    let source = &mut Prefixed::new(&head.prefix, source);
    check_members(source, &head.layout)?;
    let verified = verify_head(&head, config, booted_manifest.as_ref(), options)?;
    let manifest_sha256 = Sha256Digest::of(verified.bytes());
    let mut report = InstallReport {
        version: verified.version.to_string(),
        target: Some(target),
        local: source.inner().is_local(),
        ..InstallReport::default()
    };
    let total_bytes: u64 = verified.images.iter().map(|i| i.size).sum();

    // The target may already hold exactly this release (an earlier run
    // stopped between recording it and writing the boot env).
    if let Some(record) = data.slot_record(target)?
        && record.verified
        && record.manifest_digest() == manifest_sha256
    {
        verify_slots(config, &verified, target)?;
        flow.set_try_next(target, TRY_ATTEMPTS)?;
        data.clear_pending()?;
        report.already_installed = true;
        report.bytes_fetched = source.inner().fetched_bytes();
        report.requests = source.inner().requests();
        return Ok(report);
    }

    // Everything that can fail without touching the target fails first:
    // room for every image, then every index, fetched again while it does
    // not match the manifest. Until the target is invalidated below, its
    // record, its bytes and a rollback to it are as they were.
    crate::slot::check_room(config, target, &verified.images)?;
    let mut fetched: Vec<FetchedIndex<'_>> = Vec::new();
    for entry in &verified.images {
        let class = entry.slot_class;
        let spans = head
            .layout
            .image(class)
            .cloned()
            .ok_or_else(|| UpdateError::Bundle(format!("no {class} members in the layout")))?;
        let old = data.slot_index(booted, class)?;
        let (index_bytes, index) = fetch_index(
            source,
            &spans,
            entry,
            old.as_ref().map(|(b, _)| b.as_slice()),
            &mut report,
        )?;
        fetched.push(FetchedIndex {
            entry,
            spans,
            old: old.map(|(_, i)| i),
            index_bytes,
            index,
        });
    }

    // From here on the target is written: forget what it held, and make
    // sure the bootloader cannot boot it half-written.
    let mut pending = match data.pending()? {
        Some(p) if p.manifest_sha256 == manifest_sha256 && p.target == target => PendingInstall {
            source: source.inner().name().to_owned(),
            done_bytes: 0,
            ..p
        },
        _ => PendingInstall {
            source: source.inner().name().to_owned(),
            version: verified.version.to_string(),
            manifest_sha256,
            target,
            total_bytes,
            done_bytes: 0,
            downloaded_bytes: 0,
            started_at: crate::store::now(),
        },
    };
    data.set_pending(&pending)?;
    progress(InstallProgress::of(&pending));
    data.clear_slot(target)?;
    let state = flow.state()?;
    if state.attempts_left(target) > 0 || state.order.first() == Some(&target) {
        flow.mark_bad(target)?;
    }
    let (mut journal, done) = Journal::open(&data.journal_path(), &manifest_sha256, target)?;

    let mut indexes: Vec<(SlotClass, Vec<u8>)> = Vec::new();
    let mut read_back = Vec::new();
    for FetchedIndex {
        entry,
        spans,
        old,
        index_bytes,
        index,
    } in fetched
    {
        let class = entry.slot_class;
        let pair = config
            .slots
            .pair(class)
            .ok_or_else(|| UpdateError::Refused(format!("no {class} slots")))?;
        let base_image = booted_manifest
            .as_ref()
            .and_then(|m| m.image(class))
            .map(|e| (e.sha256, e.size));
        let seed = match old {
            Some(old_index) if old_index.hash_len() == index.hash_len() => {
                match SeedSlot::open(pair.path(booted)) {
                    Ok(s) => Some((s, old_index)),
                    Err(e) => {
                        tracing::warn!(error = %e, "booted slot cannot be read; not used as a seed");
                        None
                    }
                }
            }
            _ => None,
        };
        let patch = match (&seed, base_image) {
            (Some(_), Some((base, base_size))) => {
                match fetch::fetch_patch_table(source, &spans, entry, &base, base_size, &index)? {
                    Some(p) => Some(p),
                    // None in the bundle: the server's, if it made one.
                    None => server_patch::fetch_offered_table(
                        source, offers, entry, &base, base_size, &index,
                    ),
                }
            }
            _ => None,
        };
        let slot = TargetSlot::open(pair.path(target), entry.size)?;
        let reading = clone::Reading {
            source: &*source.inner(),
            prefix: &head.prefix,
            concurrency: fetch_concurrency(config),
        };
        let digest = clone_image(
            ImageJob {
                entry,
                spans,
                index: &index,
                seed,
                patch,
            },
            &reading,
            &slot,
            clone::Progress {
                journal: &mut journal,
                done: &done,
                data,
                pending: &mut pending,
                report: &mut report,
                progress,
            },
        )?;
        // The one sync of the slot's data this run must wait for: before
        // the journal vouches for it durably, and before the final check
        // and the boot flip.
        slot.sync()?;
        indexes.push((class, index_bytes));
        read_back.push((entry, digest));
    }
    journal.sync()?;
    progress(InstallProgress::of(&pending));
    // Every chunk written, synced and journaled; the final SHA-256 check of
    // the slot is next (hw-tests cuts the power here).
    failpoint!(pause "verify");
    if let Err(e) = check_read_back(config, &read_back, target) {
        // The journal vouched for chunks the slot does not hold: start over.
        crate::store::remove(&data.journal_path())?;
        return Err(e);
    }
    let record = SlotRecord {
        manifest: String::from_utf8(verified.bytes().to_vec())
            .map_err(|_| UpdateError::Bundle("manifest is not UTF-8".into()))?,
        signature: hex::encode(&head.signature),
        verified: true,
        installed_at: crate::store::now(),
    };
    let refs: Vec<(SlotClass, &[u8])> = indexes.iter().map(|(c, b)| (*c, b.as_slice())).collect();
    data.write_slot(target, &record, &refs)?;
    failpoint!(pause "slot-record");
    flow.set_try_next(target, TRY_ATTEMPTS)?;
    failpoint!(pause "env-write");
    data.clear_pending()?;
    report.bytes_fetched = source.inner().fetched_bytes();
    report.requests = source.inner().requests();
    Ok(report)
}

/// Requests in flight at once: `[link] fetch-concurrency`, else
/// [`DEFAULT_FETCH_CONCURRENCY`]; at least 1, at most
/// [`MAX_FETCH_CONCURRENCY`].
pub fn fetch_concurrency(config: &SystemConfig) -> usize {
    config
        .link
        .fetch_concurrency
        .map_or(DEFAULT_FETCH_CONCURRENCY, |n| n as usize)
        .clamp(1, MAX_FETCH_CONCURRENCY)
}

/// An image's index, fetched and checked before the target is touched,
/// with the booted slot's index of the same class (the seed's).
struct FetchedIndex<'m> {
    entry: &'m kernex_protocol::manifest::ImageEntry,
    spans: kernex_protocol::container::ImageSpans,
    old: Option<kernex_protocol::index::ChunkIndex>,
    index_bytes: Vec<u8>,
    index: kernex_protocol::index::ChunkIndex,
}

/// The final check of the written images: the SHA-256 each clone read
/// back from the slot as its chunks landed (`readback`) against the
/// manifest's; an image not read back whole is re-read now.
fn check_read_back(
    config: &SystemConfig,
    read_back: &[(&kernex_protocol::manifest::ImageEntry, Option<Sha256Digest>)],
    target: Slot,
) -> Result<(), UpdateError> {
    for (entry, digest) in read_back {
        let Some(found) = digest else {
            verify_images(config, std::slice::from_ref(*entry), target)?;
            continue;
        };
        if *found != entry.sha256 {
            return Err(UpdateError::SlotVerify {
                slot: target,
                class: entry.slot_class,
                expected: entry.sha256.to_hex(),
                found: found.to_hex(),
                size: entry.size,
            });
        }
    }
    Ok(())
}

/// Re-reads every image of `target` and checks size and SHA-256.
fn verify_slots(
    config: &SystemConfig,
    verified: &VerifiedManifest,
    target: Slot,
) -> Result<(), UpdateError> {
    verify_images(config, &verified.images, target)
}

/// Re-reads each of `images` from its slot `target` and checks size and
/// SHA-256 against the entry.
pub fn verify_images(
    config: &SystemConfig,
    images: &[kernex_protocol::manifest::ImageEntry],
    target: Slot,
) -> Result<(), UpdateError> {
    for entry in images {
        let pair = config
            .slots
            .pair(entry.slot_class)
            .ok_or_else(|| UpdateError::Refused(format!("no {} slots", entry.slot_class)))?;
        let path: &Path = pair.path(target);
        let found = crate::slot::digest(path, entry.size, entry.slot_class)?;
        if found != entry.sha256 {
            return Err(UpdateError::SlotVerify {
                slot: target,
                class: entry.slot_class,
                expected: entry.sha256.to_hex(),
                found: found.to_hex(),
                size: entry.size,
            });
        }
    }
    Ok(())
}
