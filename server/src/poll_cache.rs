//! What a device's poll reads from the store, kept in memory: credential
//! hash → the device and its poll state ([`Polled`]). A fleet polls all
//! the time and its answers change only when something is written, so the
//! common poll reads nothing from the store.
//!
//! Entries are dropped, never updated:
//! - for one device, when its own state changes (a heartbeat may change its
//!   version; revocation, re-enrollment and TPM activation change its
//!   credential) — [`forget_device`];
//! - for the whole fleet, after every other write: any mutating request
//!   ([`layer`]: deployments, rollouts, releases, reports, enrollment, the
//!   web UI's forms) and every scheduler pass that stepped a rollout —
//!   [`forget_all`].
//!
//! Replicas sharing a PostgreSQL database tell each other with
//! `NOTIFY kernex_poll_cache` ([`listen`]); while a replica's listener is
//! down it caches nothing. A SQLite store is one server's. An entry is also
//! never trusted longer than [`TTL`].
//!
//! A poll that read the store before a change and would insert afterwards
//! inserts nothing (a generation counter, as in
//! [`crate::credentials::CredentialCache`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;
use crate::service::devices::poll::Polled;
use crate::store::Backend;

/// How long an entry is trusted at most.
pub const TTL: Duration = Duration::from_secs(60);

/// Entries kept; when full, stale entries are dropped, then all.
pub const MAX_ENTRIES: usize = 200_000;

/// The PostgreSQL channel replicas tell each other on. The payload is the
/// sender's instance id, a space, and a device's primary key, or `*` for
/// the whole fleet.
pub const CHANNEL: &str = "kernex_poll_cache";

/// Device API paths whose writes concern only the calling device (or no
/// poll answer at all): they do not drop the whole cache.
const DEVICE_LOCAL: &[&str] = &[
    "/api/v1/device/heartbeat",
    "/api/v1/device/logs",
    "/api/v1/device/attestation",
];

#[derive(Debug)]
struct Entry {
    polled: Arc<Polled>,
    epoch: u64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Entries {
    by_hash: HashMap<String, Entry>,
    /// Device primary key → its credential hash.
    hash_of: HashMap<String, String>,
}

/// The cache. See the module documentation.
#[derive(Debug)]
pub struct PollCache {
    entries: Mutex<Entries>,
    /// Bumped by every drop (one device or all): an insert whose read
    /// began before is refused.
    generation: AtomicU64,
    /// Bumped by [`PollCache::forget_all`]: entries of an older epoch are
    /// stale.
    epoch: AtomicU64,
    /// False while changes made by other replicas could go unheard.
    enabled: AtomicBool,
}

impl Default for PollCache {
    fn default() -> Self {
        PollCache::new(true)
    }
}

/// What [`PollCache::ticket`] returns before a store read.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl PollCache {
    /// A cache; `enabled` false until a listener says otherwise (a
    /// PostgreSQL store shared with other replicas).
    pub fn new(enabled: bool) -> Self {
        PollCache {
            entries: Mutex::default(),
            generation: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            enabled: AtomicBool::new(enabled),
        }
    }

    /// Call before reading a device's poll state from the store; pass the
    /// result to [`PollCache::insert`].
    pub fn ticket(&self) -> Ticket {
        Ticket(self.generation.load(Ordering::SeqCst))
    }

    /// The poll state of the device `hash` authenticates, if cached and
    /// current.
    pub fn get(&self, hash: &str) -> Option<Arc<Polled>> {
        if !self.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let entries = self.entries.lock().ok()?;
        let e = entries.by_hash.get(hash)?;
        (e.epoch == epoch && e.at.elapsed() < TTL).then(|| e.polled.clone())
    }

    /// Remembers what `hash` polls, as read after [`PollCache::ticket`]
    /// returned `ticket`; nothing when anything was dropped since.
    pub fn insert(&self, hash: &str, polled: &Arc<Polled>, ticket: Ticket) {
        if !self.enabled.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if self.generation.load(Ordering::SeqCst) != ticket.0 {
            return;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        if entries.by_hash.len() >= MAX_ENTRIES && !entries.by_hash.contains_key(hash) {
            entries
                .by_hash
                .retain(|_, e| e.epoch == epoch && e.at.elapsed() < TTL);
            if entries.by_hash.len() >= MAX_ENTRIES {
                entries.by_hash.clear();
            }
            let Entries { by_hash, hash_of } = &mut *entries;
            hash_of.retain(|_, h| by_hash.contains_key(h));
        }
        let pk = polled.device.pk.clone();
        if let Some(old) = entries.hash_of.insert(pk, hash.to_string())
            && old != hash
        {
            entries.by_hash.remove(&old);
        }
        entries.by_hash.insert(
            hash.to_string(),
            Entry {
                polled: Arc::clone(polled),
                epoch,
                at: Instant::now(),
            },
        );
    }

    /// Drops device `pk`'s entry. Call after the change is committed.
    pub fn forget_device(&self, pk: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            self.generation.fetch_add(1, Ordering::SeqCst);
            if let Some(hash) = entries.hash_of.remove(pk) {
                entries.by_hash.remove(&hash);
            }
        }
    }

