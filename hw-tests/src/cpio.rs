//! A `newc` cpio archive writer (the initramfs format the kernel unpacks),
//! so device nodes such as /dev/console can be put into it without root.

use std::io::Write;

/// One archive member.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    CharDev {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

/// Serialises `entries` (parents before children) plus the trailer.
pub fn write(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ino, e) in entries.iter().enumerate() {
        let (path, mode, data, rmaj, rmin): (&str, u32, &[u8], u32, u32) = match e {
            Entry::Dir { path, mode } => (path, 0o040000 | mode, &[], 0, 0),
            Entry::File { path, mode, data } => (path, 0o100000 | mode, data, 0, 0),
            Entry::Symlink { path, target } => (path, 0o120777, target.as_bytes(), 0, 0),
            Entry::CharDev {
                path,
                mode,
                major,
                minor,
            } => (path, 0o020000 | mode, &[], *major, *minor),
        };
        header(
            &mut out,
            ino as u32 + 1,
            mode,
            data.len() as u32,
            rmaj,
            rmin,
            path,
        );
        out.extend_from_slice(data);
        pad4(&mut out);
    }
    header(&mut out, 0, 0, 0, 0, 0, "TRAILER!!!");
    out
}

fn header(out: &mut Vec<u8>, ino: u32, mode: u32, size: u32, rmaj: u32, rmin: u32, name: &str) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        size,
        0,
        0,
        rmaj,
        rmin,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        let _ = write!(out, "{f:08x}");
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}
