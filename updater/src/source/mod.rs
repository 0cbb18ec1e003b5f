//! Where bundle bytes come from: a local file, or an HTTP(S) URL read with
//! Range requests through the link profile (rate limit, daily budget).
//!
//! * [`http`]: the HTTP(S) source (Range requests, resume, retries, TLS).
//! * [`link`]: the link profile in force (rate limit, daily budget).

mod http;
mod link;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use kernex_protocol::reader::RangeRead;

use crate::error::{UpdateError, io_err};

pub use http::{FIRST_BACKOFF, HttpSource, MAX_ATTEMPTS, MAX_BACKOFF, tls_config};
pub use link::{DailyUsage, Link, utc_day};

/// Receives fetched bytes in order.
pub type Sink<'a> = kernex_protocol::reader::Sink<'a, UpdateError>;

/// A readable bundle: ranges of it ([`RangeRead`], the protocol's one
/// reader interface), with counts of what reading it cost.
pub trait Source: RangeRead<Error = UpdateError> + std::fmt::Debug {
    /// The file path or URL, for messages.
    fn name(&self) -> &str;
    /// Bytes received so far (for HTTP, every body byte the server sent).
    fn fetched_bytes(&self) -> u64;
    /// Requests made so far.
    fn requests(&self) -> u64;
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
/// profile.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    name: String,
    file: fs::File,
    size: u64,
    fetched: u64,
    requests: u64,
}

impl FileSource {
    /// Opens the file.
    pub fn open(path: &Path) -> Result<Self, UpdateError> {
        let file = fs::File::open(path).map_err(io_err("open the bundle", path))?;
        let size = file
            .metadata()
            .map_err(io_err("stat the bundle", path))?
            .len();
        Ok(Self {
            path: path.to_owned(),
            name: path.display().to_string(),
            file,
            size,
            fetched: 0,
            requests: 0,
        })
    }
}

impl FileSource {
    fn read_at(&mut self, offset: u64, len: u64, sink: &mut Sink<'_>) -> Result<(), UpdateError> {
        self.requests += 1;
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(io_err("seek in the bundle", &self.path))?;
        let mut left = len;
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.file
                .read_exact(&mut buf[..n])
                .map_err(io_err("read the bundle", &self.path))?;
            self.fetched += n as u64;
            sink(&buf[..n])?;
            left -= n as u64;
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
            self.requests += 1;
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
        self.fetched
    }

    fn requests(&self) -> u64 {
        self.requests
    }
}
