//! The `[tpm]` table: which TPM `kernex-updater attest` talks to.

use serde::{Deserialize, Serialize};

/// The TCTI unless `[tpm] tcti` says otherwise: the kernel's resource
/// manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// The slot PCR unless `[tpm] pcr` says otherwise (the same as
/// `kernex_attest::DEFAULT_SLOT_PCR`, which the device links only with its
/// `tpm` feature).
pub const DEFAULT_PCR: u8 = 14;

/// The `[tpm]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TpmConfig {
    /// tpm2-tss TCTI: `device:/dev/tpmrm0` (the kernel's resource manager)
    /// on hardware, `swtpm:host=127.0.0.1,port=2321` for swtpm.
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// The PCR the booted slot's measurement is extended into (0–15).
    #[serde(default = "default_pcr")]
    pub pcr: u8,
}

fn default_tcti() -> String {
    DEFAULT_TCTI.to_owned()
}

fn default_pcr() -> u8 {
    DEFAULT_PCR
}

impl Default for TpmConfig {
    fn default() -> Self {
        Self {
            tcti: default_tcti(),
            pcr: default_pcr(),
        }
    }
}
