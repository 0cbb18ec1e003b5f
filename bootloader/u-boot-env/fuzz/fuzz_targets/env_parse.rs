//! Every parser of u-boot-env on arbitrary bytes: no panic, bounded work,
//! and whatever decodes re-encodes to the same variables.
#![no_main]

use libfuzzer_sys::fuzz_target;
use u_boot_env::{Config, Env, Layout, decode, decode_redundant, encode};

fuzz_target!(|data: &[u8]| {
    for layout in [Layout::Single, Layout::Redundant] {
        if let Ok(copy) = decode(data, layout) {
            let again = encode(&copy.env, data.len(), layout, copy.flag.unwrap_or(0))
                .expect("a decoded env fits the size it came from");
            assert_eq!(decode(&again, layout).expect("re-decodes").env, copy.env);
        }
    }
    let (a, b) = data.split_at(data.len() / 2);
    if a.len() == b.len() {
        let _ = decode_redundant(a, b);
    }
    if let Ok(env) = Env::from_data(data) {
        let text = env.to_text();
        let _ = Env::from_text(&text);
    }
    let text = String::from_utf8_lossy(data);
    let _ = Env::from_text(&text);
    let _ = Config::parse(&text);
});
