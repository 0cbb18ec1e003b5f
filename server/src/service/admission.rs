//! Enrollment admission: how fast one enrollment token, and one source
//! address, may enroll devices (`[limits] enrollments-per-token-per-minute`,
//! `enrollments-per-address-per-minute`). Token buckets in memory, per
//! server process, of the one [`RateLimiter`] type the other rate limits
//! use; over the limit an enrollment
//! is refused with [`super::Error::TooManyRequests`] (429 with `Retry-After`)
//! before it touches the database.

use std::net::IpAddr;

use super::Result;
use super::rate_limit::RateLimiter;

/// Buckets kept per kind before idle ones are dropped.
const MAX_BUCKETS: usize = 100_000;

/// The enrollment buckets: per token id and per source address.
#[derive(Debug)]
pub struct Admission {
    tokens: RateLimiter,
    addresses: RateLimiter,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            tokens: RateLimiter::with_max_buckets(MAX_BUCKETS),
            addresses: RateLimiter::with_max_buckets(MAX_BUCKETS),
        }
    }
}

impl Admission {
    /// One enrollment from `source`, at most `per_minute` a minute (0:
    /// unlimited). An IPv6 address counts by its /64, which one host
    /// usually holds whole.
    pub fn address(&self, source: IpAddr, per_minute: u32) -> Result<()> {
        let key = match source {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => {
                    let s = v6.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
        };
        self.addresses.check(&key, per_minute)
    }

    /// One enrollment with token `token_id`, at most `per_minute` a minute
    /// (0: unlimited).
    pub fn token(&self, token_id: &str, per_minute: u32) -> Result<()> {
        self.tokens.check(token_id, per_minute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Error;

    #[test]
    fn each_token_and_address_has_its_own_bucket() {
        let a = Admission::default();
        for _ in 0..2 {
            assert!(a.token("t1", 2).is_ok());
        }
        assert!(
            matches!(a.token("t1", 2), Err(Error::TooManyRequests(s)) if (1..=30).contains(&s))
        );
        assert!(a.token("t2", 2).is_ok());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert!(a.address(ip("2001:db8::1"), 1).is_ok());
        assert!(
            a.address(ip("2001:db8::2"), 1).is_err(),
            "the same /64 is the same source"
        );
        assert!(a.address(ip("2001:db8:0:1::1"), 1).is_ok());
        for _ in 0..100 {
            assert!(a.address(ip("10.0.0.1"), 0).is_ok(), "0 is unlimited");
        }
    }
}
