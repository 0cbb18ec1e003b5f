//! MBR and GPT partition tables, written into (and read back from) an
//! image file: no root, no loop device, no partitioning tool.
//!
//! What is written follows UEFI 2.10 §5 (GPT: protective MBR, primary
//! header at LBA 1 with 128 entries of 128 bytes from LBA 2, the backup
//! entries and header at the end, CRC32s over both) and the classic DOS
//! MBR (four primary entries, CHS from a 255-head, 63-sector geometry).
//! The tests check both against `sfdisk --dump` and `sgdisk -v`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::board::{SECTOR, TableKind};

/// GPT entries in each copy of the table.
pub const GPT_ENTRIES: u32 = 128;
/// Size of one GPT entry.
pub const GPT_ENTRY_SIZE: u32 = 128;
/// Sectors the GPT needs at each end: the header and 16 KiB of entries
/// (plus the protective MBR at the start).
pub const GPT_TABLE_SECTORS: u64 = 1 + (GPT_ENTRIES as u64 * GPT_ENTRY_SIZE as u64) / SECTOR;

/// The EFI system partition.
pub const GUID_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// Linux filesystem data.
pub const GUID_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// Microsoft basic data (a FAT boot partition that is not an ESP).
pub const GUID_BASIC_DATA: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";

/// MBR type of a FAT32 (LBA) partition.
pub const MBR_FAT32_LBA: u8 = 0x0c;
/// MBR type of a FAT16 (LBA) partition.
pub const MBR_FAT16_LBA: u8 = 0x0e;
/// MBR type of an EFI system partition.
pub const MBR_ESP: u8 = 0xef;
/// MBR type of a Linux partition.
pub const MBR_LINUX: u8 = 0x83;
const MBR_PROTECTIVE: u8 = 0xee;

/// A 16-byte GUID, kept in its on-disk (mixed-endian) byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`.
    pub fn parse(text: &str) -> Result<Self> {
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || text.len() != 36 {
            bail!("{text:?} is not a GUID");
        }
        let b = hex::decode(&hex).with_context(|| format!("{text:?} is not a GUID"))?;
        let mut g = [0u8; 16];
        // The first three fields are little-endian on disk.
        g[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
        g[4..6].copy_from_slice(&[b[5], b[4]]);
        g[6..8].copy_from_slice(&[b[7], b[6]]);
        g[8..16].copy_from_slice(&b[8..16]);
        Ok(Guid(g))
    }

    /// A version-4-shaped GUID derived from `seed` (reproducible images).
    pub fn derived(seed: &[u8]) -> Self {
        let d = Sha256::digest(seed);
        let mut g = [0u8; 16];
        g.copy_from_slice(&d[..16]);
        // Version 4 (in the third field, little-endian) and the RFC 4122 variant.
        g[7] = (g[7] & 0x0f) | 0x40;
        g[8] = (g[8] & 0x3f) | 0x80;
        Guid(g)
    }

    /// The canonical text form (upper case, as sfdisk prints it).
    pub fn to_text(&self) -> String {
        let g = &self.0;
        format!(
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{}-{}",
            g[3],
            g[2],
            g[1],
            g[0],
            g[5],
            g[4],
            g[7],
            g[6],
            hex::encode_upper(&g[8..10]),
            hex::encode_upper(&g[10..16])
        )
    }
}

/// One partition to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First byte (a multiple of the sector size).
    pub start: u64,
    /// Size in bytes (a multiple of the sector size).
    pub size: u64,
    /// MBR type byte (MBR tables).
    pub mbr_type: u8,
    /// The MBR bootable flag.
    pub bootable: bool,
    /// GPT type GUID (GPT tables).
    pub type_guid: Guid,
    /// GPT unique partition GUID.
    pub guid: Guid,
    /// GPT partition name (at most 36 UTF-16 units).
    pub name: String,
}

/// A whole table.
#[derive(Debug, Clone)]
pub struct Table {
    /// MBR or GPT.
    pub kind: TableKind,
    /// Disk size in bytes.
    pub disk_size: u64,
    /// The MBR disk signature.
    pub mbr_signature: u32,
    /// The GPT disk GUID.
    pub disk_guid: Guid,
    /// The partitions, in order.
    pub entries: Vec<Entry>,
}

impl Table {
    /// First sector usable by partitions on a GPT disk's end: the backup
    /// table takes the last [`GPT_TABLE_SECTORS`].
    fn last_usable_lba(&self) -> u64 {
        self.disk_size / SECTOR - 1 - GPT_TABLE_SECTORS
    }

