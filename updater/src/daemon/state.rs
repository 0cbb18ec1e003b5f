//! What the daemon remembers across restarts and reboots, in the data dir:
//! its key (`device-key.pem`, mode 0600), its credential
//! (`credential.json`, mode 0600) and what it is waiting for
//! (`daemon.json`: an install or rollback that needs a reboot to finish).

use kernex_device::layout;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use kernex_bootloader::Slot;
use kernex_protocol::device_key::DeviceKey;
use serde::{Deserialize, Serialize};

use crate::error::{UpdateError, io_err};
use crate::store::{DataDir, sync_dir};

/// The device credential the server issued at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Credential {
    /// The server it is valid for.
    pub server: String,
    /// The device id it was issued to.
    pub device_id: String,
    /// The server's id for this device.
    pub id: String,
    /// The bearer credential: with [`Credential::keyed`] the latest access
    /// token (minutes), otherwise a long-lived credential from before
    /// device keys, which the daemon trades for a key registration.
    pub credential: String,
    /// The device authenticates with its key ([`layout::DEVICE_KEY`]).
    #[serde(default)]
    pub keyed: bool,
    /// When the access token expires, unix ms by this device's clock
    /// (a wrong clock costs a refused request and a new token, no more).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// What a pending reboot should finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// A new release was installed into `slot`.
    Install,
    /// `slot` holds an earlier release and was made to boot next.
    Rollback,
}

/// Set before rebooting into a new slot, cleared once the outcome is
/// reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Awaiting {
    /// Install or rollback.
    pub action: Action,
    /// The release the server asked for.
    pub release_id: String,
    /// Its version.
    pub version: String,
    /// The slot that should come up.
    pub slot: Slot,
    /// The rollout, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    /// The boot during which the reboot was asked for.
    pub boot_id: String,
    /// Whether "rebooted" was reported for the boot after.
    #[serde(default)]
    pub reported_rebooted: bool,
    /// Unix time.
    pub at: u64,
}

/// A release this device will not try again (it was rejected for good).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GivenUp {
    /// Release id.
    pub release_id: String,
    /// Why.
    pub reason: String,
}

/// `daemon.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DaemonState {
    /// The reboot in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<Awaiting>,
    /// The release given up on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_up: Option<GivenUp>,
}

fn state_path(data: &DataDir) -> PathBuf {
    data.root().join(layout::DAEMON_STATE)
}

fn credential_path(data: &DataDir) -> PathBuf {
    data.root().join(layout::CREDENTIAL)
}

/// Loads `daemon.json` (defaults when missing).
pub fn load(data: &DataDir) -> Result<DaemonState, UpdateError> {
    Ok(data.read(&state_path(data))?.unwrap_or_default())
}

/// Saves `daemon.json` atomically.
pub fn save(data: &DataDir, state: &DaemonState) -> Result<(), UpdateError> {
    data.write(&state_path(data), state)
}

/// The stored credential, if enrolled with `server`.
pub fn credential(data: &DataDir, server: &str) -> Result<Option<Credential>, UpdateError> {
    let c: Option<Credential> = data.read(&credential_path(data))?;
    Ok(c.filter(|c| c.server == server))
}

/// Forgets the credential (the server refused it).
pub fn forget_credential(data: &DataDir) -> Result<(), UpdateError> {
    crate::store::remove(&credential_path(data))
}

/// Stores the credential: written to a new file created with mode 0600,
/// synced, then renamed over the old one.
pub fn store_credential(data: &DataDir, c: &Credential) -> Result<(), UpdateError> {
    let path = credential_path(data);
    let bytes = serde_json::to_vec_pretty(c).map_err(|e| UpdateError::State {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_private(&path, &bytes)
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), UpdateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir);
    Ok(())
}

/// The device's key ([`layout::DEVICE_KEY`]): read, or made (Ed25519)
/// and stored with mode 0600 the first time. It never leaves the device.
pub fn device_key(data: &DataDir) -> Result<DeviceKey, UpdateError> {
    let path = data.root().join(layout::DEVICE_KEY);
    let bad = |e: kernex_protocol::device_key::KeyError| UpdateError::State {
        path: path.clone(),
        reason: e.to_string(),
    };
    match crate::store::read_limited(&path, 16 * 1024) {
        Ok(pem) => DeviceKey::from_pem(&pem).map_err(bad),
        Err(_) if !path.exists() => {
            let key = DeviceKey::generate().map_err(bad)?;
            write_private(&path, &key.to_pem().map_err(bad)?)?;
            tracing::info!(path = %path.display(), "device key created");
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

/// Identifies this boot: the kernel's random boot id, or for a simulated
/// device the counter its simulated boots advance.
pub fn boot_id(data: &DataDir, simulated: bool) -> Result<String, UpdateError> {
    let path = if simulated {
        sim_boot_path(data)
    } else {
        PathBuf::from("/proc/sys/kernel/random/boot_id")
    };
    match crate::store::read_limited(&path, 128) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).trim().to_owned()),
        Err(_) if simulated => Ok("0".into()),
        Err(e) => Err(e),
    }
}

fn sim_boot_path(data: &DataDir) -> PathBuf {
    data.root().join(layout::SIMULATED_BOOT_ID)
}

/// Advances the simulated boot counter.
pub fn next_sim_boot(data: &DataDir) -> Result<u64, UpdateError> {
    let n = boot_id(data, true)?.parse::<u64>().unwrap_or(0) + 1;
    crate::store::write_atomically(&sim_boot_path(data), n.to_string().as_bytes())?;
    Ok(n)
}
