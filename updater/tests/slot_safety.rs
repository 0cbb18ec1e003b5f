//! The updater never writes the wrong slot and never gives up the rollback
//! slot for less than a verified index and room for the image:
//!
//! * a target slot that resolves to the booted one (symlink, hard link,
//!   `dir/../a.img`, a bind mount, a loop device over the booted slot's
//!   file, a `/dev/disk/by-*` style link to it, a second device node) is
//!   refused, the booted slot hashed before and after;
//! * an index corrupted on the way is fetched again before the target is
//!   touched: the rollback slot's record, bytes and boot counter are
//!   checked while every index request is served;
//! * an image larger than the slot (a file slot's `size`, its filesystem's
//!   free space, a block device's size) is refused before anything is
//!   written.
//!
//! Loop devices and mounts need root; without them those cases print why
//! they were skipped (`KERNEX_TEST_REQUIRE_LOOP=1` makes that a failure).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::*;
use kernex_bootloader::Slot;
use kernex_updater::source::{self, Link, Source};
use kernex_updater::store::DataDir;
use kernex_updater::{InstallOptions, UpdateError};

const MIB: usize = 1024 * 1024;

fn install(dev: &Device, location: &str) -> Result<kernex_updater::InstallReport, UpdateError> {
    let config = dev.load();
    let mut flow = config.bootloader.open().unwrap();
    let mut src: Box<dyn Source> = source::open(location, Link::unlimited()).unwrap();
    kernex_updater::install(
        &config,
        flow.as_mut(),
        src.as_mut(),
        &InstallOptions::default(),
    )
}

/// Rewrites the device's config: booted slot, both slot paths, and extra
/// lines of the `[slots.rootfs]` table.
fn configure(dev: &Device, booted: &str, a: &Path, b: &Path, rootfs_extra: &str) {
    let p = |n: &str| dev.path(n).display().to_string();
    let text = format!(
        "compatible = \"qemu-aarch64\"\ndata-dir = \"{}\"\nkeyring = \"{}\"\nreboot-command = [\"true\"]\n\
         [slots.rootfs]\nA = \"{}\"\nB = \"{}\"\n{rootfs_extra}\n\
         [bootloader]\nbackend = \"file\"\npath = \"{}\"\nbooted-slot = \"{booted}\"\n",
        p("data"),
        p("keyring.pem"),
        a.display(),
        b.display(),
        p("boot-state")
    );
    std::fs::write(&dev.config, text).unwrap();
}

