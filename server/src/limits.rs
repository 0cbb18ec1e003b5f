//! The `[limits]` table of the server configuration: how long enrollment
//! tokens live, how fast they may be used, how much one device may store,
//! and what one connection, one request and one address may hold. Each key is documented in `server/README.md` ("Limits") and in
//! `server.example.toml`.

use serde::Deserialize;

/// Enrollment, per-device, connection and request limits.
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
    /// A request's header must arrive within this many seconds of the
    /// connection (or the previous response); also how long an idle
    /// keep-alive connection is kept.
    pub header_read_timeout_secs: u64,
    /// A connection with no byte read or written for this many seconds is
    /// closed (a stalled body, a client that stopped reading).
    pub idle_timeout_secs: u64,
    /// A handler must answer within this many seconds (503 otherwise);
    /// bundle uploads are exempt (the idle timeout bounds them).
    pub request_timeout_secs: u64,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Connections open at once from one address; more are closed at once.
    pub max_connections_per_address: usize,
    /// Requests per minute one address may make to the unauthenticated
    /// routes (login, enroll, activate) (0: unlimited).
    pub unauthenticated_per_address_per_minute: u32,
    /// Reverse proxies whose `X-Forwarded-For` is believed: a request from
    /// one of them is counted against the nearest hop that is not.
    pub trusted_proxies: Vec<std::net::IpAddr>,
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
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            request_timeout_secs: 60,
            max_connections: 4096,
            max_connections_per_address: 128,
            unauthenticated_per_address_per_minute: 120,
            trusted_proxies: Vec::new(),
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
