//! The bundle manifest: what a release is, for which hardware, and the
//! digests that bind every byte of it.
//!
//! The manifest is JSON (kebab-case keys). Parsing is strict: a field this
//! version does not know is an error, because an updater that silently
//! ignored a field could install something its builder meant to forbid. A
//! newer format raises `format`; optional, ignorable data goes in `metadata`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::limits::*;
use crate::signature::SignerInfo;

/// The manifest format this crate writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// One release for one hardware class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// Release version.
    pub version: semver::Version,
    /// Hardware class this release runs on, e.g. `raspberrypi4-64`.
    pub compatible: String,
    /// Oldest updater that may install this bundle.
    pub min_updater_version: semver::Version,
    /// Anti-rollback generation: a device refuses to install or roll back
    /// to a release whose security version is below the highest one it has
    /// committed (its floor). Raise it when a release fixes a
    /// vulnerability the older ones must never come back with. Signed with
    /// the rest of the manifest; 0 (the default, and absent from the JSON)
    /// for bundles made before the field existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub security_version: u64,
    /// One entry per slot class the bundle updates; `rootfs` is required.
    pub images: Vec<ImageEntry>,
    /// Free-form metadata (model name, quantisation, notes...). Updaters
    /// ignore it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// What the device's health watchdog checks after booting this release
    /// on trial (optional: older manifests have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
}

/// When a release booted on trial is healthy. Every field is optional so a
/// device-local table (`[health]` in system.toml) can override single
/// values; the updater fills in its defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthSpec {
    /// Seconds from the start of the watchdog run by which every check must
    /// have passed and stayed passing for the stability window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// Seconds every check must keep passing after all first passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability_window: Option<u64>,
    /// Most revert reboots in a row (no endless rollback loops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_revert_reboots: Option<u32>,
    /// The checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<HealthCheck>>,
}

/// How a `service` check watches its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceMode {
    /// A systemd unit: `ActiveState` and the growth of `NRestarts`.
    #[default]
    Systemd,
    /// The watchdog starts `command` itself, restarts it with backoff and
    /// counts the restarts (images without systemd).
    Supervise,
}

/// One health check (`type` names which).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum HealthCheck {
    /// A service is up and not crash-looping: restarted `max-restarts`
    /// times within `window` seconds is a crash loop.
    #[serde(rename_all = "kebab-case")]
    Service {
        /// The unit (systemd) or a name for the supervised process.
        name: String,
        /// Systemd or supervise.
        #[serde(default)]
        mode: ServiceMode,
        /// Program and arguments (supervise mode).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        command: Vec<String>,
        /// Restarts within the window that make a crash loop (default 3).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_restarts: Option<u32>,
        /// The window in seconds (default 300).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u64>,
        /// First restart delay in milliseconds, doubled per restart up to
        /// 30 s (supervise mode, default 1000).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backoff_ms: Option<u64>,
    },
    /// An HTTP GET answers `status` (default 200) and, if given, a body
    /// containing `body-contains`, within `timeout` seconds (default 5).
    #[serde(rename_all = "kebab-case")]
    Http {
        /// The URL (http or https).
        url: String,
        /// Expected status.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        /// Expected body substring.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body_contains: Option<String>,
        /// Seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<u64>,
    },
    /// A command exits 0 within `timeout` seconds (default 10).
    #[serde(rename_all = "kebab-case")]
    Command {
        /// Program and arguments.
        command: Vec<String>,
        /// Seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout: Option<u64>,
    },
    /// The filesystem holding `path` has at least `min-free` bytes free.
    #[serde(rename_all = "kebab-case")]
    Disk {
        /// A path on the filesystem.
        path: String,
        /// Bytes.
        min_free: u64,
    },
    /// At least `min-available` bytes of memory are available.
    #[serde(rename_all = "kebab-case")]
    Memory {
        /// Bytes.
        min_available: u64,
    },
    /// Inference smoke test: load a GGUF model, generate `tokens` tokens
    /// for `prompt`, at `min-tokens-per-second` or faster, with the peak
    /// RSS at most `max-rss` bytes and, if given, output containing
    /// `expect`.
    #[serde(rename_all = "kebab-case")]
    Llm {
        /// The GGUF file.
        model: String,
        /// The prompt.
        prompt: String,
        /// Tokens to generate.
        tokens: u32,
        /// Floor on the generation speed.
        min_tokens_per_second: u32,
        /// Ceiling on the peak resident set size, bytes.
        max_rss: u64,
        /// Expected output substring.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<String>,
    },
}

