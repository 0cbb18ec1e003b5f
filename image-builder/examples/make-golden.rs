//! Regenerates the golden bundles under `protocol/tests/golden/`.
//!
//!     cargo run -p kernex-image --example make-golden -- protocol/tests/golden
//!
//! Golden files pin the on-disk format: once checked in they are only
//! regenerated when the format version changes. Certificates are valid for
//! 100 years (the expired one for 2001 only), so the files keep verifying.

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::path::PathBuf;

use anyhow::{Context, Result};
use kernex_image::keys::{self, KeyPair, Usage, Validity};
use kernex_protocol::archive::{self, ArchiveOptions};
use kernex_protocol::bundle::{self, ImageInput, ReleaseInfo};
use kernex_protocol::index::ChunkerParams;
use kernex_protocol::signature::Signer;
use kernex_protocol::{FsType, SlotClass};

const CENTURY: i64 = 100 * 365 * 86_400;

fn image() -> Vec<u8> {
    // Deterministic: compressible text, noise, and a run of zeros.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(500_000);
    for i in 0..200_000usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(if (i / 8192) % 2 == 0 {
            b"kernex golden "[i % 14]
        } else {
            x as u8
        });
    }
    out.extend(std::iter::repeat_n(0u8, 300_000));
    out
}

fn signer(pair: &KeyPair) -> Result<Signer> {
    Ok(Signer::from_pem(
        &pair.key.private_key_to_pem_pkcs8()?,
        &pair.cert.to_pem()?,
    )?)
}

/// Builds a bundle; `edit` may change the manifest bytes before signing.
fn make_bundle(signer: Option<&Signer>, edit: &dyn Fn(Vec<u8>) -> Vec<u8>) -> Result<Vec<u8>> {
    let img = image();
    let options = ArchiveOptions {
        chunker: ChunkerParams::rollsum(16 * 1024, 4 * 1024, 64 * 1024, 64),
        ..ArchiveOptions::default()
    };
    let mut data = Vec::new();
    let built = archive::build_archive(&img[..], &mut data, &options, &|_| {})?;
    let release = ReleaseInfo {
        version: semver::Version::new(1, 0, 0),
        compatible: "qemu-aarch64".into(),
        min_updater_version: semver::Version::new(0, 1, 0),
        metadata: BTreeMap::from([("notes".to_string(), "golden test bundle".to_string())]),
    };
    let inputs = [ImageInput {
        class: SlotClass::Rootfs,
        filesystem: FsType::Raw,
        built: &built,
        patches: &[],
    }];
    let manifest = bundle::manifest_for(&release, &inputs)?;
    let manifest_bytes = edit(manifest.to_vec()?);
    let sig = match signer {
        Some(s) => s.sign(&manifest_bytes)?,
        None => Vec::new(),
    };
    let mut out = Vec::new();
    let mut reader = Cursor::new(data);
    let mut images: Vec<(ImageInput<'_>, &mut dyn std::io::Read)> = vec![(
        ImageInput {
            class: SlotClass::Rootfs,
            filesystem: FsType::Raw,
            built: &built,
            patches: &[],
        },
        &mut reader,
    )];
    if signer.is_some() {
        bundle::write_bundle(&mut out, &manifest_bytes, &sig, &mut images)?;
    } else {
        // An unsigned bundle: the same members without manifest.sig.
        write_unsigned(&mut out, &manifest_bytes, &built, &mut reader)?;
    }
    Ok(out)
}

fn write_unsigned(
    out: &mut Vec<u8>,
    manifest: &[u8],
    built: &archive::BuiltArchive,
    data: &mut Cursor<Vec<u8>>,
) -> Result<()> {
    use kernex_protocol::container::*;
    let mut member = |name: &str, bytes: &[u8]| -> Result<()> {
        write_member_header(out, name, bytes.len() as u64)?;
        out.extend_from_slice(bytes);
        write_padding(out, bytes.len() as u64)?;
        Ok(())
    };
    member(MANIFEST_MEMBER, manifest)?;
    member(&index_member(SlotClass::Rootfs), &built.index_bytes)?;
    let mut archive = built.header.clone();
    archive.extend_from_slice(data.get_ref());
    member(&archive_member(SlotClass::Rootfs), &archive)?;
    write_end(out)?;
    Ok(())
}

