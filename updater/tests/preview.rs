//! The preview is exact: what `Bundle::delta_from` (the server's rollout
//! preview, `kernex-image bundle delta`) says a device downloads equals,
//! to the byte and the request, what a real install over a real HTTP
//! Range server fetches — for a full install, a chunk delta, a patch delta
//! and an agent-only change — and a bundle smaller than the first read
//! installs over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::io::Cursor;

use common::*;
use kernex_bootloader::Slot;
use kernex_protocol::archive::{self, BuiltArchive};
use kernex_protocol::bundle::{self, Bundle, BundleDelta, ImageInput, ReleaseInfo};
use kernex_protocol::{FsType, SlotClass};
use kernex_updater::source::{self, Link};
use kernex_updater::{InstallOptions, InstallReport};

const MIB: usize = 1024 * 1024;

/// What the server's preview says a device on `old` (None: nothing to
/// seed from) downloads to install `new`.
fn preview(old: Option<&[u8]>, new: &[u8]) -> BundleDelta {
    let mut n = Bundle::open(Cursor::new(new.to_vec())).unwrap();
    match old {
        Some(old) => {
            let mut o = Bundle::open(Cursor::new(old.to_vec())).unwrap();
            n.delta_from(Some(&mut o)).unwrap()
        }
        None => n.delta_from::<Cursor<Vec<u8>>>(None).unwrap(),
    }
}

/// Installs `bundle` on `dev` over a fresh HTTP server; the report and
/// the bytes and requests the server answered.
fn install_over_http(dev: &Device, bundle: &[u8]) -> (InstallReport, u64, u64) {
    let server = Server::start(bundle.to_vec(), Fault::None);
    let config = dev.load();
    let mut flow = config.bootloader.open().unwrap();
    let mut src = source::open(&server.url, Link::unlimited()).unwrap();
    let report = kernex_updater::install(
        &config,
        flow.as_mut(),
        src.as_mut(),
        &InstallOptions::default(),
    )
    .unwrap();
    let served = server.served();
    let requests = server.requests.load(std::sync::atomic::Ordering::SeqCst);
    (report, served, requests)
}

/// The install fetched exactly what the preview says.
fn assert_exact(what: &str, predicted: &BundleDelta, fetched: (InstallReport, u64, u64)) {
    let (report, served, requests) = fetched;
    eprintln!(
        "{what}: predicted {} B in {} requests; served {served} B in {requests}; report {report:?}",
        predicted.total_bytes, predicted.requests
    );
    assert_eq!(served, predicted.total_bytes, "{what}: bytes served");
    assert_eq!(
        report.bytes_fetched, predicted.total_bytes,
        "{what}: bytes received"
    );
    assert_eq!(requests, predicted.requests, "{what}: requests served");
    assert_eq!(report.requests, predicted.requests, "{what}: requests made");
    let fetched: u64 = predicted
        .images
        .iter()
        .map(|i| i.delta.chunks_fetched)
        .sum();
    let patched: u64 = predicted
        .images
        .iter()
        .map(|i| i.delta.chunks_patched)
        .sum();
    assert_eq!(report.chunks_fetched, fetched, "{what}: chunks fetched");
    assert_eq!(report.chunks_patched, patched, "{what}: chunks patched");
}

/// Boots `dev` into B and commits it (after an install into B).
fn boot_b(dev: &Device) {
    dev.write_config("B", "");
    kernex_updater::boot::mark_good(&dev.load(), dev.flow().as_mut()).unwrap();
}

#[test]
fn full_install_fetches_what_the_preview_says() {
    let keys = keys();
    let v1 = image(3 * MIB, 1);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    // Slot A holds a factory image without a record: nothing to seed from.
    let dev = Device::new(&keys, &v1);
    let predicted = preview(None, &b1.bytes);
    assert_exact("full", &predicted, install_over_http(&dev, &b1.bytes));
    assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&v1));
}

#[test]
fn chunk_delta_fetches_what_the_preview_says() {
    let keys = keys();
    let v1 = image(4 * MIB, 1);
    let v2 = edit(&v1, 2 * MIB + 1234, 6000);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let b2 = bundle(&v2, "1.1.0", &keys.signer);
    let dev = Device::new(&keys, &v1);
    install_over_http(&dev, &b1.bytes);
    boot_b(&dev);
    let predicted = preview(Some(&b1.bytes), &b2.bytes);
    assert!(
        predicted.total_bytes * 10 < b2.bytes.len() as u64,
        "{predicted:?}"
    );
    assert_exact(
        "chunk delta",
        &predicted,
        install_over_http(&dev, &b2.bytes),
    );
    assert_eq!(file_sha256(&dev.path("slot-a.img")), sha256(&v2));
}

#[test]
fn patch_delta_fetches_what_the_preview_says() {
    let keys = keys();
    let v1 = image(4 * MIB, 1);
    let v2 = sprinkle(&v1, MIB, MIB, 3000);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let b2 = bundle_patched(&v2, "1.1.0", &keys, &b1);
    let dev = Device::new(&keys, &v1);
    install_over_http(&dev, &b1.bytes);
    boot_b(&dev);
    let predicted = preview(Some(&b1.bytes), &b2.bytes);
    assert!(
        predicted.images[0].delta.chunks_patched > 0,
        "{predicted:?}"
    );
    assert_exact(
        "patch delta",
        &predicted,
        install_over_http(&dev, &b2.bytes),
    );
    assert_eq!(file_sha256(&dev.path("slot-a.img")), sha256(&v2));
}

