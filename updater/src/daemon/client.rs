//! The control plane's device API over one keep-alive HTTP agent (ureq:
//! blocking, no async runtime on the device).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest response body read from the server.
pub const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;

/// How a call to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or had a transient fault (transport
    /// error, 408, 429, 5xx): try again later, nothing is lost.
    #[error("server unreachable: {0}")]
    Offline(String),
    /// The credential was refused (401) or the device is revoked (403).
    #[error("the server refused the device credential (HTTP {status}): {body}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// The server's JSON error.
        body: String,
    },
    /// The server rejected the request itself (other 4xx): sending it again
    /// will not help.
    #[error("the server rejected the request (HTTP {status}): {body}")]
    Rejected {
        /// Status.
        status: u16,
        /// The server's JSON error.
        body: String,
    },
    /// The server answered 2xx with a body this updater cannot read.
    #[error("unreadable answer from the server: {0}")]
    BadAnswer(String),
}

/// `POST /api/v1/device/enroll`.
#[derive(Debug, Serialize)]
pub struct EnrollRequest<'a> {
    /// Factory enrollment token.
    pub enrollment_token: &'a str,
    /// This device's id (serial, hostname).
    pub device_id: &'a str,
    /// Hardware class (`compatible`).
    pub hardware_class: &'a str,
    /// Facts about the hardware.
    pub hardware_metadata: serde_json::Map<String, serde_json::Value>,
    /// Extra tags.
    pub tags: &'a [String],
    /// The TPM identity (`kernex_attest::TpmIdentity` as JSON), when the
    /// device has a TPM configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<serde_json::Value>,
    /// The PCR the booted slot is measured into.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm_slot_pcr: Option<u8>,
}

/// The enrollment answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrolled {
    /// The server's id for this device.
    pub id: String,
    /// The device credential.
    pub credential: String,
    /// With a TPM identity: the credential-activation challenge
    /// (`kernex_attest::Activation` as JSON).
    #[serde(default)]
    pub activation: Option<serde_json::Value>,
}

/// The header of a poll answer carrying a quote nonce (hex).
pub const NONCE_HEADER: &str = "kernex-attestation-nonce";

/// A poll's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollAnswer {
    /// What to do; `None`: nothing.
    pub desired: Option<Desired>,
    /// A nonce to answer with a TPM quote at `POST /device/attestation`.
    pub nonce: Option<String>,
    /// The server's `Kernex-Poll-After` hint (a rollout acts on this
    /// device): poll again after this long, if sooner than the interval.
    pub poll_after: Option<Duration>,
}

/// The poll hint header.
pub const POLL_AFTER_HEADER: &str = "kernex-poll-after";

/// A `Kernex-Poll-After` value: whole seconds, 1 to 86400; anything else
/// is ignored.
pub fn parse_poll_after(value: &str) -> Option<Duration> {
    let secs: u64 = value.trim().parse().ok()?;
    (1..=86_400)
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

/// A download window assigned by the rollout scheduler (server clock,
/// Unix milliseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadWindow {
    /// Start no earlier than this.
    pub not_before_ms: i64,
    /// Start no later than this.
    pub not_after_ms: i64,
}

/// What the server wants this device to do (`GET /api/v1/device/poll`).
/// Unknown fields are ignored: newer servers may say more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// Release id.
    pub release_id: String,
    /// Release version.
    pub version: String,
    /// Bundle size.
    #[serde(default)]
    pub size: i64,
    /// Bundle SHA-256.
    #[serde(default)]
    pub sha256: String,
    /// Bundle URL (absolute, or relative to the server URL).
    pub url: String,
    /// `install` (default) or `rollback` (boot the other slot, which holds
    /// `version`; no download).
    #[serde(default = "default_action")]
    pub action: String,
    /// The rollout this belongs to.
    #[serde(default)]
    pub rollout_id: Option<String>,
    /// When downloading may start.
    #[serde(default)]
    pub download_window: Option<DownloadWindow>,
    /// Poll again after this many seconds.
    #[serde(default)]
    pub poll_after_secs: Option<u64>,
}

