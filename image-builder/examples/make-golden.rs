//! Regenerates the golden bundles under `protocol/tests/golden/`.
//!
//!     cargo run -p kernex-image --example make-golden -- protocol/tests/golden
//!
//! Golden files pin the on-disk format: once checked in they are only
//! regenerated when the format version changes. Certificates are valid for
//! 100 years (the expired one for 2001 only), so the files keep verifying.

use std::fs;
use std::io::Cursor;
use std::path::PathBuf;

use anyhow::{Context, Result};
use kernex_image::bundle::{BundleBuilder, Image};
use kernex_image::keys::{self, KeyPair, Usage, Validity};
use kernex_protocol::FsType;
use kernex_protocol::archive::ArchiveOptions;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::index::ChunkerParams;
use kernex_protocol::signature::Signer;

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

/// The golden bundle of [`image`], signed by `signer`.
fn make_bundle(signer: &Signer) -> Result<Vec<u8>> {
    let img = image();
    let mut out = Vec::new();
    BundleBuilder::new(
        "qemu-aarch64",
        semver::Version::new(1, 0, 0),
        Image::bytes(&img).filesystem(FsType::Raw),
        signer,
    )
    .metadata("notes", "golden test bundle")
    .archive_options(ArchiveOptions {
        chunker: ChunkerParams::rollsum(16 * 1024, 4 * 1024, 64 * 1024, 64),
        ..ArchiveOptions::default()
    })
    .write(&mut out)?;
    Ok(out)
}

/// `valid` with its manifest replaced by `manifest` and its signature by
/// `signature` (none: an unsigned bundle, the same members without
/// manifest.sig). Assembled by hand: the builder signs what it writes, and
/// `write_bundle` refuses manifests the parser rejects.
fn reassembled(valid: &[u8], manifest: &[u8], signature: Option<&[u8]>) -> Result<Vec<u8>> {
    use kernex_protocol::container::*;
    let b = Bundle::open(Cursor::new(valid))?;
    let rest_at = b.layout().images[0].index.offset - BLOCK;
    let mut out = Vec::new();
    let members = [
        (MANIFEST_MEMBER, Some(manifest)),
        (SIGNATURE_MEMBER, signature),
    ];
    for (name, bytes) in members {
        if let Some(bytes) = bytes {
            write_member_header(&mut out, name, bytes.len() as u64)?;
            out.extend_from_slice(bytes);
            write_padding(&mut out, bytes.len() as u64)?;
        }
    }
    out.extend_from_slice(&valid[rest_at as usize..]);
    Ok(out)
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

    let valid = make_bundle(&signer(&good)?)?;
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

    let manifest = Bundle::open(Cursor::new(&valid))?.manifest_bytes().to_vec();
    write("unsigned.kxb", &reassembled(&valid, &manifest, None)?)?;
    write("unknown-ca.kxb", &make_bundle(&signer(&stranger)?)?)?;
    write("expired-signer.kxb", &make_bundle(&signer(&expired)?)?)?;
    write("wrong-usage.kxb", &make_bundle(&signer(&tls)?)?)?;
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
/// again.
fn resigned(signer: &Signer, edit: &dyn Fn(Vec<u8>) -> Vec<u8>) -> Result<Vec<u8>> {
    let valid = make_bundle(signer)?;
    let b = Bundle::open(Cursor::new(&valid))?;
    let manifest = edit(b.manifest_bytes().to_vec());
    let sig = signer.sign(&manifest)?;
    reassembled(&valid, &manifest, Some(&sig))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
