//! `signature::signer_of` and `verify_detached` on arbitrary DER: no panic,
//! and nothing verifies the golden manifest except a signature from the
//! golden CA's signer.
#![no_main]

use kernex_protocol::VerifyOptions;
use kernex_protocol::signature::{signer_of, verify_detached};
use kernex_protocol_fuzz::golden;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: { golden(); }, |data: &[u8]| {
    let signer = signer_of(data);
    let golden = golden();
    if let Ok(info) = verify_detached(
        &golden.keyring,
        &golden.manifest_bytes,
        data,
        VerifyOptions::default(),
    ) {
        assert_eq!(
            signer
                .expect("a verified signature names its signer")
                .subject,
            info.subject
        );
    }
});