/// Whether a case that needs root may be skipped here.
fn skip(why: &str) {
    assert!(
        std::env::var_os("KERNEX_TEST_REQUIRE_LOOP").is_none(),
        "KERNEX_TEST_REQUIRE_LOOP is set but {why}"
    );
    eprintln!("SKIPPED: {why}");
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(LoopDevice(PathBuf::from(
                String::from_utf8_lossy(&out.stdout).trim(),
            ))),
            Ok(out) => {
                skip(&format!(
                    "losetup failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                None
            }
            Err(e) => {
                skip(&format!("no losetup: {e}"));
                None
            }
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mount, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], at: &Path) -> Option<Mount> {
        let out = Command::new("mount").args(args).arg(at).output();
        match out {
            Ok(out) if out.status.success() => Some(Mount(at.to_owned())),
            Ok(out) => {
                skip(&format!(
                    "mount {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                None
            }
            Err(e) => {
                skip(&format!("no mount: {e}"));
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Installs `bundle` into a device whose slot B is `b` (and A `a`) and
/// expects a refusal naming both paths, with slot A's file (`a_file`) and
/// the boot state unchanged and no install begun.
fn assert_refused(dev: &Device, bundle: &str, a: &Path, b: &Path, a_file: &Path, case: &str) {
    configure(dev, "A", a, b, "");
    let before = file_sha256(a_file);
    let state_before = std::fs::read(dev.path("boot-state")).ok();
    let err = install(dev, bundle).unwrap_err().to_string();
    eprintln!("{case}: {err}");
    assert!(
        err.contains("booted slot A")
            && err.contains(&a.display().to_string())
            && err.contains(&b.display().to_string()),
        "{case}: {err}"
    );
    assert_eq!(
        file_sha256(a_file),
        before,
        "{case}: the booted slot changed"
    );
    assert_eq!(
        std::fs::read(dev.path("boot-state")).ok(),
        state_before,
        "{case}: the boot state changed"
    );
    let data = DataDir::new(dev.path("data"));
    assert!(
        data.pending().unwrap().is_none(),
        "{case}: an install began"
    );
}

/// A device on v1 in slot A and v2's bundle written into its directory.
fn fresh() -> (Device, String, Vec<u8>) {
    let keys = keys();
    let v1 = image(MIB, 1);
    let v2 = image(MIB, 2);
    let b2 = bundle(&v2, "2.0.0", &keys.signer);
    let dev = Device::new(&keys, &v1);
    let bundle = dev.write_bundle("v2.kxb", &b2.bytes);
    (dev, bundle, v2)
}

#[test]
fn slot_b_a_symlink_to_the_booted_slot_is_refused() {
    let (dev, bundle, _) = fresh();
    let (a, b) = (dev.path("slot-a.img"), dev.path("slot-b.img"));
    std::os::unix::fs::symlink("slot-a.img", &b).unwrap();
    assert_refused(&dev, &bundle, &a, &b, &a, "symlink");
}

#[test]
fn slot_b_a_hard_link_to_the_booted_slot_is_refused() {
    let (dev, bundle, _) = fresh();
    let (a, b) = (dev.path("slot-a.img"), dev.path("slot-b.img"));
    std::fs::hard_link(&a, &b).unwrap();
    assert_refused(&dev, &bundle, &a, &b, &a, "hard link");
}

#[test]
fn slot_b_spelt_with_dot_dot_is_refused() {
    let (dev, bundle, _) = fresh();
    std::fs::create_dir(dev.path("dir")).unwrap();
    let a = dev.path("slot-a.img");
    let b = dev.path("dir/../slot-a.img");
    assert_refused(&dev, &bundle, &a, &b, &a, "dir/..");
}

#[test]
fn the_booted_slot_bind_mounted_over_slot_b_is_refused() {
    let (dev, bundle, _) = fresh();
    let (a, b) = (dev.path("slot-a.img"), dev.path("slot-b.img"));
    std::fs::write(&b, b"").unwrap();
    if let Some(_mount) = Mount::new(&["--bind", &a.display().to_string()], &b) {
        assert_refused(&dev, &bundle, &a, &b, &a, "bind mount");
    }
}

/// A loop device over the booted slot's file, reached directly, through a
/// `/dev/disk/by-*` style link and through a second device node; and the
/// other way round, the booted slot a loop device over slot B's file.
#[test]
fn a_loop_device_over_the_booted_slot_is_refused() {
    let (dev, bundle, _) = fresh();
    let a = dev.path("slot-a.img");
    let Some(lo) = LoopDevice::attach(&a) else {
        return;
    };
    assert_refused(&dev, &bundle, &a, &lo.0, &a, "loop device");

    std::fs::create_dir(dev.path("by-partuuid")).unwrap();
    let link = dev.path("by-partuuid/0a1b2c3d-02");
    std::os::unix::fs::symlink(&lo.0, &link).unwrap();
    assert_refused(&dev, &bundle, &a, &link, &a, "by-partuuid link");

    let rdev = std::fs::metadata(&lo.0).unwrap().rdev();
    let (major, minor) = (
        ((rdev >> 8) & 0xfff) | ((rdev >> 32) & 0xffff_f000),
        (rdev & 0xff) | ((rdev >> 12) & 0xffff_ff00),
    );
    let node = dev.path("loop-alias");
    let made = Command::new("mknod")
        .arg(&node)
        .args(["b", &major.to_string(), &minor.to_string()])
        .status();
    if made.is_ok_and(|s| s.success()) {
        assert_refused(&dev, &bundle, &a, &node, &a, "second device node");
    } else {
        skip("mknod failed");
    }

    assert_refused(
        &dev,
        &bundle,
        &lo.0,
        &a,
        &a,
        "booted slot is the loop device",
    );
}

#[test]
fn a_distinct_slot_b_installs() {
    let (dev, bundle, v2) = fresh();
    let (a, b) = (dev.path("slot-a.img"), dev.path("slot-b.img"));
    configure(&dev, "A", &a, &b, "");
    install(&dev, &bundle).unwrap();
    assert_eq!(file_sha256(&b), sha256(&v2));
    assert_eq!(file_sha256(&a), sha256(&image(MIB, 1)));
}

/// Brings `dev` (slot A holding `b1`'s image) to: A booted and committed
/// with `b1` installed, slot B holding `b1` with its record, so that a
/// rollback to B would work. Slot B's path is `b`.
fn settle_with_rollback_slot(dev: &Device, b1: &Built, b: &Path, rootfs_extra: &str) {
    let a = dev.path("slot-a.img");
    let path = dev.write_bundle("settle.kxb", &b1.bytes);
    configure(dev, "A", &a, b, rootfs_extra);
    assert_eq!(install(dev, &path).unwrap().target, Some(Slot::B));
    configure(dev, "B", &a, b, rootfs_extra);
    kernex_updater::boot::mark_good(&dev.load(), dev.flow().as_mut()).unwrap();
    assert_eq!(install(dev, &path).unwrap().target, Some(Slot::A));
    configure(dev, "A", &a, b, rootfs_extra);
    kernex_updater::boot::mark_good(&dev.load(), dev.flow().as_mut()).unwrap();
    assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::A));
}

/// What a rollback to slot B depends on: its record, its bytes, its boot
/// counter, and that no install is writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RollbackSlot {
    record: Option<String>,
    bytes: String,
    attempts: u32,
    pending: bool,
}

fn rollback_slot(config: &Path, b: &Path) -> RollbackSlot {
    let config = kernex_updater::SystemConfig::load(config).unwrap();
    let data = DataDir::new(&config.data_dir);
    let mut flow = config.bootloader.open().unwrap();
    RollbackSlot {
        record: data
            .slot_record(Slot::B)
            .unwrap()
            .map(|r| r.manifest_digest().to_hex()),
        bytes: file_sha256(b),
        attempts: flow.attempts_left(Slot::B).unwrap(),
        pending: data.pending().unwrap().is_some(),
    }
}

/// Asserts that a rollback to slot B works now (and undoes it).
fn assert_rollback_works(dev: &Device) {
    let mut flow = dev.flow();
    let state = std::fs::read(dev.path("boot-state")).unwrap();
    assert_eq!(
        kernex_updater::boot::rollback(&dev.load(), flow.as_mut(), false).unwrap(),
        Slot::B
    );
    assert_eq!(flow.primary_slot().unwrap(), Some(Slot::B));
    std::fs::write(dev.path("boot-state"), state).unwrap();
}

/// Installs v3 (`size` bytes) over HTTP with the last byte of its index
/// flipped (`once` or on every download) into a device booted on A with v1
/// in slot B (recorded): slot B is snapshotted while every index request is
/// served and must be as before each time. Returns where the byte lies.
fn install_with_flipped_index_byte(size: usize, once: bool) -> u64 {
    let keys = keys();
    let v1 = image(size, 1);
    let v3 = image(size, 3);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let b3 = bundle(&v3, "3.0.0", &keys.signer);
    let layout = kernex_protocol::bundle::Bundle::open(std::io::Cursor::new(b3.bytes.clone()))
        .unwrap()
        .layout()
        .clone();
    let index = layout.images[0].index;
    // The last byte of the index: in a page, past its head.
    let flip_at = index.offset + index.size - 1;

    let (fault, completes) = if once {
        (Fault::CorruptOnce(flip_at), true)
    } else {
        (Fault::Corrupt(flip_at), false)
    };
    let dev = Device::new(&keys, &v1);
    let b = dev.path("slot-b.img");
    settle_with_rollback_slot(&dev, &b1, &b, "");
    let intact = rollback_slot(&dev.config, &b);
    assert!(intact.record.is_some() && !intact.pending, "{intact:?}");
    assert_eq!(intact.bytes, sha256(&v1));

    // What slot B is while each request for the index is served.
    let seen: Arc<Mutex<Vec<RollbackSlot>>> = Arc::default();
    let (config, b_path, log) = (dev.config.clone(), b.clone(), seen.clone());
    let server = Server::observed(
        b3.bytes.clone(),
        fault,
        Arc::new(move |start, end| {
            if (start..end).contains(&flip_at) {
                log.lock().unwrap().push(rollback_slot(&config, &b_path));
            }
        }),
    );
    let result = install(&dev, &server.url);
    let seen = seen.lock().unwrap().clone();
    let attempts = u64::from(kernex_updater::install::CHUNK_ATTEMPTS);
    assert_eq!(
        seen.len() as u64,
        if completes { 2 } else { attempts },
        "{fault:?}: {result:?}"
    );
    for s in &seen {
        assert_eq!(
            s, &intact,
            "{fault:?}: slot B touched before the index verified"
        );
    }

    if completes {
        let report = result.unwrap();
        assert_eq!(report.index_refetched, 1, "{report:?}");
        assert_eq!(file_sha256(&b), sha256(&v3));
        assert_eq!(file_sha256(&dev.path("slot-a.img")), sha256(&v1));
        assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::B));
    } else {
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("does not match the manifest")
                && err.contains(&format!("fetched {attempts} times")),
            "{err}"
        );
        assert_eq!(rollback_slot(&dev.config, &b), intact);
        assert_eq!(dev.flow().primary_slot().unwrap(), Some(Slot::A));
        assert_rollback_works(&dev);
    }
    flip_at
}

