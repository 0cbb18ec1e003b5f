//! Several Range requests in flight, with the server's faults, and what
//! `install` shows while it runs (`--json` progress lines, a local file
//! reported as reads).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Cursor;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kernex_bootloader::Slot;
use kernex_protocol::SlotClass;
use kernex_protocol::bundle::Bundle;
use kernex_updater::source::{self, Link};
use kernex_updater::{InstallOptions, InstallReport, UpdateError};

const MIB: usize = 1024 * 1024;

fn install(dev: &Device, location: &str) -> Result<InstallReport, UpdateError> {
    let config = dev.load();
    let mut flow = config.bootloader.open().unwrap();
    let mut src = source::open(location, Link::unlimited()).unwrap();
    kernex_updater::install(
        &config,
        flow.as_mut(),
        src.as_mut(),
        &InstallOptions::default(),
    )
}

/// A device booted from slot B holding `v1` (installed from `b1`,
/// committed), with `link` lines in its config.
fn device_on(keys: &Keys, v1: &[u8], b1: &Built, link: &str) -> Device {
    let dev = Device::new(keys, v1);
    let s1 = Server::start(b1.bytes.clone(), Fault::None);
    install(&dev, &s1.url).unwrap();
    dev.write_config("B", link);
    kernex_updater::boot::mark_good(&dev.load(), dev.flow().as_mut()).unwrap();
    dev
}

/// Bundle spans (start, end) of the archive chunks of `new` that `old`
/// does not hold: what a delta install fetches.
fn new_chunk_spans(old: &Built, new: &Built) -> Vec<(u64, u64)> {
    let read = |b: &Built| {
        let mut opened = Bundle::open(Cursor::new(b.bytes.clone())).unwrap();
        let manifest = opened.unverified_manifest().clone();
        let index = opened.read_index(&manifest, SlotClass::Rootfs).unwrap();
        let start = opened
            .layout()
            .image(SlotClass::Rootfs)
            .unwrap()
            .archive
            .offset
            + index.archive_data_offset();
        (index, start)
    };
    let (old_index, _) = read(old);
    let (index, start) = read(new);
    let held: std::collections::HashSet<_> =
        old_index.stored_chunks().iter().map(|c| c.hash).collect();
    index
        .stored_chunks()
        .iter()
        .filter(|c| !held.contains(&c.hash))
        .map(|c| {
            let a = start + c.archive_offset;
            (a, a + u64::from(c.archive_size))
        })
        .collect()
}

/// `base` with eight small edits far apart: eight separate chunk runs, so
/// eight archive requests.
fn eight_edits(base: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    for k in 0..8 {
        out = edit(&out, k * base.len() / 8 + 1000, 3000);
    }
    out
}

#[test]
fn concurrent_fetches_with_drops_and_corruption_end_in_the_right_image() {
    let keys = keys();
    let v1 = image(4 * MIB, 1);
    let v2 = eight_edits(&v1);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let b2 = bundle(&v2, "2.0.0", &keys.signer);
    let spans = new_chunk_spans(&b1, &b2);
    assert!(spans.len() >= 8, "{spans:?}");
    let mut old = Bundle::open(Cursor::new(b1.bytes.clone())).unwrap();
    let mut new = Bundle::open(Cursor::new(b2.bytes.clone())).unwrap();
    let predicted = new.delta_from(Some(&mut old)).unwrap();
    // A chunk of the fifth run, corrupted on the way.
    let (a, b) = spans[spans.len() * 5 / 8];
    let corrupt_at = (a + b) / 2;
    // Each response waits a little, so requests sent at once overlap.
    let slow: Observer = Arc::new(|_, _| std::thread::sleep(Duration::from_millis(30)));
    for (what, fault) in [
        ("clean", Fault::None),
        ("corrupt once", Fault::CorruptOnce(corrupt_at)),
        (
            "connection dropped every 20 KiB",
            Fault::CloseEvery(20 * 1024),
        ),
        ("no Range support", Fault::NoRange),
    ] {
        let dev = device_on(&keys, &v1, &b1, "fetch-concurrency = 4\n");
        let server = Server::observed(b2.bytes.clone(), fault, slow.clone());
        let report = install(&dev, &server.url).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(file_sha256(&dev.path("slot-a.img")), sha256(&v2), "{what}");
        assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&v1), "{what}");
        assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::A), "{what}");
        assert!(
            server.max_in_flight() > 1,
            "{what}: never more than one request in flight"
        );
        match fault {
            Fault::None => {
                // Concurrency changes when requests go, not which: the
                // preview still holds to the byte and the request.
                assert_eq!(server.served(), predicted.total_bytes, "{what}");
                assert_eq!(report.requests, predicted.requests, "{what}");
            }
            Fault::CorruptOnce(_) => {
                assert_eq!(report.chunks_refetched, 1, "{what}: {report:?}");
                // Fetched twice: in its request, then from it on.
                let twice = server
                    .log()
                    .iter()
                    .filter(|(s, n)| *s <= a && a < s + n)
                    .count();
                assert_eq!(twice, 2, "{what}");
            }
            _ => {}
        }
    }

    // With one request at a time nothing overlaps.
    let dev = device_on(&keys, &v1, &b1, "fetch-concurrency = 1\n");
    let server = Server::observed(b2.bytes.clone(), Fault::None, slow);
    install(&dev, &server.url).unwrap();
    assert_eq!(file_sha256(&dev.path("slot-a.img")), sha256(&v2));
    assert_eq!(server.max_in_flight(), 1);
    assert_eq!(server.served(), predicted.total_bytes);
}

