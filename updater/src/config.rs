//! `/etc/kernex/system.toml`: what this device is and where its slots are.
//! See `updater/system.example.toml` for a documented example.
//!
//! The format is `kernex-device`'s, shared with the image builder that
//! writes it into factory disks; it is re-exported here.

pub use kernex_device::config::{
    ConfigError, DEFAULT_CONFIG, LinkProfile, MAX_CONFIG_SIZE, SlotPair, Slots, SystemConfig,
};