impl HealthCheck {
    /// Checks sizes and ranges against the protocol's limits; `field` names
    /// this check in errors.
    pub fn validate(&self, field: &str) -> Result<(), ManifestError> {
        let text = |name: &str, value: &str, max: usize| {
            if value.len() > max {
                Err(invalid(
                    format!("{field}.{name}"),
                    format!("longer than {max} bytes"),
                ))
            } else {
                Ok(())
            }
        };
        let argv = |argv: &[String]| {
            if argv.is_empty() || argv.len() > MAX_HEALTH_ARGS {
                return Err(invalid(
                    format!("{field}.command"),
                    format!("must hold 1 to {MAX_HEALTH_ARGS} strings"),
                ));
            }
            argv.iter()
                .try_for_each(|a| text("command", a, MAX_HEALTH_STRING_LEN))
        };
        let seconds = |name: &str, value: Option<u64>| match value {
            Some(v) if v == 0 || v > MAX_HEALTH_SECONDS => Err(invalid(
                format!("{field}.{name}"),
                format!("{v} is outside 1..={MAX_HEALTH_SECONDS}"),
            )),
            _ => Ok(()),
        };
        match self {
            HealthCheck::Service {
                name,
                mode,
                command,
                max_restarts,
                window,
                backoff_ms,
            } => {
                if name.is_empty() {
                    return Err(invalid(format!("{field}.name"), "must not be empty"));
                }
                text("name", name, MAX_HEALTH_STRING_LEN)?;
                match mode {
                    ServiceMode::Supervise => argv(command)?,
                    ServiceMode::Systemd if !command.is_empty() => {
                        return Err(invalid(
                            format!("{field}.command"),
                            "only for mode \"supervise\"",
                        ));
                    }
                    ServiceMode::Systemd => {}
                }
                if max_restarts.is_some_and(|n| n == 0 || n > 1000) {
                    return Err(invalid(
                        format!("{field}.max-restarts"),
                        "must be 1 to 1000",
                    ));
                }
                seconds("window", *window)?;
                if backoff_ms.is_some_and(|ms| ms > MAX_HEALTH_SECONDS * 1000) {
                    return Err(invalid(
                        format!("{field}.backoff-ms"),
                        format!("more than {MAX_HEALTH_SECONDS} s"),
                    ));
                }
            }
            HealthCheck::Http {
                url,
                body_contains,
                timeout,
                ..
            } => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid(format!("{field}.url"), "must be http(s)"));
                }
                text("url", url, MAX_HEALTH_STRING_LEN)?;
                text(
                    "body-contains",
                    body_contains.as_deref().unwrap_or(""),
                    MAX_HEALTH_STRING_LEN,
                )?;
                seconds("timeout", *timeout)?;
            }
            HealthCheck::Command { command, timeout } => {
                argv(command)?;
                seconds("timeout", *timeout)?;
            }
            HealthCheck::Disk { path, .. } => text("path", path, MAX_HEALTH_STRING_LEN)?,
            HealthCheck::Memory { .. } => {}
            HealthCheck::Llm {
                model,
                prompt,
                tokens,
                expect,
                ..
            } => {
                text("model", model, MAX_HEALTH_STRING_LEN)?;
                text("prompt", prompt, MAX_HEALTH_STRING_LEN)?;
                text(
                    "expect",
                    expect.as_deref().unwrap_or(""),
                    MAX_HEALTH_STRING_LEN,
                )?;
                if *tokens == 0 || *tokens > MAX_HEALTH_LLM_TOKENS {
                    return Err(invalid(
                        format!("{field}.tokens"),
                        format!("must be 1 to {MAX_HEALTH_LLM_TOKENS}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl HealthSpec {
    /// Checks every value against the protocol's limits.
    pub fn validate(&self) -> Result<(), ManifestError> {
        for (name, value) in [
            ("health.deadline", self.deadline),
            ("health.stability-window", self.stability_window),
        ] {
            if let Some(v) = value
                && v > MAX_HEALTH_SECONDS
            {
                return Err(invalid(
                    name,
                    format!("{v} is more than {MAX_HEALTH_SECONDS}"),
                ));
            }
        }
        if self.deadline == Some(0) {
            return Err(invalid("health.deadline", "must be at least 1"));
        }
        if self.max_revert_reboots.is_some_and(|n| n > 100) {
            return Err(invalid("health.max-revert-reboots", "more than 100"));
        }
        let checks = self.checks.as_deref().unwrap_or_default();
        if checks.len() > MAX_HEALTH_CHECKS {
            return Err(invalid(
                "health.checks",
                format!(
                    "{} checks, more than the limit of {MAX_HEALTH_CHECKS}",
                    checks.len()
                ),
            ));
        }
        for (i, check) in checks.iter().enumerate() {
            check.validate(&format!("health.checks[{i}]"))?;
        }
        Ok(())
    }
}

/// The slot classes a bundle can update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotClass {
    /// The root filesystem (kernel, userland, the updater itself).
    Rootfs,
    /// An agent partition (model weights, prompts, tools).
    Agent,
}

impl SlotClass {
    /// Name as used in manifests, configs and bundle member names.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotClass::Rootfs => "rootfs",
            SlotClass::Agent => "agent",
        }
    }
}

impl fmt::Display for SlotClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SlotClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rootfs" => Ok(SlotClass::Rootfs),
            "agent" => Ok(SlotClass::Agent),
            other => Err(format!(
                "unknown slot class {other:?} (expected rootfs or agent)"
            )),
        }
    }
}

