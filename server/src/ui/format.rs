//! Small formatting helpers for pages: times, sizes, URLs.

use crate::store::now_ms;

/// Unix milliseconds as `2026-11-30 04:05:06 UTC`.
pub fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix milliseconds as `HH:MM` (chart axes).
pub fn clock(ms: i64) -> String {
    let rem = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}", rem / 3600, rem % 3600 / 60)
}

/// Unix milliseconds as `HH:MM:SS` (short chart axes).
pub fn clock_secs(ms: i64) -> String {
    let rem = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// How long ago, e.g. `5 min ago`.
pub fn ago(ms: i64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        s if s < 0 => "just now".into(),
        s if s < 60 => format!("{s} s ago"),
        s if s < 3600 => format!("{} min ago", s / 60),
        s if s < 86_400 => format!("{} h ago", s / 3600),
        s => format!("{} d ago", s / 86_400),
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DD` (an HTML date input) to the unix ms of its start
/// (UTC).
pub fn parse_date(s: &str) -> Option<i64> {
    let mut it = s.splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: u32 = it.next()?.parse().ok()?;
    let d: u32 = it.next()?.parse().ok()?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // Reject 2026-02-31 and the like: the date must round-trip.
    (civil_from_days(days) == (y, m, d)).then_some(days * 86_400_000)
}

/// Bytes in decimal units, e.g. `1.5 MB` (1 MB = 1,000,000 bytes).
///
/// The UI has one unit system: decimal (SI) prefixes for every size,
/// rate and budget, as the rollout form takes them (MB/s, MB per day) and
/// as metered links bill them (cost per GB = 10^9 bytes).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Signed byte counts (database columns) in binary units.
pub fn ibytes(n: i64) -> String {
    bytes(u64::try_from(n).unwrap_or(0))
}

/// Percent-encodes a query value.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(1_796_000_000_000), "2026-11-30 00:53:20 UTC");
        let d = parse_date("2026-11-30").unwrap();
        assert_eq!(time(d), "2026-11-30 00:00:00 UTC");
        assert_eq!(
            parse_date("2024-02-29").map(time).unwrap(),
            "2024-02-29 00:00:00 UTC"
        );
        assert!(parse_date("2026-02-31").is_none());
        assert!(parse_date("yesterday").is_none());
        assert!(parse_date("2026-13-01").is_none());
    }

    #[test]
    fn sizes_and_urls() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1500), "1.5 kB");
        assert_eq!(bytes(3_000_000), "3.0 MB");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(
            url_encode("/ui/devices?x=a b&c"),
            "/ui/devices%3Fx%3Da%20b%26c"
        );
    }
}