    /// Checks the entries lie inside the usable area and do not overlap.
    pub fn check(&self) -> Result<()> {
        let sectors = self.disk_size / SECTOR;
        if !self.disk_size.is_multiple_of(SECTOR) {
            bail!("disk size {} is not a multiple of {SECTOR}", self.disk_size);
        }
        let (first, last) = match self.kind {
            TableKind::Mbr => {
                if sectors > u32::MAX as u64 + 1 {
                    bail!("an MBR addresses at most 2 TiB");
                }
                if self.entries.len() > 4 {
                    bail!("an MBR holds 4 primary partitions");
                }
                (1, sectors - 1)
            }
            TableKind::Gpt => {
                if self.entries.len() > GPT_ENTRIES as usize {
                    bail!("a GPT holds {GPT_ENTRIES} partitions here");
                }
                (1 + GPT_TABLE_SECTORS, self.last_usable_lba())
            }
        };
        let mut prev_end = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if e.start % SECTOR != 0 || e.size % SECTOR != 0 || e.size == 0 {
                bail!("partition {}: not whole sectors", i + 1);
            }
            let s = e.start / SECTOR;
            let end = s + e.size / SECTOR - 1;
            if s < first || end > last || s < prev_end {
                bail!(
                    "partition {} (sectors {s}..={end}) is outside {first}..={last} or overlaps",
                    i + 1
                );
            }
            if e.name.encode_utf16().count() > 36 {
                bail!("partition {}: name {:?} is too long", i + 1, e.name);
            }
            prev_end = end + 1;
        }
        Ok(())
    }

    /// Writes the table into `file` (which is `disk_size` bytes long).
    pub fn write(&self, file: &mut File) -> Result<()> {
        self.check()?;
        match self.kind {
            TableKind::Mbr => {
                let mbr = self.mbr();
                write_at(file, 0, &mbr)
            }
            TableKind::Gpt => {
                let sectors = self.disk_size / SECTOR;
                let entries = self.gpt_entries();
                let entries_crc = crc32fast::hash(&entries);
                let last = sectors - 1;
                let primary = self.gpt_header(1, last, 2, entries_crc);
                let backup = self.gpt_header(last, 1, last - GPT_TABLE_SECTORS + 1, entries_crc);
                write_at(file, 0, &self.protective_mbr())?;
                write_at(file, SECTOR, &primary)?;
                write_at(file, 2 * SECTOR, &entries)?;
                write_at(file, (last - GPT_TABLE_SECTORS + 1) * SECTOR, &entries)?;
                write_at(file, last * SECTOR, &backup)
            }
        }
    }

    fn mbr(&self) -> Vec<u8> {
        let mut mbr = vec![0u8; SECTOR as usize];
        mbr[440..444].copy_from_slice(&self.mbr_signature.to_le_bytes());
        for (i, e) in self.entries.iter().enumerate() {
            let lba = (e.start / SECTOR) as u32;
            let count = (e.size / SECTOR) as u32;
            let o = 446 + 16 * i;
            mbr[o] = if e.bootable { 0x80 } else { 0 };
            mbr[o + 1..o + 4].copy_from_slice(&chs(u64::from(lba)));
            mbr[o + 4] = e.mbr_type;
            mbr[o + 5..o + 8].copy_from_slice(&chs(u64::from(lba) + u64::from(count) - 1));
            mbr[o + 8..o + 12].copy_from_slice(&lba.to_le_bytes());
            mbr[o + 12..o + 16].copy_from_slice(&count.to_le_bytes());
        }
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        mbr
    }

    fn protective_mbr(&self) -> Vec<u8> {
        let mut mbr = vec![0u8; SECTOR as usize];
        let sectors = self.disk_size / SECTOR;
        let count = (sectors - 1).min(u64::from(u32::MAX)) as u32;
        let o = 446;
        mbr[o + 1..o + 4].copy_from_slice(&[0x00, 0x02, 0x00]);
        mbr[o + 4] = MBR_PROTECTIVE;
        mbr[o + 5..o + 8].copy_from_slice(&chs(sectors - 1));
        mbr[o + 8..o + 12].copy_from_slice(&1u32.to_le_bytes());
        mbr[o + 12..o + 16].copy_from_slice(&count.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        mbr
    }

    fn gpt_entries(&self) -> Vec<u8> {
        let mut out = vec![0u8; (GPT_ENTRIES * GPT_ENTRY_SIZE) as usize];
        for (i, e) in self.entries.iter().enumerate() {
            let o = i * GPT_ENTRY_SIZE as usize;
            out[o..o + 16].copy_from_slice(&e.type_guid.0);
            out[o + 16..o + 32].copy_from_slice(&e.guid.0);
            out[o + 32..o + 40].copy_from_slice(&(e.start / SECTOR).to_le_bytes());
            out[o + 40..o + 48].copy_from_slice(&((e.start + e.size) / SECTOR - 1).to_le_bytes());
            // Attributes: none (bit 2, legacy BIOS bootable, is not needed).
            for (j, unit) in e.name.encode_utf16().take(36).enumerate() {
                out[o + 56 + 2 * j..o + 58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
            }
        }
        out
    }

    fn gpt_header(
        &self,
        my_lba: u64,
        alternate: u64,
        entries_lba: u64,
        entries_crc: u32,
    ) -> Vec<u8> {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alternate.to_le_bytes());
        h[40..48].copy_from_slice(&(1 + GPT_TABLE_SECTORS).to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable_lba().to_le_bytes());
        h[56..72].copy_from_slice(&self.disk_guid.0);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&GPT_ENTRIES.to_le_bytes());
        h[84..88].copy_from_slice(&GPT_ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

/// CHS address of `lba` in a 255-head, 63-sector geometry, clamped to
/// 1023/254/63 as every tool does for addresses past 8 GiB.
fn chs(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SECTORS: u64 = 63;
    let cylinder = lba / (HEADS * SECTORS);
    if cylinder > 1023 {
        return [0xfe, 0xff, 0xff];
    }
    let head = (lba / SECTORS) % HEADS;
    let sector = lba % SECTORS + 1;
    [
        head as u8,
        (sector as u8) | (((cylinder >> 8) as u8) << 6),
        (cylinder & 0xff) as u8,
    ]
}

fn write_at(file: &mut File, offset: u64, bytes: &[u8]) -> Result<()> {
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(bytes))
        .context("unable to write the partition table")
}

/// A partition as read back from a disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPartition {
    /// 1-based number.
    pub number: usize,
    /// First byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// GPT partition name (empty on MBR disks).
    pub name: String,
}

