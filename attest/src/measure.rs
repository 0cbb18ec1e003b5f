//! The slot measurement and the PCR it lands in.
//!
//! The measurement of a release is the SHA-256 of its rootfs image, as its
//! signed manifest records it (`images[slot-class = rootfs].sha256`): the
//! bytes the slot holds after install, verified before the slot was marked
//! bootable. At boot it is extended, once, into the slot PCR
//! ([`DEFAULT_SLOT_PCR`], configurable). PCRs 0–15 start at zero on every
//! TPM reset and cannot be reset by software, so after boot the slot PCR is
//!
//! ```text
//! PCR[slot] = SHA-256( 0^32 || measurement )
//! ```
//!
//! and the verifier recomputes it with [`expected_slot_pcr`] from the
//! manifest of the release the device claims to run.

use kernex_protocol::Sha256Digest;
use kernex_protocol::manifest::{Manifest, SlotClass};
use sha2::{Digest as _, Sha256};

/// The PCR Kernex extends the booted slot's measurement into by default.
/// See attest/README.md for why 14 and what the other PCRs hold.
pub const DEFAULT_SLOT_PCR: u8 = 14;

/// The highest PCR index a slot measurement may use: 0–15 are reset only by
/// a TPM reset (16 and 23 can be reset by software, 17–22 are for dynamic
/// root of trust and locality-restricted).
pub const MAX_SLOT_PCR: u8 = 15;

/// The manifest has no rootfs image to measure.
#[derive(Debug, thiserror::Error)]
#[error("manifest {version} has no rootfs image to measure")]
pub struct NoRootfs {
    /// The manifest's version.
    pub version: String,
}

/// The measurement of the release `manifest` describes: its rootfs image's
/// SHA-256.
pub fn slot_measurement(manifest: &Manifest) -> Result<Sha256Digest, NoRootfs> {
    manifest
        .images
        .iter()
        .find(|image| image.slot_class == SlotClass::Rootfs)
        .map(|image| image.sha256)
        .ok_or_else(|| NoRootfs {
            version: manifest.version.to_string(),
        })
}

/// One PCR extend in the SHA-256 bank: `SHA-256(pcr || digest)`.
pub fn extend(pcr: &Sha256Digest, digest: &Sha256Digest) -> Sha256Digest {
    let mut h = Sha256::new();
    h.update(pcr.0);
    h.update(digest.0);
    Sha256Digest(h.finalize().into())
}

/// The slot PCR after boot when `measurement` was booted: one extend of the
/// measurement over the all-zero reset value.
pub fn expected_slot_pcr(measurement: &Sha256Digest) -> Sha256Digest {
    extend(&Sha256Digest([0; 32]), measurement)
}
