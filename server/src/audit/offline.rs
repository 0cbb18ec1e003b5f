//! `kernex-server audit verify` and `audit export`: the whole chain of every
//! organisation, checked or written out, from a copy of the database (a
//! SQLite file or a PostgreSQL URL) opened read-only, or (verify) from an
//! export. Nothing here writes to the database or needs the server.
//!
//! The export is JSON Lines: a header line, every signed checkpoint, then
//! every entry in chain order (org, seq), each exactly as stored.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

use super::chain::{self, StoredEntry, Walk};
use super::checkpoint::{self, Checkpoint};

/// Export format version.
pub const EXPORT_VERSION: u32 = 1;

/// One line of an export.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    /// The first line.
    Export {
        /// [`EXPORT_VERSION`].
        version: u32,
        /// Unix ms.
        exported_at: i64,
    },
    /// A signed checkpoint (all of them come before the entries).
    Checkpoint(Checkpoint),
    /// An entry, in chain order.
    Entry(StoredEntry),
}

/// Opens a database read-only: a SQLite file path, a `sqlite:` URL or a
/// `postgres:` URL. No migration, no pragma that writes.
pub async fn open(database: &str) -> Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let url = if database.starts_with("postgres:") || database.starts_with("postgresql:") {
        database.to_string()
    } else {
        let path = database.strip_prefix("sqlite://").unwrap_or(database);
        let path = path.split('?').next().unwrap_or(path);
        if !std::path::Path::new(path).is_file() {
            bail!("{path}: no such SQLite file");
        }
        format!("sqlite://{path}?mode=ro")
    };
    AnyPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .with_context(|| format!("unable to open {}", crate::store::redact(database)))
}

/// Writes the export of `pool` to `out`; returns the number of entries.
pub async fn export(pool: &AnyPool, out: &mut impl Write) -> Result<u64> {
    let line = |out: &mut dyn Write, l: &Line| -> Result<()> {
        serde_json::to_writer(&mut *out, l)?;
        out.write_all(b"\n")?;
        Ok(())
    };
    line(
        &mut *out,
        &Line::Export {
            version: EXPORT_VERSION,
            exported_at: crate::store::now_ms(),
        },
    )?;
    for cp in checkpoints(pool).await? {
        line(&mut *out, &Line::Checkpoint(cp))?;
    }
    let mut n = 0;
    let sql = format!(
        "SELECT {} FROM audit_log ORDER BY org_id, seq",
        chain::COLUMNS
    );
    let mut rows = sqlx::query(&sql).fetch(pool);
    while let Some(row) = rows.try_next().await? {
        line(&mut *out, &Line::Entry(StoredEntry::from_row(&row)?))?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

async fn checkpoints(pool: &AnyPool) -> Result<Vec<Checkpoint>> {
    let rows = sqlx::query(&format!(
        "SELECT {} FROM audit_checkpoints ORDER BY org_id, seq",
        checkpoint::COLUMNS
    ))
    .fetch_all(pool)
    .await
    .context("unable to read the audit checkpoints (a database from before 0013?)")?;
    Ok(rows
        .iter()
        .map(Checkpoint::from_row)
        .collect::<sqlx::Result<_>>()?)
}

/// What verification found, per organisation.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// By organisation id.
    pub orgs: BTreeMap<String, OrgReport>,
}

/// One organisation's chain.
#[derive(Debug, Default, Clone)]
pub struct OrgReport {
    /// Entries read.
    pub entries: u64,
    /// The last entry that links up from the genesis.
    pub verified_through: i64,
    /// The highest entry covered by a valid, trusted signed checkpoint.
    pub signed_through: i64,
    /// Everything wrong, in order found.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.orgs.values().all(|o| o.problems.is_empty())
    }

    /// A human summary, one line per organisation and per problem.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (org, r) in &self.orgs {
            s.push_str(&format!(
                "org {org}: {} entries, chain verified through {}, signed through {}{}\n",
                r.entries,
                r.verified_through,
                r.signed_through,
                if r.problems.is_empty() { ", OK" } else { "" }
            ));
            for p in &r.problems {
                s.push_str(&format!("  PROBLEM: {p}\n"));
            }
        }
        if self.orgs.is_empty() {
            s.push_str("no audit entries\n");
        }
        s
    }
}