/// A signed bundle of a rootfs and an agent image.
fn two_image_bundle(rootfs: &[u8], agent: &[u8], version: &str, keys: &Keys) -> Vec<u8> {
    let mut built: Vec<(SlotClass, BuiltArchive, Vec<u8>)> = Vec::new();
    for (class, img) in [(SlotClass::Rootfs, rootfs), (SlotClass::Agent, agent)] {
        let mut data = Vec::new();
        let b = archive::build_archive(img, &mut data, &options(), &|_| {}).unwrap();
        built.push((class, b, data));
    }
    let inputs: Vec<ImageInput<'_>> = built
        .iter()
        .map(|(class, b, _)| ImageInput {
            class: *class,
            filesystem: FsType::Raw,
            built: b,
            patches: &[],
        })
        .collect();
    let release = ReleaseInfo {
        version: semver::Version::parse(version).unwrap(),
        compatible: "qemu-aarch64".into(),
        min_updater_version: semver::Version::parse("0.1.0").unwrap(),
        security_version: 0,
        metadata: BTreeMap::new(),
    };
    let manifest_bytes = bundle::manifest_for(&release, &inputs)
        .unwrap()
        .to_vec()
        .unwrap();
    let sig = keys.signer.sign(&manifest_bytes).unwrap();
    let mut readers: Vec<Cursor<Vec<u8>>> = built
        .iter()
        .map(|(_, _, d)| Cursor::new(d.clone()))
        .collect();
    let mut images: Vec<(ImageInput<'_>, &mut dyn std::io::Read)> = inputs
        .into_iter()
        .zip(readers.iter_mut())
        .map(|(i, r)| (i, r as &mut dyn std::io::Read))
        .collect();
    let mut out = Vec::new();
    bundle::write_bundle(&mut out, &manifest_bytes, &sig, &mut images).unwrap();
    out
}

/// Adds an agent slot pair to `dev`'s config (slot A holding `agent`).
fn with_agent_slots(dev: &Device, booted: &str, agent: Option<&[u8]>) {
    dev.write_config(booted, "");
    if let Some(agent) = agent {
        std::fs::write(dev.path("agent-a.img"), agent).unwrap();
    }
    let text = std::fs::read_to_string(&dev.config).unwrap().replace(
        "[bootloader]",
        &format!(
            "[slots.agent]\nA = \"{}\"\nB = \"{}\"\n[bootloader]",
            dev.path("agent-a.img").display(),
            dev.path("agent-b.img").display()
        ),
    );
    std::fs::write(&dev.config, text).unwrap();
}

#[test]
fn agent_only_change_fetches_what_the_preview_says() {
    let keys = keys();
    let rootfs = image(2 * MIB, 1);
    let agent1 = image(MIB, 2);
    let agent2 = edit(&agent1, MIB / 2, 5000);
    let b1 = two_image_bundle(&rootfs, &agent1, "1.0.0", &keys);
    let b2 = two_image_bundle(&rootfs, &agent2, "1.1.0", &keys);
    let dev = Device::new(&keys, &rootfs);
    with_agent_slots(&dev, "A", Some(&agent1));
    let first = preview(None, &b1);
    assert_exact("full, two images", &first, install_over_http(&dev, &b1));
    with_agent_slots(&dev, "B", None);
    kernex_updater::boot::mark_good(&dev.load(), dev.flow().as_mut()).unwrap();
    let predicted = preview(Some(&b1), &b2);
    assert_eq!(predicted.images[0].delta.chunks_fetched, 0, "{predicted:?}");
    assert!(
        predicted.images[1].delta.chunks_fetched > 0,
        "{predicted:?}"
    );
    assert_exact("agent only", &predicted, install_over_http(&dev, &b2));
    assert_eq!(file_sha256(&dev.path("slot-a.img")), sha256(&rootfs));
    assert_eq!(file_sha256(&dev.path("agent-a.img")), sha256(&agent2));
}

#[test]
fn a_bundle_smaller_than_the_first_read_installs_over_http() {
    let keys = keys();
    let tiny = image(512, 5);
    let b = bundle(&tiny, "1.0.0", &keys.signer);
    let len = b.bytes.len() as u64;
    eprintln!("bundle of {len} bytes");
    assert!(len < kernex_updater::install::FIRST_READ, "{len}");
    let dev = Device::new(&keys, &image(512, 4));
    let predicted = preview(None, &b.bytes);
    assert_eq!(predicted.total_bytes, len, "{predicted:?}");
    assert_eq!(predicted.requests, 1, "{predicted:?}");
    let fetched = install_over_http(&dev, &b.bytes);
    assert_exact("tiny", &predicted, fetched);
    assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&tiny));
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::B));
}

#[test]
fn a_chunk_corrupted_in_the_first_read_is_fetched_again() {
    let keys = keys();
    let tiny = image(512, 5);
    let b = bundle(&tiny, "1.0.0", &keys.signer);
    let opened = Bundle::open(Cursor::new(b.bytes.clone())).unwrap();
    let chunk_at = opened.layout().images[0].archive.offset
        + opened.unverified_manifest().images[0].archive.header_size;
    assert!(chunk_at < kernex_updater::install::FIRST_READ);
    let dev = Device::new(&keys, &image(512, 4));
    let server = Server::start(b.bytes.clone(), Fault::CorruptOnce(chunk_at));
    let config = dev.load();
    let mut flow = config.bootloader.open().unwrap();
    let mut src = source::open(&server.url, Link::unlimited()).unwrap();
    let report = kernex_updater::install(
        &config,
        flow.as_mut(),
        src.as_mut(),
        &InstallOptions::default(),
    )
    .unwrap();
    assert_eq!(report.chunks_refetched, 1, "{report:?}");
    assert_eq!(report.requests, 2, "{report:?}");
    assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&tiny));
}
