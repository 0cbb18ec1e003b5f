//! Login throttling: exponential backoff on failed logins, then a temporary
//! lockout, per (account, address) pair, per address and per account, in
//! memory and bounded (`[login]` in the configuration).
//!
//! Every key keeps a count of failed logins and the time of the last one.
//! Past its free attempts, each further attempt must wait
//! `backoff-base-ms × 2^(failures − free)` after the last failure, up to a
//! cap; an attempt that comes sooner is refused (429, `Retry-After`) without
//! checking the password, so it costs no hash and tells nothing.
//!
//! * **(account, address)**: `free-attempts` (5) free, then backoff; at
//!   `lockout-after` (20) failures the pair is locked for `lockout-secs`
//!   (900). This is the only lockout, and it locks one address out of one
//!   account: an attacker cannot lock the real owner out from elsewhere.
//! * **address** (any account): `address-free-attempts` (20) free, then
//!   backoff up to `lockout-secs`: one address spraying many accounts.
//! * **account** (any address): `account-free-attempts` (20) free, then
//!   backoff capped at `account-max-backoff-secs` (60): many addresses
//!   guessing one account. The cap bounds what anyone can do to an account:
//!   at worst one attempt per cap. An address that logged in to the account
//!   successfully (and has not failed since) is exempt.
//!
//! A success clears its pair and its account. A key is forgotten
//! `lockout-secs` after its last failure, and the table holds at most
//! `throttle-max-entries` keys (the least recently failed are dropped
//! first). Admins clear an account's state (`DELETE
//! /api/v1/users/{id}/login-throttle`); a restart clears everything.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::refusals::LoginRefusal;
use super::users::{LoginRequest, LoginResponse};
use super::{Error, Result};
use crate::AppState;
use crate::auth::{Operator, Role};

/// Throttle settings (from `[login]`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Failures per (account, address) before backoff.
    pub free_attempts: u32,
    /// Failures per (account, address) that lock the pair.
    pub lockout_after: u32,
    /// How long a lockout lasts, and how long a key is remembered.
    pub lockout: Duration,
    /// First backoff step.
    pub backoff_base: Duration,
    /// Failures per address (any account) before backoff.
    pub address_free_attempts: u32,
    /// Failures per account (any address) before backoff.
    pub account_free_attempts: u32,
    /// Longest backoff per account.
    pub account_max_backoff: Duration,
    /// Keys kept.
    pub max_entries: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Pair(String, Option<IpAddr>),
    Address(IpAddr),
    Account(String),
}

#[derive(Debug, Clone, Copy)]
struct State {
    failures: u32,
    last: Instant,
    /// A pair whose last attempt succeeded: exempt from the account's
    /// backoff.
    trusted: bool,
}

/// What the throttle holds against one account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Failed logins counted (the most of any of its keys).
    pub failures: u32,
    /// Addresses locked out of it.
    pub locked_addresses: usize,
}

/// The throttle's table.
#[derive(Debug)]
pub struct LoginThrottle {
    settings: Settings,
    table: Mutex<HashMap<Key, State>>,
}

