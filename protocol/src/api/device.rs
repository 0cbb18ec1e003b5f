//! The device API (`/api/v1/device/...`): enroll, poll, heartbeat, report,
//! logs. Devices authenticate with the credential enrollment returned
//! (`Authorization: Bearer kxd_...`).

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::tpm::{Activation, TpmIdentity};

/// `POST /api/v1/device/enroll`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The factory enrollment token.
    pub enrollment_token: String,
    /// The device's own id, unique in the organisation (e.g. a serial).
    pub device_id: String,
    /// Hardware class, e.g. `raspberrypi4-64`.
    pub hardware_class: String,
    /// Free-form hardware facts.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub hardware_metadata: serde_json::Map<String, serde_json::Value>,
    /// Extra tags (added to the token's).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Link class, e.g. ethernet, wifi, metered-4g (rollout scheduling).
    /// This and `site`, `time_zone` are a hint: the token or an operator
    /// sets them, an operator may accept the device's claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_class: Option<String>,
    /// Site or cell tag (rollout scheduling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// IANA time zone, e.g. Europe/Berlin (maintenance windows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// The device's TPM identity (`kernex-updater attest identity`): EK,
    /// its certificate, AK. The answer carries a credential-activation
    /// challenge for `POST /device/activate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub tpm: Option<TpmIdentity>,
    /// The PCR the device extends its slot measurement into (default 14).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_slot_pcr: Option<u8>,
    /// The device's public key and the proof it holds the private key. The
    /// answer's credential is then a short-lived access token. Without
    /// it (an updater older than device keys) the server may issue a
    /// long-lived bearer credential (`legacy-device-credentials`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<super::KeyProof>,
}

/// Enrollment result. The credential is shown only here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    /// Internal device id.
    pub id: String,
    /// The device credential: `Authorization: Bearer <credential>`.
    pub credential: String,
    /// When the enrollment carried a key: the credential is an access
    /// token valid this many seconds (then `POST /device/auth`). None: a
    /// long-lived bearer credential (no key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    /// With a TPM identity: the challenge to answer with
    /// TPM2_ActivateCredential (`id-object`, `encrypted-secret`, hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub activation: Option<Activation>,
}

/// What the server wants a device to do with a desired release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DesiredAction {
    /// Download and install the release into the inactive slot.
    Install,
    /// Boot the other slot, which holds the release; no download.
    Rollback,
    /// An action a newer server knows and this device does not: ignored.
    #[serde(other)]
    Unknown,
}

impl DesiredAction {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Rollback => "rollback",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for DesiredAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the device should run (`GET /api/v1/device/poll`, 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DesiredState {
    /// Release id.
    pub release_id: String,
    /// Release version.
    pub version: String,
    /// Bundle size in bytes.
    #[serde(default)]
    pub size: i64,
    /// SHA-256 of the bundle file.
    #[serde(default)]
    pub sha256: String,
    /// Where to download it (supports `Range`): absolute, or relative to
    /// the server's base URL.
    pub url: String,
    /// `install` (when absent) or `rollback`. Set for rollouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<DesiredAction>,
    /// The rollout this belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    /// Start downloading only inside this window (server clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_window: Option<DownloadWindow>,
    /// Hint: poll again after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_after_secs: Option<u64>,
    /// Chunk patches the server made for this device (from its booted
    /// release, which the bundle carries no patch from): use them like
    /// the bundle's own ([`crate::offered`] says why that is safe).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<ServerPatch>,
}

/// A chunk patch made by the server, offered outside the signed bundle
/// ([`crate::offered`]). Every chunk it decodes to is verified against the
/// signed chunk index; a frame that fails costs its bytes, no more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerPatch {
    /// The image it patches (`rootfs`, `agent`).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub slot_class: crate::manifest::SlotClass,
    /// Where to download it (supports `Range`), like `url`.
    pub url: String,
    /// SHA-256 of the base image (the booted slot's, by its manifest).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub base_sha256: crate::Sha256Digest,
    /// The base release's version (for people).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub base_version: semver::Version,
    /// Size of the patch (table and frames).
    pub size: u64,
    /// Size of its table, at its start.
    pub table_size: u64,
    /// SHA-256 of the table.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub table_sha256: crate::Sha256Digest,
}

impl ServerPatch {
    /// The patch as a manifest would list it.
    pub fn patch_ref(&self) -> crate::manifest::PatchRef {
        crate::manifest::PatchRef {
            base_sha256: self.base_sha256,
            base_version: self.base_version.clone(),
            size: self.size,
            table_size: self.table_size,
            table_sha256: self.table_sha256,
        }
    }
}

impl DesiredState {
    /// The action, `install` when the server named none.
    pub fn action(&self) -> DesiredAction {
        self.action.unwrap_or(DesiredAction::Install)
    }
}

/// When a device may start its download (unix ms, server clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DownloadWindow {
    /// Not before this.
    pub not_before_ms: i64,
    /// Not at or after this (a download under way may finish).
    pub not_after_ms: i64,
}

