//! kill -9 the real `kernex-updater` binary at random points of an install
//! over HTTP; after every kill the device still boots the old slot (or the
//! fully verified new one), and a re-run never downloads a chunk the journal
//! already holds. `KERNEX_POWER_CUTS` sets the number of kills (default 50).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// A child that exits before its kill is reaped by `try_wait`.
#![allow(clippy::zombie_processes)]

mod common;

use std::io::Cursor;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kernex_bootloader::Slot;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::{Sha256Digest, SlotClass};

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
