//! The device-local `[health]` table.

use std::path::PathBuf;

use kernex_protocol::manifest::{HealthCheck, HealthSpec};
use serde::{Deserialize, Serialize};

/// The program systemd-mode `service` checks ask (`systemctl show`).
pub const DEFAULT_SYSTEMCTL: &str = "systemctl";

/// The device-local `[health]` table of system.toml: overrides the
/// manifest's spec field by field (`checks` as a whole), plus the
/// watchdog device, which only the device knows.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthConfig {
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stability_window: Option<u64>,
    /// Most revert reboots in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_revert_reboots: Option<u32>,
    /// Replaces the manifest's checks when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<HealthCheck>>,
    /// Hardware watchdog device fed while the checks run (`/dev/watchdog`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog_device: Option<PathBuf>,
    /// Feed interval for the watchdog device and sd_notify, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed_interval_ms: Option<u64>,
    /// The `systemctl` the systemd-mode `service` checks run (program and
    /// arguments, `show …` appended): default `["systemctl"]`, the system
    /// manager; `["systemctl", "--user"]` for units of the user manager
    /// whose `$XDG_RUNTIME_DIR` the updater runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemctl_command: Option<Vec<String>>,
}

impl HealthConfig {
    /// The `systemctl` command line systemd-mode checks run.
    pub fn systemctl(&self) -> Vec<String> {
        self.systemctl_command
            .clone()
            .unwrap_or_else(|| vec![DEFAULT_SYSTEMCTL.to_owned()])
    }

    /// The override part, as a spec.
    pub fn spec(&self) -> HealthSpec {
        HealthSpec {
            deadline: self.deadline,
            stability_window: self.stability_window,
            max_revert_reboots: self.max_revert_reboots,
            checks: self.checks.clone(),
        }
    }
}
