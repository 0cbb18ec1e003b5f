//! The control plane's device API over one keep-alive HTTP agent (ureq:
//! blocking, no async runtime on the device): one typed method per
//! endpoint, with the requests and answers of [`kernex_protocol::api`].

use std::time::Duration;

use kernex_protocol::api::{self, paths};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest response body read from the server.
pub const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;

/// Longest quote nonce accepted from a poll answer, hex characters (a
/// nonce is at most 64 bytes).
const MAX_NONCE_HEX: usize = 128;

/// How a call to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached or had a transient fault (transport
    /// error, 408, 429, 5xx, or 409 with `Retry-After`: the same
    /// `Idempotency-Key` is still being processed): try again later,
    /// nothing is lost.
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

impl ClientError {
    /// A 403 answering a request the credential is not the question of
    /// (enrollment, a TPM binding): the server refused it by policy and
    /// its detail says why (e.g. "EK certificate not issued by a trusted
    /// TPM vendor CA").
    pub fn as_policy_refusal(self) -> ClientError {
        match self {
            ClientError::Unauthorized { status: 403, body } => {
                ClientError::Rejected { status: 403, body }
            }
            other => other,
        }
    }
}

/// A poll's answer: the body and what its headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollAnswer {
    /// What to do; `None`: nothing.
    pub desired: Option<api::DesiredState>,
    /// A nonce (hex) to answer with a TPM quote ([`Client::attest_quote`]).
    pub nonce: Option<String>,
    /// The server's [`api::POLL_AFTER_HEADER`] hint (a rollout acts on
    /// this device): poll again after this long, if sooner than the
    /// interval.
    pub poll_after: Option<Duration>,
}

