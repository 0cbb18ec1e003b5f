//! A cache of device credentials: credential hash → the device it
//! authenticates, so a device's requests (poll, heartbeat, the `Range`
//! requests of a download) do not look the credential up in the store
//! each time.
//!
//! Revocation and rotation take effect at once on this server: revoking a
//! device and re-enrolling it (which rotates its credential) drop its
//! entries before they answer. Another replica sharing the database keeps
//! an entry at most [`TTL`], so there a revoked credential stops working
//! within that time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::auth::Device;

/// How long an entry is trusted without asking the store.
pub const TTL: Duration = Duration::from_secs(10);

/// Entries kept; when full, expired entries are dropped, then all.
pub const MAX_ENTRIES: usize = 200_000;

/// Credential hash → device.
#[derive(Debug, Default)]
pub struct CredentialCache {
    entries: Mutex<HashMap<String, (Device, Instant)>>,
    /// Bumped by every [`CredentialCache::forget_device`]: a lookup that
    /// began before a revocation must not cache what it read.
    generation: AtomicU64,
}

impl CredentialCache {
    /// The device `hash` authenticates, if cached and fresh.
    pub fn get(&self, hash: &str) -> Option<Device> {
        let entries = self.entries.lock().ok()?;
        let (device, at) = entries.get(hash)?;
        (at.elapsed() < TTL).then(|| device.clone())
    }

    /// Call before reading a credential from the store; pass the result to
    /// [`CredentialCache::insert`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Remembers that `hash` authenticates `device`, as read from the store
    /// after [`CredentialCache::generation`] returned `generation`; nothing
    /// is cached when a device was forgotten since (it may be this one,
    /// revoked after the read).
    pub fn insert(&self, hash: String, device: Device, generation: u64) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&hash) {
            entries.retain(|_, (_, at)| at.elapsed() < TTL);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(hash, (device, Instant::now()));
    }

    /// Forgets every credential of device `pk` (revoked, or its credential
    /// rotated).
    /// Call after the change is committed.
    pub fn forget_device(&self, pk: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::SeqCst);
            entries.retain(|_, (d, _)| d.pk != pk);
        }
    }

    /// Forgets every credential of organisation `org_id` (disabled).
    pub fn forget_org(&self, org_id: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::SeqCst);
            entries.retain(|_, (d, _)| d.org_id != org_id);
        }
    }

    /// Entries held (fresh or not).
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(pk: &str) -> Device {
        Device {
            pk: pk.into(),
            org_id: "o".into(),
            device_id: format!("dev-{pk}"),
            unproven: false,
            expires_at: None,
        }
    }

    #[test]
    fn forget_device_drops_all_its_credentials() {
        let c = CredentialCache::default();
        let g = c.generation();
        c.insert("h1".into(), device("a"), g);
        c.insert("h2".into(), device("a"), g);
        c.insert("h3".into(), device("b"), g);
        assert_eq!(c.get("h1").map(|d| d.pk), Some("a".into()));
        c.forget_device("a");
        assert!(c.get("h1").is_none() && c.get("h2").is_none());
        assert_eq!(c.get("h3").map(|d| d.pk), Some("b".into()));
        assert_eq!(c.len(), 1);
        // A lookup that began before the revocation caches nothing.
        c.insert("h4".into(), device("a"), g);
        assert!(c.get("h4").is_none());
    }
}
