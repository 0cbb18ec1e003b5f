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

/// Extracts (or copies) the images into their slots. Returns the release,
/// each class's digest, and the updater's slot records to stage.
fn write_slots(
    opts: &CreateOptions,
    placed: &[Placed],
    disk: &mut File,
) -> Result<(
    Option<ReleaseRecord>,
    BTreeMap<SlotClass, Written>,
    SlotRecords,
)> {
    let board = &opts.board;
    let mut written = BTreeMap::new();
    let mut records = Vec::new();
    match &opts.source {
        Source::Bundle { path, keyring } => {
            let keyring = Keyring::from_pem(keyring).context("unable to load the keyring")?;
            let file = File::open(path)
                .with_context(|| format!("unable to open bundle {}", path.display()))?;
            let mut bundle = Bundle::open(BufReader::new(file))
                .with_context(|| format!("{} is not a valid bundle", path.display()))?;
            let verified = bundle
                .verify(&keyring, VerifyOptions::default())
                .with_context(|| format!("signature of {} does not verify", path.display()))?;
            check_release(board, placed, &verified)?;
            let classes: Vec<SlotClass> = verified.images.iter().map(|i| i.slot_class).collect();
            for class in classes {
                let w = extract_into(&mut bundle, &verified, class, placed, disk, opts)?;
                written.insert(class, w);
            }
            let signature = hex::encode(bundle.signature());
            let manifest = String::from_utf8(bundle.manifest_bytes().to_vec())
                .context("the manifest is not UTF-8")?;
            let record = SlotRecord {
                manifest,
                signature,
                verified: true,
                installed_at: opts.timestamp,
            };
            let record = serde_json::to_vec_pretty(&record)?;
            let slots: &[Slot] = if opts.fill_b {
                &[Slot::A, Slot::B]
            } else {
                &[Slot::A]
            };
            let data_path = |rel: PathBuf| Path::new(DATA_DIR).join(rel).display().to_string();
            for &slot in slots {
                for image in &verified.images {
                    let class = image.slot_class;
                    let index = bundle
                        .read_index(verified.manifest(), class)
                        .with_context(|| format!("unable to read the {class} index"))?
                        .encode();
                    if Sha256Digest::of(&index) != image.index.sha256 {
                        bail!(
                            "the {class} index does not re-encode to the bytes the manifest names"
                        );
                    }
                    records.push((data_path(layout::slot_index(slot, class)), index));
                }
                records.push((data_path(layout::slot_record(slot)), record.clone()));
            }
            let release = ReleaseRecord {
                version: verified.version.clone(),
                compatible: verified.compatible.clone(),
                signer: verified.signer().to_string(),
                manifest_sha256: Sha256Digest::of(bundle.manifest_bytes()),
            };
            Ok((Some(release), written, records))
        }
        Source::Images(images) => {
            if !images.iter().any(|(c, _)| *c == SlotClass::Rootfs) {
                bail!("--image rootfs=PATH is required");
            }
            for (class, path) in images {
                let w = copy_into(path, *class, placed, disk, opts)?;
                if written.insert(*class, w).is_some() {
                    bail!("--image {class}= is given twice");
                }
            }
            check_agent_slots(board, written.contains_key(&SlotClass::Agent))?;
            Ok((None, written, records))
        }
    }
}

fn check_agent_slots(board: &BoardProfile, has_agent: bool) -> Result<()> {
    let board_agent = board.partition(Role::AgentA).is_some();
    match (has_agent, board_agent) {
        (true, false) => bail!(
            "the release has an agent image but board {} has no agent-a/agent-b partitions",
            board.name
        ),
        (false, true) => bail!(
            "board {} has agent slots but the release has no agent image",
            board.name
        ),
        _ => Ok(()),
    }
}

