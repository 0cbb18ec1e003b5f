//! kill -9 the real `kernex-updater` binary at random points of an install
//! over HTTP; after every kill the device still boots the old slot (or the
//! fully verified new one), and a re-run never downloads a chunk the journal
//! already holds. `KERNEX_POWER_CUTS` sets the number of kills (default 50).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A child that exits before its kill is reaped by `try_wait`.
#![allow(clippy::zombie_processes)]

mod common;
mod pause;

use std::io::Cursor;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kernex_bootloader::Slot;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::{Sha256Digest, SlotClass};
use pause::kill_at_pause;

fn run_updater(dev: &Device, url: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
        .args(["--config", dev.config.to_str().unwrap(), "install", url])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn kill_9_at_random_points_then_resume() {
    let kills: usize = std::env::var("KERNEX_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let keys = keys();
    let v1 = image(2 * 1024 * 1024, 1);
    let v2 = image(2 * 1024 * 1024, 2);
    let b = bundle(&v2, "2.0.0", &keys.signer);
    // Where each stored chunk lies in the bundle.
    let mut opened = Bundle::open(Cursor::new(b.bytes.clone())).unwrap();
    let manifest = opened.unverified_manifest().clone();
    let index = opened.read_index(&manifest, SlotClass::Rootfs).unwrap();
    let data_start = opened
        .layout()
        .image(SlotClass::Rootfs)
        .unwrap()
        .archive
        .offset
        + index.archive_data_offset();
    let chunk_span = |id: u32| {
        let c = &index.stored_chunks()[id as usize];
        (
            data_start + c.archive_offset,
            data_start + c.archive_offset + u64::from(c.archive_size),
        )
    };
    let server = Server::start(b.bytes.clone(), Fault::None);
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let started = Instant::now();
    let mut done_kills = 0;
    let mut rounds = 0;
    while done_kills < kills {
        rounds += 1;
        let dev = Device::new(&keys, &v1);
        // ~1 s per install at 2.5 MB/s, so kills land all over it.
        dev.write_config("A", "rate-limit = 2500000\n");
        let a_before = file_sha256(&dev.path("slot-a.img"));
        let journal = dev.path("data/install/journal");
        let pending_manifest = || -> Option<Sha256Digest> {
            let text = std::fs::read_to_string(dev.path("data/install/state.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v["manifest-sha256"].as_str()?.parse().ok()
        };
        let mut journaled = std::collections::HashSet::new();
        server.take_log();
        loop {
            let mut child = run_updater(&dev, &server.url);
            let delay = Duration::from_millis(30 + random(900));
            let deadline = Instant::now() + delay;
            let mut finished = None;
            while Instant::now() < deadline {
                if let Some(status) = child.try_wait().unwrap() {
                    finished = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if finished.is_none() {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                done_kills += 1;
            }
            // No response of this run overlapped a chunk journaled before it.
            for (start, sent) in server.take_log() {
                for &id in &journaled {
                    let (a, b) = chunk_span(id);
                    assert!(
                        start + sent <= a || start >= b,
                        "round {rounds}: chunk {id} ({a}..{b}) downloaded again by a request at {start}+{sent}"
                    );
                }
            }
            if let Some(m) = pending_manifest() {
                for (class, id) in kernex_updater::journal::read(&journal, &m, Slot::B).unwrap() {
                    assert_eq!(class, SlotClass::Rootfs);
                    journaled.insert(id);
                }
            }
            // The booted slot is untouched; the boot env boots A, or B only
            // once B verified.
            assert_eq!(file_sha256(&dev.path("slot-a.img")), a_before);
            let primary = dev.flow().primary_slot().unwrap();
            if primary == Some(Slot::B) {
                assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&v2));
            } else {
                assert_eq!(primary, Some(Slot::A));
            }
            if let Some(status) = finished {
                assert!(status.success(), "round {rounds}: install failed: {status}");
                break;
            }
            if done_kills >= kills {
                // Finish this round without a kill.
                let status = run_updater(&dev, &server.url).wait().unwrap();
                assert!(status.success());
                for (start, sent) in server.take_log() {
                    for &id in &journaled {
                        let (a, b) = chunk_span(id);
                        assert!(
                            start + sent <= a || start >= b,
                            "chunk {id} downloaded again"
                        );
                    }
                }
                break;
            }
        }
        assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&v2));
        assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::B));
        assert!(!journal.exists());
    }
    eprintln!(
        "{done_kills} kills in {rounds} rounds, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Where each stored rootfs chunk lies in the bundle.
fn chunk_spans(bundle: &[u8]) -> Vec<(u64, u64)> {
    let mut opened = Bundle::open(Cursor::new(bundle.to_vec())).unwrap();
    let manifest = opened.unverified_manifest().clone();
    let index = opened.read_index(&manifest, SlotClass::Rootfs).unwrap();
    let data_start = opened
        .layout()
        .image(SlotClass::Rootfs)
        .unwrap()
        .archive
        .offset
        + index.archive_data_offset();
    index
        .stored_chunks()
        .iter()
        .map(|c| {
            let a = data_start + c.archive_offset;
            (a, a + u64::from(c.archive_size))
        })
        .collect()
}

/// Power cuts at exact steps, not random ones: in the middle of a journal
/// write (a torn record on disk), between writing the slot record and the
/// boot env, and right after the boot env. The updater binary stops itself
/// at the step (`KERNEX_TEST_PAUSE_AT`, compiled in with the `failpoints`
/// feature, which the tests turn on) and is SIGKILLed there; then the same
/// invariants as the random test hold.
#[test]
fn kill_9_at_named_steps() {
    let keys = keys();
    let v1 = image(2 * 1024 * 1024, 1);
    let v2 = image(2 * 1024 * 1024, 2);
    let b = bundle(&v2, "2.0.0", &keys.signer);
    let spans = chunk_spans(&b.bytes);
    let server = Server::start(b.bytes.clone(), Fault::None);
    for step in [
        "journal-write",
        "journal-write:3",
        "slot-record",
        "env-write",
    ] {
        let dev = Device::new(&keys, &v1);
        let a_before = file_sha256(&dev.path("slot-a.img"));
        let journal = dev.path("data/install/journal");
        server.take_log();
        kill_at_pause(&dev.config, &["install", &server.url], step, 60);

        // The booted slot is untouched; A boots, or B once B verified.
        assert_eq!(file_sha256(&dev.path("slot-a.img")), a_before, "{step}");
        let primary = dev.flow().primary_slot().unwrap();
        match step {
            "env-write" => {
                assert_eq!(primary, Some(Slot::B), "{step}");
                assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&v2));
            }
            _ => assert_eq!(primary, Some(Slot::A), "{step}"),
        }
        // What the run left: a torn journal, or a recorded slot B.
        let mut journaled = std::collections::HashSet::new();
        if step.starts_with("journal-write") {
            let len = std::fs::metadata(&journal).unwrap().len();
            assert_ne!(
                (len - kernex_updater::journal::JOURNAL_HEADER as u64)
                    % kernex_updater::journal::JOURNAL_RECORD as u64,
                0,
                "{step}: the journal ends in a torn record"
            );
            let text = std::fs::read_to_string(dev.path("data/install/state.json")).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let m: Sha256Digest = v["manifest-sha256"].as_str().unwrap().parse().unwrap();
            for (_, id) in kernex_updater::journal::read(&journal, &m, Slot::B).unwrap() {
                journaled.insert(id);
            }
            assert!(!journaled.is_empty(), "{step}: nothing journaled");
        } else {
            assert!(dev.path("data/slot-B/record.json").exists(), "{step}");
            journaled.extend(0..spans.len() as u32);
        }
        server.take_log();

        // A re-run completes and downloads no journaled (or, once B is
        // recorded, no) chunk again.
        let out = Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
            .args([
                "--config",
                dev.config.to_str().unwrap(),
                "install",
                &server.url,
            ])
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert!(out.status.success(), "{step}: {out:?}");
        for (start, sent) in server.take_log() {
            for &id in &journaled {
                let (a, b) = spans[id as usize];
                assert!(
                    start + sent <= a || start >= b,
                    "{step}: chunk {id} ({a}..{b}) downloaded again by a request at {start}+{sent}"
                );
            }
        }
        assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&v2), "{step}");
        assert_eq!(file_sha256(&dev.path("slot-a.img")), a_before, "{step}");
        assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::B), "{step}");
        assert!(!journal.exists(), "{step}");
    }
}

