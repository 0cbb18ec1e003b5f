//! `status`: the A/B state, what each slot holds, the install in progress.

use kernex_bootloader::{BootFlow, BootState, DEFAULT_ATTEMPTS, Slot};
use kernex_protocol::SlotClass;
use serde::Serialize;

use crate::config::SystemConfig;
use crate::error::UpdateError;
use crate::source::{DailyUsage, utc_day};
use crate::store::{DataDir, LastInstall, PendingInstall};

/// The machine-readable status (`status --json`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// The running slot.
    pub booted_slot: Slot,
    /// The slot the bootloader boots next (`None`: no attempts left anywhere).
    pub primary_slot: Option<Slot>,
    /// Whether the booted slot is committed (its counter is back at 3).
    pub committed: bool,
    /// The anti-rollback floor: the highest security version committed
    /// (`None`: both copies of it are corrupt; installs are refused).
    pub security_floor: Option<u64>,
    /// The raw boot-state variables.
    pub boot_state: BootState,
    /// Both slots.
    pub slots: Vec<SlotStatus>,
    /// The install in progress.
    pub pending_install: Option<PendingStatus>,
    /// The last install's outcome.
    pub last_install: Option<LastInstall>,
    /// Download use today on the link.
    pub link: LinkStatus,
    /// The health watchdog's last decision.
    pub health: Option<crate::health::HealthRecord>,
    /// The watchdog's last revert (kept when a later decision replaces it
    /// in `health`, e.g. the old slot committed after the revert).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_revert: Option<crate::health::HealthRecord>,
    /// The daemon's link to the control plane (`[server]` configured).
    pub server: Option<ServerStatus>,
}

/// What the daemon knows about the control plane.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ServerStatus {
    /// The control plane.
    pub url: String,
    /// The server's id for this device, once enrolled.
    pub enrolled_as: Option<String>,
    /// Reports and log batches waiting to be delivered.
    pub queued_messages: usize,
    /// The install or rollback waiting for its reboot.
    pub awaiting: Option<crate::daemon::state::Awaiting>,
    /// The release given up on, and why.
    pub given_up: Option<crate::daemon::state::GivenUp>,
}

/// One slot.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SlotStatus {
    /// Which.
    pub slot: Slot,
    /// Whether it is the running slot.
    pub booted: bool,
    /// Boot attempts left.
    pub attempts_left: u32,
    /// Installed release version, if recorded.
    pub version: Option<String>,
    /// The recorded release's security version.
    pub security_version: Option<u64>,
    /// Whether the recorded image was verified after writing.
    pub verified: bool,
    /// Unix time of the install.
    pub installed_at: Option<u64>,
    /// Each image.
    pub images: Vec<ImageStatus>,
}

/// One image of a slot.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageStatus {
    /// Class.
    pub class: SlotClass,
    /// Device or file.
    pub path: String,
    /// Recorded image digest.
    pub sha256: Option<String>,
    /// Recorded image size.
    pub size: Option<u64>,
}

/// The install in progress.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PendingStatus {
    /// The recorded state.
    #[serde(flatten)]
    pub install: PendingInstall,
    /// Percent of image bytes written and verified.
    pub progress_percent: f64,
}

/// Link usage.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LinkStatus {
    /// Whether the link is metered.
    pub metered: bool,
    /// Rate limit, bytes/s.
    pub rate_limit: Option<u64>,
    /// Daily budget, bytes.
    pub daily_budget: Option<u64>,
    /// Bytes downloaded today (UTC).
    pub used_today: u64,
}

/// Collects the status.
pub fn status(config: &SystemConfig, flow: &mut dyn BootFlow) -> Result<Status, UpdateError> {
    let data = DataDir::new(&config.data_dir);
    let booted = flow.booted_slot()?;
    let state = flow.state()?;
    let mut slots = Vec::new();
    for slot in Slot::ALL {
        let record = data.slot_record(slot)?;
        let manifest = match &record {
            Some(r) => Some(r.manifest()?),
            None => None,
        };
        let images = config
            .slots
            .classes()
            .into_iter()
            .map(|class| {
                let entry = manifest.as_ref().and_then(|m| m.image(class));
                ImageStatus {
                    class,
                    path: config
                        .slots
                        .pair(class)
                        .map(|p| p.path(slot).display().to_string())
                        .unwrap_or_default(),
                    sha256: entry.map(|e| e.sha256.to_hex()),
                    size: entry.map(|e| e.size),
                }
            })
            .collect();
        slots.push(SlotStatus {
            slot,
            booted: slot == booted,
            attempts_left: state.attempts_left(slot),
            version: manifest.as_ref().map(|m| m.version.to_string()),
            security_version: manifest.as_ref().map(|m| m.security_version),
            verified: record.as_ref().is_some_and(|r| r.verified),
            installed_at: record.as_ref().map(|r| r.installed_at),
            images,
        });
    }
    let pending_install = data.pending()?.map(|p| PendingStatus {
        progress_percent: if p.total_bytes == 0 {
            0.0
        } else {
            (p.done_bytes as f64 * 1000.0 / p.total_bytes as f64).round() / 10.0
        },
        install: p,
    });
    let usage: DailyUsage = data
        .read::<DailyUsage>(&data.budget_path())?
        .filter(|u| u.day == utc_day())
        .unwrap_or_default();
    Ok(Status {
        booted_slot: booted,
        primary_slot: state.primary(),
        committed: state.attempts_left(booted) >= DEFAULT_ATTEMPTS,
        security_floor: crate::floor::Floor::for_device(config).get().ok(),
        boot_state: state,
        slots,
        pending_install,
        last_install: data.last_install()?,
        health: crate::health::last_record(&data)?,
        last_revert: crate::health::last_revert(&data)?,
        server: match &config.server {
            Some(server) => Some(server_status(&data, &server.url)?),
            None => None,
        },
        link: LinkStatus {
            metered: config.link.metered,
            rate_limit: config.link.rate_limit,
            daily_budget: config.link.daily_budget,
            used_today: usage.bytes,
        },
    })
}