/// Filesystem inside an image, so the updater knows how to mount it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsType {
    /// ext4
    Ext4,
    /// squashfs
    Squashfs,
    /// erofs
    Erofs,
    /// Raw bytes, not a filesystem Kernex knows.
    Raw,
}

impl FsType {
    /// Name as in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Squashfs => "squashfs",
            FsType::Erofs => "erofs",
            FsType::Raw => "raw",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One image: the bytes a slot must hold after install, and how to get them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ImageEntry {
    /// Which slot class this image goes to.
    pub slot_class: SlotClass,
    /// Filesystem inside the image.
    pub filesystem: FsType,
    /// Image size in bytes.
    pub size: u64,
    /// SHA-256 of the whole image.
    pub sha256: Sha256Digest,
    /// The compact chunk index (bundle member `<class>.kxi`).
    pub index: IndexRef,
    /// The bita chunk archive (bundle member `<class>.bita`).
    pub archive: ArchiveRef,
    /// Chunk patches from older releases' images (bundle members
    /// `<class>.from-<base-sha256>.kxp`, in this order); see
    /// [`crate::patch`]. Optional: a device without a matching base uses
    /// the archive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<PatchRef>,
}

impl ImageEntry {
    /// The patch from the image whose SHA-256 is `base`, if the bundle
    /// carries one.
    pub fn patch_from(&self, base: &Sha256Digest) -> Option<(usize, &PatchRef)> {
        self.patches
            .iter()
            .enumerate()
            .find(|(_, p)| p.base_sha256 == *base)
    }
}

/// Binds a chunk patch: which image it applies to, and its table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PatchRef {
    /// SHA-256 of the base image (what the device's other slot must hold).
    pub base_sha256: Sha256Digest,
    /// Version of the release the base image belongs to (for people).
    pub base_version: semver::Version,
    /// Size of the patch member (table and data).
    pub size: u64,
    /// Size of the patch table at its start.
    pub table_size: u64,
    /// SHA-256 of the patch table.
    pub table_sha256: Sha256Digest,
}

/// Binds the chunk index: its head (fetched first by a device) and the whole
/// file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct IndexRef {
    /// Size of the index file.
    pub size: u64,
    /// SHA-256 of the index file.
    pub sha256: Sha256Digest,
    /// Size of the index head (fixed header + page table).
    pub head_size: u64,
    /// SHA-256 of the index head.
    pub head_sha256: Sha256Digest,
}

