//! Time: the injectable clock the scheduler and the device API read, the
//! egress meter that counts bundle bytes per clock second, and recurring
//! maintenance windows in a device's time zone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

use super::spec::{MaintenanceWindow, parse_day, parse_hhmm};

/// Where "now" comes from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Sets the time; `false` for a clock that cannot be set.
    fn set_ms(&self, _ms: i64) -> bool {
        false
    }
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::store::now_ms()
    }
}

/// A clock that only moves when told (`test-clock = true`): the simulator
/// and the tests step it through `POST /api/v1/test/clock`.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// Starts at `ms`.
    pub fn new(ms: i64) -> Self {
        ManualClock(AtomicI64::new(ms))
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
    fn set_ms(&self, ms: i64) -> bool {
        self.0.store(ms, Ordering::SeqCst);
        true
    }
}

/// Bundle bytes served, per organisation and clock second (the HTTP
/// layer's count; the scheduler's own accounting is in `rollout_samples`).
#[derive(Debug, Default)]
pub struct EgressMeter {
    seconds: Mutex<HashMap<String, BTreeMap<i64, u64>>>,
}

/// Seconds of history kept per organisation.
const EGRESS_HISTORY: usize = 400_000;

impl EgressMeter {
    /// Counts `bytes` served at `now_ms`.
    pub fn add(&self, org_id: &str, now_ms: i64, bytes: u64) {
        let Ok(mut map) = self.seconds.lock() else {
            return;
        };
        let org = map.entry(org_id.to_string()).or_default();
        *org.entry(now_ms.div_euclid(1000)).or_default() += bytes;
        while org.len() > EGRESS_HISTORY {
            org.pop_first();
        }
    }

    /// `(second, bytes)` from `since_sec` on.
    pub fn since(&self, org_id: &str, since_sec: i64) -> Vec<(i64, u64)> {
        let Ok(map) = self.seconds.lock() else {
            return Vec::new();
        };
        map.get(org_id)
            .map(|o| o.range(since_sec..).map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

/// Parses an IANA time zone name (bundled tz database).
pub fn time_zone(name: &str) -> Option<TimeZone> {
    if name.eq_ignore_ascii_case("utc") {
        return Some(TimeZone::UTC);
    }
    TimeZone::get(name).ok()
}

#[derive(Debug, Clone, Copy)]
struct Parsed {
    start: u32,
    end: u32,
    /// Bit d set: opens on Monday-zero day d.
    days: u8,
}

/// A set of recurring maintenance windows; empty means always open.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    list: Vec<Parsed>,
}

/// Whether a window is open at an instant, and until when (or when the
/// next one opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Openness {
    /// Open until this instant (ms).
    OpenUntil(i64),
    /// Closed; the next window opens at this instant (ms).
    ClosedUntil(i64),
}

impl Windows {
    /// From validated windows.
    pub fn new(windows: &[MaintenanceWindow]) -> Self {
        Windows {
            list: windows
                .iter()
                .filter_map(|w| {
                    let start = parse_hhmm(&w.start)?;
                    let end = parse_hhmm(&w.end)?;
                    let days = if w.days.is_empty() {
                        0x7f
                    } else {
                        w.days
                            .iter()
                            .filter_map(|d| parse_day(d))
                            .fold(0u8, |m, d| m | (1 << d))
                    };
                    Some(Parsed { start, end, days })
                })
                .collect(),
        }
    }

    /// True when there is no window (always open).
    pub fn is_always(&self) -> bool {
        self.list.is_empty()
    }

    /// Where `t_ms` falls for a device in `tz`.
    pub fn at(&self, tz: &TimeZone, t_ms: i64) -> Openness {
        if self.list.is_empty() {
            return Openness::OpenUntil(i64::MAX);
        }
        let Ok(ts) = Timestamp::from_millisecond(t_ms) else {
            return Openness::ClosedUntil(i64::MAX);
        };
        let today = ts.to_zoned(tz.clone()).date();
        let mut open_until: Option<i64> = None;
        let mut next_open = i64::MAX;
        for offset in -1i64..=8 {
            let Ok(day) = today.checked_add(offset.days()) else {
                continue;
            };
            let weekday = day.weekday().to_monday_zero_offset();
            for w in &self.list {
                if w.days & (1 << weekday) == 0 {
                    continue;
                }
                let Some(open) = local_ms(tz, day, w.start) else {
                    continue;
                };
                let close_day = if w.end > w.start {
                    Some(day)
                } else {
                    day.checked_add(1.day()).ok()
                };
                let Some(close) = close_day.and_then(|d| local_ms(tz, d, w.end)) else {
                    continue;
                };
                if open <= t_ms && t_ms < close {
                    open_until = Some(open_until.map_or(close, |u| u.max(close)));
                } else if open > t_ms {
                    next_open = next_open.min(open);
                }
            }
        }
        match open_until {
            Some(u) => Openness::OpenUntil(u),
            None => Openness::ClosedUntil(next_open),
        }
    }
}

fn local_ms(tz: &TimeZone, day: Date, minutes: u32) -> Option<i64> {
    let h = i8::try_from(minutes / 60).ok()?;
    let m = i8::try_from(minutes % 60).ok()?;
    let dt = day.at(h, m, 0, 0);
    let zoned = tz.to_ambiguous_zoned(dt).compatible().ok()?;
    Some(zoned.timestamp().as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(start: &str, end: &str, days: &[&str]) -> MaintenanceWindow {
        MaintenanceWindow {
            start: start.into(),
            end: end.into(),
            days: days.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>()
            .unwrap_or_else(|e| unreachable!("{e}"))
            .as_millisecond()
    }

    #[test]
    fn windows_in_local_time() {
        let berlin = time_zone("Europe/Berlin").unwrap_or_else(|| unreachable!());
        let windows = Windows::new(&[w("01:00", "05:00", &[])]);
        // 2026-01-15 00:30 UTC = 01:30 in Berlin (CET): open until 04:00 UTC.
        assert_eq!(
            windows.at(&berlin, ms("2026-01-15T00:30:00Z")),
            Openness::OpenUntil(ms("2026-01-15T04:00:00Z"))
        );
        // 12:00 UTC: closed until 00:00 UTC next day (01:00 Berlin).
        assert_eq!(
            windows.at(&berlin, ms("2026-01-15T12:00:00Z")),
            Openness::ClosedUntil(ms("2026-01-16T00:00:00Z"))
        );
        // Summer time: 01:00 CEST = 23:00 UTC the day before.
        assert_eq!(
            windows.at(&berlin, ms("2026-07-15T12:00:00Z")),
            Openness::ClosedUntil(ms("2026-07-15T23:00:00Z"))
        );
        // Across midnight, weekdays only: Friday 22:00 to 02:00 Saturday.
        let night = Windows::new(&[w("22:00", "02:00", &["fri"])]);
        // 2026-01-16 is a Friday.
        assert_eq!(
            night.at(&TimeZone::UTC, ms("2026-01-17T01:00:00Z")),
            Openness::OpenUntil(ms("2026-01-17T02:00:00Z"))
        );
        assert_eq!(
            night.at(&TimeZone::UTC, ms("2026-01-17T03:00:00Z")),
            Openness::ClosedUntil(ms("2026-01-23T22:00:00Z"))
        );
        assert!(time_zone("Mars/Olympus").is_none());
        assert_eq!(
            Windows::default().at(&TimeZone::UTC, 0),
            Openness::OpenUntil(i64::MAX)
        );
    }
}
