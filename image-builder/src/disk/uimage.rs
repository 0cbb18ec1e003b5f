//! `boot.scr`: a U-Boot script in the legacy uImage format, byte for byte
//! what `mkimage -A ARCH -O linux -T script -C none -n NAME -d boot.cmd`
//! writes (with `SOURCE_DATE_EPOCH` as its time stamp), so building a disk
//! image needs no u-boot-tools.

/// `IH_ARCH_ARM64`.
pub const ARCH_ARM64: u8 = 22;
/// `IH_ARCH_X86`.
pub const ARCH_X86: u8 = 3;
const MAGIC: u32 = 0x2705_1956;
const OS_LINUX: u8 = 5;
const TYPE_SCRIPT: u8 = 6;
const COMP_NONE: u8 = 0;
const NAME_LEN: usize = 32;
const HEADER_LEN: usize = 64;

/// The script image: header, the one-entry size table, the script.
pub fn script_image(script: &[u8], arch: u8, name: &str, time: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(script.len() + 8);
    // A script image is a multi-file image with one file: a table of
    // big-endian sizes ended by 0, then the file.
    data.extend_from_slice(&(script.len() as u32).to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(script);
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes()); // header CRC, below
    header.extend_from_slice(&time.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes()); // load address
    header.extend_from_slice(&0u32.to_be_bytes()); // entry point
    header.extend_from_slice(&crc32fast::hash(&data).to_be_bytes());
    header.extend_from_slice(&[OS_LINUX, arch, TYPE_SCRIPT, COMP_NONE]);
    let mut n = [0u8; NAME_LEN];
    let bytes = name.as_bytes();
    let len = bytes.len().min(NAME_LEN - 1);
    n[..len].copy_from_slice(&bytes[..len]);
    header.extend_from_slice(&n);
    let hcrc = crc32fast::hash(&header);
    header[4..8].copy_from_slice(&hcrc.to_be_bytes());
    header.extend_from_slice(&data);
    header
}