/// Binds the bita archive: its header (dictionary) by digest; its chunk data
/// is bound chunk by chunk through the index's chunk hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ArchiveRef {
    /// Size of the whole archive file.
    pub size: u64,
    /// Size of the archive header; chunk data starts here.
    pub header_size: u64,
    /// SHA-256 of the archive header.
    pub header_sha256: Sha256Digest,
}

/// What is wrong with a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Larger than [`MAX_MANIFEST_SIZE`].
    #[error("manifest is {found} bytes, more than the limit of {limit}")]
    TooLarge {
        /// The limit.
        limit: u64,
        /// The size found.
        found: u64,
    },
    /// Not JSON, or not the schema (names the field).
    #[error("manifest is not valid: {0}")]
    Json(#[from] serde_json::Error),
    /// A format this updater does not know.
    #[error("manifest format {found} is not supported (this build reads format {MANIFEST_FORMAT})")]
    UnsupportedFormat {
        /// The format found.
        found: u64,
    },
    /// Parsed, but a value is out of range.
    #[error("manifest field {field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks a `compatible` string: 1–64 characters of `a-z 0-9 - _ .`.
pub fn check_compatible(compatible: &str) -> Result<(), ManifestError> {
    if compatible.is_empty() || compatible.len() > MAX_COMPATIBLE_LEN {
        return Err(invalid(
            "compatible",
            format!("must be 1 to {MAX_COMPATIBLE_LEN} characters"),
        ));
    }
    if !compatible
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    {
        return Err(invalid(
            "compatible",
            format!("{compatible:?} may only hold a-z, 0-9, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

impl Manifest {
    /// Parses and validates manifest bytes. Does not check the signature:
    /// see [`crate::signature::verify_manifest`], the only way to get a
    /// [`VerifiedManifest`].
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(ManifestError::TooLarge {
                limit: MAX_MANIFEST_SIZE,
                found: bytes.len() as u64,
            });
        }
        // The format decides which schema applies, so read it first: a
        // newer manifest gets "format 2 is not supported", not a complaint
        // about the first new field.
        #[derive(Deserialize)]
        struct FormatOnly {
            format: u64,
        }
        let format: FormatOnly = serde_json::from_slice(bytes)?;
        if format.format != u64::from(MANIFEST_FORMAT) {
            return Err(ManifestError::UnsupportedFormat {
                found: format.format,
            });
        }
        let manifest: Manifest = serde_json::from_slice(bytes)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Serialises the manifest (pretty JSON, stable key order).
    pub fn to_vec(&self) -> Result<Vec<u8>, ManifestError> {
        self.validate()?;
        let mut out = serde_json::to_vec_pretty(self)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Checks every value against the protocol's rules and limits.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::UnsupportedFormat {
                found: u64::from(self.format),
            });
        }
        check_compatible(&self.compatible)?;
        if self.security_version > MAX_SECURITY_VERSION {
            return Err(invalid(
                "security-version",
                format!(
                    "{} is more than the limit of {MAX_SECURITY_VERSION}",
                    self.security_version
                ),
            ));
        }
        if self.images.is_empty() {
            return Err(invalid("images", "a bundle needs at least one image"));
        }
        if self.images.len() > MAX_IMAGES {
            return Err(invalid(
                "images",
                format!(
                    "{} images, more than the limit of {MAX_IMAGES}",
                    self.images.len()
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, image) in self.images.iter().enumerate() {
            let field = |name: &str| format!("images[{i}].{name}");
            if !seen.insert(image.slot_class) {
                return Err(invalid(
                    field("slot-class"),
                    format!("{} appears twice", image.slot_class),
                ));
            }
            if image.size == 0 || image.size > MAX_IMAGE_SIZE {
                return Err(invalid(
                    field("size"),
                    format!("{} is outside 1..={MAX_IMAGE_SIZE}", image.size),
                ));
            }
            if image.index.size > MAX_INDEX_SIZE || image.index.head_size > image.index.size {
                return Err(invalid(
                    field("index.size"),
                    format!(
                        "index of {} bytes (head {}) is outside the limit of {MAX_INDEX_SIZE}",
                        image.index.size, image.index.head_size
                    ),
                ));
            }
            // The bundle layout adds these sizes up before the signature
            // is checked, so each must be bounded.
            if image.archive.size > MAX_ARCHIVE_SIZE {
                return Err(invalid(
                    field("archive.size"),
                    format!(
                        "{} is more than the limit of {MAX_ARCHIVE_SIZE}",
                        image.archive.size
                    ),
                ));
            }
            if image.patches.len() > MAX_PATCHES {
                return Err(invalid(
                    field("patches"),
                    format!(
                        "{} patches, more than the limit of {MAX_PATCHES}",
                        image.patches.len()
                    ),
                ));
            }
            for (k, patch) in image.patches.iter().enumerate() {
                let pfield = |name: &str| format!("images[{i}].patches[{k}].{name}");
                if patch.base_sha256 == image.sha256 {
                    return Err(invalid(pfield("base-sha256"), "is the image itself"));
                }
                if image.patches[..k]
                    .iter()
                    .any(|p| p.base_sha256 == patch.base_sha256)
                {
                    return Err(invalid(
                        pfield("base-sha256"),
                        "a second patch from the same base",
                    ));
                }
                if patch.table_size < crate::patch::PATCH_HEADER_SIZE as u64
                    || patch.table_size > MAX_PATCH_TABLE_SIZE
                    || patch.table_size > patch.size
                    || patch.size > MAX_ARCHIVE_SIZE
                {
                    return Err(invalid(
                        pfield("table-size"),
                        format!(
                            "table of {} bytes in a member of {} bytes is outside the limits",
                            patch.table_size, patch.size
                        ),
                    ));
                }
            }
            if image.archive.header_size > MAX_ARCHIVE_HEADER_SIZE
                || image.archive.header_size > image.archive.size
            {
                return Err(invalid(
                    field("archive.header-size"),
                    format!(
                        "archive header of {} bytes does not fit an archive of {} bytes within the limit of {MAX_ARCHIVE_HEADER_SIZE}",
                        image.archive.header_size, image.archive.size
                    ),
                ));
            }
        }
        if !seen.contains(&SlotClass::Rootfs) {
            return Err(invalid("images", "a bundle must carry a rootfs image"));
        }
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(invalid(
                "metadata",
                format!(
                    "{} entries, more than the limit of {MAX_METADATA_ENTRIES}",
                    self.metadata.len()
                ),
            ));
        }
        for (key, value) in &self.metadata {
            if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN {
                return Err(invalid(
                    "metadata",
                    format!("key {key:?} must be 1 to {MAX_METADATA_KEY_LEN} bytes"),
                ));
            }
            if value.len() > MAX_METADATA_VALUE_LEN {
                return Err(invalid(
                    format!("metadata.{key}"),
                    format!("value is longer than {MAX_METADATA_VALUE_LEN} bytes"),
                ));
            }
        }
        if let Some(health) = &self.health {
            health.validate()?;
        }
        Ok(())
    }

    /// The image for a slot class, if the bundle carries one.
    pub fn image(&self, class: SlotClass) -> Option<&ImageEntry> {
        self.images.iter().find(|i| i.slot_class == class)
    }
}

/// A manifest whose signature verified against a trusted keyring.
///
/// The only constructor is signature verification
/// ([`crate::signature::verify_manifest`]); install code takes this type, so
/// an unverified manifest cannot reach a slot.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    manifest: Manifest,
    bytes: Vec<u8>,
    signer: SignerInfo,
}

impl VerifiedManifest {
    pub(crate) fn new(manifest: Manifest, bytes: Vec<u8>, signer: SignerInfo) -> Self {
        Self {
            manifest,
            bytes,
            signer,
        }
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The exact bytes that were signed.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Who signed it.
    pub fn signer(&self) -> &SignerInfo {
        &self.signer
    }
}

impl std::ops::Deref for VerifiedManifest {
    type Target = Manifest;
    fn deref(&self) -> &Manifest {
        &self.manifest
    }
}

#[cfg(test)]
mod tests;
