//! Every parser of u-boot-env on arbitrary bytes: no panic, bounded work,
//! and whatever decodes re-encodes to the same variables.
#![no_main]

use libfuzzer_sys::fuzz_target;
use u_boot_env::{Config, Env, EnvError, Layout, decode, decode_redundant, encode};

fuzz_target!(|data: &[u8]| {
    for layout in [Layout::Single, Layout::Redundant] {
        if let Ok(copy) = decode(data, layout) {
            let capacity = data.len() - layout.header_len();
            match encode(&copy.env, data.len(), layout, copy.flag.unwrap_or(0)) {
                Ok(again) => {
                    assert_eq!(decode(&again, layout).expect("re-decodes").env, copy.env);
                }
                // A data area whose last entry ends at its very end (no
                // terminating empty entry) is read, as U-Boot reads it, but
                // is written back only with the terminator: one byte more
                // than the area. Anything else must fit.
                Err(EnvError::TooLarge { needed, capacity: c }) => {
                    assert_eq!((needed, c), (capacity + 1, capacity), "only the terminator is over");
                }
                Err(e) => panic!("a decoded env re-encodes: {e}"),
            }
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