fn default_action() -> String {
    "install".into()
}

/// The device API at `base` (e.g. `http://127.0.0.1:8080`).
#[derive(Debug)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// Over `base`, with these TLS settings
    /// ([`crate::source::tls_config`]).
    pub fn new(base: &str, tls: ureq::tls::TlsConfig) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_global(Some(Duration::from_secs(60)))
            .tls_config(tls)
            .build();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            agent: ureq::Agent::new_with_config(config),
        }
    }

    /// `path` (or an absolute URL) made absolute.
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}/{}", self.base, path.trim_start_matches('/'))
        }
    }

    /// Enrolls with a factory token.
    pub fn enroll(&self, req: &EnrollRequest<'_>) -> Result<Enrolled, ClientError> {
        let body = self.post(None, "/api/v1/device/enroll", req, None)?;
        parse(&body)
    }

    /// Polls for desired state (`None` when there is nothing to do) and a
    /// quote nonce, when the server asks for one.
    pub fn poll(&self, credential: &str) -> Result<PollAnswer, ClientError> {
        let resp = self
            .agent
            .get(self.url("/api/v1/device/poll"))
            .header("Authorization", format!("Bearer {credential}"))
            .call()
            .map_err(|e| ClientError::Offline(e.to_string()))?;
        // A nonce is at most 64 bytes: anything longer or not hex is ignored.
        let nonce = resp
            .headers()
            .get(NONCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 128 && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned);
        let poll_after = resp
            .headers()
            .get(POLL_AFTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_poll_after);
        let (status, body) = read(resp)?;
        let desired = match status {
            204 => None,
            200 => Some(parse(&body)?),
            _ => return Err(classify(status, &body)),
        };
        Ok(PollAnswer {
            desired,
            nonce,
            poll_after,
        })
    }

    /// POSTs JSON to `path`; the answer body on 2xx.
    pub fn post<T: Serialize + ?Sized>(
        &self,
        credential: Option<&str>,
        path: &str,
        body: &T,
        idempotency_key: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        self.post_raw(credential, path, &json, idempotency_key)
    }

    /// POSTs JSON bytes to `path`; the answer body on 2xx.
    pub fn post_raw(
        &self,
        credential: Option<&str>,
        path: &str,
        json: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut req = self
            .agent
            .post(self.url(path))
            .header("Content-Type", "application/json");
        if let Some(c) = credential {
            req = req.header("Authorization", format!("Bearer {c}"));
        }
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let resp = req
            .send(json)
            .map_err(|e| ClientError::Offline(e.to_string()))?;
        let (status, body) = read(resp)?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(classify(status, &body))
        }
    }
}

fn read(mut resp: ureq::http::Response<ureq::Body>) -> Result<(u16, Vec<u8>), ClientError> {
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE_BYTES)
        .read_to_vec()
        .map_err(|e| ClientError::Offline(format!("reading the answer: {e}")))?;
    Ok((status, body))
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::BadAnswer(e.to_string()))
}

fn classify(status: u16, body: &[u8]) -> ClientError {
    let body: String = String::from_utf8_lossy(body).chars().take(500).collect();
    match status {
        401 | 403 => ClientError::Unauthorized { status, body },
        408 | 429 | 500..=599 => ClientError::Offline(format!("HTTP {status}: {body}")),
        _ => ClientError::Rejected { status, body },
    }
}

#[cfg(test)]
mod poll_hint_tests {
    use super::*;

    #[test]
    fn poll_after_takes_whole_seconds_in_range() {
        assert_eq!(parse_poll_after("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_poll_after(" 1 "), Some(Duration::from_secs(1)));
        assert_eq!(parse_poll_after("86400"), Some(Duration::from_secs(86_400)));
        for bad in [
            "0",
            "-5",
            "1.5",
            "",
            "ten",
            "86401",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_poll_after(bad), None, "{bad:?}");
        }
    }
}
