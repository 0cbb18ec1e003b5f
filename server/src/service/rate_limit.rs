//! Rate limits: token buckets by key, in memory, per server process. One
//! type serves every limit: each device, each operator, bundle uploads per
//! operator and each address on the unauthenticated routes
//! (`AppState::limits`, checked by `http::guard` and the extractors), and
//! enrollments per token and per address (`service::admission`). Over the
//! limit: [`Error::TooManyRequests`] with the seconds to wait (429 with
//! `Retry-After`). The buckets kept are bounded (200,000 by default, about
//! 20 MB): full ones are dropped first, then the least recently used.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::{Error, Result};

/// Token buckets by key.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    max_buckets: usize,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::with_max_buckets(MAX_BUCKETS)
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before idle ones are dropped (the default).
const MAX_BUCKETS: usize = 200_000;

impl RateLimiter {
    /// Buckets for at most `max` keys (at least 10).
    pub fn with_max_buckets(max: usize) -> Self {
        RateLimiter {
            buckets: Mutex::new(HashMap::new()),
            max_buckets: max.max(10),
        }
    }

    /// Takes one token from `key`'s bucket of `per_minute` (also its burst
    /// size); [`Error::TooManyRequests`] when empty. `per_minute == 0`
    /// disables the limit.
    pub fn check(&self, key: &str, per_minute: u32) -> Result<()> {
        if per_minute == 0 {
            return Ok(());
        }
        let rate = f64::from(per_minute) / 60.0;
        let capacity = f64::from(per_minute);
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .map_err(|_| Error::Internal(anyhow::anyhow!("rate limiter lock poisoned")))?;
        let max = self.max_buckets;
        if buckets.len() >= max && !buckets.contains_key(key) {
            // Full buckets are the same as no bucket: drop them.
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < capacity);
            if buckets.len() >= max {
                // Still full (many callers at once): the least recently
                // used tenth goes, so memory stays bounded.
                let mut ages: Vec<Instant> = buckets.values().map(|b| b.at).collect();
                let (_, cut, _) = ages.select_nth_unstable(max / 10);
                let cut = *cut;
                buckets.retain(|_, b| b.at > cut);
            }
        }
        if !buckets.contains_key(key) {
            buckets.insert(
                key.to_string(),
                Bucket {
                    tokens: capacity,
                    at: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(capacity);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - bucket.tokens) / rate).ceil().max(1.0);
            Err(Error::TooManyRequests(wait as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_empties_then_refuses() {
        let l = RateLimiter::default();
        for _ in 0..3 {
            l.check("a", 3).unwrap();
        }
        match l.check("a", 3) {
            Err(Error::TooManyRequests(secs)) => assert!((1..=20).contains(&secs), "{secs}"),
            other => panic!("{other:?}"),
        }
        // Other keys have their own bucket; 0 is unlimited.
        l.check("b", 3).unwrap();
        for _ in 0..1000 {
            l.check("c", 0).unwrap();
        }
    }

    #[test]
    fn the_buckets_kept_are_bounded() {
        let l = RateLimiter::with_max_buckets(100);
        for n in 0..1000 {
            l.check(&format!("k{n}"), 1).unwrap();
        }
        let kept = l.buckets.lock().map(|b| b.len()).unwrap();
        assert!(kept <= 100, "{kept}");
        // The most recent key is still limited.
        assert!(l.check("k999", 1).is_err());
    }
}
