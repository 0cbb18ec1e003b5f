//! Test releases: a development CA and two or more signed bundles of one
//! hardware class whose images share most of their chunks, and the exact
//! byte ranges a device running one must fetch to install another.

use std::collections::HashSet;
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kernex_image::bundle::{BundleBuilder, Image};
use kernex_image::keys::{Usage, Validity, create_ca, create_leaf};
use kernex_protocol::bundle::Bundle;
use kernex_protocol::container;
use kernex_protocol::index::ChunkIndex;
use kernex_protocol::signature::Signer;
use kernex_protocol::{FsType, SlotClass};

/// A small deterministic PRNG (xorshift64*): reproducible fleets and
/// images without a dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded (0 is replaced).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What `make_releases` wrote.
#[derive(Debug, Clone)]
pub struct MadeReleases {
    /// The CA certificate to install as the organisation's keyring.
    pub ca_pem: PathBuf,
    /// Bundles, oldest first.
    pub bundles: Vec<PathBuf>,
}

/// Writes a CA and `versions.len()` bundles for `compatible` into `dir`.
/// The first image is `size` pseudo-random bytes (half of each 4 KiB block
/// repeats, so zstd has work); each later one rewrites `change` of its
/// predecessor's 64 KiB blocks.
pub fn make_releases(
    dir: &Path,
    compatible: &str,
    versions: &[semver::Version],
    size: usize,
    change: f64,
    seed: u64,
) -> Result<MadeReleases> {
    if versions.is_empty() {
        bail!("give at least one version");
    }
    if !(0.0..=1.0).contains(&change) {
        bail!("--change must be between 0 and 1");
    }
    fs::create_dir_all(dir).with_context(|| format!("unable to create {}", dir.display()))?;
    let ca = create_ca("Kernex sim", Validity::days_from_now(3650))?;
    let leaf = create_leaf(
        &ca,
        "Kernex sim",
        "Kernex sim signing",
        Usage::CodeSigning,
        Validity::days_from_now(3650),
    )?;
    let ca_pem = dir.join("ca.crt");
    fs::write(&ca_pem, ca.cert.to_pem()?)
        .with_context(|| format!("unable to write {}", ca_pem.display()))?;
    let signer = Signer::from_pem(&leaf.key.private_key_to_pem_pkcs8()?, &leaf.cert.to_pem()?)?;
    let mut rng = Rng::new(seed);
    let mut image = vec![0u8; size];
    for block in image.chunks_mut(4096) {
        let half = block.len() / 2;
        for b in block[..half].iter_mut() {
            *b = (rng.next_u64() & 0xff) as u8;
        }
        let pattern = (rng.next_u64() & 0xff) as u8;
        for b in block[half..].iter_mut() {
            *b = pattern;
        }
    }
    let mut bundles = Vec::new();
    for (i, version) in versions.iter().enumerate() {
        if i > 0 {
            for block in image.chunks_mut(64 * 1024) {
                if rng.f64() < change {
                    for b in block.iter_mut() {
                        *b = (rng.next_u64() & 0xff) as u8;
                    }
                }
            }
        }
        let mut out = Vec::new();
        BundleBuilder::new(
            compatible,
            version.clone(),
            Image::bytes(&image).filesystem(FsType::Raw),
            &signer,
        )
        .metadata("made-by", "kernex-sim")
        .write(&mut out)?;
        let path = dir.join(format!("{compatible}-{version}.kxb"));
        fs::write(&path, &out).with_context(|| format!("unable to write {}", path.display()))?;
        bundles.push(path);
    }
    Ok(MadeReleases { ca_pem, bundles })
}

/// A bundle held in memory with its parsed layout and indexes.
#[derive(Debug)]
pub struct LocalRelease {
    /// Version.
    pub version: String,
    /// Hardware class.
    pub compatible: String,
    /// The bundle file.
    pub bytes: Vec<u8>,
    layout: container::BundleLayout,
    indexes: Vec<(SlotClass, ChunkIndex)>,
}

impl LocalRelease {
    /// Reads and parses a bundle file.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).with_context(|| format!("unable to read {}", path.display()))?;
        let mut b = Bundle::open(Cursor::new(bytes.clone()))
            .with_context(|| format!("{} is not a Kernex bundle", path.display()))?;
        let manifest = b.unverified_manifest().clone();
        let mut indexes = Vec::new();
        for image in &manifest.images {
            indexes.push((image.slot_class, b.read_index(&manifest, image.slot_class)?));
        }
        let layout = b.layout().clone();
        Ok(LocalRelease {
            version: manifest.version.to_string(),
            compatible: manifest.compatible.clone(),
            bytes,
            layout,
            indexes,
        })
    }

    /// The byte ranges (merged, ascending) a device holding `old` fetches
    /// to install this release: manifest, signature and headers, then per
    /// image the index head, index pages and compressed chunks it lacks —
    /// the same accounting as `kernex-image bundle delta` and the server's
    /// preview.
    pub fn fetch_ranges(&self, old: Option<&LocalRelease>) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let prefix = self.layout.signature.end() + container::padding(self.layout.signature.size);
        ranges.push((0, prefix));
        for (class, index) in &self.indexes {
            let Some(spans) = self.layout.image(*class) else {
                continue;
            };
            let old_index =
                old.and_then(|o| o.indexes.iter().find(|(c, _)| c == class).map(|(_, i)| i));
            let head = index.head();
            ranges.push((spans.index.offset, spans.index.offset + head.head_size()));
            let old_pages: HashSet<[u8; 16]> = old_index
                .map(|o| o.head().pages.iter().map(|p| p.digest).collect())
                .unwrap_or_default();
            for page in &head.pages {
                if !old_pages.contains(&page.digest) {
                    let at = spans.index.offset + page.offset;
                    ranges.push((at, at + u64::from(page.len)));
                }
            }
            let comparable = old_index
                .is_some_and(|o| o.params() == index.params() && o.hash_len() == index.hash_len());
            let have = match (comparable, old_index) {
                (true, Some(o)) => o.hashes(),
                _ => HashSet::new(),
            };
            let data = spans.archive.offset + index.archive_data_offset();
            for chunk in index.stored_chunks() {
                if !have.contains(&chunk.hash) {
                    let at = data + chunk.archive_offset;
                    ranges.push((at, at + u64::from(chunk.archive_size)));
                }
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// The largest compressed chunk (the preview's tolerance per device).
    pub fn max_chunk(&self) -> u64 {
        self.indexes
            .iter()
            .flat_map(|(_, i)| i.stored_chunks().iter().map(|c| u64::from(c.archive_size)))
            .max()
            .unwrap_or(0)
    }
}
