//! The device's own formats, with one owner.
//!
//! `kernex-updater` reads them on the device; `kernex-image` writes them
//! into factory disk images and provisions them on the factory line. Both
//! use these types, so a key renamed here is renamed for both:
//!
//! - [`SystemConfig`], `/etc/kernex/system.toml`, and the tables in it:
//!   [`Slots`], [`LinkProfile`], [`ServerConfig`], [`HealthConfig`],
//!   [`TpmConfig`] (the `[bootloader]` table is
//!   [`kernex_bootloader::BootloaderConfig`]);
//! - [`SlotRecord`], what a slot holds;
//! - [`layout`], the file names under the data directory.
//!
//! The boot variables and the attempts count are the boot-state contract's
//! and stay in `kernex-bootloader` ([`kernex_bootloader::BootState::to_vars`],
//! [`kernex_bootloader::DEFAULT_ATTEMPTS`]); the bundle format is
//! `kernex-protocol`'s. This crate holds types, serde and path names only:
//! no I/O but reading the config file, no network, nothing async, and it
//! depends on neither the updater nor the image builder.

pub mod config;
pub mod health;
pub mod layout;
pub mod record;
pub mod server;
pub mod tpm;

pub use config::{
    ConfigError, DEFAULT_CONFIG, LinkProfile, MAX_CONFIG_SIZE, SlotPair, Slots, SystemConfig,
};
pub use health::{DEFAULT_SYSTEMCTL, HealthConfig};
pub use record::{RecordError, SlotRecord};
pub use server::{DEFAULT_POLL_INTERVAL, ServerConfig};
pub use tpm::TpmConfig;

#[cfg(test)]
mod tests;
