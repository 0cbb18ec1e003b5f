//! The `[limits]` table of the server configuration: how long enrollment
//! tokens live, how fast they may be used, and how much one device may
//! store. Each key is documented in `server/README.md` ("Limits") and in
//! `server.example.toml`.

use serde::Deserialize;

/// Enrollment and per-device limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Limits {
    /// The expiry the web UI suggests for a new enrollment token, days.
    pub enrollment_token_default_ttl_days: u32,
    /// The latest expiry a new enrollment token may have, days from now;
    /// tokens made before expiries were required expire this long after
    /// they were made.
    pub enrollment_token_max_ttl_days: u32,
    /// Enrollments per minute with one token (0: unlimited).
    pub enrollments_per_token_per_minute: u32,
    /// Enrollments per minute from one source address (0: unlimited).
    pub enrollments_per_address_per_minute: u32,
    /// Largest heartbeat `extra` object, bytes of JSON.
    pub max_heartbeat_extra_bytes: usize,
    /// Largest `hardware_metadata` object at enrollment, bytes of JSON.
    pub max_hardware_metadata_bytes: usize,
    /// A log line's time is clamped to this many seconds around the
    /// server's clock.
    pub log_clock_skew_secs: u64,
    /// Log lines kept per device: a batch that would go over it makes room
    /// by deleting the device's oldest lines; a batch alone over it is
    /// refused (413).
    pub device_log_max_lines: u64,
    /// Bytes of log messages kept per device, as `device-log-max-lines`.
    pub device_log_max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            enrollment_token_default_ttl_days: 30,
            enrollment_token_max_ttl_days: 365,
            enrollments_per_token_per_minute: 60,
            enrollments_per_address_per_minute: 30,
            max_heartbeat_extra_bytes: 4096,
            max_hardware_metadata_bytes: 4096,
            log_clock_skew_secs: 86_400,
            device_log_max_lines: 100_000,
            device_log_max_bytes: 16 << 20,
        }
    }
}

impl Limits {
    /// [`Self::enrollment_token_max_ttl_days`] in ms.
    pub fn enrollment_token_max_ttl_ms(&self) -> i64 {
        i64::from(self.enrollment_token_max_ttl_days) * 86_400_000
    }

    /// [`Self::log_clock_skew_secs`] in ms.
    pub fn log_clock_skew_ms(&self) -> i64 {
        i64::try_from(self.log_clock_skew_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }
}
