//! The bundle container: a plain ustar archive with a fixed member order.
//!
//! ```text
//! manifest.json     the manifest (signed bytes)
//! manifest.sig      detached CMS signature over manifest.json (DER)
//! rootfs.kxi        compact chunk index of the rootfs image
//! rootfs.bita       bita chunk archive of the rootfs image
//! rootfs.from-<sha256>.kxp  chunk patches of the rootfs image from older
//!                   images, in manifest order (optional, see `patch`)
//! agent.kxi/.bita   the same for each further image, in manifest order
//! ```
//!
//! Each member's data starts on a 512-byte boundary after its 512-byte
//! header, so once a reader has the manifest (whose sizes fix the rest of the
//! layout) it knows the offset of every byte in the bundle and can fetch
//! any index page or chunk with one HTTP Range request. `tar -xf` unpacks a
//! bundle, after which the `bita` CLI reads its archives directly.

use std::io::{self, Write};

use crate::Sha256Digest;
use crate::manifest::{Manifest, SlotClass};

/// tar block size.
pub const BLOCK: u64 = 512;
/// Name of the manifest member.
pub const MANIFEST_MEMBER: &str = "manifest.json";
/// Name of the signature member.
pub const SIGNATURE_MEMBER: &str = "manifest.sig";
/// Largest member size the octal size field holds (8 GiB - 1); larger
/// members use the GNU base-256 form, which GNU tar and libarchive read.
const OCTAL_SIZE_MAX: u64 = (1 << 33) - 1;

/// Name of an image's index member.
pub fn index_member(class: SlotClass) -> String {
    format!("{class}.kxi")
}

/// Name of an image's archive member.
pub fn archive_member(class: SlotClass) -> String {
    format!("{class}.bita")
}

/// Name of an image's patch member from the base image `base`.
pub fn patch_member(class: SlotClass, base: &Sha256Digest) -> String {
    format!("{class}.from-{}.kxp", base.to_hex())
}

/// A malformed container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The header block is not a valid ustar header.
    #[error("bundle member header at offset {offset} is invalid: {reason}")]
    Header {
        /// Offset of the header in the bundle.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Bytes of padding after a member of `size` bytes.
pub fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// A member's data span in the bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Span {
    /// Offset of the first data byte.
    pub offset: u64,
    /// Data size.
    pub size: u64,
}

impl Span {
    /// One past the last data byte.
    pub fn end(&self) -> u64 {
        self.offset + self.size
    }
}

/// Spans of one image's members.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageSpans {
    /// The slot class.
    pub class: SlotClass,
    /// The index member.
    pub index: Span,
    /// The archive member.
    pub archive: Span,
    /// The patch members, in manifest order.
    pub patches: Vec<(Sha256Digest, Span)>,
}

/// Where every member lies in a bundle file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BundleLayout {
    /// The manifest.
    pub manifest: Span,
    /// The signature.
    pub signature: Span,
    /// The images, in manifest order.
    pub images: Vec<ImageSpans>,
    /// Size of the whole bundle file.
    pub total_size: u64,
}

impl BundleLayout {
    /// Offset of the signature member's header, given the manifest size.
    pub fn signature_header_offset(manifest_size: u64) -> u64 {
        BLOCK + manifest_size + padding(manifest_size)
    }

    /// The full layout, from the manifest and signature sizes and the
    /// manifest's member sizes.
    pub fn compute(manifest_size: u64, signature_size: u64, manifest: &Manifest) -> Self {
        let mut at = 0u64;
        let mut member = |size: u64| {
            let span = Span {
                offset: at + BLOCK,
                size,
            };
            at += BLOCK + size + padding(size);
            span
        };
        let manifest_span = member(manifest_size);
        let signature = member(signature_size);
        let images = manifest
            .images
            .iter()
            .map(|image| ImageSpans {
                class: image.slot_class,
                index: member(image.index.size),
                archive: member(image.archive.size),
                patches: image
                    .patches
                    .iter()
                    .map(|p| (p.base_sha256, member(p.size)))
                    .collect(),
            })
            .collect();
        BundleLayout {
            manifest: manifest_span,
            signature,
            images,
            total_size: at + 2 * BLOCK,
        }
    }

    /// Spans of one image.
    pub fn image(&self, class: SlotClass) -> Option<&ImageSpans> {
        self.images.iter().find(|i| i.class == class)
    }

