//! `kernex-image`: build root filesystem images, signed bundles and
//! development keys on a build host or a factory line.
//!
//! The binary is a thin shell over this library: each command lives in
//! [`cli`], the work in the other modules, so tests call it directly.

pub mod cli;
pub mod fsdetect;
pub mod keys;
pub mod progress;
pub mod rootfs;
