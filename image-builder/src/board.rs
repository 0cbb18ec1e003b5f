//! Board profiles: what a factory disk image for one kind of board holds.
//!
//! A profile is a TOML file (kebab-case keys, an unknown key is an error)
//! naming the partition table, the partitions in disk order, the boot
//! partition's generated files and the vendor files it needs, the
//! bootloader (U-Boot with its env on the FAT boot partition, or GRUB with a
//! grubenv) and where Linux finds it all on the device. The profiles Kernex
//! ships are compiled in (`image-builder/boards/*.toml`); `--board` takes
//! their name or the path of a profile of your own. See
//! `image-builder/boards/README.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

/// Largest profile file read.
pub const MAX_PROFILE_SIZE: u64 = 64 * 1024;
/// Most partitions in a profile.
pub const MAX_PARTITIONS: usize = 16;
/// Largest disk a profile may describe (MBR tables stop at 2 TiB).
pub const MAX_DISK_SIZE: u64 = 16 << 40;
/// MBR partitions address 32-bit sectors.
pub const MAX_MBR_DISK_SIZE: u64 = (1u64 << 32) * SECTOR;
/// Sector size of every image written (512-byte logical sectors).
pub const SECTOR: u64 = 512;
/// Partitions start and end on this boundary.
pub const ALIGNMENT: u64 = 1 << 20;
/// Largest U-Boot env a profile may ask for.
pub const MAX_ENV_SIZE: u64 = 1 << 20;
/// Most generated boot files and vendor boot files, each.
pub const MAX_BOOT_FILES: usize = 256;

/// The profiles shipped with Kernex, by name.
pub const BUILT_IN: &[(&str, &str)] = &[
    (
        "raspberrypi4-64",
        include_str!("../boards/raspberrypi4-64.toml"),
    ),
    (
        "jetson-orin-nano",
        include_str!("../boards/jetson-orin-nano.toml"),
    ),
    ("qemu-aarch64", include_str!("../boards/qemu-aarch64.toml")),
    ("x86-64-efi", include_str!("../boards/x86-64-efi.toml")),
];

/// A profile could not be found or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// Neither a built-in name nor a readable file.
    #[error("unknown board {name:?}: not a built-in profile ({known}) nor a profile file")]
    Unknown {
        /// What was asked for.
        name: String,
        /// The built-in names.
        known: String,
    },
    /// The file could not be read.
    #[error("unable to read board profile {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_PROFILE_SIZE`].
    #[error("board profile {path} is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Not valid TOML, or keys this version does not know.
    #[error("board profile {origin} does not parse: {message}")]
    Parse {
        /// Where it came from.
        origin: String,
        /// What the TOML parser said.
        message: String,
    },
    /// Parsed, but describes no valid disk.
    #[error("board profile {origin}: {reason}")]
    Invalid {
        /// Where it came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },
}

/// A size in bytes, written as an integer or as `"256MiB"`, `"2GiB"`,
/// `"512KiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

impl Size {
    /// Parses `"256MiB"`, `"1GiB"`, `"4096"`, `"64KiB"` (binary units only).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        if digits.is_empty() {
            return Err(format!("{text:?} is not a size (e.g. 256MiB, 2GiB)"));
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not a size"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            other => {
                return Err(format!(
                    "{text:?}: unknown unit {other:?} (use KiB, MiB, GiB or TiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", b >> 30)
        } else if b != 0 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else {
            write!(f, "{b} bytes")
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => Size::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Size::parse(s)
    }
}

/// MBR (DOS) or GPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableKind {
    /// Master boot record: at most four primary partitions, disks up to 2 TiB.
    Mbr,
    /// GUID partition table, with a protective MBR.
    Gpt,
}

impl TableKind {
    /// `mbr` or `gpt`.
    pub fn as_str(self) -> &'static str {
        match self {
            TableKind::Mbr => "mbr",
            TableKind::Gpt => "gpt",
        }
    }
}

/// What a partition is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The FAT boot partition (the ESP on EFI boards).
    Boot,
    /// Root filesystem slot A: the factory release.
    RootfsA,
    /// Root filesystem slot B: empty, or the factory release with --fill-b.
    RootfsB,
    /// Agent slot A (models, prompts, tools), for bundles with an agent image.
    AgentA,
    /// Agent slot B.
    AgentB,
    /// The data partition (ext4): the updater's state and the provisioned
    /// identity and config.
    Data,
}

