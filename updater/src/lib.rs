//! The Kernex device updater.
//!
//! `install` verifies a bundle's signed manifest before any slot write,
//! clones each image into the inactive slot — chunks from the booted slot
//! and from what an interrupted run already wrote, the rest fetched with
//! HTTP Range requests — checks every chunk before writing it and the whole
//! slot after, then tells the bootloader to try the new slot. A journal
//! makes the clone resumable after `kill -9` or a power cut. See
//! `updater/README.md`.

#[cfg(feature = "tpm")]
pub mod attest;
pub mod boot;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
mod failpoints;
pub mod floor;
pub mod health;
pub mod install;
pub mod journal;
pub mod slot;
pub mod source;
pub mod status;
pub mod store;

pub use config::{LinkProfile, SlotPair, Slots, SystemConfig};
pub use error::UpdateError;
pub use install::{InstallOptions, InstallProgress, InstallReport, install, install_with_progress};
pub use status::{Status, status};
