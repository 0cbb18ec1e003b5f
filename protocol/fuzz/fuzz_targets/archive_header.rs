//! `archive::parse_archive_header` on arbitrary bytes: no panic, it agrees
//! with `archive_header_size`, and whatever parses can be checked against
//! the golden rootfs index (`check_dictionary`) without panicking.
#![no_main]

use kernex_protocol::archive::{archive_header_size, check_dictionary, parse_archive_header};
use kernex_protocol_fuzz::golden;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: { golden(); }, |data: &[u8]| {
    let size = archive_header_size(data);
    let Ok(header) = parse_archive_header(data) else {
        return;
    };
    assert_eq!(
        *size.as_ref().expect("a parsed header has a size"),
        header.size
    );
    let _ = check_dictionary(&header.dictionary, &golden().index);
});
