//! `Manifest::from_slice` on arbitrary bytes: no panic, whatever parses
//! serialises back to the same manifest, and the bundle layout an
//! (unverified) manifest implies can be computed without overflow.
#![no_main]

use kernex_protocol::Manifest;
use kernex_protocol::container::BundleLayout;
use kernex_protocol::limits::{MAX_MANIFEST_SIZE, MAX_SIGNATURE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(manifest) = Manifest::from_slice(data) else {
        return;
    };
    let again = manifest.to_vec().expect("a parsed manifest serialises");
    // Pretty-printing can push a compact manifest over the size limit.
    if again.len() as u64 <= MAX_MANIFEST_SIZE {
        assert_eq!(
            Manifest::from_slice(&again).expect("a serialised manifest parses"),
            manifest
        );
    }
    // Bundle::open computes this from the manifest before anything checks
    // the signature.
    let layout = BundleLayout::compute(data.len() as u64, MAX_SIGNATURE_SIZE, &manifest);
    for (_, _, span) in layout.members() {
        assert!(span.end() <= layout.total_size);
    }
});