impl Role {
    /// The name used in profiles, GPT partition names and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Boot => "boot",
            Role::RootfsA => "rootfs-a",
            Role::RootfsB => "rootfs-b",
            Role::AgentA => "agent-a",
            Role::AgentB => "agent-b",
            Role::Data => "data",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One partition, in disk order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PartitionSpec {
    /// What it holds.
    pub role: Role,
    /// Its size (a multiple of 1 MiB).
    pub size: Size,
    /// Filesystem label (boot: FAT, at most 11 characters; data: ext4, at
    /// most 16). Defaults: `KXBOOT`, `kxdata`.
    #[serde(default)]
    pub label: Option<String>,
    /// FAT type of the boot partition: 16 or 32 (default 32).
    #[serde(default)]
    pub fat_bits: Option<u8>,
    /// This partition takes the space `disk create --size` adds (at most one,
    /// usually data).
    #[serde(default)]
    pub grow: bool,
}

impl PartitionSpec {
    /// The filesystem label written.
    pub fn label_or_default(&self) -> &str {
        match (&self.label, self.role) {
            (Some(l), _) => l,
            (None, Role::Boot) => "KXBOOT",
            (None, _) => "kxdata",
        }
    }
}

/// The built-in U-Boot boot scripts (`bootloader/uboot/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootScript {
    /// `boot.cmd`: arm64 (`booti`), the env saved with `saveenv` where the
    /// U-Boot build keeps it.
    #[serde(rename = "boot.cmd")]
    Arm64,
    /// `boot-x86.cmd`: the env kept in a file on the boot partition with
    /// `env import/export` + `fatwrite`, booted with `zboot`.
    #[serde(rename = "boot-x86.cmd")]
    X86,
}

impl BootScript {
    /// The script text.
    pub fn source(self) -> &'static str {
        match self {
            BootScript::Arm64 => include_str!("../../bootloader/uboot/boot.cmd"),
            BootScript::X86 => include_str!("../../bootloader/uboot/boot-x86.cmd"),
        }
    }

    /// The uImage architecture byte (`mkimage -A`): arm64 or x86.
    pub fn arch(self) -> u8 {
        match self {
            BootScript::Arm64 => crate::disk::uimage::ARCH_ARM64,
            BootScript::X86 => crate::disk::uimage::ARCH_X86,
        }
    }
}

/// The bootloader and where it keeps the boot-state contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    rename_all_fields = "kebab-case",
    tag = "kind",
    deny_unknown_fields
)]
pub enum BootloaderSpec {
    /// U-Boot, its env in a file on the FAT boot partition
    /// (`CONFIG_ENV_IS_IN_FAT`): the profile's `settings` plus the contract's
    /// variables are written as the whole env, so they must include
    /// `bootcmd`.
    #[serde(rename = "u-boot")]
    UBoot {
        /// The env file on the boot partition (`CONFIG_ENV_FAT_FILE`).
        env_file: String,
        /// `CONFIG_ENV_SIZE` in bytes.
        env_size: u64,
        /// The boot script written as `boot.scr`.
        script: BootScript,
        /// Board variables (`kernex_dev`, `kernex_kernel`, `bootcmd`, …);
        /// `kernex_part_A/B` and `kernex_root_A/B` are derived from the
        /// partitions and `[device]`.
        #[serde(default)]
        settings: BTreeMap<String, String>,
    },
    /// GRUB as an EFI application: `grub.cfg` (generated), `kernex.cfg`
    /// (`bootloader/grub/kernex.cfg`) and `grubenv` in `config-dir` on the
    /// boot partition (the ESP).
    Grub {
        /// Directory on the boot partition holding grub.cfg and grubenv,
        /// e.g. `EFI/BOOT` (GRUB's `$prefix`).
        config_dir: String,
        /// The GRUB disk the slots are on, e.g. `hd0`.
        disk: String,
        /// GRUB variables set in grub.cfg (`kernex_bootargs`, …);
        /// `kernex_part_A/B` and `kernex_root_A/B` are derived.
        #[serde(default)]
        settings: BTreeMap<String, String>,
    },
}

/// Where Linux finds the disk on the device (for the generated
/// `system.toml`, `fw_env.config` and `kernex_root_A/B`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceSpec {
    /// Partition N is this prefix followed by N, e.g. `/dev/mmcblk0p`.
    pub partition_prefix: String,
    /// Where the boot partition is mounted, e.g. `/boot/firmware`.
    pub boot_mount: String,
    /// Where the data partition is mounted, e.g. `/data`.
    pub data_mount: String,
}

/// A file the profile writes onto the boot partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BootFile {
    /// Path on the boot partition, e.g. `config.txt`.
    pub path: String,
    /// Its content.
    pub content: String,
}

