//! `fw_env.config`: where the environment lives.
//!
//! The format `fw_printenv` reads: one line per copy (two for a redundant
//! environment), `#` comments, whitespace-separated columns:
//!
//! ```text
//! # device          offset    env-size  sector-size  sectors
//! /dev/mmcblk0      0x3f8000  0x4000
//! /dev/mmcblk0      0x3fc000  0x4000
//! ```
//!
//! As in U-Boot's and libubootenv's tools, the offset is a C integer (`0x..`
//! hex, `0..` octal, decimal, and may be negative: counted from the end of a
//! block device or file), while env size, sector size and sector count are
//! always read as hexadecimal, with or without `0x`. Write `0x` everywhere to
//! be unambiguous. Sector size defaults to the env size; it matters only on
//! MTD flash, where it is the erase block size.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{ConfigError, MAX_ENV_SIZE};

/// The default location of the config.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/fw_env.config";

/// Largest config file read.
pub const MAX_CONFIG_SIZE: u64 = 64 * 1024;

/// Largest erase block accepted.
pub const MAX_SECTOR_SIZE: u64 = 64 * 1024 * 1024;

/// One copy of the environment: one line of `fw_env.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// File, block device or MTD character device.
    pub device: PathBuf,
    /// Byte offset of the copy; negative counts from the end of the device.
    pub offset: i64,
    /// Size of the copy, header included.
    pub env_size: usize,
    /// Erase block size (MTD); defaults to `env_size`.
    pub sector_size: Option<u64>,
    /// Number of erase blocks the copy may span (MTD).
    pub sectors: Option<u64>,
}

impl DeviceConfig {
    /// A copy at `offset` in `device`, `env_size` bytes long.
    pub fn new(device: impl Into<PathBuf>, offset: i64, env_size: usize) -> Self {
        Self {
            device: device.into(),
            offset,
            env_size,
            sector_size: None,
            sectors: None,
        }
    }
}

/// A parsed `fw_env.config`: one copy, or two for a redundant environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The first copy.
    pub first: DeviceConfig,
    /// The second copy of a redundant environment.
    pub second: Option<DeviceConfig>,
}

fn parse_c_int(s: &str) -> Option<i64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(hex, 16).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        i64::from_str_radix(&body[1..], 8).ok()?
    } else {
        body.parse::<i64>().ok()?
    };
    Some(if neg { -v } else { v })
}

fn parse_hex(s: &str) -> Option<u64> {
    let body = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(body, 16).ok()
}

impl Config {
    /// A single-copy environment.
    pub fn single(copy: DeviceConfig) -> Self {
        Self {
            first: copy,
            second: None,
        }
    }

    /// A redundant environment.
    pub fn redundant(first: DeviceConfig, second: DeviceConfig) -> Self {
        Self {
            first,
            second: Some(second),
        }
    }

    /// True for two copies.
    pub fn is_redundant(&self) -> bool {
        self.second.is_some()
    }

    /// The copies in order.
    pub fn copies(&self) -> impl Iterator<Item = &DeviceConfig> {
        std::iter::once(&self.first).chain(self.second.as_ref())
    }

    /// Reads and parses a config file (at most [`MAX_CONFIG_SIZE`] bytes).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_SIZE + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_SIZE {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                limit: MAX_CONFIG_SIZE,
            });
        }
        Self::parse(&text)
    }

    /// Parses the text of a config file.
    ///
    /// ```
    /// let config = u_boot_env::Config::parse(
    ///     "# Raspberry Pi: uboot.env on the FAT boot partition\n\
    ///      /boot/firmware/uboot.env 0x0000 0x4000\n",
    /// )?;
    /// assert_eq!(config.first.env_size, 0x4000);
    /// assert!(!config.is_redundant());
    /// # Ok::<(), u_boot_env::ConfigError>(())
    /// ```
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut copies = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let content = raw.split('#').next().unwrap_or_default().trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            if fields.len() < 3 {
                return Err(ConfigError::MissingFields {
                    line,
                    text: raw.chars().take(120).collect(),
                });
            }
            if copies.len() == 2 {
                return Err(ConfigError::TooManyDevices { line });
            }
            let offset = parse_c_int(fields[1]).ok_or_else(|| ConfigError::BadNumber {
                line,
                field: "offset",
                text: fields[1].to_owned(),
                expected: "C-style (0x.., 0.., decimal)",
            })?;
            let hex =
                |idx: usize, field: &'static str, max: u64| -> Result<Option<u64>, ConfigError> {
                    let Some(text) = fields.get(idx) else {
                        return Ok(None);
                    };
                    let value = parse_hex(text).ok_or_else(|| ConfigError::BadNumber {
                        line,
                        field,
                        text: (*text).to_owned(),
                        expected: "hexadecimal",
                    })?;
                    if value == 0 || value > max {
                        return Err(ConfigError::OutOfRange {
                            line,
                            field,
                            value,
                            max,
                        });
                    }
                    Ok(Some(value))
                };
            let env_size = hex(2, "env size", MAX_ENV_SIZE as u64)?.unwrap_or_default() as usize;
            let sector_size = hex(3, "sector size", MAX_SECTOR_SIZE)?;
            let sectors = hex(4, "sector count", 4096)?;
            copies.push(DeviceConfig {
                device: PathBuf::from(fields[0]),
                offset,
                env_size,
                sector_size,
                sectors,
            });
        }
        let mut copies = copies.into_iter();
        let first = copies.next().ok_or(ConfigError::NoDevice)?;
        let second = copies.next();
        if let Some(second) = &second
            && second.env_size != first.env_size
        {
            return Err(ConfigError::SizeMismatch {
                first: first.env_size,
                second: second.env_size,
            });
        }
        Ok(Self { first, second })
    }
}
