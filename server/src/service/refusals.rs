//! Counts of what the server refused to protect itself, for `/metrics`
//! (`http::metrics` registers them): logins the throttle refused, by
//! reason; unauthenticated requests over their address's rate limit;
//! connections over the per-address cap; and Idempotency-Key conflicts.
//! Every label has a fixed set of values, so no client can add series.

use prometheus_client::encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Why the login throttle refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoginRefusal {
    /// The account's backoff (from this address, or from any).
    Account,
    /// The address's backoff (failures on any account).
    Address,
    /// The (account, address) pair is locked out.
    Lockout,
}

impl LoginRefusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LoginRefusal::Account => "account",
            LoginRefusal::Address => "address",
            LoginRefusal::Lockout => "lockout",
        }
    }
}

/// An Idempotency-Key conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdempotencyConflict {
    /// 409: the key's first request is still in progress (or was just
    /// released).
    InProgress,
    /// 422: the key was used for another request.
    Mismatch,
}

impl IdempotencyConflict {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            IdempotencyConflict::InProgress => "in_progress",
            IdempotencyConflict::Mismatch => "mismatch",
        }
    }
}

/// One label, `name`, with one of a fixed set of values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Label(&'static str, &'static str);

impl EncodeLabelSet for Label {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> std::fmt::Result {
        (self.0, self.1).encode(encoder.encode_label())
    }
}

/// The refusal counters.
#[derive(Debug, Clone, Default)]
pub struct Refusals {
    logins: Family<Label, Counter>,
    conflicts: Family<Label, Counter>,
    /// Unauthenticated requests (login, enroll, activate, device auth)
    /// refused: their address was over its rate limit.
    pub unauthenticated: Counter,
    /// Connections closed at once: their address already had
    /// `max-connections-per-address` open.
    pub connections: Counter,
}

impl Refusals {
    /// Registers the counters in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "login_throttled",
            "Logins refused by the login throttle, by reason (account, address, lockout)",
            self.logins.clone(),
        );
        registry.register(
            "unauthenticated_rate_limited",
            "Unauthenticated requests refused: their address was over its rate limit",
            self.unauthenticated.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once: their address was at max-connections-per-address",
            self.connections.clone(),
        );
        registry.register(
            "idempotency_conflicts",
            "Idempotency-Key conflicts, by kind (in_progress: 409, mismatch: 422)",
            self.conflicts.clone(),
        );
        // Every series exists from the start (at 0), so a rate is defined.
        for r in [
            LoginRefusal::Account,
            LoginRefusal::Address,
            LoginRefusal::Lockout,
        ] {
            drop(self.logins.get_or_create(&Label("reason", r.as_str())));
        }
        for k in [
            IdempotencyConflict::InProgress,
            IdempotencyConflict::Mismatch,
        ] {
            drop(self.conflicts.get_or_create(&Label("kind", k.as_str())));
        }
    }

    /// Counts a login the throttle refused.
    pub fn login(&self, why: LoginRefusal) {
        self.logins
            .get_or_create(&Label("reason", why.as_str()))
            .inc();
    }

    /// Counts an Idempotency-Key conflict.
    pub fn idempotency(&self, kind: IdempotencyConflict) {
        self.conflicts
            .get_or_create(&Label("kind", kind.as_str()))
            .inc();
    }
}