/// The save points are not synced: a power cut may keep a journal record
/// whose chunk's data never reached the disk, or lose records whose data
/// did. Simulated on what a kill left (the process stopped in its sixth
/// journal append, then SIGKILLed): half the journaled chunks' data is
/// zeroed in slot B ("the data was lost") and the journal's last records
/// are cut off ("the records were lost"). The re-run re-hashes every
/// journaled chunk, fetches exactly the zeroed ones and those whose
/// records were cut again, and ends in the right image.
#[test]
fn a_power_cut_losing_unsynced_data_or_records_costs_only_those_chunks() {
    let keys = keys();
    let v1 = image(2 * 1024 * 1024, 1);
    let v2 = image(2 * 1024 * 1024, 2);
    let b = bundle(&v2, "2.0.0", &keys.signer);
    let spans = chunk_spans(&b.bytes);
    let mut opened = Bundle::open(Cursor::new(b.bytes.clone())).unwrap();
    let manifest = opened.unverified_manifest().clone();
    let index = opened.read_index(&manifest, SlotClass::Rootfs).unwrap();
    let server = Server::start(b.bytes.clone(), Fault::None);
    let dev = Device::new(&keys, &v1);
    let journal = dev.path("data/install/journal");
    kill_at_pause(
        &dev.config,
        &["install", &server.url],
        "journal-write:6",
        60,
    );

    let text = std::fs::read_to_string(dev.path("data/install/state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let m: Sha256Digest = v["manifest-sha256"].as_str().unwrap().parse().unwrap();
    // The records in the order they were appended.
    let bytes = std::fs::read(&journal).unwrap();
    let header = kernex_updater::journal::JOURNAL_HEADER;
    let record = kernex_updater::journal::JOURNAL_RECORD;
    let records: Vec<u32> = bytes[header..]
        .chunks_exact(record)
        .map(|r| u32::from_le_bytes([r[4], r[5], r[6], r[7]]))
        .collect();
    assert!(records.len() >= 8, "{} records", records.len());
    assert_eq!(
        kernex_updater::journal::read(&journal, &m, Slot::B)
            .unwrap()
            .len(),
        records.len()
    );
    // The last quarter of the records never reached the disk...
    let kept = records.len() * 3 / 4;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len((header + kept * record) as u64)
        .unwrap();
    // ...and of the records kept, every other chunk's data did not either
    // (zeroed; a chunk of zeros would still verify, so none of those).
    let zeros: std::collections::HashSet<u32> = index
        .image_chunks()
        .filter(|(at, _, c)| {
            v2[*at as usize..(*at + u64::from(c.source_size)) as usize]
                .iter()
                .all(|&x| x == 0)
        })
        .map(|(_, id, _)| id as u32)
        .collect();
    let lost: Vec<u32> = records[..kept]
        .iter()
        .copied()
        .filter(|id| !zeros.contains(id))
        .step_by(2)
        .collect();
    assert!(lost.len() >= 2, "{lost:?}");
    {
        use std::os::unix::fs::FileExt;
        let slot = std::fs::OpenOptions::new()
            .write(true)
            .open(dev.path("slot-b.img"))
            .unwrap();
        for (at, id, chunk) in index.image_chunks() {
            if lost.contains(&(id as u32)) {
                slot.write_all_at(&vec![0u8; chunk.source_size as usize], at)
                    .unwrap();
            }
        }
    }
    server.take_log();

    let out = Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
        .args([
            "--config",
            dev.config.to_str().unwrap(),
            "install",
            &server.url,
        ])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(file_sha256(&dev.path("slot-b.img")), sha256(&v2));
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::B));
    // Every kept record whose data survived: not fetched again. Every
    // chunk whose data was lost, or whose record was: fetched again.
    let log = server.take_log();
    let fetched = |id: u32| {
        let (a, b) = spans[id as usize];
        log.iter()
            .any(|&(start, sent)| start < b && a < start + sent)
    };
    for (k, &id) in records.iter().enumerate() {
        let expect = k >= kept || lost.contains(&id);
        assert_eq!(fetched(id), expect, "record {k} (chunk {id})");
    }
}