    /// Makes every entry stale. Call after the change is committed.
    pub fn forget_all(&self) {
        // Under the lock, so an insert either precedes both bumps (and is
        // stale) or sees the new generation (and is refused).
        let _entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Turns the cache on or off (dropping everything either way).
    pub fn set_enabled(&self, enabled: bool) {
        self.forget_all();
        self.enabled.store(enabled, Ordering::SeqCst);
    }

    /// Whether the cache is on (always on SQLite; on PostgreSQL while the
    /// listener is connected).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Entries held (current or not).
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.by_hash.len()).unwrap_or(0)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Device `pk` changed (its version, credential or TPM binding): drops its
/// cached credential and poll state here, and on the other replicas.
pub async fn forget_device(state: &AppState, pk: &str) {
    state.credentials.forget_device(pk);
    state.poll_cache.forget_device(pk);
    notify(state, pk).await;
}

/// Something that may change any device's poll answer was written: drops
/// every poll state here and on the other replicas.
pub async fn forget_all(state: &AppState) {
    state.poll_cache.forget_all();
    notify(state, "*").await;
}

async fn notify(state: &AppState, payload: &str) {
    if state.store.backend() != Backend::Postgres {
        return;
    }
    let sent = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(format!("{} {payload}", state.instance_id))
        .execute(state.store.pool())
        .await;
    if let Err(e) = sent {
        // The other replicas keep what they cached for at most TTL.
        tracing::warn!(error = %e, "unable to tell other replicas about a change (NOTIFY)");
    }
}

/// Middleware: after a mutating request (anything but GET, HEAD and
/// OPTIONS) that was not refused drops the whole cache, except for the device API's own
/// per-device writes, which drop their device themselves.
pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && !DEVICE_LOCAL.contains(&req.uri().path());
    let response = next.run(req).await;
    // A refused request (4xx) wrote nothing; not dropping the cache for it
    // also keeps junk requests from emptying it.
    if mutating && !response.status().is_client_error() {
        forget_all(&state).await;
    }
    response
}

/// Listens for the other replicas' changes (PostgreSQL only; returns at
/// once on SQLite). The cache is off until the listener is connected, and
/// again whenever the connection drops, until it is back.
pub async fn listen(state: AppState) {
    if state.store.backend() != Backend::Postgres {
        return;
    }
    let url = state.config.database_url();
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "poll cache: unable to connect the change listener; caching stays off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "poll cache: LISTEN failed; caching stays off");
            tokio::time::sleep(backoff).await;
            continue;
        }
        backoff = Duration::from_millis(500);
        state.poll_cache.set_enabled(true);
        tracing::debug!("poll cache: listening for other replicas' changes");
        // `None` or an error: the connection is gone.
        while let Ok(Some(n)) = listener.try_recv().await {
            match n.payload().split_once(' ') {
                // This replica's own change, already applied.
                Some((from, _)) if from == state.instance_id => {}
                Some((_, "*")) => state.poll_cache.forget_all(),
                Some((_, pk)) => {
                    state.credentials.forget_device(pk);
                    state.poll_cache.forget_device(pk);
                }
                None => state.poll_cache.forget_all(),
            }
        }
        state.poll_cache.set_enabled(false);
        tracing::warn!("poll cache: lost the change listener; caching is off until it is back");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Device;

    fn polled(pk: &str, version: &str) -> Arc<Polled> {
        Arc::new(Polled {
            device: Device {
                pk: pk.into(),
                org_id: "o".into(),
                device_id: format!("dev-{pk}"),
                unproven: false,
                expires_at: None,
            },
            current_version: Some(version.into()),
            assigned: None,
            in_rollout: false,
            tpm: false,
        })
    }

    #[test]
    fn a_device_change_drops_only_that_device() {
        let c = PollCache::default();
        let t = c.ticket();
        c.insert("h1", &polled("a", "1"), t);
        c.insert("h2", &polled("b", "1"), t);
        assert_eq!(c.get("h1").map(|p| p.device.pk.clone()), Some("a".into()));
        c.forget_device("a");
        assert!(c.get("h1").is_none());
        assert_eq!(c.get("h2").map(|p| p.device.pk.clone()), Some("b".into()));
    }

    #[test]
    fn a_fleet_change_drops_everything_and_refuses_older_reads() {
        let c = PollCache::default();
        let before = c.ticket();
        c.insert("h1", &polled("a", "1"), before);
        c.forget_all();
        assert!(c.get("h1").is_none());
        // A read that began before the change caches nothing.
        c.insert("h1", &polled("a", "1"), before);
        assert!(c.get("h1").is_none());
        let after = c.ticket();
        c.insert("h1", &polled("a", "2"), after);
        assert_eq!(
            c.get("h1").and_then(|p| p.current_version.clone()),
            Some("2".into())
        );
    }

    #[test]
    fn a_rotated_credential_replaces_the_old_entry() {
        let c = PollCache::default();
        let t = c.ticket();
        c.insert("old", &polled("a", "1"), t);
        c.insert("new", &polled("a", "1"), t);
        assert!(c.get("old").is_none());
        assert!(c.get("new").is_some());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_disabled_cache_holds_nothing() {
        let c = PollCache::new(false);
        let t = c.ticket();
        c.insert("h1", &polled("a", "1"), t);
        assert!(c.get("h1").is_none());
        c.set_enabled(true);
        let t = c.ticket();
        c.insert("h1", &polled("a", "1"), t);
        assert!(c.get("h1").is_some());
        c.set_enabled(false);
        assert!(c.get("h1").is_none());
    }
}