/// Reads the partitions of an MBR or GPT disk (primary GPT header only,
/// checked by its CRCs).
pub fn read(file: &mut File) -> Result<(TableKind, Vec<ReadPartition>)> {
    let mut mbr = [0u8; SECTOR as usize];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut mbr))
        .context("unable to read the MBR")?;
    if mbr[510..512] != [0x55, 0xaa] {
        bail!("no partition table (no MBR signature)");
    }
    let entry = |i: usize| {
        let o = 446 + 16 * i;
        let t = mbr[o + 4];
        let lba = u32::from_le_bytes([mbr[o + 8], mbr[o + 9], mbr[o + 10], mbr[o + 11]]);
        let n = u32::from_le_bytes([mbr[o + 12], mbr[o + 13], mbr[o + 14], mbr[o + 15]]);
        (t, u64::from(lba), u64::from(n))
    };
    if entry(0).0 != MBR_PROTECTIVE {
        let parts = (0..4)
            .map(entry)
            .enumerate()
            .filter(|(_, (t, _, n))| *t != 0 && *n != 0)
            .map(|(i, (_, lba, n))| ReadPartition {
                number: i + 1,
                start: lba * SECTOR,
                size: n * SECTOR,
                name: String::new(),
            })
            .collect();
        return Ok((TableKind::Mbr, parts));
    }
    let mut h = [0u8; SECTOR as usize];
    file.seek(SeekFrom::Start(SECTOR))
        .and_then(|_| file.read_exact(&mut h))
        .context("unable to read the GPT header")?;
    if &h[0..8] != b"EFI PART" {
        bail!("protective MBR but no GPT header at LBA 1");
    }
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let header_size = u32_at(12) as usize;
    if !(92..=SECTOR as usize).contains(&header_size) {
        bail!("GPT header size {header_size} is invalid");
    }
    let mut check = h[..header_size].to_vec();
    check[16..20].fill(0);
    if crc32fast::hash(&check) != u32_at(16) {
        bail!("GPT header CRC does not match");
    }
    let (lba, count, size) = (u64_at(72), u32_at(80), u32_at(84));
    if !(128..=4096).contains(&size) || count > 1024 {
        bail!("GPT entry layout ({count} entries of {size} bytes) is not supported");
    }
    let mut entries = vec![0u8; count as usize * size as usize];
    file.seek(SeekFrom::Start(lba * SECTOR))
        .and_then(|_| file.read_exact(&mut entries))
        .context("unable to read the GPT entries")?;
    if crc32fast::hash(&entries) != u32_at(88) {
        bail!("GPT entries CRC does not match");
    }
    let mut parts = Vec::new();
    for (i, e) in entries.chunks(size as usize).enumerate() {
        if e[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&e[32..40]);
        let first = u64::from_le_bytes(b);
        b.copy_from_slice(&e[40..48]);
        let last = u64::from_le_bytes(b);
        if last < first {
            bail!("GPT entry {} ends before it starts", i + 1);
        }
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        parts.push(ReadPartition {
            number: i + 1,
            start: first * SECTOR,
            size: (last - first + 1) * SECTOR,
            name: String::from_utf16_lossy(&units),
        });
    }
    Ok((TableKind::Gpt, parts))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn guid_text_round_trips_through_the_mixed_endian_layout() {
        let g = Guid::parse(GUID_ESP).unwrap();
        assert_eq!(g.0[0..4], [0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(g.to_text(), GUID_ESP);
        let d = Guid::derived(b"seed");
        assert_eq!(Guid::parse(&d.to_text()).unwrap(), d);
        assert_eq!(&d.to_text()[14..15], "4");
    }

    #[test]
    fn chs_matches_the_classic_geometry() {
        assert_eq!(chs(2048), [32, 33, 0]);
        assert_eq!(chs(1 << 30), [0xfe, 0xff, 0xff]);
    }
}
