//! `kernex-image`: build root filesystem images, signed bundles,
//! development keys and factory disk images on a build host, and provision
//! boards on a factory line.
//!
//! The binary is a thin shell over this library: each command lives in
//! [`cli`], the work in the other modules, so tests, the fleet simulator and
//! the whole-system tests call it directly — e.g. [`bundle::BundleBuilder`]
//! for what `bundle create` does.

pub mod board;
pub mod bundle;
pub mod cli;
pub mod disk;
pub mod fsdetect;
pub mod keys;
pub mod preauth;
pub mod progress;
pub mod provision;
pub mod rootfs;
