//! What the device tells the server about its installs, and its own log
//! lines: built as [`kernex_protocol::api`] reports and log batches and
//! queued in the [`Outbox`], which delivers them in order when the server
//! is reachable. Download progress is the exception: it is sent at once
//! or not at all ([`downloading`]), since a later report supersedes it.

use std::path::Path;

use anyhow::{Context as _, Result};
use kernex_bootloader::Slot;
use kernex_protocol::api::{self, ReportState};

use super::client::{Client, ClientError};
use super::logs;
use super::outbox::{Delivered, Outbox};
use super::state::Awaiting;
use crate::store::DataDir;

/// The queue of reports and log batches.
#[derive(Debug)]
pub(super) struct Reports {
    outbox: Outbox,
    data: DataDir,
}

impl Reports {
    /// Opens the outbox under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        Ok(Self {
            outbox: Outbox::open(data_dir).context("unable to open the outbox")?,
            data: DataDir::new(data_dir),
        })
    }

    fn queue(&mut self, report: api::Report) -> Result<()> {
        self.outbox.push(report).context("unable to queue a report")
    }

    /// The slot `a` installed came up: `rebooted`, on trial.
    pub fn rebooted(&mut self, a: &Awaiting) -> Result<()> {
        self.queue(api::Report {
            release_id: Some(a.release_id.clone()),
            ..api::Report::new(ReportState::Rebooted)
        })
    }

    /// How the install or rollback `a` ended (`state`, an outcome), with
    /// the version the `running` slot holds.
    pub fn outcome(
        &mut self,
        a: &Awaiting,
        state: ReportState,
        reason: Option<&str>,
        running: Slot,
    ) -> Result<()> {
        let version = self
            .data
            .slot_record(running)?
            .and_then(|r| r.manifest().ok())
            .map(|m| m.version.to_string());
        self.queue(api::Report {
            release_id: Some(a.release_id.clone()),
            version,
            booted_slot: Some(running.name().to_owned()),
            reason: reason.map(str::to_owned),
            ..api::Report::new(state)
        })
    }

    /// The watchdog reverted `booted`, a slot on trial the daemon was not
    /// waiting for (installed by hand).
    pub fn reverted(&mut self, reason: &str, booted: Slot) -> Result<()> {
        self.queue(api::Report {
            reason: Some(reason.to_owned()),
            booted_slot: Some(booted.name().to_owned()),
            ..api::Report::new(ReportState::Reverted)
        })
    }

    /// `release_id` was installed (written and verified), after
    /// downloading `bytes_done` of a `bytes_total` byte bundle.
    pub fn installed(&mut self, release_id: &str, bytes_done: u64, bytes_total: i64) -> Result<()> {
        self.queue(api::Report {
            release_id: Some(release_id.to_owned()),
            bytes_done: Some(i64::try_from(bytes_done).unwrap_or(i64::MAX)),
            bytes_total: Some(bytes_total),
            ..api::Report::new(ReportState::Installed)
        })
    }

    /// The daemon gave up on `release_id`.
    pub fn failed(&mut self, release_id: &str, reason: &str) -> Result<()> {
        self.queue(api::Report {
            release_id: Some(release_id.to_owned()),
            reason: Some(reason.to_owned()),
            ..api::Report::new(ReportState::Failed)
        })
    }

    /// Queues the log lines buffered since the last call, in batches the
    /// server takes, with a warning first when the buffer dropped some.
    pub fn ship_logs(&mut self) {
        let (lines, dropped) = logs::drain();
        if lines.is_empty() && dropped == 0 {
            return;
        }
        let mut entries = Vec::with_capacity(lines.len() + 1);
        if dropped > 0 {
            entries.push(api::LogLine {
                level: api::LogLevel::Warn,
                message: format!("{dropped} log lines dropped (buffer full)"),
                at: Some(super::now_ms()),
            });
        }
        entries.extend(lines);
        for batch in entries.chunks(api::MAX_LOG_LINES) {
            let batch = api::LogBatch {
                entries: batch.to_vec(),
            };
            if let Err(e) = self.outbox.push(batch) {
                tracing::debug!(error = %e, "unable to queue log lines");
            }
        }
    }

    /// Delivers what is queued ([`Outbox::deliver`]).
    pub fn deliver(&self, client: &Client, credential: &str) -> Result<Delivered, ClientError> {
        self.outbox.deliver(client, credential)
    }
}

/// A progress report while `release_id` downloads: `bytes_done`
/// downloaded so far.
pub(super) fn downloading(release_id: &str, bytes_done: u64) -> api::Report {
    api::Report {
        release_id: Some(release_id.to_owned()),
        bytes_done: Some(i64::try_from(bytes_done).unwrap_or(i64::MAX)),
        ..api::Report::new(ReportState::Downloading)
    }
}
