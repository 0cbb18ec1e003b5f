//! Reports and log batches waiting for the server, on disk: one file per
//! message in `<data-dir>/outbox/`, named by a sequence number, delivered
//! oldest first. A device that is offline for hours keeps what it has to
//! say and delivers it in order when it is back; a power cut loses nothing
//! that was queued (each file is written atomically).

use std::fs;
use std::path::{Path, PathBuf};

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

/// One queued message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Message {
    /// Device API path, e.g. `/api/v1/device/report`.
    pub path: String,
    /// Sent as the `Idempotency-Key`: a resend after a lost answer is not
    /// applied twice.
    pub key: String,
    /// Unix time queued.
    pub queued_at: u64,
    /// The JSON body.
    pub body: serde_json::Value,
}

impl Message {
    fn is_logs(&self) -> bool {
        self.path.ends_with("/logs")
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
        let dir = data_dir.join("outbox");
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

    /// Queues `body` for `path`.
    pub fn push(&mut self, path: &str, body: serde_json::Value) -> Result<(), UpdateError> {
        let queued = Self::sequence(&self.dir)?;
        if queued.len() >= MAX_MESSAGES {
            let victim = queued
                .iter()
                .find(|(_, p)| self.load(p).is_ok_and(|m| m.is_logs()))
                .or(queued.first());
            if let Some((_, p)) = victim {
                tracing::warn!(file = %p.display(), "outbox full: dropping the oldest message");
                remove(p)?;
            }
        }
        let seq = self.next;
        self.next += 1;
        let message = Message {
            path: path.to_owned(),
            key: format!("{}-{seq}", self.prefix),
            queued_at: now(),
            body,
        };
        let bytes = serde_json::to_vec(&message).map_err(|e| UpdateError::State {
            path: self.dir.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&self.dir.join(format!("{seq:016}.json")), &bytes)
    }

    fn load(&self, path: &Path) -> Result<Message, UpdateError> {
        let bytes = read_limited(path, MAX_MESSAGE_BYTES)?;
        serde_json::from_slice(&bytes).map_err(|e| UpdateError::State {
            path: path.to_owned(),
            reason: e.to_string(),
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
    /// block the queue forever.
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
            let body = serde_json::to_vec(&message.body)
                .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
            match client.post_raw(Some(credential), &message.path, &body, Some(&message.key)) {
                Ok(_) => {
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
