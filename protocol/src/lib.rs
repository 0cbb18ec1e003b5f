//! The Kernex contract: bundle manifest, chunk index, signatures, and the
//! device API's wire types ([`api`]).
//!
//! This crate is pure: it reads and writes bytes through `Read`/`Write`/
//! `Seek`, never devices, sockets or databases, so the updater, the server
//! and the image builder share one parser. Every size read from input is
//! checked against a limit in [`limits`] before anything is allocated.

pub mod api;
pub mod archive;
pub mod bundle;
pub mod container;
pub mod digest;
pub mod index;
pub mod limits;
pub mod manifest;
pub mod patch;
pub mod signature;

pub use digest::Sha256Digest;
pub use manifest::{
    ArchiveRef, FsType, ImageEntry, IndexRef, Manifest, ManifestError, PatchRef, SlotClass,
    VerifiedManifest,
};
pub use signature::{Keyring, SignatureError, Signer, SignerInfo, VerifyOptions};
