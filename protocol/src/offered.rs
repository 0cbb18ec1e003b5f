//! Patches offered outside the signed bundle: chunk patches the control
//! plane made itself (from a base release the vendor made none from).
//!
//! The signed manifest lists only the patches the vendor put in the bundle
//! ([`crate::manifest::PatchRef`]). A server-made patch has the same member
//! layout ([`crate::patch`]) but lives at its own URL; the device learns
//! of it in its poll answer ([`crate::api::ServerPatch`]): where it is, the
//! base image it is from, its size and its table's size and SHA-256.
//!
//! That answer is not signed by the vendor, and need not be: every chunk a
//! frame decodes to is checked against its hash in the *signed* chunk
//! index, exactly like a chunk from the archive, and a frame that does not
//! decode or verify is fetched from the archive instead. A wrong or
//! malicious patch therefore costs at most its own bytes (each frame is
//! fetched once) and never changes what is written; the slot is verified
//! against the manifest's SHA-256 before the boot flip in any case.
//!
//! To plan and fetch it by the same rules as a bundle's own patch
//! ([`crate::plan::plan_image_offered`]), the offered patch of the `k`-th
//! image of a manifest is addressed as if it were a bundle member at
//! [`span`]: far past any bundle, so no request to it is ever clipped by
//! the first read, and the device routes those reads to the patch's URL.

use crate::container::Span;
use crate::manifest::{PatchRef, SlotClass};

/// Where offered patches start in the virtual address space of a bundle.
pub const OFFERED_AT: u64 = 1 << 62;
/// Space between the offered patches of two images (far above
/// [`crate::limits::MAX_IMAGE_SIZE`] and any patch).
pub const OFFERED_STRIDE: u64 = 1 << 56;

/// The virtual span of the offered patch of the `k`-th image of a
/// manifest.
pub fn span(k: usize, patch: &PatchRef) -> Span {
    Span {
        offset: OFFERED_AT + k as u64 * OFFERED_STRIDE,
        size: patch.size,
    }
}

/// Which image (`k`) and which offset in its offered patch a virtual
/// offset names; None below [`OFFERED_AT`] (a bundle offset).
pub fn locate(offset: u64) -> Option<(usize, u64)> {
    let rel = offset.checked_sub(OFFERED_AT)?;
    Some(((rel / OFFERED_STRIDE) as usize, rel % OFFERED_STRIDE))
}

/// An offered patch as the server's preview knows it: the image it is for,
/// its reference (as a manifest would list it) and its table.
#[derive(Debug, Clone)]
pub struct Offered {
    /// The image.
    pub class: SlotClass,
    /// Base image, sizes and table digest.
    pub patch: PatchRef,
    /// The table (the first `patch.table_size` bytes of the member).
    pub table: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_offsets_round_trip() {
        let p = PatchRef {
            base_sha256: crate::Sha256Digest([1; 32]),
            base_version: semver::Version::new(1, 0, 0),
            size: 100,
            table_size: 40,
            table_sha256: crate::Sha256Digest([2; 32]),
        };
        let s = span(2, &p);
        assert_eq!(locate(s.offset + 41), Some((2, 41)));
        assert_eq!(locate(5), None);
    }
}
