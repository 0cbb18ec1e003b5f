#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Cursor;
use std::path::Path;

use kernex_protocol::archive::ArchiveOptions;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::index::ChunkerParams;
use kernex_protocol::signature::{Keyring, Signer, VerifyOptions};
use kernex_protocol::{FsType, SlotClass};

use super::{BundleBuilder, Image};
use crate::keys::{self, KeyPair, Usage, Validity};

struct Keys {
    signer: Signer,
    keyring: Keyring,
    other_keyring: Keyring,
}

fn signer(pair: &KeyPair) -> Signer {
    Signer::from_pem(
        &pair.key.private_key_to_pem_pkcs8().unwrap(),
        &pair.cert.to_pem().unwrap(),
    )
    .unwrap()
}

fn keys() -> Keys {
    let v = Validity::days_from_now(30);
    let ca = keys::create_ca("Kernex test", v).unwrap();
    let other = keys::create_ca("Somebody else", v).unwrap();
    let leaf = keys::create_leaf(&ca, "Kernex test", "signing", Usage::CodeSigning, v).unwrap();
    Keys {
        signer: signer(&leaf),
        keyring: Keyring::from_pem(&ca.cert.to_pem().unwrap()).unwrap(),
        other_keyring: Keyring::from_pem(&other.cert.to_pem().unwrap()).unwrap(),
    }
}

/// `len` bytes of noise (incompressible: a chunk patched costs a fraction
/// of the chunk).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn options() -> ArchiveOptions {
    ArchiveOptions {
        chunker: ChunkerParams::rollsum(8 * 1024, 2 * 1024, 64 * 1024, 64),
        threads: 1,
        ..ArchiveOptions::default()
    }
}

fn builder<'a>(keys: &'a Keys, version: &str, image: &'a [u8]) -> BundleBuilder<'a> {
    BundleBuilder::new(
        "qemu-aarch64",
        semver::Version::parse(version).unwrap(),
        Image::bytes(image).filesystem(FsType::Raw),
        &keys.signer,
    )
    .archive_options(options())
}

fn write(builder: &BundleBuilder<'_>) -> (Vec<u8>, super::BuiltBundle) {
    let mut bytes = Vec::new();
    let built = builder.write(&mut bytes).unwrap();
    (bytes, built)
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_bundle_verifies_and_holds_its_images_and_says_what_it_is() {
    let keys = keys();
    let rootfs = noise(300_000, 1);
    let agent = noise(100_000, 2);
    let (bytes, built) = write(
        &builder(&keys, "1.2.0", &rootfs)
            .agent(Image::bytes(&agent))
            .metadata("model", "qwen-1.5b")
            .min_updater_version(semver::Version::new(0, 2, 0))
            .security_version(3),
    );
    assert_eq!(built.size, bytes.len() as u64);
    let mut bundle = Bundle::open(Cursor::new(&bytes)).unwrap();
    assert_eq!(bundle.unverified_manifest(), &built.manifest);
    let verified = bundle
        .verify(&keys.keyring, VerifyOptions::default())
        .unwrap();
    assert_eq!(verified.signer(), &built.signer);
    assert_eq!(verified.version.to_string(), "1.2.0");
    assert_eq!(verified.min_updater_version.to_string(), "0.2.0");
    assert_eq!(verified.security_version, 3, "signed with the manifest");
    assert_eq!(verified.metadata["model"], "qwen-1.5b");
    assert!(verified.health.is_none());
    for (image, class, data) in [
        (&built.images[0], SlotClass::Rootfs, &rootfs),
        (&built.images[1], SlotClass::Agent, &agent),
    ] {
        assert_eq!(image.class, class);
        // Noise is no filesystem: recognised as raw, or as told.
        assert_eq!(image.filesystem, FsType::Raw);
        let index = bundle.read_index(verified.manifest(), class).unwrap();
        assert_eq!(index.encode(), image.archive.index_bytes);
        let mut out = Vec::new();
        bundle
            .extract_image(&verified, class, &mut out, &|_| {})
            .unwrap();
        assert_eq!(&out, data);
    }
}

#[test]
fn a_file_build_is_the_bundle_written_in_memory_and_leaves_only_the_bundle() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = noise(200_000, 3);
    std::fs::write(dir.path().join("rootfs.img"), &rootfs).unwrap();
    let out = dir.path().join("release.kxb");
    let from_file = BundleBuilder::new(
        "qemu-aarch64",
        semver::Version::new(1, 0, 0),
        Image::file(dir.path().join("rootfs.img")),
        &keys.signer,
    )
    .archive_options(options())
    .build(&out)
    .unwrap();
    let (bytes, in_memory) = write(&builder(&keys, "1.0.0", &rootfs));
    assert_eq!(from_file.manifest, in_memory.manifest);
    // The same bytes but for the signature (CMS signs with a time stamp).
    let file = std::fs::read(&out).unwrap();
    assert_eq!(file.len() as u64, from_file.size);
    let (a, b) = (
        Bundle::open(Cursor::new(&file)).unwrap(),
        Bundle::open(Cursor::new(&bytes)).unwrap(),
    );
    assert_eq!(a.manifest_bytes(), b.manifest_bytes());
    let rest = |bundle: &Bundle<Cursor<&Vec<u8>>>| bundle.layout().images[0].index.offset as usize;
    assert_eq!(&file[rest(&a)..], &bytes[rest(&b)..]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);
    assert_eq!(names(dir.path()), ["release.kxb", "rootfs.img"]);
}

