//! The `[bootloader]` table of the updater's config, and opening a backend from it.

use std::path::PathBuf;

use crate::{BootError, BootFlow, BootedSlot, File, Grub, Slot, UBoot};

/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// U-Boot env through `fw_env.config`.
    UBoot,
    /// GRUB `grubenv`.
    Grub,
    /// A plain state file.
    File,
}

/// The `[bootloader]` table (kebab-case keys):
///
/// ```toml
/// [bootloader]
/// backend = "u-boot"                  # "u-boot" | "grub" | "file"
/// fw-env-config = "/etc/fw_env.config" # u-boot (default shown)
/// grubenv = "/boot/grub/grubenv"       # grub (default shown)
/// path = "/var/lib/kernex/boot-state"  # file (required)
/// cmdline = "/proc/cmdline"            # where the booted slot is read (default shown)
/// booted-slot = "A"                    # fixed booted slot instead (tests, simulators)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BootloaderConfig {
    /// The backend.
    pub backend: Backend,
    /// U-Boot: the `fw_env.config` to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fw_env_config: Option<PathBuf>,
    /// GRUB: the environment block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grubenv: Option<PathBuf>,
    /// File: the state file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The kernel command line to read the booted slot from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<PathBuf>,
    /// A fixed booted slot (overrides `cmdline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted_slot: Option<Slot>,
}

/// Default `fw_env.config`.
pub const DEFAULT_FW_ENV_CONFIG: &str = u_boot_env::config::DEFAULT_CONFIG_PATH;
/// Default grubenv.
pub const DEFAULT_GRUBENV: &str = "/boot/grub/grubenv";

impl BootloaderConfig {
    /// Where the booted slot comes from.
    pub fn booted(&self) -> BootedSlot {
        match (self.booted_slot, &self.cmdline) {
            (Some(slot), _) => BootedSlot::Fixed(slot),
            (None, Some(path)) => BootedSlot::Cmdline(path.clone()),
            (None, None) => BootedSlot::default(),
        }
    }

    /// Opens the configured backend.
    pub fn open(&self) -> Result<Box<dyn BootFlow>, BootError> {
        let booted = self.booted();
        Ok(match self.backend {
            Backend::UBoot => {
                let config = self
                    .fw_env_config
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_FW_ENV_CONFIG));
                Box::new(UBoot::from_config_file(config, booted)?)
            }
            Backend::Grub => Box::new(Grub::new(
                self.grubenv
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_GRUBENV)),
                booted,
            )),
            Backend::File => {
                let path = self.path.clone().ok_or(BootError::MissingSetting {
                    backend: "file",
                    setting: "path",
                })?;
                Box::new(File::new(path, booted))
            }
        })
    }
}