fn updater(dev: &Device, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
        .args(["--config", dev.config.to_str().unwrap(), "install"])
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn install_json_prints_progress_lines_and_a_local_file_counts_reads() {
    let keys = keys();
    let v1 = image(2 * MIB, 1);
    let v2 = image(6 * MIB, 2);
    let b = bundle(&v2, "2.0.0", &keys.signer);

    let dev = Device::new(&keys, &v1);
    let path = dev.write_bundle("v2.kxb", &b.bytes);
    let out = updater(&dev, &[&path, "--json", "--fetch-concurrency", "2"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let (last, progress) = lines.split_last().unwrap();
    assert_eq!(last["event"], "installed", "{stdout}");
    assert_eq!(last["local"], true, "{stdout}");
    assert_eq!(last["version"], "2.0.0", "{stdout}");
    let read = last["bytes-fetched"].as_u64().unwrap();
    assert!(read > 0 && read <= b.bytes.len() as u64, "{stdout}");
    assert!(progress.len() >= 2, "{stdout}");
    let mut done = 0;
    for p in progress {
        assert_eq!(p["event"], "progress", "{p}");
        assert_eq!(p["transfer"], "read", "{p}");
        assert_eq!(p["total-bytes"], v2.len() as u64, "{p}");
        let d = p["done-bytes"].as_u64().unwrap();
        assert!(d >= done, "progress went backwards: {stdout}");
        done = d;
    }
    assert_eq!(done, v2.len() as u64, "{stdout}");
    assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&v2));

    // Without --json: one line that speaks of reading the file.
    let dev = Device::new(&keys, &v1);
    let path = dev.write_bundle("v2.kxb", &b.bytes);
    let out = updater(&dev, &[&path]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains(&format!("read {read} bytes from {path} in ")),
        "{stdout}"
    );
    assert!(!stdout.contains("request"), "{stdout}");

    // Over HTTP: downloads.
    let dev = Device::new(&keys, &v1);
    let server = Server::start(b.bytes.clone(), Fault::None);
    let out = updater(&dev, &[&server.url, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let first: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["transfer"], "downloaded", "{stdout}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["local"], false, "{stdout}");
    assert_eq!(last["bytes-fetched"], server.served(), "{stdout}");
}

/// The (start, end) ranges of `log` that overlap an earlier one.
fn fetched_twice(log: &[(u64, u64)]) -> Vec<((u64, u64), (u64, u64))> {
    let mut out = Vec::new();
    for (k, &(s, n)) in log.iter().enumerate() {
        for &(s0, n0) in &log[..k] {
            if s < s0 + n0 && s0 < s + n {
                out.push(((s0, s0 + n0), (s, s + n)));
            }
        }
    }
    out
}

/// No byte of a bundle is requested twice in one install: the first
/// read, the member headers, the index head and pages, the patch table
/// and frames and the chunks are each fetched once (what the first read
/// holds is never fetched again), for a full install, a chunk delta and a
/// patch delta, with several requests in flight.
#[test]
fn no_byte_is_fetched_twice_in_one_install() {
    let keys = keys();
    let v1 = image(4 * MIB, 1);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let one_file = edit(&v1, 2 * MIB + 1234, 600);
    let b_chunks = bundle(&one_file, "2.0.0", &keys.signer);
    let sprinkled = sprinkle(&one_file, MIB, MIB, 3000);
    let b_patch = bundle_patched(&sprinkled, "2.1.0", &keys, &b1);
    for (what, dev, b) in [
        ("full", Device::new(&keys, &v1), &b1),
        (
            "chunk delta",
            device_on(&keys, &v1, &b1, "fetch-concurrency = 4\n"),
            &b_chunks,
        ),
        (
            "patch delta",
            device_on(&keys, &v1, &b1, "fetch-concurrency = 4\n"),
            &b_patch,
        ),
    ] {
        let server = Server::start(b.bytes.clone(), Fault::None);
        install(&dev, &server.url).unwrap_or_else(|e| panic!("{what}: {e}"));
        let log = server.log();
        eprintln!("{what}: {log:?}");
        let twice = fetched_twice(&log);
        assert!(twice.is_empty(), "{what}: fetched twice: {twice:?}");
    }
}
