//! The slot record: what a slot holds, written by the updater after an
//! install verified (and by the image builder for the slots of a factory
//! disk), at [`crate::layout::slot_record`].

use kernex_protocol::manifest::ManifestError;
use kernex_protocol::{Manifest, Sha256Digest};
use serde::{Deserialize, Serialize};

/// The recorded manifest does not parse.
#[derive(Debug, thiserror::Error)]
#[error("recorded manifest: {0}")]
pub struct RecordError(#[from] pub ManifestError);

/// What a slot holds, as recorded after it was written and verified
/// (`record.json`, pretty JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SlotRecord {
    /// The manifest bytes as signed (UTF-8 JSON).
    pub manifest: String,
    /// The detached signature, hex.
    pub signature: String,
    /// Whether the slot's content was read back and matched the manifest.
    pub verified: bool,
    /// Unix time of the install.
    pub installed_at: u64,
}

impl SlotRecord {
    /// The recorded manifest, parsed. It was verified when installed.
    pub fn manifest(&self) -> Result<Manifest, RecordError> {
        Ok(Manifest::from_slice(self.manifest.as_bytes())?)
    }

    /// SHA-256 of the manifest bytes: identifies a release.
    pub fn manifest_digest(&self) -> Sha256Digest {
        Sha256Digest::of(self.manifest.as_bytes())
    }
}
