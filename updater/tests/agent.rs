//! A device with an agent slot pair (`[slots.agent]`): a bundle of a rootfs
//! and an agent image (what `kernex-image bundle create --rootfs … --agent …`
//! makes, built through its library, `kernex_image::bundle`) installs both images
//! into slot B through the real binary, both are verified and recorded, and
//! `status` shows both; a bundle without the agent image is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{image, sha256};
use kernex_image::bundle::{self, BundleBuilder, Image};
use kernex_image::keys::{self, Usage, Validity};
use kernex_protocol::archive::ArchiveOptions;
use kernex_protocol::index::ChunkerParams;

const MIB: usize = 1024 * 1024;

struct AgentDevice {
    dir: tempfile::TempDir,
}

impl AgentDevice {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn updater(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kernex-updater"))
            .arg("--config")
            .arg(self.path("system.toml"))
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    }

    fn status_json(&self) -> serde_json::Value {
        let out = self.updater(&["status", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Keys, a device with rootfs and agent slots (A booted, holding the old
/// images), and the signing key and certificate as files.
fn device(old_rootfs: &[u8], old_agent: &[u8]) -> AgentDevice {
    let dir = tempfile::tempdir().unwrap();
    let d = AgentDevice { dir };
    let v = Validity::days_from_now(30);
    let ca = keys::create_ca("Kernex test", v).unwrap();
    let leaf = keys::create_leaf(&ca, "Kernex test", "signing", Usage::CodeSigning, v).unwrap();
    std::fs::write(d.path("keyring.pem"), ca.cert.to_pem().unwrap()).unwrap();
    std::fs::write(
        d.path("key.pem"),
        leaf.key.private_key_to_pem_pkcs8().unwrap(),
    )
    .unwrap();
    std::fs::write(d.path("cert.pem"), leaf.cert.to_pem().unwrap()).unwrap();
    std::fs::write(d.path("rootfs-a.img"), old_rootfs).unwrap();
    std::fs::write(d.path("agent-a.img"), old_agent).unwrap();
    let p = |n: &str| d.path(n).display().to_string();
    let config = format!(
        "compatible = \"qemu-aarch64\"\ndata-dir = \"{}\"\nkeyring = \"{}\"\n\
         [slots.rootfs]\nA = \"{}\"\nB = \"{}\"\n\
         [slots.agent]\nA = \"{}\"\nB = \"{}\"\n\
         [bootloader]\nbackend = \"file\"\npath = \"{}\"\nbooted-slot = \"A\"\n",
        p("data"),
        p("keyring.pem"),
        p("rootfs-a.img"),
        p("rootfs-b.img"),
        p("agent-a.img"),
        p("agent-b.img"),
        p("boot-state"),
    );
    std::fs::write(d.path("system.toml"), config).unwrap();
    d
}

/// What `kernex-image bundle create` makes of these images, through the
/// library it calls.
fn bundle_create(dev: &AgentDevice, rootfs: &Path, agent: Option<&Path>, out: &Path) {
    let signer = bundle::load_signer(&dev.path("key.pem"), &dev.path("cert.pem")).unwrap();
    let mut builder = BundleBuilder::new(
        "qemu-aarch64",
        semver::Version::new(1, 1, 0),
        Image::file(rootfs),
        &signer,
    )
    .metadata("model", "test-model")
    .archive_options(ArchiveOptions {
        chunker: ChunkerParams::rollsum(8 * 1024, 2 * 1024, 64 * 1024, 64),
        hash_len: 16,
        zstd_level: 3,
        threads: 1,
    });
    if let Some(agent) = agent {
        builder = builder.agent(Image::file(agent));
    }
    builder.build(out).unwrap();
}

#[test]
fn rootfs_and_agent_install_together() {
    let old_rootfs = image(MIB, 1);
    let old_agent = image(MIB / 2, 2);
    let new_rootfs = common::edit(&old_rootfs, 200_000, 5000);
    let new_agent = image(3 * MIB / 2, 3);
    let dev = device(&old_rootfs, &old_agent);
    std::fs::write(dev.path("new-rootfs.img"), &new_rootfs).unwrap();
    std::fs::write(dev.path("new-agent.img"), &new_agent).unwrap();

    // A rootfs-only bundle does not fit a device with agent slots.
    bundle_create(
        &dev,
        &dev.path("new-rootfs.img"),
        None,
        &dev.path("rootfs-only.kxb"),
    );
    let out = dev.updater(&["install", dev.path("rootfs-only.kxb").to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the bundle has no agent image"), "{err}");
    assert!(
        !dev.path("rootfs-b.img").exists()
            || std::fs::read(dev.path("rootfs-b.img")).unwrap().is_empty()
    );

    bundle_create(
        &dev,
        &dev.path("new-rootfs.img"),
        Some(&dev.path("new-agent.img")),
        &dev.path("both.kxb"),
    );
    let out = dev.updater(&["install", dev.path("both.kxb").to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");

    // Both images in slot B, slot A untouched.
    assert_eq!(
        sha256(&std::fs::read(dev.path("rootfs-b.img")).unwrap()),
        sha256(&new_rootfs)
    );
    assert_eq!(
        sha256(&std::fs::read(dev.path("agent-b.img")).unwrap()),
        sha256(&new_agent)
    );
    assert_eq!(
        sha256(&std::fs::read(dev.path("rootfs-a.img")).unwrap()),
        sha256(&old_rootfs)
    );
    assert_eq!(
        sha256(&std::fs::read(dev.path("agent-a.img")).unwrap()),
        sha256(&old_agent)
    );

    // status --json: slot B holds 1.1.0, verified, with both image digests.
    let status = dev.status_json();
    let slots = status["slots"].as_array().unwrap();
    let b = slots.iter().find(|s| s["slot"] == "B").unwrap();
    assert_eq!(b["version"], "1.1.0", "{status:#}");
    assert_eq!(b["verified"], true, "{status:#}");
    let images = b["images"].as_array().unwrap();
    let digest = |class: &str| {
        images
            .iter()
            .find(|i| i["class"] == class)
            .unwrap_or_else(|| panic!("no {class} image in {status:#}"))["sha256"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(digest("rootfs"), sha256(&new_rootfs));
    assert_eq!(digest("agent"), sha256(&new_agent));
    assert_eq!(status["primary-slot"], "B", "{status:#}");

    // The table shows both of slot B's images: size and digest.
    let out = dev.updater(&["status"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    for (class, img) in [("rootfs", &new_rootfs), ("agent", &new_agent)] {
        let want = format!("{class} {}B", img.len());
        let line = table
            .lines()
            .find(|l| l.contains(&want))
            .unwrap_or_else(|| panic!("no {want:?} in\n{table}"));
        assert!(line.contains(&sha256(img)[..16]), "{table}");
    }
}
