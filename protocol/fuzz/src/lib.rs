//! What the fuzz targets share: the checked-in golden bundle and its CA,
//! decoded once, so targets can check fuzzed input against real data (a
//! dictionary against a real index, a signature against the real manifest).

use std::io::Cursor;
use std::sync::OnceLock;

use kernex_protocol::bundle::Bundle;
use kernex_protocol::index::ChunkIndex;
use kernex_protocol::{Keyring, SlotClass, VerifyOptions};

/// The golden bundle every other golden file is a variant of.
pub const VALID_BUNDLE: &[u8] = include_bytes!("../../tests/golden/valid.kxb");
/// The CA that signed it.
pub const GOLDEN_CA: &[u8] = include_bytes!("../../tests/golden/ca.crt");

/// The parts of [`VALID_BUNDLE`] the targets use.
#[derive(Debug)]
pub struct Golden {
    /// The manifest bytes, as signed.
    pub manifest_bytes: Vec<u8>,
    /// The rootfs chunk index.
    pub index: ChunkIndex,
    /// A keyring holding [`GOLDEN_CA`].
    pub keyring: Keyring,
}

/// The golden bundle, opened once. Panics (failing every target at once)
/// if the checked-in golden files no longer read: that is a broken tree,
/// not a fuzz finding.
pub fn golden() -> &'static Golden {
    static GOLDEN: OnceLock<Golden> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let mut bundle =
            Bundle::open(Cursor::new(VALID_BUNDLE.to_vec())).expect("golden valid.kxb opens");
        let manifest = bundle.unverified_manifest().clone();
        let index = bundle
            .read_index(&manifest, SlotClass::Rootfs)
            .expect("golden valid.kxb has a rootfs index");
        let keyring = Keyring::from_pem(GOLDEN_CA).expect("golden ca.crt loads");
        // The bundle target reaches chunk verification only through seeds
        // that verify.
        bundle
            .verify(&keyring, VerifyOptions::default())
            .expect("golden valid.kxb verifies against ca.crt");
        Golden {
            manifest_bytes: bundle.manifest_bytes().to_vec(),
            index,
            keyring,
        }
    })
}