/// What an enrollment came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrollment {
    /// Enrolled: the credential.
    Enrolled(api::EnrollResponse),
    /// The device id is enrolled already and this request did not prove
    /// it is that device: an operator decides; no credential.
    Pending(api::EnrollPending),
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

    /// Enrolls with a factory token ([`paths::ENROLL`]): enrolled, or
    /// waiting for an operator (202: the device id is enrolled already and
    /// this key is not its key).
    pub fn enroll(&self, req: &api::EnrollRequest) -> Result<Enrollment, ClientError> {
        let (status, body) = self.post_status(None, paths::ENROLL, req)?;
        match status {
            202 => Ok(Enrollment::Pending(parse(&body)?)),
            200..=299 => Ok(Enrollment::Enrolled(parse(&body)?)),
            _ => Err(classify(status, &body)),
        }
    }

    /// A nonce to sign ([`paths::CHALLENGE`]).
    pub fn challenge(&self) -> Result<api::Challenge, ClientError> {
        parse(&self.post(None, paths::CHALLENGE, &serde_json::json!({}), None)?)
    }

    /// Trades a signed nonce for an access token ([`paths::AUTH`]).
    pub fn auth(&self, auth: &api::DeviceAuth) -> Result<api::AccessToken, ClientError> {
        parse(&self.post(None, paths::AUTH, auth, None)?)
    }

    /// Registers (or rotates) the device key ([`paths::KEY`]).
    pub fn register_key(
        &self,
        credential: &str,
        proof: &api::KeyProof,
    ) -> Result<api::AccessToken, ClientError> {
        parse(&self.post(Some(credential), paths::KEY, proof, None)?)
    }

    /// Polls for desired state ([`paths::POLL`]; `None` when there is
    /// nothing to do) and a quote nonce, when the server asks for one.
    pub fn poll(&self, credential: &str) -> Result<PollAnswer, ClientError> {
        let resp = self
            .agent
            .get(self.url(paths::POLL))
            .header("Authorization", format!("Bearer {credential}"))
            .call()
            .map_err(|e| ClientError::Offline(e.to_string()))?;
        // Anything longer than a nonce or not hex is ignored.
        let nonce = resp
            .headers()
            .get(api::NONCE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= MAX_NONCE_HEX && v.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned);
        let poll_after = resp
            .headers()
            .get(api::POLL_AFTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(api::parse_poll_after);
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

    /// Sends inventory ([`paths::HEARTBEAT`]).
    pub fn heartbeat(&self, credential: &str, hb: &api::Heartbeat) -> Result<(), ClientError> {
        self.post(Some(credential), paths::HEARTBEAT, hb, None)
            .map(drop)
    }

    /// Reports install progress or an outcome ([`paths::REPORT`]). With
    /// `idempotency_key`, a resend after a lost answer is not applied
    /// twice.
    pub fn report(
        &self,
        credential: &str,
        report: &api::Report,
        idempotency_key: Option<&str>,
    ) -> Result<(), ClientError> {
        self.post(Some(credential), paths::REPORT, report, idempotency_key)
            .map(drop)
    }

    /// Ships log lines ([`paths::LOGS`]).
    pub fn logs(
        &self,
        credential: &str,
        batch: &api::LogBatch,
        idempotency_key: Option<&str>,
    ) -> Result<(), ClientError> {
        self.post(Some(credential), paths::LOGS, batch, idempotency_key)
            .map(drop)
    }

    /// Binds this device's enrollment to its TPM ([`paths::TPM_BIND`]).
    pub fn bind_tpm(
        &self,
        credential: &str,
        binding: &api::TpmBinding,
    ) -> Result<api::TpmBindingAnswer, ClientError> {
        parse(&self.post(Some(credential), paths::TPM_BIND, binding, None)?)
    }

    /// Answers a credential-activation challenge ([`paths::ACTIVATE`]).
    pub fn activate(
        &self,
        credential: &str,
        answer: &api::ActivationAnswer,
    ) -> Result<api::Activated, ClientError> {
        parse(&self.post(Some(credential), paths::ACTIVATE, answer, None)?)
    }

    /// Answers a quote nonce ([`paths::ATTESTATION`]).
    pub fn attest_quote(
        &self,
        credential: &str,
        quote: &api::QuoteReport,
    ) -> Result<api::QuoteResult, ClientError> {
        parse(&self.post(Some(credential), paths::ATTESTATION, quote, None)?)
    }

    /// POSTs `body` as JSON to `path`; the status and answer body.
    fn post_status<T: Serialize + ?Sized>(
        &self,
        credential: Option<&str>,
        path: &str,
        body: &T,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let json = serde_json::to_vec(body)
            .map_err(|e| ClientError::BadAnswer(format!("unable to encode the request: {e}")))?;
        let mut req = self
            .agent
            .post(self.url(path))
            .header("Content-Type", "application/json");
        if let Some(c) = credential {
            req = req.header("Authorization", format!("Bearer {c}"));
        }
        let resp = req
            .send(&json[..])
            .map_err(|e| ClientError::Offline(e.to_string()))?;
        read(resp)
    }

    /// POSTs `body` as JSON to `path`; the answer body on 2xx.
    fn post<T: Serialize + ?Sized>(
        &self,
        credential: Option<&str>,
        path: &str,
        body: &T,
        idempotency_key: Option<&str>,
    ) -> Result<Vec<u8>, ClientError> {
        // Serialising the api types cannot fail (no maps with non-string
        // keys, no failing serialisers); a failure is still an error.
        let json = serde_json::to_vec(body)
            .map_err(|e| ClientError::BadAnswer(format!("unable to encode the request: {e}")))?;
        let mut req = self
            .agent
            .post(self.url(path))
            .header("Content-Type", "application/json");
        if let Some(c) = credential {
            req = req.header("Authorization", format!("Bearer {c}"));
        }
        if let Some(k) = idempotency_key {
            req = req.header(api::IDEMPOTENCY_KEY_HEADER, k);
        }
        let resp = req
            .send(&json[..])
            .map_err(|e| ClientError::Offline(e.to_string()))?;
        let retry_after = resp.headers().contains_key("retry-after");
        let (status, body) = read(resp)?;
        if (200..300).contains(&status) {
            Ok(body)
        } else if status == 409 && retry_after {
            // The server is still working on this key (an earlier attempt
            // whose answer was lost): not a verdict on the message.
            let body: String = String::from_utf8_lossy(&body).chars().take(500).collect();
            Err(ClientError::Offline(format!(
                "HTTP 409 (in progress): {body}"
            )))
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
