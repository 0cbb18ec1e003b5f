//! Factory disk images: a complete, flashable image for one board, written
//! into a plain file without root privileges or loop devices.
//!
//! Steps, all on offsets inside one (sparse) file that is renamed into
//! place only when everything succeeded:
//!
//! 1. the partition table (MBR or GPT, [`table`]);
//! 2. the FAT boot partition (`mkfs.vfat --offset`, `mcopy -i disk@@offset`):
//!    the vendor's boot files, the profile's generated files, the boot script
//!    (`boot.scr`, [`uimage`]) and the initial boot state — a U-Boot env file
//!    or a grubenv — saying: boot slot A (`BOOT_ORDER=A B`, `BOOT_A_LEFT=3`,
//!    `BOOT_B_LEFT=0`, or 3 when slot B is filled too);
//! 3. slot A: the release's root filesystem image, extracted from the bundle
//!    after its signature verified, every chunk and the whole image checked
//!    against the manifest; slot B: empty (zeros), or the same with `--fill-b`;
//! 4. the data partition (ext4, `mkfs.ext4 -d -E offset=`): `etc/kernex/`
//!    (`system.toml`, `fw_env.config`, `disk.json`) and the updater's record
//!    of what the slots hold (`kernex/slot-A/`).

pub mod table;
pub mod tools;
pub mod uimage;

mod files;
mod slots;

use files::*;
pub use files::{fw_env_config, system_config, system_toml};
use slots::*;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kernex_bootloader::{Backend, BootState, BootloaderConfig, DEFAULT_ATTEMPTS, GrubEnv, Slot};
use kernex_device::{SlotPair, SlotRecord, Slots, SystemConfig, layout};
use kernex_protocol::bundle::Bundle;
use kernex_protocol::signature::{Keyring, VerifyOptions};
use kernex_protocol::{Sha256Digest, SlotClass, VerifiedManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::board::{ALIGNMENT, BoardProfile, BootloaderSpec, Role, TableKind};
use crate::progress;
use table::{Entry, Guid, Table};

/// Where `disk create` records what it wrote, on the data partition.
pub const DISK_RECORD: &str = "/etc/kernex/disk.json";
/// The updater config on the data partition (`provision` adds `[server]`).
pub const SYSTEM_TOML: &str = kernex_device::DEFAULT_CONFIG;
/// The keyring `system.toml` names: the release's CA, in the image.
pub const KEYRING: &str = "/etc/kernex/keyring.pem";
/// The data partition directory of the updater's state (`data-dir`).
pub const DATA_DIR: &str = "kernex";

/// What goes into the slots.
#[derive(Debug, Clone)]
pub enum Source {
    /// A signed bundle, verified against a keyring.
    Bundle {
        /// The bundle file.
        path: PathBuf,
        /// Trusted CA certificates (PEM).
        keyring: Vec<u8>,
    },
    /// Plain filesystem images by slot class (development: no signature,
    /// no record of a release on the data partition).
    Images(Vec<(SlotClass, PathBuf)>),
}

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The board.
    pub board: BoardProfile,
    /// What goes into the slots.
    pub source: Source,
    /// Where the vendor's boot files are.
    pub boot_files: Option<PathBuf>,
    /// The image file to write.
    pub output: PathBuf,
    /// Write the release into slot B as well.
    pub fill_b: bool,
    /// Total disk size (the `grow` partition takes the rest).
    pub size: Option<u64>,
    /// Time stamp for the boot script header and slot records.
    pub timestamp: u64,
    /// No progress bar.
    pub quiet: bool,
}

/// One partition as placed on the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Placed {
    /// 1-based partition number.
    pub number: usize,
    /// What it holds.
    pub role: Role,
    /// First byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// How Linux on the device names it (a device path, or
    /// `/dev/disk/by-partuuid/…` on GPT disks).
    pub device: String,
    /// GPT unique partition GUID (GPT disks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

/// The release written into slot A (bundle sources only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReleaseRecord {
    /// Release version.
    pub version: semver::Version,
    /// Hardware class.
    pub compatible: String,
    /// Who signed it (verified).
    pub signer: String,
    /// SHA-256 of the signed manifest bytes.
    pub manifest_sha256: Sha256Digest,
}

