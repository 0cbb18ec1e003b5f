//! A bundle behind an HTTP(S) URL, read with Range requests through the
//! link profile: a dropped connection resumes where it stopped, failures
//! are retried with backoff, the first read learns the bundle's size.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kernex_protocol::reader::RangeRead;

use super::{Counts, Link, Sink, Source};
use crate::error::UpdateError;

/// Attempts per range before giving up (the count restarts whenever a
/// connection delivered data).
pub const MAX_ATTEMPTS: u32 = 8;
/// First retry delay; doubles on each failed attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Idle keep-alive connections kept per host: one per range in flight.
const IDLE_CONNECTIONS: usize = 16;

/// A bundle behind an HTTP(S) URL, read with single-range `Range`
/// requests (what S3 and CDNs serve) over one keep-alive agent. Its
/// [`Source::fork`]s share the agent's connection pool, the link profile
/// and the counts, each with a request of its own in flight.
#[derive(Debug)]
pub struct HttpSource {
    url: String,
    agent: ureq::Agent,
    link: Arc<Mutex<Link>>,
    total: Option<u64>,
    counts: Arc<Counts>,
    warned_no_range: Arc<AtomicBool>,
    bearer: Option<String>,
}

enum Attempt {
    /// The sink failed: stop.
    Fatal(UpdateError),
    /// Worth retrying.
    Retry(String),
}

/// Largest CA bundle read.
const MAX_CA_FILE: u64 = 1024 * 1024;

/// The TLS settings of every HTTPS connection the updater makes: the
/// system's trust store, or only the CA certificates in `ca` (PEM) when a
/// private CA is pinned (`[server] ca`).
pub fn tls_config(ca: Option<&Path>) -> Result<ureq::tls::TlsConfig, UpdateError> {
    let builder = ureq::tls::TlsConfig::builder().provider(ureq::tls::TlsProvider::NativeTls);
    let Some(ca) = ca else {
        return Ok(builder.build());
    };
    let bad = |reason: String| UpdateError::Config {
        path: ca.to_owned(),
        reason,
    };
    let pem = crate::store::read_limited(ca, MAX_CA_FILE)
        .map_err(|e| bad(format!("unable to read the CA certificates: {e}")))?;
    let certs = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c.to_owned())),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in the file".into()));
    }
    Ok(builder
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(certs)))
        .build())
}

impl HttpSource {
    /// Over `url`, trusting the system's CAs.
    pub fn new(url: &str, link: Link) -> Self {
        Self::with_tls(
            url,
            link,
            ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::NativeTls)
                .build(),
        )
    }

    /// Over `url`, with these TLS settings ([`tls_config`]).
    pub fn with_tls(url: &str, link: Link, tls: ureq::tls::TlsConfig) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(30)))
            .max_idle_connections_per_host(IDLE_CONNECTIONS)
            .tls_config(tls)
            .build();
        Self {
            url: url.to_owned(),
            agent: ureq::Agent::new_with_config(config),
            link: Arc::new(Mutex::new(link)),
            total: None,
            counts: Arc::default(),
            warned_no_range: Arc::default(),
            bearer: None,
        }
    }

    /// Another file on the same server (a server-made patch beside the
    /// bundle): its own URL, size and counts, but this source's connection
    /// pool, credential and link profile. One link, so the rate limit holds
    /// for both together and every byte of either counts against the one
    /// daily budget (two links would each keep a count of their own, and
    /// the last to save would drop the other's bytes).
    pub fn sibling(&self, url: &str) -> Self {
        Self {
            url: url.to_owned(),
            agent: self.agent.clone(),
            link: self.link.clone(),
            total: None,
            counts: Arc::default(),
            warned_no_range: Arc::default(),
            bearer: self.bearer.clone(),
        }
    }

    /// The link profile, shared with the forks.
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `Authorization: Bearer <credential>` with every request (the
    /// control plane's device download endpoint).
    pub fn with_bearer(mut self, credential: &str) -> Self {
        self.bearer = Some(credential.to_owned());
        self
    }

    fn download_err(&self, reason: String) -> UpdateError {
        UpdateError::Download {
            url: self.url.clone(),
            reason,
        }
    }

    /// One request for `pos..end`; advances `pos` by what reached the sink.
    /// Once the response says how large the bundle is, `end` is cut to
    /// that size when `at_most` (the first read of a bundle that may be
    /// smaller), and a range past it is an error otherwise.
    fn attempt(
        &mut self,
        pos: &mut u64,
        end: &mut u64,
        at_most: bool,
        sink: &mut Sink<'_>,
    ) -> Result<(), Attempt> {
        self.counts.request();
        let mut request = self
            .agent
            .get(&self.url)
            .header("Range", format!("bytes={}-{}", *pos, *end - 1));
        if let Some(credential) = &self.bearer {
            request = request.header("Authorization", format!("Bearer {credential}"));
        }
        let mut resp = request.call().map_err(|e| Attempt::Retry(e.to_string()))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let mut skip = 0u64;
        match status {
            206 => {
                let range = header("content-range").unwrap_or_default();
                let (start, total) = parse_content_range(&range).ok_or_else(|| {
                    Attempt::Fatal(self.download_err(format!(
                        "206 response with an unusable Content-Range {range:?}"
                    )))
                })?;
                if start != *pos {
                    return Err(Attempt::Fatal(self.download_err(format!(
                        "asked for bytes from {}, server sent from {start}",
                        *pos
                    ))));
                }
                self.total = Some(total);
            }
            200 => {
                // No Range support: the whole body comes; skip to `pos`.
                if !self.warned_no_range.swap(true, Ordering::Relaxed) {
                    tracing::warn!(url = %self.url, "server ignores Range requests: every request downloads from the start of the bundle");
                }
                if let Some(len) = header("content-length").and_then(|l| l.parse().ok()) {
                    self.total = Some(len);
                }
                skip = *pos;
            }
            416 => {
                return Err(Attempt::Fatal(self.download_err(format!(
                    "the server has no bytes {}..{} (416): the bundle is truncated",
                    *pos, *end
                ))));
            }
            s if (500..600).contains(&s) || s == 408 || s == 429 => {
                return Err(Attempt::Retry(format!("HTTP {s}")));
            }
            s => {
                return Err(Attempt::Fatal(
                    self.download_err(format!("HTTP status {s}")),
                ));
            }
        }
        if let Some(total) = self.total {
            if at_most {
                *end = (*end).min(total);
            } else if *end > total {
                return Err(Attempt::Fatal(UpdateError::Bundle(format!(
                    "{} is truncated: {total} bytes, needs at least {}",
                    self.url, *end
                ))));
            }
        }
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 64 * 1024];
        while *pos < *end {
            let want = if skip > 0 {
                skip.min(buf.len() as u64)
            } else {
                (*end - *pos).min(buf.len() as u64)
            } as usize;
            let n = match reader.read(&mut buf[..want]) {
                Ok(0) => return Err(Attempt::Retry("connection closed early".into())),
                Ok(n) => n,
                Err(e) => return Err(Attempt::Retry(e.to_string())),
            };
            self.counts.fetched(n as u64);
            self.link().take(n as u64).map_err(Attempt::Fatal)?;
            if skip > 0 {
                skip -= n as u64;
                continue;
            }
            sink(&buf[..n]).map_err(Attempt::Fatal)?;
            *pos += n as u64;
        }
        if status == 206 {
            // Read the (empty) rest so the connection goes back to the pool.
            let _ = reader.read(&mut buf[..1]);
        }
        Ok(())
    }
}

