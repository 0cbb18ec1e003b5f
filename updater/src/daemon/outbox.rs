//! Reports and log batches waiting for the server, on disk: one file per
//! message in `<data-dir>/outbox/`, named by a sequence number, delivered
//! oldest first. A device that is offline for hours keeps what it has to
//! say and delivers it in order when it is back; a power cut loses nothing
//! that was queued (each file is written atomically).
//!
//! A file holds one [`Message`]: an [`Outgoing`] report or log batch (the
//! [`kernex_protocol::api`] types), its idempotency key and when it was
//! queued. Files an older updater queued (`path` and an untyped JSON
//! `body`, before the wire types had one owner) are read too, so a device
//! upgraded while offline still delivers them; a body that is not a valid
//! report or log batch is set aside, as the server would have rejected it.

use std::fs;
use std::path::{Path, PathBuf};

use kernex_protocol::api::{self, paths};
use serde::{Deserialize, Serialize};

use super::client::{Client, ClientError};
use crate::error::{UpdateError, io_err};
use crate::store::{now, read_limited, remove, write_atomically};

/// Most messages kept; when full, the oldest log batch (else the oldest
/// message) is dropped to make room.
pub const MAX_MESSAGES: usize = 2000;
/// Largest message file read back.
pub const MAX_MESSAGE_BYTES: u64 = 2 * 1024 * 1024;
/// Rejected messages kept for inspection.
pub const MAX_REJECTED: usize = 50;

/// What the device has to say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outgoing {
    /// Install progress or outcome ([`paths::REPORT`]).
    Report(api::Report),
    /// Log lines ([`paths::LOGS`]).
    Logs(api::LogBatch),
}

impl From<api::Report> for Outgoing {
    fn from(r: api::Report) -> Self {
        Self::Report(r)
    }
}

impl From<api::LogBatch> for Outgoing {
    fn from(b: api::LogBatch) -> Self {
        Self::Logs(b)
    }
}

impl Outgoing {
    fn send(&self, client: &Client, credential: &str, key: &str) -> Result<(), ClientError> {
        match self {
            Self::Report(r) => client.report(credential, r, Some(key)),
            Self::Logs(b) => client.logs(credential, b, Some(key)),
        }
    }
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Message {
    /// Sent as the `Idempotency-Key`: a resend after a lost answer is not
    /// applied twice.
    pub key: String,
    /// Unix time queued.
    pub queued_at: u64,
    /// The report or log batch.
    pub message: Outgoing,
}

/// A message as updaters before the typed outbox queued it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct LegacyMessage {
    /// Device API path: [`paths::REPORT`] or [`paths::LOGS`].
    path: String,
    key: String,
    queued_at: u64,
    body: serde_json::Value,
}

impl TryFrom<LegacyMessage> for Message {
    type Error = String;

    fn try_from(old: LegacyMessage) -> Result<Self, String> {
        let message = match old.path.as_str() {
            paths::REPORT => serde_json::from_value(old.body)
                .map(Outgoing::Report)
                .map_err(|e| format!("queued report: {e}"))?,
            paths::LOGS => serde_json::from_value(old.body)
                .map(Outgoing::Logs)
                .map_err(|e| format!("queued log batch: {e}"))?,
            other => return Err(format!("queued for an unknown path {other:?}")),
        };
        Ok(Message {
            key: old.key,
            queued_at: old.queued_at,
            message,
        })
    }
}

/// A message file: this format or the one before.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OnDisk {
    Typed(Message),
    Legacy(LegacyMessage),
}

/// Reads a message file's bytes.
fn decode(bytes: &[u8]) -> Result<Message, String> {
    match serde_json::from_slice::<OnDisk>(bytes) {
        Ok(OnDisk::Typed(m)) => Ok(m),
        Ok(OnDisk::Legacy(old)) => Message::try_from(old),
        // Untagged errors say nothing: name the new format's complaint.
        Err(_) => Err(serde_json::from_slice::<Message>(bytes)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "not a queued message".into())),
    }
}

/// What a delivery run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Messages the server took.
    pub sent: usize,
    /// Messages the server rejected (moved aside).
    pub rejected: usize,
    /// Messages still queued.
    pub left: usize,
}

/// The queue.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    next: u64,
    /// Random per-process prefix of idempotency keys.
    prefix: String,
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (t >> ((i % 16) * 8)) as u8 ^ std::process::id() as u8;
        }
    }
    hex::encode(bytes)
}