    /// Every member in order: (name, header offset, data span).
    pub fn members(&self) -> Vec<(String, u64, Span)> {
        let mut out = vec![
            (
                MANIFEST_MEMBER.to_string(),
                self.manifest.offset - BLOCK,
                self.manifest,
            ),
            (
                SIGNATURE_MEMBER.to_string(),
                self.signature.offset - BLOCK,
                self.signature,
            ),
        ];
        for image in &self.images {
            out.push((
                index_member(image.class),
                image.index.offset - BLOCK,
                image.index,
            ));
            out.push((
                archive_member(image.class),
                image.archive.offset - BLOCK,
                image.archive,
            ));
            for (base, span) in &image.patches {
                out.push((patch_member(image.class, base), span.offset - BLOCK, *span));
            }
        }
        out
    }
}

fn put_octal(field: &mut [u8], value: u64) {
    // Width - 1 digits, then NUL.
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

/// Writes a ustar header for a regular file member (mode 0644, owner
/// root, mtime 0: bundles are reproducible).
pub fn write_member_header(out: &mut dyn Write, name: &str, size: u64) -> io::Result<()> {
    if name.len() > 99 || name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("member name {name:?} must be 1 to 99 bytes"),
        ));
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    put_octal(&mut h[100..108], 0o644);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    if size <= OCTAL_SIZE_MAX {
        put_octal(&mut h[124..136], size);
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    put_octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.write_all(&h)
}

/// Writes the padding after a member of `size` bytes.
pub fn write_padding(out: &mut dyn Write, size: u64) -> io::Result<()> {
    out.write_all(&[0u8; 512][..padding(size) as usize])
}

/// Writes the end-of-archive marker.
pub fn write_end(out: &mut dyn Write) -> io::Result<()> {
    out.write_all(&[0u8; 1024])
}

/// A parsed member header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHeader {
    /// Member name.
    pub name: String,
    /// Data size.
    pub size: u64,
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    let mut digits = 0;
    for &b in field {
        match b {
            b'0'..=b'7' => {
                v = v.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
                digits += 1;
            }
            b' ' if digits == 0 => {}
            b' ' | 0 => break,
            _ => return None,
        }
    }
    (digits > 0).then_some(v)
}

/// Parses one 512-byte header block; `offset` is only for error messages.
pub fn parse_member_header(block: &[u8], offset: u64) -> Result<MemberHeader, ContainerError> {
    let bad = |reason: &str| ContainerError::Header {
        offset,
        reason: reason.to_string(),
    };
    if block.len() != 512 {
        return Err(bad("truncated header"));
    }
    if block.iter().all(|&b| b == 0) {
        return Err(bad("end of archive where a member was expected"));
    }
    if &block[257..263] != b"ustar\0" {
        return Err(bad("not a ustar header"));
    }
    let stored = parse_octal(&block[148..156]).ok_or_else(|| bad("bad checksum field"))?;
    let sum: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    if stored != sum {
        return Err(bad("header checksum mismatch"));
    }
    if block[156] != b'0' && block[156] != 0 {
        return Err(bad("member is not a regular file"));
    }
    let name_len = block[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let name = std::str::from_utf8(&block[..name_len])
        .map_err(|_| bad("member name is not UTF-8"))?
        .to_string();
    let size = if block[124] & 0x80 != 0 {
        if block[124..128].iter().any(|&b| b & 0x7f != 0) {
            return Err(bad("member size too large"));
        }
        let mut be = [0u8; 8];
        be.copy_from_slice(&block[128..136]);
        u64::from_be_bytes(be)
    } else {
        parse_octal(&block[124..136]).ok_or_else(|| bad("bad size field"))?
    };
    Ok(MemberHeader { name, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_small_and_huge() {
        for size in [
            0u64,
            1,
            511,
            512,
            OCTAL_SIZE_MAX,
            OCTAL_SIZE_MAX + 1,
            1 << 40,
        ] {
            let mut out = Vec::new();
            write_member_header(&mut out, "rootfs.bita", size).expect("writes");
            let h = parse_member_header(&out, 0).expect("parses");
            assert_eq!(
                h,
                MemberHeader {
                    name: "rootfs.bita".into(),
                    size
                }
            );
        }
    }

    #[test]
    fn corrupt_headers_are_rejected() {
        let mut out = Vec::new();
        write_member_header(&mut out, "manifest.json", 100).expect("writes");
        for at in 0..512 {
            let mut b = out.clone();
            b[at] ^= 0x01;
            let _ = parse_member_header(&b, 0); // never panics
        }
        let mut b = out.clone();
        b[0] = b'x';
        assert!(parse_member_header(&b, 0).is_err());
        assert!(parse_member_header(&out[..100], 0).is_err());
    }
}