/// `bytes START-END/TOTAL` → (START, TOTAL).
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

impl HttpSource {
    /// Streams `offset..offset + len` (cut at the bundle's end when
    /// `at_most`), resuming a dropped connection where it stopped.
    fn fetch(
        &mut self,
        offset: u64,
        len: u64,
        at_most: bool,
        sink: &mut Sink<'_>,
    ) -> Result<(), UpdateError> {
        let mut end = offset.saturating_add(len);
        if let Some(total) = self.total {
            if at_most {
                end = end.min(total);
            } else if end > total {
                return Err(UpdateError::Bundle(format!(
                    "{} is truncated: {total} bytes, needs at least {end}",
                    self.url
                )));
            }
        }
        let mut pos = offset;
        let mut failures = 0u32;
        while pos < end {
            self.link().check()?;
            let before = pos;
            match self.attempt(&mut pos, &mut end, at_most, sink) {
                Ok(()) => {}
                Err(Attempt::Fatal(e)) => {
                    self.link().save()?;
                    return Err(e);
                }
                Err(Attempt::Retry(reason)) => {
                    if pos > before {
                        failures = 0;
                    }
                    failures += 1;
                    if failures >= MAX_ATTEMPTS {
                        self.link().save()?;
                        return Err(self.download_err(format!(
                            "{reason} (gave up after {failures} attempts at byte {pos})"
                        )));
                    }
                    let delay = FIRST_BACKOFF
                        .saturating_mul(1 << (failures - 1).min(16))
                        .min(MAX_BACKOFF);
                    tracing::info!(url = %self.url, at = pos, %reason, ?delay, "retrying");
                    std::thread::sleep(delay);
                }
            }
        }
        // The usage is saved as it grows (`Link::take`) and when the last
        // fork drops the link.
        Ok(())
    }
}

impl RangeRead for HttpSource {
    type Error = UpdateError;

    fn known_size(&mut self) -> Result<Option<u64>, UpdateError> {
        Ok(self.total)
    }

    fn read_into(&mut self, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<(), UpdateError> {
        self.fetch(offset, len, false, sink)
    }

    fn read_start(&mut self, len: u64) -> Result<Vec<u8>, UpdateError> {
        let mut out = Vec::new();
        self.fetch(0, len, true, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }
}

impl Source for HttpSource {
    fn name(&self) -> &str {
        &self.url
    }

    fn fetched_bytes(&self) -> u64 {
        self.counts.fetched_bytes()
    }

    fn requests(&self) -> u64 {
        self.counts.requests()
    }

    fn is_local(&self) -> bool {
        false
    }

    fn fork(&self) -> Result<Box<dyn Source>, UpdateError> {
        Ok(Box::new(Self {
            url: self.url.clone(),
            agent: self.agent.clone(),
            link: self.link.clone(),
            total: self.total,
            counts: self.counts.clone(),
            warned_no_range: self.warned_no_range.clone(),
            bearer: self.bearer.clone(),
        }))
    }
}
