//! `/etc/kernex/system.toml`: what this device is and where its slots are.
//! See `updater/system.example.toml` for a documented example.

use std::path::{Path, PathBuf};

use kernex_bootloader::{BootloaderConfig, Slot};
use kernex_protocol::SlotClass;
use serde::{Deserialize, Serialize};

use crate::error::UpdateError;

/// Default config path.
pub const DEFAULT_CONFIG: &str = "/etc/kernex/system.toml";
/// Largest config file read.
pub const MAX_CONFIG_SIZE: u64 = 1024 * 1024;

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SystemConfig {
    /// Hardware class this device is; bundles must name the same.
    pub compatible: String,
    /// Where the updater keeps its state (slot records, journal, budget).
    pub data_dir: PathBuf,
    /// PEM file of trusted CA certificates.
    pub keyring: PathBuf,
    /// The slots.
    pub slots: Slots,
    /// The boot-state backend.
    pub bootloader: BootloaderConfig,
    /// How the device may use its network link.
    #[serde(default)]
    pub link: LinkProfile,
    /// Command (program and arguments) `install --reboot` runs after a
    /// successful install.
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
    /// The control plane the daemon talks to (`[server]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<crate::daemon::ServerConfig>,
    /// The health watchdog's device-local settings (`[health]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::health::HealthConfig>,
    /// The TPM for `attest` (`[tpm]`: `tcti`, `pcr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<crate::cli::attest::TpmConfig>,
}

fn default_reboot_command() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

/// The slot pairs, by class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Slots {
    /// The root filesystem pair (required).
    pub rootfs: SlotPair,
    /// The agent pair (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<SlotPair>,
}

/// One A/B pair: a block device or a file for each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotPair {
    /// Slot A.
    #[serde(rename = "A")]
    pub a: PathBuf,
    /// Slot B.
    #[serde(rename = "B")]
    pub b: PathBuf,
}

impl SlotPair {
    /// The path of `slot`.
    pub fn path(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }
}

impl Slots {
    /// The pair of `class`, if configured.
    pub fn pair(&self, class: SlotClass) -> Option<&SlotPair> {
        match class {
            SlotClass::Rootfs => Some(&self.rootfs),
            SlotClass::Agent => self.agent.as_ref(),
        }
    }

    /// Every configured class.
    pub fn classes(&self) -> Vec<SlotClass> {
        let mut out = vec![SlotClass::Rootfs];
        if self.agent.is_some() {
            out.push(SlotClass::Agent);
        }
        out
    }
}

/// The `[link]` table: what downloading may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LinkProfile {
    /// Download rate limit in bytes per second; absent or 0 means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u64>,
    /// Whether the link is paid by the byte (4G). The daily budget applies
    /// only to metered links.
    #[serde(default)]
    pub metered: bool,
    /// Bytes the updater may download per UTC day on a metered link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_budget: Option<u64>,
}

impl SystemConfig {
    /// Parses config text; `path` is for error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, UpdateError> {
        let bad = |reason: String| UpdateError::Config {
            path: path.to_owned(),
            reason,
        };
        let config: SystemConfig = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        kernex_protocol::manifest::check_compatible(&config.compatible)
            .map_err(|e| bad(format!("compatible: {e}")))?;
        if config.reboot_command.is_empty() {
            return Err(bad("reboot-command must name a program".into()));
        }
        if let Some(health) = &config.health
            && health.systemctl_command.as_ref().is_some_and(Vec::is_empty)
        {
            return Err(bad("health.systemctl-command must name a program".into()));
        }
        for class in config.slots.classes() {
            if let Some(pair) = config.slots.pair(class)
                && pair.a == pair.b
            {
                return Err(bad(format!(
                    "slots.{class}: A and B are the same path {}",
                    pair.a.display()
                )));
            }
        }
        Ok(config)
    }

    /// Reads and parses the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, UpdateError> {
        let bytes = crate::store::read_limited(path, MAX_CONFIG_SIZE)?;
        let text = String::from_utf8(bytes).map_err(|_| UpdateError::Config {
            path: path.to_owned(),
            reason: "not UTF-8".into(),
        })?;
        Self::from_toml(&text, path)
    }
}