fn check_release(
    board: &BoardProfile,
    placed: &[Placed],
    verified: &VerifiedManifest,
) -> Result<()> {
    if verified.compatible != board.compatible {
        bail!(
            "the bundle is for {:?}, board {} runs {:?}",
            verified.compatible,
            board.name,
            board.compatible
        );
    }
    check_agent_slots(board, verified.image(SlotClass::Agent).is_some())?;
    for image in &verified.images {
        let (a, _) = slot_roles(image.slot_class);
        let slot = find(placed, a)?;
        if image.size > slot.size {
            bail!(
                "the {} image is {} bytes, larger than its {}-byte slot (partition {})",
                image.slot_class,
                image.size,
                slot.size,
                slot.number
            );
        }
    }
    Ok(())
}

/// A writer into one partition of the disk that refuses to run past it.
struct PartitionWriter<'a> {
    out: BufWriter<&'a mut File>,
    left: u64,
}

impl Write for PartitionWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other("the image is larger than its slot"));
        }
        let n = self.out.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn partition_writer<'a>(disk: &'a mut File, slot: &Placed) -> Result<PartitionWriter<'a>> {
    disk.seek(SeekFrom::Start(slot.start))
        .with_context(|| format!("unable to seek to partition {}", slot.number))?;
    Ok(PartitionWriter {
        out: BufWriter::with_capacity(1 << 20, disk),
        left: slot.size,
    })
}

fn extract_into(
    bundle: &mut Bundle<BufReader<File>>,
    verified: &VerifiedManifest,
    class: SlotClass,
    placed: &[Placed],
    disk: &mut File,
    opts: &CreateOptions,
) -> Result<Written> {
    let (a, b) = slot_roles(class);
    let size = verified.image(class).map(|i| i.size).unwrap_or(0);
    let bar = progress::bytes(size, &format!("{class} A"), opts.quiet);
    let slot_a = find(placed, a)?;
    let report = {
        let mut w = partition_writer(disk, slot_a)?;
        let report = bundle
            .extract_image(verified, class, &mut w, &|n| bar.set_position(n))
            .with_context(|| format!("the {class} image of the bundle does not verify"))?;
        w.flush()
            .with_context(|| format!("unable to write slot A ({class})"))?;
        report
    };
    bar.finish_and_clear();
    if opts.fill_b {
        let slot_b = find(placed, b)?;
        copy_range(disk, slot_a.start, slot_b.start, report.size)
            .with_context(|| format!("unable to copy slot A into slot B ({class})"))?;
    }
    Ok(Written {
        sha256: report.sha256,
        size: report.size,
    })
}

