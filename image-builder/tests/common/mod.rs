//! Helpers shared by the disk and provisioning tests: the binary, the peer
//! tools (never skipped: a missing one fails), a release to build from (its
//! bundles made by the library's `BundleBuilder`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kernex_image::bundle::{BundleBuilder, Image, load_signer};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub fn kernex_image() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kernex-image"))
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn run_json(cmd: &mut Command) -> Value {
    serde_json::from_slice(&run(cmd).stdout).expect("JSON output")
}

/// A peer tool from PATH (also /usr/sbin, /sbin); panics (never skips) if absent.
pub fn peer(name: &str) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .collect::<Vec<_>>();
    let found = dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
    let found = found.unwrap_or_else(|| panic!("{name} is not installed: run scripts/setup"));
    let mut cmd = Command::new(found);
    cmd.env("MTOOLS_SKIP_CHECK", "1");
    cmd
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn read_range(path: &Path, start: u64, len: u64) -> Vec<u8> {
    let mut f = fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// A file of the ext4 filesystem at `offset` in `disk`, through debugfs.
pub fn debugfs_cat(disk: &Path, offset: u64, path: &str) -> Vec<u8> {
    let out = run(peer("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(format!("{}?offset={offset}", disk.display())));
    out.stdout
}

/// Keys and a small ext4 root filesystem image; bundles built on demand.
pub struct Release {
    pub dir: tempfile::TempDir,
}

impl Release {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let r = Release { dir };
        run(kernex_image()
            .args(["keys", "create", "--out"])
            .arg(r.path("keys")));
        let root = r.path("root");
        fs::create_dir_all(root.join("etc/kernex")).unwrap();
        fs::create_dir_all(root.join("boot")).unwrap();
        fs::write(root.join("etc/os-release"), "NAME=Kernex test\n").unwrap();
        fs::write(root.join("boot/Image"), vec![0x5a; 300_000]).unwrap();
        run(kernex_image()
            .arg("rootfs")
            .arg(&root)
            .args(["--fs", "ext4", "--timestamp", "1700000000", "--out"])
            .arg(r.path("rootfs-1.img")));
        r
    }

    /// A signed bundle of rootfs-1.img for `compatible`.
    pub fn bundle_for(&self, compatible: &str, version: &str) -> PathBuf {
        let out = self.path(&format!("{compatible}-{version}.kxb"));
        if out.exists() {
            return out;
        }
        let signer = load_signer(
            &self.path("keys/signing.key"),
            &self.path("keys/signing.crt"),
        )
        .unwrap();
        BundleBuilder::new(
            compatible,
            semver::Version::parse(version).unwrap(),
            Image::file(self.path("rootfs-1.img")),
            &signer,
        )
        .build(&out)
        .unwrap();
        out
    }
}