#[test]
fn an_index_byte_flipped_once_is_fetched_again_and_the_install_completes() {
    // In the bundle's first read (the index of a small image follows the
    // manifest), and in a page fetched on its own.
    let first_read = kernex_updater::install::FIRST_READ;
    assert!(install_with_flipped_index_byte(MIB, true) < first_read);
    assert!(install_with_flipped_index_byte(8 * MIB, true) > first_read);
}

#[test]
fn an_index_corrupt_for_good_fails_before_the_rollback_slot_is_touched() {
    let first_read = kernex_updater::install::FIRST_READ;
    assert!(install_with_flipped_index_byte(MIB, false) < first_read);
    assert!(install_with_flipped_index_byte(8 * MIB, false) > first_read);
}

#[test]
fn an_image_larger_than_a_file_slot_s_configured_size_is_refused() {
    let keys = keys();
    let v1 = image(MIB, 1);
    let big = image(2 * MIB, 5);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let b_big = bundle(&big, "2.0.0", &keys.signer);
    // v1 fits exactly, 2 MiB does not.
    let dev = Device::new(&keys, &v1);
    let b = dev.path("slot-b.img");
    let size = format!("size = {}", v1.len());
    settle_with_rollback_slot(&dev, &b1, &b, &size);
    let intact = rollback_slot(&dev.config, &b);
    let path = dev.write_bundle("big.kxb", &b_big.bytes);
    let err = install(&dev, &path).unwrap_err().to_string();
    assert!(
        err.contains(&big.len().to_string())
            && err.contains(&v1.len().to_string())
            && err.contains("slots.rootfs.size")
            && err.contains(&b.display().to_string()),
        "{err}"
    );
    assert_eq!(rollback_slot(&dev.config, &b), intact);
    assert_rollback_works(&dev);
}

