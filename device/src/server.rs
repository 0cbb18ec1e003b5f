//! The `[server]` table: the control plane the daemon talks to, and what
//! the device tells it about its link and place.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default poll interval, seconds (the seed's 60 s).
pub const DEFAULT_POLL_INTERVAL: u64 = 60;

/// The `[server]` table of system.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerConfig {
    /// The control plane, e.g. `https://kernex.example.com`.
    pub url: String,
    /// The factory enrollment token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<String>,
    /// A file holding the enrollment token (written by provisioning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_token_file: Option<PathBuf>,
    /// This device's id in the organisation (default: the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// Tags asked for at enrollment (added to the token's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Seconds between polls (jittered by ±10 %).
    #[serde(
        default = "default_poll_interval",
        skip_serializing_if = "is_default_poll_interval"
    )]
    pub poll_interval: u64,
    /// Install a release the server assigns, or follow its `rollback`
    /// action, even when the release's version is lower than the running
    /// one. Default `false`: such an assignment is reported as failed.
    /// Either way the anti-rollback floor holds: a release whose
    /// `security-version` is below the highest one the device committed is
    /// always refused.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_downgrade: bool,
    /// Trust only the CA certificates in this PEM file for the server (a
    /// private CA pinned at the factory) instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The kind of network link the device is on (e.g. `metered-4g`,
    /// `ethernet`): the rollout scheduler's bandwidth budgets are per link
    /// class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_class: Option<String>,
    /// Where the device stands (e.g. `berlin-3`), for the operator's
    /// selectors and reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// The device's IANA time zone (e.g. `Europe/Berlin`): maintenance
    /// windows are in device time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn default_poll_interval() -> u64 {
    DEFAULT_POLL_INTERVAL
}

fn is_default_poll_interval(seconds: &u64) -> bool {
    *seconds == DEFAULT_POLL_INTERVAL
}

impl ServerConfig {
    /// The control plane at `url`, every other key at its default.
    pub fn new(url: impl Into<String>) -> Self {
        ServerConfig {
            url: url.into(),
            enrollment_token: None,
            enrollment_token_file: None,
            device_id: None,
            tags: Vec::new(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            allow_downgrade: false,
            ca: None,
            link_class: None,
            site: None,
            time_zone: None,
        }
    }
}
