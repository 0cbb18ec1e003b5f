//! `container::parse_member_header` on arbitrary bytes: no panic, and every
//! header it accepts is one `write_member_header` writes back identically.
#![no_main]

use kernex_protocol::container::{parse_member_header, write_member_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_member_header(data, 0) else {
        return;
    };
    // The writer takes names of 1 to 99 bytes; a 100-byte name fills the
    // field without a NUL, which only the reader accepts.
    if (1..=99).contains(&header.name.len()) {
        let mut block = Vec::new();
        write_member_header(&mut block, &header.name, header.size)
            .expect("a parsed header's name and size are writable");
        assert_eq!(
            parse_member_header(&block, 0).expect("a written header parses"),
            header
        );
    }
});