impl Outbox {
    /// Opens (creating) the queue under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, UpdateError> {
        let dir = data_dir.join(kernex_device::layout::OUTBOX);
        fs::create_dir_all(dir.join("rejected")).map_err(io_err("create", &dir))?;
        let next = Self::sequence(&dir)?
            .last()
            .map(|(n, _)| n + 1)
            .unwrap_or(1);
        Ok(Self {
            dir,
            next,
            prefix: random_hex(8),
        })
    }

    /// The queued files, oldest first.
    fn sequence(dir: &Path) -> Result<Vec<(u64, PathBuf)>, UpdateError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            out.push((seq, entry.path()));
        }
        out.sort();
        Ok(out)
    }

    /// Messages waiting.
    pub fn len(&self) -> Result<usize, UpdateError> {
        Ok(Self::sequence(&self.dir)?.len())
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> Result<bool, UpdateError> {
        Ok(self.len()? == 0)
    }

    /// Queues a report or log batch.
    pub fn push(&mut self, message: impl Into<Outgoing>) -> Result<(), UpdateError> {
        let queued = Self::sequence(&self.dir)?;
        if queued.len() >= MAX_MESSAGES {
            let victim = queued
                .iter()
                .find(|(_, p)| {
                    self.load(p)
                        .is_ok_and(|m| matches!(m.message, Outgoing::Logs(_)))
                })
                .or(queued.first());
            if let Some((_, p)) = victim {
                tracing::warn!(file = %p.display(), "outbox full: dropping the oldest message");
                remove(p)?;
            }
        }
        let seq = self.next;
        self.next += 1;
        let message = Message {
            key: format!("{}-{seq}", self.prefix),
            queued_at: now(),
            message: message.into(),
        };
        let bytes = serde_json::to_vec(&message).map_err(|e| UpdateError::State {
            path: self.dir.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&self.dir.join(format!("{seq:016}.json")), &bytes)
    }

    fn load(&self, path: &Path) -> Result<Message, UpdateError> {
        let bytes = read_limited(path, MAX_MESSAGE_BYTES)?;
        decode(&bytes).map_err(|reason| UpdateError::State {
            path: path.to_owned(),
            reason,
        })
    }

    fn set_aside(&self, path: &Path, why: &str) -> Result<(), UpdateError> {
        tracing::warn!(file = %path.display(), %why, "outbox: message set aside, not sent again");
        let rejected = self.dir.join("rejected");
        if let Some(name) = path.file_name() {
            let to = rejected.join(name);
            fs::rename(path, &to).map_err(io_err("move", path))?;
        }
        let old = Self::sequence(&rejected)?;
        if old.len() > MAX_REJECTED {
            for (_, p) in &old[..old.len() - MAX_REJECTED] {
                remove(p)?;
            }
        }
        Ok(())
    }

    /// Sends what is queued, oldest first, until the server is unreachable
    /// or refuses the credential (then `Err`, and the rest stays queued). A
    /// message the server rejects as such (4xx) is set aside so it cannot
    /// block the queue forever; a 409 "still in progress" (with
    /// `Retry-After`) is transient: the message stays and is sent again
    /// on the next run.
    pub fn deliver(&self, client: &Client, credential: &str) -> Result<Delivered, ClientError> {
        let mut done = Delivered::default();
        let queued = Self::sequence(&self.dir).map_err(|e| ClientError::Offline(e.to_string()))?;
        done.left = queued.len();
        for (_, path) in queued {
            let message = match self.load(&path) {
                Ok(m) => m,
                Err(e) => {
                    let _ = self.set_aside(&path, &e.to_string());
                    done.rejected += 1;
                    done.left -= 1;
                    continue;
                }
            };
            match message.message.send(client, credential, &message.key) {
                Ok(()) => {
                    remove(&path).map_err(|e| ClientError::Offline(e.to_string()))?;
                    done.sent += 1;
                }
                Err(ClientError::Rejected { status, body }) => {
                    let _ = self.set_aside(&path, &format!("HTTP {status}: {body}"));
                    done.rejected += 1;
                }
                Err(e) => return Err(e),
            }
            done.left -= 1;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// Pins the file format: a report as this updater queues it.
    #[test]
    fn a_queued_report_reads_back() {
        let text = r#"{"key":"ab12-7","queued-at":1700000000,"message":{"report":{
            "state":"committed","release_id":"r1","version":"1.0.1","booted_slot":"B","reason":null}}}"#;
        let m = decode(text.as_bytes()).unwrap();
        let mut report = api::Report::new(api::ReportState::Committed);
        report.release_id = Some("r1".into());
        report.version = Some("1.0.1".into());
        report.booted_slot = Some("B".into());
        assert_eq!(m.message, Outgoing::Report(report));
        assert_eq!((m.key.as_str(), m.queued_at), ("ab12-7", 1_700_000_000));
        let again = serde_json::to_vec(&m).unwrap();
        assert_eq!(decode(&again).unwrap(), m);
    }

    /// Files the updater queued before the typed outbox (path and body)
    /// are delivered by this one.
    #[test]
    fn files_of_the_old_format_are_read() {
        let report = r#"{"path":"/api/v1/device/report","key":"k-1","queued-at":5,
            "body":{"state":"reverted","reason":"probe failed","booted_slot":"A"}}"#;
        let m = decode(report.as_bytes()).unwrap();
        let Outgoing::Report(r) = &m.message else {
            panic!("{m:?}")
        };
        assert_eq!(r.state, api::ReportState::Reverted);
        assert_eq!(r.reason.as_deref(), Some("probe failed"));
        assert_eq!(m.key, "k-1");

        let logs = r#"{"path":"/api/v1/device/logs","key":"k-2","queued-at":6,
            "body":{"entries":[{"level":"warn","message":"hot","at":12}]}}"#;
        let m = decode(logs.as_bytes()).unwrap();
        assert_eq!(
            m.message,
            Outgoing::Logs(api::LogBatch {
                entries: vec![api::LogLine {
                    level: api::LogLevel::Warn,
                    message: "hot".into(),
                    at: Some(12),
                }]
            })
        );
    }

    /// A one-connection-per-answer HTTP server on 127.0.0.1 that answers
    /// with `answers` in turn; returns its URL and the requests' heads.
    fn server(answers: Vec<&'static str>) -> (String, std::sync::mpsc::Receiver<String>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for answer in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                tx.send(head).unwrap();
                let mut stream = stream;
                stream.write_all(answer.as_bytes()).unwrap();
            }
        });
        (url, rx)
    }

    /// A 409 "in progress" (the server still works on an earlier attempt
    /// with the same key) leaves the report queued; it is sent again, with
    /// the same key, on the next run.
    #[test]
    fn a_409_in_progress_is_retried_later_not_dropped() {
        let in_progress = "HTTP/1.1 409 Conflict\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 22\r\nConnection: close\r\n\r\n{\"error\":\"conflict\"}  ";
        let accepted = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        let (url, heads) = server(vec![in_progress, accepted]);
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        outbox
            .push(api::Report::new(api::ReportState::Committed))
            .unwrap();
        let client = Client::new(&url, ureq::tls::TlsConfig::default());

        let first = outbox.deliver(&client, "kxd_x");
        assert!(matches!(first, Err(ClientError::Offline(_))), "{first:?}");
        assert_eq!(outbox.len().unwrap(), 1, "the report stays queued");
        let Ok(rejected) = fs::read_dir(
            dir.path()
                .join(kernex_device::layout::OUTBOX)
                .join("rejected"),
        ) else {
            panic!("no rejected directory")
        };
        assert_eq!(rejected.count(), 0, "nothing set aside");

        let second = outbox.deliver(&client, "kxd_x").unwrap();
        assert_eq!((second.sent, second.left), (1, 0));
        let key = |head: String| {
            head.lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("idempotency-key:")
                        .map(|v| v.trim().to_string())
                })
                .unwrap()
        };
        let (a, b) = (key(heads.recv().unwrap()), key(heads.recv().unwrap()));
        assert_eq!(a, b, "the retry carries the same Idempotency-Key");
    }

    /// A 409 without `Retry-After` is the server's verdict: set aside.
    #[test]
    fn a_plain_409_is_set_aside() {
        let conflict = "HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: 22\r\nConnection: close\r\n\r\n{\"error\":\"conflict\"}  ";
        let (url, _heads) = server(vec![conflict]);
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path()).unwrap();
        outbox
            .push(api::Report::new(api::ReportState::Committed))
            .unwrap();
        let client = Client::new(&url, ureq::tls::TlsConfig::default());
        let done = outbox.deliver(&client, "kxd_x").unwrap();
        assert_eq!((done.rejected, done.left), (1, 0));
    }

    /// What the server would have rejected is refused on reading (and set
    /// aside by delivery), with a reason.
    #[test]
    fn unreadable_files_say_why() {
        for (text, why) in [
            (
                r#"{"path":"/api/v1/device/logs","key":"k","queued-at":1,"body":{"entries":[{"level":"loud","message":"x"}]}}"#,
                "log batch",
            ),
            (
                r#"{"path":"/api/v1/device/other","key":"k","queued-at":1,"body":{}}"#,
                "unknown path",
            ),
            (r#"{"key":"k","queued-at":1}"#, "message"),
            ("not json", "expected"),
        ] {
            let e = decode(text.as_bytes()).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