/// What `disk create` wrote: printed as its report and kept on the data
/// partition as `etc/kernex/disk.json` for `provision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskRecord {
    /// The board profile's name.
    pub board: String,
    /// The board's hardware class.
    pub compatible: String,
    /// Where the device mounts the data partition.
    pub data_mount: String,
    /// MBR or GPT.
    pub partition_table: TableKind,
    /// Disk size in bytes.
    pub size: u64,
    /// The partitions.
    pub partitions: Vec<Placed>,
    /// The release in slot A (none for `--image` sources).
    pub release: Option<ReleaseRecord>,
    /// SHA-256 of slot A's image (the bytes at the start of the partition).
    pub slot_a_sha256: Sha256Digest,
    /// Size of slot A's image.
    pub slot_a_image_size: u64,
    /// Whether slot B holds the same release.
    pub slot_b_filled: bool,
    /// The initial boot state (the contract's variables).
    pub boot_state: BTreeMap<String, String>,
}

/// The report of `disk create`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreateReport {
    /// The image file.
    pub output: PathBuf,
    /// What was written.
    #[serde(flatten)]
    pub record: DiskRecord,
    /// Files on the boot partition.
    pub boot_files: Vec<String>,
}

/// Partition placement for a profile and an optional total size.
pub fn layout(board: &BoardProfile, size: Option<u64>) -> Result<(Table, Vec<Placed>)> {
    let gpt_tail = match board.partition_table {
        TableKind::Gpt => ALIGNMENT,
        TableKind::Mbr => 0,
    };
    let minimum: u64 =
        ALIGNMENT + board.partitions.iter().map(|p| p.size.0).sum::<u64>() + gpt_tail;
    let disk_size = size.unwrap_or(minimum);
    if disk_size < minimum {
        bail!(
            "--size {disk_size} is smaller than board {} needs ({minimum} bytes)",
            board.name
        );
    }
    let mut extra = (disk_size - minimum) / ALIGNMENT * ALIGNMENT;
    if extra > 0 && !board.partitions.iter().any(|p| p.grow) {
        bail!(
            "--size is larger than board {} needs and no partition has grow = true",
            board.name
        );
    }
    let limit = match board.partition_table {
        TableKind::Mbr => crate::board::MAX_MBR_DISK_SIZE,
        TableKind::Gpt => crate::board::MAX_DISK_SIZE,
    };
    if disk_size > limit {
        bail!(
            "--size {disk_size} is larger than a {} disk may be ({limit})",
            board.partition_table.as_str()
        );
    }
    let seed = format!("kernex-disk:{}", board.name);
    let disk_guid = Guid::derived(seed.as_bytes());
    let mbr_signature = u32::from_le_bytes(
        Sha256::digest(seed.as_bytes())[..4]
            .try_into()
            .unwrap_or([0x4b, 0x58, 0, 0]),
    );
    let mut start = ALIGNMENT;
    let mut entries = Vec::new();
    let mut placed = Vec::new();
    for (i, p) in board.partitions.iter().enumerate() {
        let mut psize = p.size.0;
        if p.grow {
            psize += extra;
            extra = 0;
        }
        let number = i + 1;
        let guid = Guid::derived(format!("{seed}:{}", p.role).as_bytes());
        let (mbr_type, type_guid) = match (p.role, &board.bootloader) {
            (Role::Boot, BootloaderSpec::Grub { .. }) => (table::MBR_ESP, table::GUID_ESP),
            (Role::Boot, _) if p.fat_bits == Some(16) => {
                (table::MBR_FAT16_LBA, table::GUID_BASIC_DATA)
            }
            (Role::Boot, _) => (table::MBR_FAT32_LBA, table::GUID_BASIC_DATA),
            _ => (table::MBR_LINUX, table::GUID_LINUX),
        };
        entries.push(Entry {
            start,
            size: psize,
            mbr_type,
            bootable: p.role == Role::Boot,
            type_guid: Guid::parse(type_guid)?,
            guid,
            name: p.role.as_str().to_owned(),
        });
        let (device, partuuid) = match board.partition_table {
            TableKind::Mbr => (board.device_path(number), None),
            TableKind::Gpt => {
                let uuid = guid.to_text().to_ascii_lowercase();
                (format!("/dev/disk/by-partuuid/{uuid}"), Some(uuid))
            }
        };
        placed.push(Placed {
            number,
            role: p.role,
            start,
            size: psize,
            device,
            partuuid,
        });
        start += psize;
    }
    let table = Table {
        kind: board.partition_table,
        disk_size,
        mbr_signature,
        disk_guid,
        entries,
    };
    table.check()?;
    Ok((table, placed))
}

fn find(placed: &[Placed], role: Role) -> Result<&Placed> {
    placed
        .iter()
        .find(|p| p.role == role)
        .with_context(|| format!("the board has no {role} partition"))
}

/// A slot class's A and B roles.
fn slot_roles(class: SlotClass) -> (Role, Role) {
    match class {
        SlotClass::Rootfs => (Role::RootfsA, Role::RootfsB),
        SlotClass::Agent => (Role::AgentA, Role::AgentB),
    }
}