/// A [`super::POLL_AFTER_HEADER`] value: whole seconds, 1 to 86400;
/// anything else is ignored.
pub fn parse_poll_after(value: &str) -> Option<Duration> {
    let secs: u64 = value.trim().parse().ok()?;
    (1..=86_400)
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

/// Inventory sent with each heartbeat (`POST /api/v1/device/heartbeat`),
/// as `kernex-updater status --json` and sysinfo report it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// CPU use, percent.
    pub cpu_percent: Option<f64>,
    /// Memory in use, bytes.
    pub memory_used_bytes: Option<u64>,
    /// Memory total, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Disk in use, bytes.
    pub disk_used_bytes: Option<u64>,
    /// Disk total, bytes.
    pub disk_total_bytes: Option<u64>,
    /// Hottest sensor, °C.
    pub temperature_celsius: Option<f64>,
    /// Seconds since boot.
    pub uptime_secs: Option<u64>,
    /// Slot booted (A/B).
    pub booted_slot: Option<String>,
    /// Slot the bootloader tries first.
    pub primary_slot: Option<String>,
    /// Release version running.
    pub version: Option<String>,
    /// Updater version.
    pub updater_version: Option<String>,
    /// Link class, e.g. ethernet, wifi, metered-4g.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_class: Option<String>,
    /// Site or cell tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// IANA time zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// The anti-rollback floor: the highest manifest `security-version`
    /// the device has committed. It refuses any release below it, so the
    /// server refuses to assign one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_floor: Option<u64>,
    /// Anything else (kept, not interpreted): the A/B status, the link
    /// profile, the health verdict.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Where an install stands, as a device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReportState {
    /// Fetching and writing the inactive slot.
    Downloading,
    /// Written and verified; the bootloader will try it.
    Installed,
    /// Booted the new slot, not yet committed.
    Rebooted,
    /// The health watchdog committed the new slot.
    Committed,
    /// The new slot failed (watchdog or bootloader fallback); the old one
    /// runs again.
    Reverted,
    /// The install failed before any reboot.
    Failed,
    /// After a `rollback` action: the other slot runs; `release_id` and
    /// `version` are what now runs.
    RolledBack,
}

impl ReportState {
    /// Every state, in the order an install moves through them.
    pub const ALL: [ReportState; 7] = [
        Self::Downloading,
        Self::Installed,
        Self::Rebooted,
        Self::Committed,
        Self::Reverted,
        Self::Failed,
        Self::RolledBack,
    ];

    /// The wire name (also what the server stores).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Installed => "installed",
            Self::Rebooted => "rebooted",
            Self::Committed => "committed",
            Self::Reverted => "reverted",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }

    /// The state named `s` on the wire.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// An outcome: the install is over, for good or bad.
    pub fn is_outcome(self) -> bool {
        matches!(
            self,
            Self::Committed | Self::Reverted | Self::Failed | Self::RolledBack
        )
    }
}

impl fmt::Display for ReportState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Install progress and outcome (`POST /api/v1/device/report`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Where the install stands.
    pub state: ReportState,
    /// Release the report is about.
    #[serde(default)]
    pub release_id: Option<String>,
    /// Bytes downloaded so far.
    #[serde(default)]
    pub bytes_done: Option<i64>,
    /// Bytes to download.
    #[serde(default)]
    pub bytes_total: Option<i64>,
    /// Version now running (committed) or still running (reverted).
    #[serde(default)]
    pub version: Option<String>,
    /// Slot booted.
    #[serde(default)]
    pub booted_slot: Option<String>,
    /// Why (reverted, failed).
    #[serde(default)]
    pub reason: Option<String>,
}

impl Report {
    /// A report of `state` with nothing else set.
    pub fn new(state: ReportState) -> Self {
        Self {
            state,
            release_id: None,
            bytes_done: None,
            bytes_total: None,
            version: None,
            booted_slot: None,
            reason: None,
        }
    }
}

/// A log line's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Debug.
    Debug,
    /// Info.
    Info,
    /// Warning.
    Warn,
    /// Error.
    Error,
}

impl LogLevel {
    /// The wire name (also what the server stores).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most lines in one [`LogBatch`].
pub const MAX_LOG_LINES: usize = 1000;
/// Longer messages are cut to this many bytes (at a character boundary).
pub const MAX_LOG_MESSAGE: usize = 8192;

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    /// debug, info, warn, error.
    pub level: LogLevel,
    /// The message (cut at [`MAX_LOG_MESSAGE`] bytes).
    pub message: String,
    /// When, unix ms (default: received).
    #[serde(default)]
    pub at: Option<i64>,
}

/// A batch of log lines (`POST /api/v1/device/logs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LogBatch {
    /// At most [`MAX_LOG_LINES`] lines.
    pub entries: Vec<LogLine>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_after_takes_whole_seconds_in_range() {
        assert_eq!(parse_poll_after("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_poll_after(" 1 "), Some(Duration::from_secs(1)));
        assert_eq!(parse_poll_after("86400"), Some(Duration::from_secs(86_400)));
        for bad in [
            "0",
            "-5",
            "1.5",
            "",
            "ten",
            "86401",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_poll_after(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn report_states_round_trip_by_name() {
        for s in ReportState::ALL {
            let json = serde_json::to_value(s).unwrap_or_default();
            assert_eq!(json, serde_json::Value::from(s.as_str()));
            assert_eq!(ReportState::parse(s.as_str()), Some(s));
        }
        assert_eq!(ReportState::parse("exploded"), None);
    }

    #[test]
    fn unknown_actions_are_read_as_unknown() {
        let d: Result<DesiredState, _> = serde_json::from_str(
            r#"{"release_id":"r","version":"1.0.0","url":"/x","action":"reflash-bios","future":1}"#,
        );
        assert_eq!(
            d.map(|d| d.action()).ok(),
            Some(DesiredAction::Unknown),
            "a newer server's action and fields are tolerated"
        );
    }
}