fn server_status(data: &DataDir, url: &str) -> Result<ServerStatus, UpdateError> {
    let daemon = crate::daemon::state::load(data)?;
    let outbox = data.root().join(kernex_device::layout::OUTBOX);
    let queued_messages = match std::fs::read_dir(&outbox) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .count(),
        Err(_) => 0,
    };
    Ok(ServerStatus {
        url: url.to_owned(),
        enrolled_as: crate::daemon::state::credential(data, url)?.map(|c| c.id),
        queued_messages,
        awaiting: daemon.awaiting,
        given_up: daemon.given_up,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let order: Vec<&str> = self.boot_state.order.iter().map(|s| s.name()).collect();
        writeln!(
            f,
            "booted slot   {}{}",
            self.booted_slot,
            if self.committed {
                " (committed)"
            } else {
                " (not committed: run mark-good once healthy)"
            }
        )?;
        writeln!(
            f,
            "boots next    {}   (BOOT_ORDER=\"{}\")",
            self.primary_slot
                .map(|s| s.name())
                .unwrap_or("none (counters reset on next boot)"),
            order.join(" ")
        )?;
        match self.security_floor {
            Some(floor) => writeln!(
                f,
                "security floor {floor}   (releases below it are refused)"
            )?,
            None => writeln!(f, "security floor unreadable (both copies corrupt)")?,
        }
        writeln!(f)?;
        writeln!(
            f,
            "SLOT  BOOTED  TRIES  VERSION     VERIFIED  IMAGE              SHA-256"
        )?;
        for s in &self.slots {
            for (i, img) in s.images.iter().enumerate() {
                let first = i == 0;
                writeln!(
                    f,
                    "{:<4}  {:<6}  {:<5}  {:<10}  {:<8}  {:<17}  {}",
                    if first { s.slot.name() } else { "" },
                    if first && s.booted { "yes" } else { "" },
                    if first {
                        s.attempts_left.to_string()
                    } else {
                        String::new()
                    },
                    if first {
                        s.version.as_deref().unwrap_or("-")
                    } else {
                        ""
                    },
                    if first {
                        if s.verified { "yes" } else { "no" }
                    } else {
                        ""
                    },
                    format!(
                        "{} {}",
                        img.class,
                        img.size.map(|n| format!("{n}B")).unwrap_or_default()
                    ),
                    img.sha256
                        .as_deref()
                        .map(|h| &h[..16.min(h.len())])
                        .unwrap_or("-"),
                )?;
            }
        }
        writeln!(f)?;
        match &self.pending_install {
            Some(p) => writeln!(
                f,
                "pending       {} into slot {}: {:.1}% ({} of {} bytes), {} bytes downloaded",
                p.install.version,
                p.install.target,
                p.progress_percent,
                p.install.done_bytes,
                p.install.total_bytes,
                p.install.downloaded_bytes
            )?,
            None => writeln!(f, "pending       none")?,
        }
        match &self.last_install {
            Some(l) => writeln!(f, "last install  {:?}: {}", l.outcome, l.reason)?,
            None => writeln!(f, "last install  none")?,
        }
        if let Some(h) = &self.health {
            writeln!(
                f,
                "health        {:?} slot {}: {}",
                h.outcome, h.slot, h.reason
            )?;
        }
        if let Some(r) = &self.last_revert
            && self.health.as_ref() != Some(r)
        {
            writeln!(
                f,
                "last revert   slot {} ({}): {}",
                r.slot,
                r.version.as_deref().unwrap_or("no recorded release"),
                r.reason
            )?;
        }
        if let Some(server) = &self.server {
            writeln!(
                f,
                "server        {} ({}), {} messages queued{}",
                server.url,
                server
                    .enrolled_as
                    .as_deref()
                    .map(|id| format!("enrolled as {id}"))
                    .unwrap_or_else(|| "not enrolled".into()),
                server.queued_messages,
                server
                    .awaiting
                    .as_ref()
                    .map(|a| format!(", {} awaits its reboot into slot {}", a.version, a.slot))
                    .unwrap_or_default()
            )?;
        }
        write!(
            f,
            "link          {}{}, {} bytes today{}",
            if self.link.metered {
                "metered"
            } else {
                "unmetered"
            },
            self.link
                .rate_limit
                .map(|r| format!(", {r} B/s"))
                .unwrap_or_default(),
            self.link.used_today,
            self.link
                .daily_budget
                .filter(|_| self.link.metered)
                .map(|b| format!(" of {b}"))
                .unwrap_or_default()
        )
    }
}