/// A board profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BoardProfile {
    /// The profile's name.
    pub name: String,
    /// One line about the board.
    pub description: String,
    /// The bundle `compatible` this board runs; `disk create` refuses others.
    pub compatible: String,
    /// MBR or GPT.
    pub partition_table: TableKind,
    /// Where things are on the device.
    pub device: DeviceSpec,
    /// The bootloader.
    pub bootloader: BootloaderSpec,
    /// Files the vendor supplies with `--boot-files DIR` (firmware, U-Boot,
    /// GRUB's EFI binary); `disk create` fails when one is missing.
    #[serde(default)]
    pub vendor_boot_files: Vec<String>,
    /// Files generated onto the boot partition (e.g. `config.txt`).
    #[serde(default)]
    pub boot_files: Vec<BootFile>,
    /// The partitions, in disk order.
    pub partitions: Vec<PartitionSpec>,
}

fn valid_boot_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 255
        && !path.starts_with('/')
        && path.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
        })
}

impl BoardProfile {
    /// Loads a built-in profile by name, or a profile file by path.
    pub fn load(name_or_path: &str) -> Result<Self, ProfileError> {
        if let Some((name, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::parse(text, &format!("{name} (built in)"));
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(ProfileError::Unknown {
                name: name_or_path.to_owned(),
                known: BUILT_IN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let origin = path.display().to_string();
        let read_err = |source| ProfileError::Read {
            path: origin.clone(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_err)?.len();
        if size > MAX_PROFILE_SIZE {
            return Err(ProfileError::TooLarge {
                path: origin,
                size,
                limit: MAX_PROFILE_SIZE,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::parse(&text, &origin)
    }

    /// Parses and validates a profile; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ProfileError> {
        let profile: BoardProfile = toml::from_str(text).map_err(|e| ProfileError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim().to_owned(),
        })?;
        profile.validate().map_err(|reason| ProfileError::Invalid {
            origin: origin.to_owned(),
            reason,
        })?;
        Ok(profile)
    }

    /// Checks everything `disk create` relies on.
    pub fn validate(&self) -> Result<(), String> {
        kernex_protocol::manifest::check_compatible(&self.compatible)
            .map_err(|e| format!("compatible: {e}"))?;
        if self.name.is_empty() || self.name.len() > 64 {
            return Err("name must be 1 to 64 characters".into());
        }
        if self.partitions.is_empty() || self.partitions.len() > MAX_PARTITIONS {
            return Err(format!("1 to {MAX_PARTITIONS} partitions are required"));
        }
        if self.partition_table == TableKind::Mbr && self.partitions.len() > 4 {
            return Err(format!(
                "an MBR holds 4 primary partitions, the profile has {}",
                self.partitions.len()
            ));
        }
        for role in [Role::Boot, Role::RootfsA, Role::RootfsB, Role::Data] {
            let n = self.partitions.iter().filter(|p| p.role == role).count();
            if n != 1 {
                return Err(format!(
                    "exactly one partition with role = \"{role}\" is required, found {n}"
                ));
            }
        }
        let agents = [Role::AgentA, Role::AgentB]
            .map(|r| self.partitions.iter().filter(|p| p.role == r).count());
        if agents != [0, 0] && agents != [1, 1] {
            return Err("agent-a and agent-b come as a pair (one each, or neither)".into());
        }
        if self.partitions.iter().filter(|p| p.grow).count() > 1 {
            return Err("at most one partition may have grow = true".into());
        }
        let mut total = ALIGNMENT;
        for p in &self.partitions {
            let what = format!("partition {}", p.role);
            if p.size.0 == 0 || p.size.0 % ALIGNMENT != 0 {
                return Err(format!(
                    "{what}: size {} is not a positive multiple of 1MiB",
                    p.size
                ));
            }
            total = total
                .checked_add(p.size.0)
                .ok_or_else(|| format!("{what}: sizes overflow"))?;
            if let Some(label) = &p.label {
                let max = if p.role == Role::Boot { 11 } else { 16 };
                if label.is_empty()
                    || label.len() > max
                    || !label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                {
                    return Err(format!(
                        "{what}: label {label:?} must be 1 to {max} characters of A-Z, a-z, 0-9, '-', '_'"
                    ));
                }
            }
            if p.fat_bits.is_some() && p.role != Role::Boot {
                return Err(format!(
                    "{what}: fat-bits only applies to the boot partition"
                ));
            }
            match (p.role, p.fat_bits) {
                (Role::Boot, Some(16)) if p.size.0 > 2 << 30 || p.size.0 < 4 << 20 => {
                    return Err(format!("{what}: FAT16 needs 4MiB to 2GiB"));
                }
                (Role::Boot, Some(32)) if p.size.0 < 33 << 20 => {
                    return Err(format!(
                        "{what}: FAT32 needs at least 33MiB (use fat-bits = 16)"
                    ));
                }
                (_, Some(16 | 32) | None) => {}
                (_, Some(b)) => return Err(format!("{what}: fat-bits is {b}, not 16 or 32")),
            }
        }
        let limit = match self.partition_table {
            TableKind::Mbr => MAX_MBR_DISK_SIZE,
            TableKind::Gpt => MAX_DISK_SIZE,
        };
        if total + ALIGNMENT > limit {
            return Err(format!(
                "the partitions need {} bytes, more than a {} disk may hold ({limit})",
                total + ALIGNMENT,
                self.partition_table.as_str()
            ));
        }
        if !self.device.partition_prefix.starts_with('/') {
            return Err("device.partition-prefix must be an absolute path".into());
        }
        for (key, mount) in [
            ("device.boot-mount", &self.device.boot_mount),
            ("device.data-mount", &self.device.data_mount),
        ] {
            if !mount.starts_with('/') || mount.contains(char::is_whitespace) {
                return Err(format!("{key} must be an absolute path without spaces"));
            }
        }
        match &self.bootloader {
            BootloaderSpec::UBoot {
                env_file,
                env_size,
                settings,
                ..
            } => {
                if !valid_boot_path(env_file) {
                    return Err(format!(
                        "bootloader.env-file {env_file:?} is not a valid path on the boot partition"
                    ));
                }
                if *env_size < 0x100 || *env_size > MAX_ENV_SIZE {
                    return Err(format!(
                        "bootloader.env-size {env_size} is out of range (256 to {MAX_ENV_SIZE})"
                    ));
                }
                if !settings.contains_key("bootcmd") {
                    return Err(
                        "bootloader.settings must set bootcmd: the env file is U-Boot's whole env"
                            .into(),
                    );
                }
                for name in settings.keys() {
                    u_boot_env::validate_name(name)
                        .map_err(|e| format!("bootloader.settings: {e}"))?;
                    if is_derived(name) {
                        return Err(format!(
                            "bootloader.settings: {name} is written by disk create, not by the profile"
                        ));
                    }
                }
            }
            BootloaderSpec::Grub {
                config_dir,
                disk,
                settings,
            } => {
                if !valid_boot_path(config_dir) {
                    return Err(format!(
                        "bootloader.config-dir {config_dir:?} is not a valid path on the boot partition"
                    ));
                }
                if disk.is_empty() || !disk.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(format!(
                        "bootloader.disk {disk:?} is not a GRUB disk name (e.g. hd0)"
                    ));
                }
                for (name, value) in settings {
                    if name.is_empty()
                        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    {
                        return Err(format!(
                            "bootloader.settings: {name:?} is not a GRUB variable name"
                        ));
                    }
                    if is_derived(name) {
                        return Err(format!(
                            "bootloader.settings: {name} is written by disk create, not by the profile"
                        ));
                    }
                    if value.contains(['"', '\\', '\n', '$']) {
                        return Err(format!(
                            "bootloader.settings: {name}'s value may not contain '\"', '\\', '$' or a newline"
                        ));
                    }
                }
            }
        }
        if self.vendor_boot_files.len() > MAX_BOOT_FILES || self.boot_files.len() > MAX_BOOT_FILES {
            return Err(format!("at most {MAX_BOOT_FILES} boot files of each kind"));
        }
        for f in &self.vendor_boot_files {
            if !valid_boot_path(f) {
                return Err(format!(
                    "vendor-boot-files: {f:?} is not a valid relative path"
                ));
            }
        }
        for f in &self.boot_files {
            if !valid_boot_path(&f.path) {
                return Err(format!(
                    "boot-files: {:?} is not a valid relative path",
                    f.path
                ));
            }
        }
        Ok(())
    }

    /// The partition with `role`, and its 1-based number.
    pub fn partition(&self, role: Role) -> Option<(usize, &PartitionSpec)> {
        self.partitions
            .iter()
            .enumerate()
            .find(|(_, p)| p.role == role)
            .map(|(i, p)| (i + 1, p))
    }

    /// The device path of partition `number`.
    pub fn device_path(&self, number: usize) -> String {
        format!("{}{number}", self.device.partition_prefix)
    }
}

/// Variables `disk create` derives; a profile may not set them.
fn is_derived(name: &str) -> bool {
    matches!(
        name,
        "BOOT_ORDER"
            | "BOOT_A_LEFT"
            | "BOOT_B_LEFT"
            | "kernex_part_A"
            | "kernex_part_B"
            | "kernex_root_A"
            | "kernex_root_B"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn every_built_in_profile_parses_and_is_named_after_its_file() {
        for (name, text) in BUILT_IN {
            let p = BoardProfile::parse(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(&p.name, name);
            assert_eq!(&p.compatible, name);
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(Size::parse("256MiB").unwrap(), Size(256 << 20));
        assert_eq!(Size::parse("2GiB").unwrap(), Size(2 << 30));
        assert_eq!(Size::parse("4096").unwrap(), Size(4096));
        assert!(Size::parse("2GB").is_err());
        assert!(Size::parse("MiB").is_err());
        assert!(Size::parse("99999999999999TiB").is_err());
    }
}
