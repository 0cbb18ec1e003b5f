//! Where bundle bytes come from: a local file, or an HTTP(S) URL read with
//! Range requests through the link profile (rate limit, daily budget).
//!
//! * [`http`]: the HTTP(S) source (Range requests, resume, retries, TLS).
//! * [`link`]: the link profile in force (rate limit, daily budget).

mod http;
mod link;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kernex_protocol::reader::RangeRead;

use crate::error::{UpdateError, io_err};

pub use http::{FIRST_BACKOFF, HttpSource, MAX_ATTEMPTS, MAX_BACKOFF, tls_config};
pub use link::{DailyUsage, Link, utc_day};

/// Receives fetched bytes in order.
pub type Sink<'a> = kernex_protocol::reader::Sink<'a, UpdateError>;

/// A readable bundle: ranges of it ([`RangeRead`], the protocol's one
/// reader interface), with counts of what reading it cost.
pub trait Source: RangeRead<Error = UpdateError> + std::fmt::Debug + Send + Sync {
    /// The file path or URL, for messages.
    fn name(&self) -> &str;
    /// Bytes received so far (for HTTP, every body byte the server sent),
    /// by this source and every [`Source::fork`] of it.
    fn fetched_bytes(&self) -> u64;
    /// Requests (HTTP) or reads (file) made so far, forks included.
    fn requests(&self) -> u64;
    /// Whether the bytes come from local storage (a file, a USB stick)
    /// rather than over a network: reads, not downloads.
    fn is_local(&self) -> bool;
    /// Another reader of the same bundle for another thread: it shares
    /// the counts, the link profile (rate limit, budget) and the size
    /// learnt so far, so several ranges can be in flight at once.
    fn fork(&self) -> Result<Box<dyn Source>, UpdateError>;
}

/// What a source and its forks have read, shared between threads.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    fetched: AtomicU64,
    requests: AtomicU64,
}

impl Counts {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn fetched(&self, n: u64) {
        self.fetched.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A bundle the protocol's rules reject (read by
/// `kernex_protocol::reader`) is a rejected bundle.
impl From<kernex_protocol::bundle::BundleError> for UpdateError {
    fn from(e: kernex_protocol::bundle::BundleError) -> Self {
        UpdateError::Bundle(e.to_string())
    }
}

/// Opens `location`: `http://` or `https://` is a URL, anything else a path.
pub fn open(location: &str, link: Link) -> Result<Box<dyn Source>, UpdateError> {
    if location.starts_with("http://") || location.starts_with("https://") {
        Ok(Box::new(HttpSource::new(location, link)))
    } else {
        Ok(Box::new(FileSource::open(Path::new(location))?))
    }
}

/// A bundle file on local storage (or a USB stick). Not subject to the link
/// profile. Reads are positioned (`pread`), so forks share one open file.
#[derive(Debug)]
pub struct FileSource {
    path: Arc<PathBuf>,
    name: String,
    file: Arc<fs::File>,
    size: u64,
    counts: Arc<Counts>,
}

/// Bytes a file read hands on at a time.
const FILE_READ_BUF: usize = 1024 * 1024;

impl FileSource {
    /// Opens the file.
    pub fn open(path: &Path) -> Result<Self, UpdateError> {
        let file = fs::File::open(path).map_err(io_err("open the bundle", path))?;
        let size = file
            .metadata()
            .map_err(io_err("stat the bundle", path))?
            .len();
        Ok(Self {
            path: Arc::new(path.to_owned()),
            name: path.display().to_string(),
            file: Arc::new(file),
            size,
            counts: Arc::default(),
        })
    }

    fn read_at(&mut self, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<(), UpdateError> {
        self.counts.request();
        let mut left = len;
        let mut at = offset;
        let mut buf = vec![0u8; len.min(FILE_READ_BUF as u64) as usize];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buf[..n], at)
                .map_err(io_err("read the bundle", &self.path))?;
            self.counts.fetched(n as u64);
            sink(&buf[..n])?;
            left -= n as u64;
            at += n as u64;
        }
        Ok(())
    }
}

impl RangeRead for FileSource {
    type Error = UpdateError;

    fn known_size(&mut self) -> Result<Option<u64>, UpdateError> {
        Ok(Some(self.size))
    }

    fn read_into(&mut self, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<(), UpdateError> {
        if offset.saturating_add(len) > self.size {
            self.counts.request();
            return Err(UpdateError::Bundle(format!(
                "{} is truncated: {} bytes, needs at least {}",
                self.name,
                self.size,
                offset.saturating_add(len)
            )));
        }
        self.read_at(offset, len, sink)
    }

    fn read_start(&mut self, len: u64) -> Result<Vec<u8>, UpdateError> {
        let mut out = Vec::new();
        self.read_at(0, len.min(self.size), &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }
}

impl Source for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn fetched_bytes(&self) -> u64 {
        self.counts.fetched_bytes()
    }

    fn requests(&self) -> u64 {
        self.counts.requests()
    }

    fn is_local(&self) -> bool {
        true
    }

    fn fork(&self) -> Result<Box<dyn Source>, UpdateError> {
        Ok(Box::new(Self {
            path: self.path.clone(),
            name: self.name.clone(),
            file: self.file.clone(),
            size: self.size,
            counts: self.counts.clone(),
        }))
    }
}