/// Checks chains against the trusted keys (raw public keys, hex). With no
/// trusted key, checkpoint signatures are not checked (the caller says so).
///
/// With keys, the checkpoints must also be where the server puts them: a
/// chain with entries has at least one, consecutive ones are at most
/// `every_entries` apart, and fewer than `every_entries` entries follow
/// the last. So deleting checkpoints to hide a re-hashed chain shows; what
/// cannot show is a change to the unsigned tail (README, "Audit log").
#[derive(Debug)]
pub struct Verifier {
    trusted: Option<HashSet<String>>,
    every_entries: u64,
    /// Checkpoints by (org, seq), waiting for their entry.
    pending: BTreeMap<(String, i64), Checkpoint>,
    walks: BTreeMap<String, Walk>,
    /// Organisations whose chain broke: nothing after is verified.
    broken: HashSet<String>,
    report: VerifyReport,
}

impl Verifier {
    /// `trusted`: the public keys whose signatures count; `None`: skip
    /// signatures.
    /// `every_entries`: the server's `audit-checkpoint-entries` (the
    /// largest it ever had; 0: no spacing checks).
    pub fn new(trusted: Option<HashSet<String>>, every_entries: u64) -> Self {
        Verifier {
            trusted,
            every_entries,
            pending: BTreeMap::new(),
            walks: BTreeMap::new(),
            broken: HashSet::new(),
            report: VerifyReport::default(),
        }
    }

    fn org(&mut self, org: &str) -> &mut OrgReport {
        self.report.orgs.entry(org.to_string()).or_default()
    }

    /// A checkpoint (all before any entry). Without trusted keys they are
    /// not looked at: an unsigned claim proves nothing.
    pub fn checkpoint(&mut self, cp: Checkpoint) {
        let problem = match &self.trusted {
            None => return,
            Some(keys) if !keys.contains(&cp.public_key) => Some(format!(
                "checkpoint at entry {} is signed by an untrusted key {}",
                cp.seq, cp.public_key
            )),
            Some(_) if !cp.signature_valid() => Some(format!(
                "checkpoint at entry {}: the signature does not match (seq, hash or time changed)",
                cp.seq
            )),
            Some(_) => None,
        };
        let org = cp.org_id.clone();
        match problem {
            Some(p) => self.org(&org).problems.push(p),
            None => {
                self.pending.insert((org, cp.seq), cp);
            }
        }
    }

    /// The next entry, in (org, seq) order.
    pub fn entry(&mut self, e: &StoredEntry) {
        let broken_before = self.broken.contains(&e.org_id);
        let walk = self
            .walks
            .entry(e.org_id.clone())
            .or_insert_with(Walk::genesis);
        let step = if broken_before { Ok(()) } else { walk.step(e) };
        let verified = walk.last_seq();
        let checkpoint = self.pending.remove(&(e.org_id.clone(), e.seq));
        let signatures = self.trusted.is_some();
        let every = self.every_entries;
        let r = self.org(&e.org_id);
        r.entries += 1;
        match step {
            Ok(()) if !broken_before => {
                r.verified_through = verified;
                if let Some(cp) = checkpoint {
                    if cp.hash == e.hash {
                        if signatures {
                            let gap = u64::try_from(e.seq - r.signed_through).unwrap_or(0);
                            if r.signed_through > 0 && every > 0 && gap > every {
                                r.problems.push(format!(
                                    "no signed checkpoint between entries {} and {} (one is made every {every} entries: deleted?)",
                                    r.signed_through, e.seq
                                ));
                            }
                            r.signed_through = e.seq;
                        }
                    } else {
                        r.problems.push(format!(
                            "entry {}: its hash differs from the signed checkpoint's",
                            e.seq
                        ));
                    }
                }
            }
            Ok(()) => {}
            Err(b) => {
                r.problems.push(format!("entry {}: {}", b.seq, b.reason));
                // Stop walking this chain: everything after is unverified.
                self.broken.insert(e.org_id.clone());
            }
        }
    }