impl LoginThrottle {
    /// An empty throttle.
    pub fn new(settings: Settings) -> Self {
        LoginThrottle {
            settings,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn table(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Key, State>>> {
        self.table
            .lock()
            .map_err(|_| Error::Internal(anyhow::anyhow!("login throttle lock poisoned")))
    }

    /// How long `key` must still wait at `now` (zero: it may try).
    fn wait(&self, key: &Key, s: &State, now: Instant) -> Duration {
        let c = &self.settings;
        let (free, cap) = match key {
            Key::Pair(..) if s.failures >= c.lockout_after => {
                return (s.last + c.lockout).saturating_duration_since(now);
            }
            Key::Pair(..) => (c.free_attempts, c.lockout),
            Key::Address(_) => (c.address_free_attempts, c.lockout),
            Key::Account(_) => (c.account_free_attempts, c.account_max_backoff),
        };
        if s.failures < free {
            return Duration::ZERO;
        }
        let steps = (s.failures - free).min(30);
        let backoff = c.backoff_base.saturating_mul(1u32 << steps).min(cap);
        (s.last + backoff).saturating_duration_since(now)
    }

    fn keys(account: &str, from: Option<IpAddr>) -> [Option<Key>; 3] {
        [
            Some(Key::Pair(account.to_string(), from)),
            from.map(Key::Address),
            Some(Key::Account(account.to_string())),
        ]
    }

    /// 429 with the seconds to wait when `account` may not try from
    /// `from` now.
    pub fn check(&self, account: &str, from: Option<IpAddr>) -> Result<()> {
        match self.refusal(account, from)? {
            None => Ok(()),
            Some((secs, _)) => Err(Error::TooManyRequests(secs)),
        }
    }

    /// When `account` may not try from `from` now: the seconds to wait and
    /// why (the key with the longest wait).
    pub fn refusal(
        &self,
        account: &str,
        from: Option<IpAddr>,
    ) -> Result<Option<(u64, LoginRefusal)>> {
        let now = Instant::now();
        let table = self.table()?;
        let pair_trusted = table
            .get(&Key::Pair(account.to_string(), from))
            .is_some_and(|s| s.trusted);
        let mut wait = Duration::ZERO;
        let mut why = LoginRefusal::Account;
        for key in Self::keys(account, from).into_iter().flatten() {
            if pair_trusted && matches!(key, Key::Account(_)) {
                continue;
            }
            if let Some(s) = table.get(&key)
                && now.duration_since(s.last) < self.settings.lockout
            {
                let w = self.wait(&key, s, now);
                if w > wait {
                    wait = w;
                    why = match key {
                        Key::Pair(..) if s.failures >= self.settings.lockout_after => {
                            LoginRefusal::Lockout
                        }
                        Key::Pair(..) | Key::Account(_) => LoginRefusal::Account,
                        Key::Address(_) => LoginRefusal::Address,
                    };
                }
            }
        }
        if wait.is_zero() {
            Ok(None)
        } else {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Ok(Some((secs.max(1), why)))
        }
    }

    /// Records a failed login of `account` from `from`.
    pub fn failed(&self, account: &str, from: Option<IpAddr>) -> Result<()> {
        let now = Instant::now();
        let mut table = self.table()?;
        for key in Self::keys(account, from).into_iter().flatten() {
            if !table.contains_key(&key) && table.len() >= self.settings.max_entries {
                self.evict(&mut table, now);
            }
            let forget = self.settings.lockout;
            let s = table.entry(key).or_insert(State {
                failures: 0,
                last: now,
                trusted: false,
            });
            if now.duration_since(s.last) >= forget {
                s.failures = 0;
            }
            s.failures = s.failures.saturating_add(1);
            s.last = now;
            s.trusted = false;
        }
        Ok(())
    }

    /// Records a successful login: the pair and the account start over,
    /// and the pair is exempt from the account's backoff.
    pub fn succeeded(&self, account: &str, from: Option<IpAddr>) -> Result<()> {
        let now = Instant::now();
        let mut table = self.table()?;
        table.remove(&Key::Account(account.to_string()));
        let pair = Key::Pair(account.to_string(), from);
        if !table.contains_key(&pair) && table.len() >= self.settings.max_entries {
            self.evict(&mut table, now);
        }
        table.insert(
            pair,
            State {
                failures: 0,
                last: now,
                trusted: true,
            },
        );
        Ok(())
    }

    /// Forgets every failure of `account` (an admin's clear).
    pub fn clear(&self, account: &str) -> Result<usize> {
        let mut table = self.table()?;
        let before = table.len();
        table.retain(|k, s| match k {
            Key::Pair(a, _) => a != account || s.trusted,
            Key::Account(a) => a != account,
            Key::Address(_) => true,
        });
        Ok(before - table.len())
    }

    /// What is held against `account`: the most failures of any of its
    /// keys, and how many of its (account, address) pairs are locked out.
    pub fn held(&self, account: &str) -> Result<Held> {
        let now = Instant::now();
        let table = self.table()?;
        let mut held = Held::default();
        for (k, s) in table.iter() {
            let live = now.duration_since(s.last) < self.settings.lockout;
            match k {
                Key::Pair(a, _) | Key::Account(a) if a == account && live => {
                    held.failures = held.failures.max(s.failures);
                    if matches!(k, Key::Pair(..)) && s.failures >= self.settings.lockout_after {
                        held.locked_addresses += 1;
                    }
                }
                _ => {}
            }
        }
        Ok(held)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.table.lock().map_or(0, |t| t.len())
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops forgotten keys; when still full, the least recently failed
    /// tenth.
    fn evict(&self, table: &mut HashMap<Key, State>, now: Instant) {
        let forget = self.settings.lockout;
        table.retain(|_, s| now.duration_since(s.last) < forget);
        if table.len() < self.settings.max_entries {
            return;
        }
        let mut ages: Vec<Instant> = table.values().map(|s| s.last).collect();
        let n = (ages.len() / 10).max(1);
        let (_, cut, _) = ages.select_nth_unstable(n - 1);
        let cut = *cut;
        table.retain(|_, s| s.last > cut);
        tracing::warn!(
            kept = table.len(),
            "login throttle table full: the oldest entries were dropped"
        );
    }
}

/// The throttle's name for an account: organisation and email.
fn account(state: &AppState, req: &LoginRequest) -> String {
    let org = req
        .organization
        .as_deref()
        .unwrap_or(&state.config.default_organization);
    format!("{org}\u{0}{}", req.email)
}

/// Logs in through the throttle: refused (429) while `from` or the account
/// is backing off or locked, before any password is checked; a wrong
/// password counts, a right one clears.
pub async fn login(
    state: &AppState,
    req: LoginRequest,
    from: Option<IpAddr>,
) -> Result<LoginResponse> {
    let key = account(state, &req);
    if let Some((secs, why)) = state.login_throttle.refusal(&key, from)? {
        tracing::info!(
            email = %req.email,
            from = ?from,
            reason = why.as_str(),
            "login refused: backing off after failed attempts"
        );
        state.metrics.refusals.login(why);
        return Err(Error::TooManyRequests(secs));
    }
    match super::users::login(state, req).await {
        Ok(session) => {
            state.login_throttle.succeeded(&key, from)?;
            Ok(session)
        }
        Err(Error::Unauthorized) => {
            state.login_throttle.failed(&key, from)?;
            Err(Error::Unauthorized)
        }
        Err(e) => Err(e),
    }
}

/// The throttle's name for user `user_id` of the operator's organisation,
/// and their email; read through `db`.
async fn account_of<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    op: &Operator,
    user_id: &str,
) -> Result<(String, String)> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT u.email, o.name FROM users u JOIN organizations o ON o.id = u.org_id WHERE u.id = $1 AND u.org_id = $2",
    )
    .bind(user_id)
    .bind(&op.org_id)
    .fetch_optional(db)
    .await?;
    let (email, org) = row.ok_or(Error::NotFound("no such user"))?;
    Ok((format!("{org}\u{0}{email}"), email))
}

/// What the login throttle holds against user `user_id` of the operator's
/// organisation (admin), on this server process.
pub async fn held(state: &AppState, op: &Operator, user_id: &str) -> Result<Held> {
    op.require(Role::Admin)?;
    let (account, _) = account_of(state.store.pool(), op, user_id).await?;
    state.login_throttle.held(&account)
}

/// Clears the login throttle of user `user_id` of the operator's
/// organisation (admin): its lockouts and backoff end now. Answers how
/// many entries were dropped.
pub async fn clear(state: &AppState, op: &Operator, user_id: &str) -> Result<usize> {
    op.require(Role::Admin)?;
    let target = format!("user:{user_id}");
    let audit = super::audit::Audited::new(state, op, "user.login_throttle.clear", &target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let (account, email) = account_of(&mut *tx, op, user_id).await?;
        Ok((account, format!("user:{email}")))
    }
    .await;
    let account = audit.finish(tx, outcome).await?;
    // The throttle lives in memory: cleared once the entry is committed.
    state.login_throttle.clear(&account)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            free_attempts: 2,
            lockout_after: 4,
            lockout: Duration::from_secs(600),
            backoff_base: Duration::from_secs(1),
            address_free_attempts: 10,
            account_free_attempts: 3,
            account_max_backoff: Duration::from_secs(5),
            max_entries: 100,
        }
    }

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, n]))
    }

    fn refused(t: &LoginThrottle, a: &str, from: Option<IpAddr>) -> u64 {
        match t.check(a, from) {
            Err(Error::TooManyRequests(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_doubles_then_locks_the_pair_only() {
        let t = LoginThrottle::new(settings());
        for _ in 0..2 {
            t.check("a", ip(1)).unwrap();
            t.failed("a", ip(1)).unwrap();
        }
        assert_eq!(refused(&t, "a", ip(1)), 1);
        t.failed("a", ip(1)).unwrap();
        assert_eq!(refused(&t, "a", ip(1)), 2);
        t.failed("a", ip(1)).unwrap();
        // Locked: the lockout, not the backoff.
        assert_eq!(refused(&t, "a", ip(1)), 600);
        // Another address is not locked out (the account's own backoff
        // is capped at 5 s).
        assert!(refused(&t, "a", ip(2)) <= 5);
        // An address that logged in before is exempt from the account's
        // backoff.
        t.succeeded("a", ip(3)).unwrap();
        t.failed("a", ip(1)).unwrap();
        t.failed("a", ip(1)).unwrap();
        t.failed("a", ip(1)).unwrap();
        assert!(t.check("a", ip(2)).is_err());
        t.check("a", ip(3)).unwrap();
        let held = t.held("a").unwrap();
        assert_eq!(held.locked_addresses, 1, "{held:?}");
        assert!(held.failures >= 4, "{held:?}");
        // An admin's clear ends the lockout.
        assert!(t.clear("a").unwrap() >= 2);
        assert_eq!(t.held("a").unwrap(), Held::default());
        t.check("a", ip(1)).unwrap();
        t.check("a", ip(2)).unwrap();
    }

    #[test]
    fn the_table_is_bounded() {
        let t = LoginThrottle::new(settings());
        for n in 0..1000u32 {
            t.failed(&format!("user{n}"), None).unwrap();
        }
        assert!(t.len() <= 100, "{}", t.len());
    }
}
