//! The Kernex contract: bundle manifest, chunk index, signatures, and the
//! device API's wire types ([`api`]).
//!
//! This crate is pure: it reads and writes bytes through `Read`/`Write`/
//! `Seek`, never devices, sockets or databases, so the updater, the server
//! and the image builder share one parser. Every size read from input is
//! checked against a limit in [`limits`] before anything is allocated.
//!
//! A bundle is read by one set of rules wherever it lies: [`reader`] (the
//! [`reader::RangeRead`] interface, the head and index checks) and
//! [`plan`] (which ranges a device requests). The device's install, the
//! server's rollout preview and `kernex-image bundle delta` all use them,
//! so the bytes previewed are the bytes fetched.

pub mod api;
pub mod archive;
pub mod bundle;
pub mod container;
pub mod device_key;
pub mod digest;
pub mod index;
pub mod limits;
pub mod manifest;
pub mod offered;
pub mod patch;
pub mod plan;
pub mod reader;
pub mod signature;

pub use digest::Sha256Digest;
pub use manifest::{
    ArchiveRef, FsType, ImageEntry, IndexRef, Manifest, ManifestError, PatchRef, SlotClass,
    VerifiedManifest,
};
pub use signature::{Keyring, SignatureError, Signer, SignerInfo, VerifyOptions};