#[test]
fn an_image_larger_than_the_free_space_of_a_file_slot_s_filesystem_is_refused() {
    let keys = keys();
    let v1 = image(MIB, 1);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let dev = Device::new(&keys, &v1);
    let small = dev.path("small-fs");
    std::fs::create_dir(&small).unwrap();
    let Some(_mount) = Mount::new(&["-t", "tmpfs", "-o", "size=512k", "tmpfs"], &small) else {
        return;
    };
    let b = small.join("slot-b.img");
    configure(&dev, "A", &dev.path("slot-a.img"), &b, "");
    let path = dev.write_bundle("v1.kxb", &b1.bytes);
    let state_before = std::fs::read(dev.path("boot-state")).ok();
    let err = install(&dev, &path).unwrap_err().to_string();
    assert!(
        err.contains("no room") && err.contains(&v1.len().to_string()),
        "{err}"
    );
    assert!(!b.exists(), "slot B was created");
    assert!(DataDir::new(dev.path("data")).pending().unwrap().is_none());
    assert_eq!(std::fs::read(dev.path("boot-state")).ok(), state_before);
}

#[test]
fn an_image_larger_than_a_block_device_slot_is_refused() {
    let keys = keys();
    let v1 = image(MIB, 1);
    let big = image(2 * MIB, 5);
    let b1 = bundle(&v1, "1.0.0", &keys.signer);
    let b_big = bundle(&big, "2.0.0", &keys.signer);
    // A loop device over a 1 MiB file: v1 fits, 2 MiB does not.
    let dev = Device::new(&keys, &v1);
    let backing = dev.path("slot-b.raw");
    std::fs::write(&backing, vec![0u8; v1.len()]).unwrap();
    let Some(lo) = LoopDevice::attach(&backing) else {
        return;
    };
    settle_with_rollback_slot(&dev, &b1, &lo.0, "");
    let intact = rollback_slot(&dev.config, &lo.0);
    assert_eq!(intact.bytes, sha256(&v1));
    let path = dev.write_bundle("big.kxb", &b_big.bytes);
    let err = install(&dev, &path).unwrap_err().to_string();
    assert!(
        err.contains(&big.len().to_string())
            && err.contains(&format!("block device of {} bytes", v1.len()))
            && err.contains(&lo.0.display().to_string()),
        "{err}"
    );
    assert_eq!(rollback_slot(&dev.config, &lo.0), intact);
    assert_rollback_works(&dev);
}