    /// The report; checkpoints whose entry never came are problems (a
    /// deleted tail).
    pub fn finish(mut self) -> VerifyReport {
        let pending = std::mem::take(&mut self.pending);
        for ((org, seq), _) in pending {
            let r = self.org(&org);
            let have = r.entries;
            r.problems.push(format!(
                "a signed checkpoint covers entry {seq}, which is missing (the chain has {have} entries: deleted?)"
            ));
        }
        if self.trusted.is_some() {
            let every = self.every_entries;
            for r in self.report.orgs.values_mut() {
                if r.entries == 0 || !r.problems.is_empty() {
                    continue;
                }
                let tail = u64::try_from(r.verified_through - r.signed_through).unwrap_or(0);
                if r.signed_through == 0 {
                    r.problems
                        .push("no entry is covered by a valid signed checkpoint".into());
                } else if every > 0 && tail >= every {
                    r.problems.push(format!(
                        "the last {tail} entries are not covered by a signed checkpoint (one is made every {every} entries: deleted?)"
                    ));
                }
            }
        }
        self.report
    }
}

/// Verifies every chain in a database.
pub async fn verify_database(
    pool: &AnyPool,
    trusted: Option<HashSet<String>>,
    every_entries: u64,
) -> Result<VerifyReport> {
    let mut v = Verifier::new(trusted, every_entries);
    for cp in checkpoints(pool).await? {
        v.checkpoint(cp);
    }
    let sql = format!(
        "SELECT {} FROM audit_log ORDER BY org_id, seq",
        chain::COLUMNS
    );
    let mut rows = sqlx::query(&sql).fetch(pool);
    while let Some(row) = rows.try_next().await? {
        v.entry(&StoredEntry::from_row(&row)?);
    }
    Ok(v.finish())
}

/// Verifies an export (JSON Lines, as [`export`] writes it).
pub fn verify_export(
    input: impl BufRead,
    trusted: Option<HashSet<String>>,
    every_entries: u64,
) -> Result<VerifyReport> {
    let mut v = Verifier::new(trusted, every_entries);
    let mut header = false;
    let mut entries = false;
    let mut last: Option<(String, i64)> = None;
    for (n, line) in input.lines().enumerate() {
        let n = n + 1;
        let line = line.with_context(|| format!("line {n}: unable to read"))?;
        if line.len() > 1 << 20 {
            bail!("line {n}: longer than 1 MiB");
        }
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line =
            serde_json::from_str(&line).with_context(|| format!("line {n}: not an export line"))?;
        match parsed {
            Line::Export { version, .. } if !header && n == 1 => {
                if version != EXPORT_VERSION {
                    bail!("line {n}: export version {version}, expected {EXPORT_VERSION}");
                }
                header = true;
            }
            Line::Export { .. } => bail!("line {n}: a second header"),
            _ if !header => bail!("line 1: not an export header"),
            Line::Checkpoint(_) if entries => bail!("line {n}: a checkpoint after the entries"),
            Line::Checkpoint(cp) => v.checkpoint(cp),
            Line::Entry(e) => {
                let key = (e.org_id.clone(), e.seq);
                if last.as_ref().is_some_and(|l| *l >= key) {
                    bail!("line {n}: entries out of (org, seq) order");
                }
                last = Some(key);
                entries = true;
                v.entry(&e);
            }
        }
    }
    if !header {
        bail!("empty export");
    }
    Ok(v.finish())
}
