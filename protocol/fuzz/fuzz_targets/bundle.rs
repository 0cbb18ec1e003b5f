//! A whole bundle from arbitrary bytes: `Bundle::open`, then every image's
//! index and archive header against the unverified manifest, then (when the
//! bytes still carry the golden signature, as mutations of the golden seeds
//! past the manifest do) every chunk through `verify_contents`. No panic,
//! no unbounded allocation.
#![no_main]

use std::io::Cursor;

use kernex_protocol::VerifyOptions;
use kernex_protocol::bundle::Bundle;
use kernex_protocol::signature::signer_of;
use kernex_protocol_fuzz::golden;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: { golden(); }, |data: &[u8]| {
    let Ok(mut bundle) = Bundle::open(Cursor::new(data.to_vec())) else {
        return;
    };
    let _ = signer_of(bundle.signature());
    let manifest = bundle.unverified_manifest().clone();
    let _ = bundle.layout().members();
    for image in &manifest.images {
        if let Ok(index) = bundle.read_index(&manifest, image.slot_class) {
            let _ = bundle.read_archive_header(&manifest, image.slot_class, &index);
        }
    }
    if let Ok(verified) = bundle.verify(&golden().keyring, VerifyOptions::default()) {
        if let Ok(reports) = bundle.verify_contents(&verified, &|_| {}) {
            assert_eq!(reports.len(), verified.images.len());
        }
    }
});
