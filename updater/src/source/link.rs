//! The link profile in force: a token bucket for the rate limit and the
//! daily byte budget of a metered link, persisted in the data dir.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::LinkProfile;
use crate::error::UpdateError;
use crate::store::DataDir;

/// Bytes downloaded on one UTC day, persisted in the data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DailyUsage {
    /// Days since the Unix epoch (UTC).
    pub day: u64,
    /// Bytes downloaded that day.
    pub bytes: u64,
}

/// Today, in days since the Unix epoch (UTC).
pub fn utc_day() -> u64 {
    crate::store::now() / 86_400
}

/// The link profile in force: a token bucket for the rate and the daily
/// budget counter.
#[derive(Debug)]
pub struct Link {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
    budget: Option<u64>,
    usage: DailyUsage,
    unsaved: u64,
    data: Option<DataDir>,
}

/// The day's usage is persisted at least every this many bytes when a
/// daily budget applies (a crash forgets at most this much of the budget)...
const BUDGET_SAVE_EVERY: u64 = 256 * 1024;
/// ...and every this many bytes when none does (the count is only shown by
/// `status`): each save is a synced write and a rename.
const USAGE_SAVE_EVERY: u64 = 16 * 1024 * 1024;

impl Link {
    /// No limits (tests, local files).
    pub fn unlimited() -> Self {
        Self {
            rate: None,
            tokens: 0.0,
            last: Instant::now(),
            budget: None,
            usage: DailyUsage::default(),
            unsaved: 0,
            data: None,
        }
    }

    /// The link profile, with today's usage from the data dir.
    pub fn new(profile: &LinkProfile, data: &DataDir) -> Result<Self, UpdateError> {
        let today = utc_day();
        let usage = match data.read::<DailyUsage>(&data.budget_path())? {
            Some(u) if u.day == today => u,
            _ => DailyUsage {
                day: today,
                bytes: 0,
            },
        };
        let rate = profile.rate_limit.filter(|&r| r > 0);
        Ok(Self {
            rate,
            tokens: 0.0,
            last: Instant::now(),
            budget: if profile.metered {
                profile.daily_budget
            } else {
                None
            },
            usage,
            unsaved: 0,
            data: Some(data.clone()),
        })
    }

    /// Today's usage.
    pub fn usage(&self) -> DailyUsage {
        self.usage
    }

    fn roll_day(&mut self) {
        let today = utc_day();
        if today != self.usage.day {
            self.usage = DailyUsage {
                day: today,
                bytes: 0,
            };
        }
    }

    /// Fails if today's budget is spent.
    pub fn check(&mut self) -> Result<(), UpdateError> {
        self.roll_day();
        match self.budget {
            Some(budget) if self.usage.bytes >= budget => {
                self.save()?;
                Err(UpdateError::BudgetSpent {
                    budget,
                    used: self.usage.bytes,
                })
            }
            _ => Ok(()),
        }
    }

    /// Accounts for `n` received bytes: waits as the rate limit requires,
    /// and fails once the budget is spent.
    pub fn take(&mut self, n: u64) -> Result<(), UpdateError> {
        self.usage.bytes += n;
        self.unsaved += n;
        let every = if self.budget.is_some() {
            BUDGET_SAVE_EVERY
        } else {
            USAGE_SAVE_EVERY
        };
        if self.unsaved >= every {
            self.save()?;
        }
        if let Some(rate) = self.rate {
            // Token bucket holding at most a quarter second of traffic.
            let now = Instant::now();
            let cap = (rate as f64 / 4.0).max(1.0);
            self.tokens =
                (self.tokens + now.duration_since(self.last).as_secs_f64() * rate as f64).min(cap);
            self.last = now;
            self.tokens -= n as f64;
            if self.tokens < 0.0 {
                std::thread::sleep(Duration::from_secs_f64(-self.tokens / rate as f64));
                self.last = Instant::now();
                self.tokens = 0.0;
            }
        }
        if let Some(budget) = self.budget
            && self.usage.bytes > budget
        {
            self.save()?;
            return Err(UpdateError::BudgetSpent {
                budget,
                used: self.usage.bytes,
            });
        }
        Ok(())
    }

    /// Persists today's usage.
    pub fn save(&mut self) -> Result<(), UpdateError> {
        if let Some(data) = &self.data
            && self.unsaved > 0
        {
            data.write(&data.budget_path(), &self.usage)?;
        }
        self.unsaved = 0;
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.save();
    }
}