#[test]
fn patches_come_from_older_bundles_that_verify_for_the_same_hardware() {
    let keys = keys();
    let v1 = noise(400_000, 4);
    let mut v2 = v1.clone();
    for at in (100_000..300_000).step_by(4096) {
        v2[at] ^= 0x5a;
    }
    let (old, _) = write(&builder(&keys, "1.0.0", &v1));
    let (plain, unpatched) = write(&builder(&keys, "1.1.0", &v2));
    let (patched, built) = write(
        &builder(&keys, "1.1.0", &v2)
            .patch_from(&old)
            .keyring(&keys.keyring),
    );
    let image = &built.images[0];
    assert!(unpatched.images[0].patches.is_empty());
    assert_eq!(image.patches.len(), 1, "{:?}", image.patches);
    let patch = &image.patches[0];
    assert_eq!(patch.base_version.to_string(), "1.0.0");
    assert!(patch.chunks_patched > 0 && patch.chunks_patched <= patch.chunks_new);
    let entry = &built.manifest.images[0].patches[0];
    assert_eq!(entry.size, patch.size);
    assert_eq!(entry.base_sha256, patch.base_sha256);
    assert_eq!(built.size, patched.len() as u64);
    assert!(patched.len() > plain.len());

    // No keyring, a keyring that does not trust it, other hardware.
    let err = builder(&keys, "1.1.0", &v2)
        .patch_from(&old)
        .write(&mut Vec::new())
        .unwrap_err();
    assert!(format!("{err:#}").contains("keyring"), "{err:#}");
    let err = builder(&keys, "1.1.0", &v2)
        .patch_from(&old)
        .keyring(&keys.other_keyring)
        .write(&mut Vec::new())
        .unwrap_err();
    assert!(format!("{err:#}").contains("does not verify"), "{err:#}");
    let (other_hw, _) = write(&BundleBuilder::new(
        "raspberrypi4-64",
        semver::Version::new(1, 0, 0),
        Image::bytes(&v1),
        &keys.signer,
    ));
    let err = builder(&keys, "1.1.0", &v2)
        .patch_from(&other_hw)
        .keyring(&keys.keyring)
        .write(&mut Vec::new())
        .unwrap_err();
    assert!(format!("{err:#}").contains("never used"), "{err:#}");

    // A release nothing resembles gives no patch, and says so.
    let (stranger, _) = write(&builder(&keys, "0.9.0", &noise(400_000, 99)));
    let (_, built) = write(
        &builder(&keys, "1.1.0", &v2)
            .patch_from(&stranger)
            .keyring(&keys.keyring),
    );
    assert!(built.images[0].patches.is_empty());
    assert_eq!(built.images[0].unpatched, [semver::Version::new(0, 9, 0)]);
}

#[test]
fn a_failed_build_leaves_nothing_behind() {
    let keys = keys();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = noise(100_000, 5);
    let out = dir.path().join("never.kxb");
    let err = BundleBuilder::new(
        "no spaces allowed",
        semver::Version::new(1, 0, 0),
        Image::bytes(&rootfs),
        &keys.signer,
    )
    .build(&out)
    .unwrap_err();
    assert!(format!("{err:#}").contains("no spaces allowed"), "{err:#}");
    let err = BundleBuilder::new(
        "qemu-aarch64",
        semver::Version::new(1, 0, 0),
        Image::file(dir.path().join("missing.img")),
        &keys.signer,
    )
    .build(&out)
    .unwrap_err();
    assert!(format!("{err:#}").contains("missing.img"), "{err:#}");
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}