/// The image bytes of one class, written into one or two slots.
struct Written {
    sha256: Sha256Digest,
    size: u64,
}

/// Writes everything; see the module docs.
pub fn create(opts: &CreateOptions) -> Result<CreateReport> {
    let board = &opts.board;
    let (table, placed) = layout(board, opts.size)?;
    let boot_stage = tempfile::tempdir().context("unable to create a temporary directory")?;
    let boot_files = stage_boot_files(opts, &placed, boot_stage.path())?;

    let out_dir = match opts.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".kernex-disk-")
        .tempfile_in(&out_dir)
        .with_context(|| format!("unable to create a temporary file in {}", out_dir.display()))?;
    let disk_path = tmp.path().to_path_buf();
    let mut disk = tmp
        .reopen()
        .context("unable to open the temporary disk image")?;
    disk.set_len(table.disk_size)
        .with_context(|| format!("unable to size the disk image to {} bytes", table.disk_size))?;
    table.write(&mut disk)?;

    // Slots first: a bundle that does not verify stops here.
    let (release, written, records) = write_slots(opts, &placed, &mut disk)?;
    let rootfs = written
        .get(&SlotClass::Rootfs)
        .context("no root filesystem image was written")?;

    // Boot partition.
    let boot = find(&placed, Role::Boot)?;
    let boot_spec = board
        .partition(Role::Boot)
        .map(|(_, p)| p)
        .context("no boot partition")?;
    let volume_id = u32::from_le_bytes(
        Sha256::digest(format!("kernex-boot:{}", board.name))[..4]
            .try_into()
            .unwrap_or([0x4b, 0x58, 0x42, 0x54]),
    );
    tools::mkfs_vfat(
        &disk_path,
        boot.start,
        boot.size,
        boot_spec.fat_bits.unwrap_or(32),
        boot_spec.label_or_default(),
        volume_id,
    )?;
    let boot_state = boot_state(opts.fill_b)?;
    write_boot_state(board, &placed, &boot_state, boot_stage.path())?;
    tools::mcopy_tree(&disk_path, boot.start, boot_stage.path())?;

    // Data partition.
    let data = find(&placed, Role::Data)?;
    let record = DiskRecord {
        board: board.name.clone(),
        compatible: board.compatible.clone(),
        data_mount: board.device.data_mount.clone(),
        partition_table: board.partition_table,
        size: table.disk_size,
        partitions: placed.clone(),
        release,
        slot_a_sha256: rootfs.sha256,
        slot_a_image_size: rootfs.size,
        slot_b_filled: opts.fill_b,
        boot_state: boot_state.clone(),
    };
    let data_stage = tempfile::tempdir().context("unable to create a temporary directory")?;
    stage_data(board, &placed, &record, &records, data_stage.path())?;
    let data_spec = board
        .partition(Role::Data)
        .map(|(_, p)| p)
        .context("no data partition")?;
    tools::mkfs_ext4(
        &disk_path,
        data.start,
        data.size,
        data_spec.label_or_default(),
        data_stage.path(),
    )?;
    // mkfs.ext4 -d copies the builder's uid and gid: the device's files
    // belong to root.
    let mut chown = String::new();
    for path in staged_paths(data_stage.path(), Path::new("/"))? {
        chown.push_str(&format!("sif {path} uid 0\nsif {path} gid 0\n"));
    }
    tools::debugfs(&disk_path, data.start, &chown, true)
        .context("unable to give the data partition's files to root")?;

    disk.sync_all().context("unable to sync the disk image")?;
    drop(disk);
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .context("unable to set the disk image's permissions")?;
    }
    tmp.persist(&opts.output).with_context(|| {
        format!(
            "unable to move the disk image into place at {}",
            opts.output.display()
        )
    })?;
    Ok(CreateReport {
        output: opts.output.clone(),
        record,
        boot_files,
    })
}

/// The contract's variables for a factory disk: slot A first with its
/// attempts; slot B has none unless it holds the release too.
pub fn boot_state(fill_b: bool) -> Result<BTreeMap<String, String>> {
    let state = BootState {
        order: vec![Slot::A, Slot::B],
        a_left: DEFAULT_ATTEMPTS,
        b_left: if fill_b { DEFAULT_ATTEMPTS } else { 0 },
    };
    let mut vars = BTreeMap::new();
    state
        .to_vars(&mut vars)
        .context("unable to set the boot state")?;
    Ok(vars)
}

type SlotRecords = Vec<(String, Vec<u8>)>;