fn copy_into(
    path: &Path,
    class: SlotClass,
    placed: &[Placed],
    disk: &mut File,
    opts: &CreateOptions,
) -> Result<Written> {
    let (a, b) = slot_roles(class);
    let slot_a = find(placed, a)?;
    let mut src = File::open(path)
        .with_context(|| format!("unable to open {class} image {}", path.display()))?;
    let size = src
        .metadata()
        .with_context(|| format!("unable to read {}", path.display()))?
        .len();
    if size > slot_a.size {
        bail!(
            "the {class} image {} is {size} bytes, larger than its {}-byte slot (partition {})",
            path.display(),
            slot_a.size,
            slot_a.number
        );
    }
    let bar = progress::bytes(size, &format!("{class} A"), opts.quiet);
    let mut hasher = Sha256::new();
    {
        let mut w = partition_writer(disk, slot_a)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        loop {
            let n = std::io::Read::read(&mut src, &mut buf)
                .with_context(|| format!("unable to read {}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n])
                .with_context(|| format!("unable to write slot A ({class})"))?;
            done += n as u64;
            bar.set_position(done);
        }
        w.flush()
            .with_context(|| format!("unable to write slot A ({class})"))?;
    }
    bar.finish_and_clear();
    if opts.fill_b {
        let slot_b = find(placed, b)?;
        copy_range(disk, slot_a.start, slot_b.start, size)?;
    }
    Ok(Written {
        sha256: Sha256Digest::from_hasher(hasher),
        size,
    })
}

fn copy_range(disk: &mut File, from: u64, to: u64, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        disk.read_exact_at(&mut buf[..n], from + done)
            .context("unable to read the disk image")?;
        disk.write_all_at(&buf[..n], to + done)
            .context("unable to write the disk image")?;
        done += n as u64;
    }
    Ok(())
}

/// Copies the vendor's boot files and writes the profile's generated ones
/// into `stage` (the boot partition's tree). Returns their paths.
fn stage_boot_files(opts: &CreateOptions, placed: &[Placed], stage: &Path) -> Result<Vec<String>> {
    let board = &opts.board;
    let mut names = Vec::new();
    if let Some(dir) = &opts.boot_files {
        if !dir.is_dir() {
            bail!("--boot-files {} is not a directory", dir.display());
        }
        copy_tree(dir, stage, &mut names, Path::new(""))?;
    }
    let missing: Vec<&str> = board
        .vendor_boot_files
        .iter()
        .filter(|f| !stage.join(f).is_file())
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!(
            "board {} needs these vendor boot files, missing from --boot-files{}: {}",
            board.name,
            opts.boot_files
                .as_ref()
                .map(|d| format!(" {}", d.display()))
                .unwrap_or_else(|| " (not given)".into()),
            missing.join(", ")
        );
    }
    for f in &board.boot_files {
        write_staged(
            stage,
            &f.path,
            f.content.trim_start().as_bytes(),
            &mut names,
        )?;
    }
    match &board.bootloader {
        BootloaderSpec::UBoot { script, .. } => {
            let scr = uimage::script_image(
                script.source().as_bytes(),
                script.arch(),
                "Kernex A/B",
                u32::try_from(opts.timestamp).unwrap_or(u32::MAX),
            );
            write_staged(stage, "boot.scr", &scr, &mut names)?;
        }
        BootloaderSpec::Grub { config_dir, .. } => {
            let cfg = grub_cfg(board, placed)?;
            write_staged(
                stage,
                &format!("{config_dir}/grub.cfg"),
                cfg.as_bytes(),
                &mut names,
            )?;
            write_staged(
                stage,
                &format!("{config_dir}/kernex.cfg"),
                include_str!("../../../bootloader/grub/kernex.cfg").as_bytes(),
                &mut names,
            )?;
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

fn copy_tree(src: &Path, dst: &Path, names: &mut Vec<String>, rel: &Path) -> Result<()> {
    let entries = fs::read_dir(src).with_context(|| format!("unable to read {}", src.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("unable to read {}", src.display()))?;
        let path = entry.path();
        let ty = entry
            .file_type()
            .with_context(|| format!("unable to read {}", path.display()))?;
        let target = dst.join(entry.file_name());
        let rel = rel.join(entry.file_name());
        if ty.is_dir() {
            fs::create_dir_all(&target)
                .with_context(|| format!("unable to create {}", target.display()))?;
            copy_tree(&path, &target, names, &rel)?;
        } else if ty.is_file() {
            fs::copy(&path, &target)
                .with_context(|| format!("unable to copy boot file {}", path.display()))?;
            names.push(rel.display().to_string());
        } else {
            bail!(
                "boot file {} is neither a file nor a directory (FAT holds no links)",
                path.display()
            );
        }
    }
    Ok(())
}

fn write_staged(stage: &Path, rel: &str, bytes: &[u8], names: &mut Vec<String>) -> Result<()> {
    let path = stage.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("unable to create {}", parent.display()))?;
    }
    fs::write(&path, bytes).with_context(|| format!("unable to write {}", path.display()))?;
    names.push(rel.to_owned());
    Ok(())
}

/// `kernex_root_X` for a slot: the device path on MBR disks, the
/// PARTUUID on GPT disks (stable whatever the disk is called).
fn kernel_root(p: &Placed) -> String {
    match &p.partuuid {
        Some(uuid) => format!("PARTUUID={uuid}"),
        None => p.device.clone(),
    }
}

/// The generated `grub.cfg`: slot partitions, settings, then kernex.cfg.
fn grub_cfg(board: &BoardProfile, placed: &[Placed]) -> Result<String> {
    let BootloaderSpec::Grub { disk, settings, .. } = &board.bootloader else {
        bail!("board {} does not boot GRUB", board.name);
    };
    let part = |p: &Placed| match board.partition_table {
        TableKind::Gpt => format!("({disk},gpt{})", p.number),
        TableKind::Mbr => format!("({disk},msdos{})", p.number),
    };
    let a = find(placed, Role::RootfsA)?;
    let b = find(placed, Role::RootfsB)?;
    let mut cfg = format!(
        "# Generated by kernex-image disk create for board {}.\n\
         # The slots, then the Kernex A/B selection (kernex.cfg, grubenv beside it).\n\
         set kernex_part_A=\"{}\"\nset kernex_part_B=\"{}\"\n\
         set kernex_root_A=\"{}\"\nset kernex_root_B=\"{}\"\n",
        board.name,
        part(a),
        part(b),
        kernel_root(a),
        kernel_root(b)
    );
    for (k, v) in settings {
        cfg.push_str(&format!("set {k}=\"{v}\"\n"));
    }
    cfg.push_str("source \"${prefix}/kernex.cfg\"\n");
    Ok(cfg)
}

/// Writes the U-Boot env file or the grubenv into the boot stage.
fn write_boot_state(
    board: &BoardProfile,
    placed: &[Placed],
    state: &BTreeMap<String, String>,
    stage: &Path,
) -> Result<()> {
    match &board.bootloader {
        BootloaderSpec::UBoot {
            env_file,
            env_size,
            settings,
            ..
        } => {
            let mut env = u_boot_env::Env::new();
            for (k, v) in settings.iter().chain(state) {
                env.set(k, v)
                    .with_context(|| format!("invalid U-Boot variable {k}"))?;
            }
            let a = find(placed, Role::RootfsA)?;
            let b = find(placed, Role::RootfsB)?;
            env.set("kernex_part_A", &a.number.to_string())?;
            env.set("kernex_part_B", &b.number.to_string())?;
            env.set("kernex_root_A", &kernel_root(a))?;
            env.set("kernex_root_B", &kernel_root(b))?;
            let size = usize::try_from(*env_size).context("env-size does not fit")?;
            let image = u_boot_env::encode(&env, size, u_boot_env::Layout::Single, 0)
                .with_context(|| format!("the U-Boot env does not fit in {env_size} bytes"))?;
            let path = stage.join(env_file);
            fs::write(&path, image)
                .with_context(|| format!("unable to write {}", path.display()))?;
        }
        BootloaderSpec::Grub { config_dir, .. } => {
            let mut env = GrubEnv::new();
            for (k, v) in state {
                env.set(k, v)
                    .map_err(|e| anyhow::anyhow!("invalid grubenv variable {k}: {e}"))?;
            }
            let bytes = env
                .to_bytes()
                .map_err(|e| anyhow::anyhow!("unable to encode the grubenv: {e}"))?;
            let dir = stage.join(config_dir);
            fs::create_dir_all(&dir)
                .with_context(|| format!("unable to create {}", dir.display()))?;
            fs::write(dir.join("grubenv"), bytes).context("unable to write the grubenv")?;
        }
    }
    Ok(())
}

/// The updater's config for this board (`kernex-device`'s
/// [`SystemConfig`]): its slots, boot-state backend and data dir, without
/// `[server]` (`provision` adds it).
pub fn system_config(board: &BoardProfile, placed: &[Placed]) -> Result<SystemConfig> {
    let data_mount = &board.device.data_mount;
    let slot = |role| find(placed, role).map(|p| PathBuf::from(&p.device));
    let pair = |a, b| -> Result<SlotPair> {
        Ok(SlotPair {
            a: slot(a)?,
            b: slot(b)?,
        })
    };
    let agent = match board.partition(Role::AgentA) {
        Some(_) => Some(pair(Role::AgentA, Role::AgentB)?),
        None => None,
    };
    let mut bootloader = BootloaderConfig {
        backend: Backend::UBoot,
        fw_env_config: None,
        grubenv: None,
        path: None,
        cmdline: None,
        booted_slot: None,
    };
    match &board.bootloader {
        BootloaderSpec::UBoot { .. } => {
            bootloader.fw_env_config =
                Some(format!("{data_mount}/etc/kernex/fw_env.config").into());
        }
        BootloaderSpec::Grub { config_dir, .. } => {
            bootloader.backend = Backend::Grub;
            bootloader.grubenv =
                Some(format!("{}/{config_dir}/grubenv", board.device.boot_mount).into());
        }
    }
    Ok(SystemConfig::new(
        board.compatible.clone(),
        format!("{data_mount}/{DATA_DIR}"),
        KEYRING,
        Slots {
            rootfs: pair(Role::RootfsA, Role::RootfsB)?,
            agent,
        },
        bootloader,
    ))
}

/// `config` as the text of `system.toml`, after a comment saying who wrote
/// it for which board.
pub fn system_toml(board: &BoardProfile, config: &SystemConfig) -> Result<String> {
    let body = toml::to_string(config).context("unable to write system.toml")?;
    Ok(format!(
        "# /etc/kernex/system.toml, written by kernex-image disk create for board {}.\n\
         # It lives on the data partition ({}/etc/kernex/system.toml); the\n\
         # image links /etc/kernex/system.toml to it. See updater/system.example.toml.\n\
         {body}",
        board.name, board.device.data_mount,
    ))
}

/// `fw_env.config` for a U-Boot board: the env file on the mounted boot
/// partition.
pub fn fw_env_config(board: &BoardProfile) -> Option<String> {
    match &board.bootloader {
        BootloaderSpec::UBoot {
            env_file, env_size, ..
        } => Some(format!(
            "# Written by kernex-image disk create for board {}: U-Boot's env is the\n\
             # file {env_file} on the FAT boot partition, mounted at {}.\n\
             # device  offset  env-size\n\
             {}/{env_file}  0x0000  {env_size:#x}\n",
            board.name, board.device.boot_mount, board.device.boot_mount,
        )),
        BootloaderSpec::Grub { .. } => None,
    }
}

/// Every file and directory below `dir`, as absolute paths in the
/// filesystem made from it.
fn staged_paths(dir: &Path, rel: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("unable to read {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("unable to read {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = rel.join(e.file_name());
        out.push(path.display().to_string());
        if e.path().is_dir() {
            out.extend(staged_paths(&e.path(), &path)?);
        }
    }
    Ok(out)
}

fn stage_data(
    board: &BoardProfile,
    placed: &[Placed],
    record: &DiskRecord,
    slot_records: &SlotRecords,
    stage: &Path,
) -> Result<()> {
    let mut names = Vec::new();
    let rel = |p: &str| p.trim_start_matches('/').to_owned();
    write_staged(
        stage,
        &rel(DISK_RECORD),
        &serde_json::to_vec_pretty(record)?,
        &mut names,
    )?;
    write_staged(
        stage,
        &rel(SYSTEM_TOML),
        system_toml(board, &system_config(board, placed)?)?.as_bytes(),
        &mut names,
    )?;
    if let Some(cfg) = fw_env_config(board) {
        write_staged(
            stage,
            "etc/kernex/fw_env.config",
            cfg.as_bytes(),
            &mut names,
        )?;
    }
    fs::create_dir_all(stage.join(DATA_DIR)).context("unable to stage the data directory")?;
    for (path, bytes) in slot_records {
        write_staged(stage, path, bytes, &mut names)?;
    }
    Ok(())
}
