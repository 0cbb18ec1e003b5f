//! The heartbeat: what the device is running, how it is doing and what
//! its link is ([`kernex_protocol::api::Heartbeat`]).

use std::path::Path;

use kernex_protocol::api::Heartbeat;
use sysinfo::{Disks, System};

use super::ServerConfig;
use crate::status::Status;

/// Samples the system between heartbeats (CPU use needs two samples).
#[derive(Debug)]
pub struct Sampler {
    system: System,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new()
    }
}

impl Sampler {
    /// Takes a first sample.
    pub fn new() -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        system.refresh_memory();
        Self { system }
    }

    /// The heartbeat for `status`, with the data dir's disk and the link
    /// class, site and time zone of `server`.
    pub fn heartbeat(
        &mut self,
        status: &Status,
        data_dir: &Path,
        server: &ServerConfig,
    ) -> Heartbeat {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let (disk_used, disk_total) = disk_of(data_dir).unzip();
        let booted = status.slots.iter().find(|s| s.booted);
        let mut extra = serde_json::Map::new();
        extra.insert("committed".into(), status.committed.into());
        extra.insert(
            "link".into(),
            serde_json::to_value(&status.link).unwrap_or_default(),
        );
        if let Some(h) = &status.health {
            extra.insert("health".into(), serde_json::to_value(h).unwrap_or_default());
        }
        Heartbeat {
            cpu_percent: Some(f64::from(self.system.global_cpu_usage())),
            memory_used_bytes: Some(self.system.used_memory()),
            memory_total_bytes: Some(self.system.total_memory()),
            disk_used_bytes: disk_used,
            disk_total_bytes: disk_total,
            temperature_celsius: temperature(),
            uptime_secs: Some(System::uptime()),
            booted_slot: Some(status.booted_slot.name().to_owned()),
            primary_slot: status.primary_slot.map(|s| s.name().to_owned()),
            version: booted.and_then(|s| s.version.clone()),
            updater_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            link_class: server.link_class.clone(),
            site: server.site.clone(),
            time_zone: server.time_zone.clone(),
            security_floor: status.security_floor,
            extra,
        }
    }
}

/// (used, total) bytes of the filesystem holding `path`: the disk with the
/// longest mount point that is a prefix of it.
fn disk_of(path: &Path) -> Option<(u64, u64)> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let disks = Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| {
            (
                d.total_space().saturating_sub(d.available_space()),
                d.total_space(),
            )
        })
}

/// The hottest of `/sys/class/thermal/thermal_zone*/temp` (millidegrees).
fn temperature() -> Option<f64> {
    let zones = std::fs::read_dir("/sys/class/thermal").ok()?;
    zones
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| {
            let text = crate::store::read_limited(&e.path().join("temp"), 64).ok()?;
            let milli: f64 = String::from_utf8_lossy(&text).trim().parse().ok()?;
            Some(milli / 1000.0)
        })
        .reduce(f64::max)
}
