//! `/etc/kernex/system.toml`: what this device is and where its slots are.
//! See `updater/system.example.toml` for a documented example.
//!
//! Keys are kebab-case and unknown keys are refused. Serialising a
//! [`SystemConfig`] leaves out what is at its default, so a config written
//! by the image builder says only what the board needs.

use std::io::Read;
use std::path::{Path, PathBuf};

use kernex_bootloader::{BootloaderConfig, Slot};
use kernex_protocol::SlotClass;
use serde::{Deserialize, Serialize};

use crate::{HealthConfig, ServerConfig, TpmConfig};

/// Default config path.
pub const DEFAULT_CONFIG: &str = "/etc/kernex/system.toml";
/// Largest config file read.
pub const MAX_CONFIG_SIZE: u64 = 1024 * 1024;

/// Why a config was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("unable to {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "read").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid config.
    #[error("config {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SystemConfig {
    /// Hardware class this device is; bundles must name the same.
    pub compatible: String,
    /// Where the updater keeps its state (slot records, journal, budget;
    /// see [`crate::layout`]).
    pub data_dir: PathBuf,
    /// PEM file of trusted CA certificates.
    pub keyring: PathBuf,
    /// The slots.
    pub slots: Slots,
    /// The boot-state backend.
    pub bootloader: BootloaderConfig,
    /// How the device may use its network link.
    #[serde(default, skip_serializing_if = "LinkProfile::is_default")]
    pub link: LinkProfile,
    /// Command (program and arguments) `install --reboot` runs after a
    /// successful install.
    #[serde(
        default = "default_reboot_command",
        skip_serializing_if = "is_default_reboot_command"
    )]
    pub reboot_command: Vec<String>,
    /// The control plane the daemon talks to (`[server]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerConfig>,
    /// The health watchdog's device-local settings (`[health]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthConfig>,
    /// The TPM for `attest` (`[tpm]`: `tcti`, `pcr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmConfig>,
}

fn default_reboot_command() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

fn is_default_reboot_command(command: &[String]) -> bool {
    command == default_reboot_command().as_slice()
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
    /// The largest image either slot holds, in bytes (optional; for file
    /// slots, whose size nothing else bounds). The updater refuses a larger
    /// image before writing anything; a block device is also checked
    /// against its own size, a file against its filesystem's free space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl SlotPair {
    /// A pair of `a` and `b` with no configured size.
    pub fn new(a: impl Into<PathBuf>, b: impl Into<PathBuf>) -> Self {
        Self {
            a: a.into(),
            b: b.into(),
            size: None,
        }
    }

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
    /// Range requests an install keeps in flight at once (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_concurrency: Option<u32>,
}

impl LinkProfile {
    fn is_default(&self) -> bool {
        *self == LinkProfile::default()
    }
}

impl SystemConfig {
    /// A config with the defaults of every optional table: no `[link]`
    /// limits, `systemctl reboot`, no `[server]`, `[health]` or `[tpm]`.
    pub fn new(
        compatible: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        keyring: impl Into<PathBuf>,
        slots: Slots,
        bootloader: BootloaderConfig,
    ) -> Self {
        SystemConfig {
            compatible: compatible.into(),
            data_dir: data_dir.into(),
            keyring: keyring.into(),
            slots,
            bootloader,
            link: LinkProfile::default(),
            reboot_command: default_reboot_command(),
            server: None,
            health: None,
            tpm: None,
        }
    }

    /// Parses config text and checks what TOML cannot say; `path` is for
    /// error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
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
            if let Some(pair) = config.slots.pair(class)
                && pair.size == Some(0)
            {
                return Err(bad(format!("slots.{class}.size must be more than 0 bytes")));
            }
        }
        Ok(config)
    }

    /// Reads (at most [`MAX_CONFIG_SIZE`] bytes) and parses the config file
    /// at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let io = |action| {
            move |source| ConfigError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        let file = std::fs::File::open(path).map_err(io("open"))?;
        let mut bytes = Vec::new();
        file.take(MAX_CONFIG_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(io("read"))?;
        let bad = |reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if bytes.len() as u64 > MAX_CONFIG_SIZE {
            return Err(bad(format!("larger than {MAX_CONFIG_SIZE} bytes")));
        }
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        Self::from_toml(&text, path)
    }
}