fn main() -> Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "protocol/tests/golden".into()),
    );
    fs::create_dir_all(&dir)?;
    let now = Validity::days_from_now(0).not_before;
    let long = Validity {
        not_before: now - 86_400,
        not_after: now + CENTURY,
    };
    let ca = keys::create_ca("Kernex golden", long)?;
    let other_ca = keys::create_ca("Somebody else", long)?;
    let good = keys::create_leaf(
        &ca,
        "Kernex golden",
        "Kernex golden signing",
        Usage::CodeSigning,
        long,
    )?;
    let stranger = keys::create_leaf(
        &other_ca,
        "Somebody else",
        "Somebody else signing",
        Usage::CodeSigning,
        long,
    )?;
    let expired = keys::create_leaf(
        &ca,
        "Kernex golden",
        "Kernex golden expired signing",
        Usage::CodeSigning,
        Validity {
            not_before: 978_307_200,
            not_after: 1_009_843_200,
        },
    )?;
    let tls = keys::create_leaf(
        &ca,
        "Kernex golden",
        "Kernex golden TLS server",
        Usage::TlsServer,
        long,
    )?;

    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let p = dir.join(name);
        fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))
    };
    write("ca.crt", &ca.cert.to_pem()?)?;
    write("other-ca.crt", &other_ca.cert.to_pem()?)?;

    let same = |m: Vec<u8>| m;
    let valid = make_bundle(Some(&signer(&good)?), &same)?;
    write("valid.kxb", &valid)?;
    write("truncated.kxb", &valid[..valid.len() * 2 / 3])?;

    // One digit of the signed manifest changed after signing.
    let mut tampered = valid.clone();
    let at = find(&tampered, b"\"version\": \"1.0.0\"").context("version in manifest")? + 16;
    tampered[at] = b'1';
    write("tampered-manifest.kxb", &tampered)?;

    // One bit of chunk data flipped: the signature is fine, a chunk is not.
    let mut flipped = valid.clone();
    let bita = find(&flipped, b"BITA1\0").context("archive in bundle")?;
    let chunk_at = bita + (flipped.len() - bita) / 2;
    flipped[chunk_at] ^= 0x04;
    write("bitflip-chunk.kxb", &flipped)?;

    // One bit of the index flipped.
    let mut index = valid.clone();
    let kxi = find(&index, b"KXINDEX1").context("index in bundle")?;
    index[kxi + 100] ^= 0x01;
    write("bitflip-index.kxb", &index)?;

    write("unsigned.kxb", &make_bundle(None, &same)?)?;
    write(
        "unknown-ca.kxb",
        &make_bundle(Some(&signer(&stranger)?), &same)?,
    )?;
    write(
        "expired-signer.kxb",
        &make_bundle(Some(&signer(&expired)?), &same)?,
    )?;
    write(
        "wrong-usage.kxb",
        &make_bundle(Some(&signer(&tls)?), &same)?,
    )?;
    let unknown_field = |m: Vec<u8>| {
        let text = String::from_utf8_lossy(&m).replacen(
            "{\n",
            "{\n  \"reboot-policy\": \"immediately\",\n",
            1,
        );
        text.into_bytes()
    };
    write(
        "unknown-field.kxb",
        &resigned(&signer(&good)?, &unknown_field)?,
    )?;
    let oversized = |m: Vec<u8>| {
        let pad = " ".repeat(70 * 1024);
        let text = String::from_utf8_lossy(&m).replacen("{\n", &format!("{{{pad}\n"), 1);
        text.into_bytes()
    };
    write(
        "oversized-manifest.kxb",
        &resigned(&signer(&good)?, &oversized)?,
    )?;
    write("image.bin", &image())?;
    println!("golden files written to {}", dir.display());
    Ok(())
}

/// A valid bundle whose manifest is replaced by `edit(manifest)` and signed
/// again (write_bundle refuses manifests the parser rejects, so this
/// assembles the container by hand).
fn resigned(signer: &Signer, edit: &dyn Fn(Vec<u8>) -> Vec<u8>) -> Result<Vec<u8>> {
    let valid = make_bundle(Some(signer), &|m| m)?;
    let b = kernex_protocol::bundle::Bundle::open(Cursor::new(valid.clone()))?;
    let manifest = edit(b.manifest_bytes().to_vec());
    let sig = signer.sign(&manifest)?;
    let rest_at = b.layout().images[0].index.offset - kernex_protocol::container::BLOCK;
    let mut out = Vec::new();
    use kernex_protocol::container::*;
    for (name, bytes) in [(MANIFEST_MEMBER, &manifest), (SIGNATURE_MEMBER, &sig)] {
        write_member_header(&mut out, name, bytes.len() as u64)?;
        out.extend_from_slice(bytes);
        write_padding(&mut out, bytes.len() as u64)?;
    }
    out.extend_from_slice(&valid[rest_at as usize..]);
    Ok(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
