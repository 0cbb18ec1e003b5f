//! Read and write U-Boot environments exactly as U-Boot, `fw_printenv` /
//! `fw_setenv` (u-boot-tools, libubootenv) and `mkenvimage` do.
//!
//! An environment copy is `crc32 [flag] data`: a little-endian CRC32 (IEEE)
//! of the data area, a flag byte for redundant environments, then
//! `name=value\0` entries closed by an empty entry and padded (0xff) to the
//! configured size. A redundant environment keeps two such copies; the flag
//! bytes say which is current, and a write always goes to the other one, so
//! a power cut leaves either the old or the new environment valid.
//!
//! Where the copies live comes from `fw_env.config` ([`Config`]); a
//! [`Store`] reads and writes them on files, block devices and MTD flash.
//!
//! ```
//! use u_boot_env::{Config, Store};
//!
//! let dir = tempfile::tempdir()?;
//! let env_file = dir.path().join("uboot.env");
//! std::fs::write(&env_file, [0u8; 0x4000])?;
//! let config = Config::parse(&format!("{} 0x0 0x4000\n", env_file.display()))?;
//! let mut store = Store::open(&config)?;
//! store.update(|env| env.set("BOOT_ORDER", "A B"))?;
//! assert_eq!(store.read()?.get("BOOT_ORDER"), Some("A B"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The pure codec ([`encode`], [`decode`], [`decode_redundant`], [`Env`])
//! works on bytes and never touches a device.

pub mod config;
mod env;
mod error;
pub mod image;
pub mod medium;
mod store;

pub use config::{Config, DeviceConfig};
pub use env::{Env, validate_name};
pub use error::{ConfigError, EnvError};
pub use image::{FlagScheme, Layout, decode, decode_redundant, encode};
pub use medium::Medium;
pub use store::{State, Store, StoreCopy};

/// Largest environment (one copy, header included) this crate reads or
/// writes; checked before allocating.
pub const MAX_ENV_SIZE: usize = 16 * 1024 * 1024;
