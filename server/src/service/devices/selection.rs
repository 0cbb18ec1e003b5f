//! Which devices a device-list filter selects: the one WHERE clause that
//! the list, its count and the bulk actions share, and the list's keyset
//! cursor.

use super::fleet::{DeviceFilter, STATUSES, offline_after_ms};
use crate::AppState;
use crate::auth::Operator;
use crate::service::{Error, Result};
use crate::store::{Backend, now_ms};

/// The longest search string.
const MAX_QUERY_CHARS: usize = 128;
/// The longest cursor accepted (hex of a device id).
const MAX_CURSOR_CHARS: usize = 1024;

/// The cursor for the page after `device_id`.
pub(crate) fn cursor(device_id: &str) -> String {
    hex::encode(device_id.as_bytes())
}

pub(crate) fn read_cursor(c: &str) -> Result<String> {
    let bad = || Error::Invalid("after: not a cursor of this list (follow the Link header)".into());
    if c.len() > MAX_CURSOR_CHARS {
        return Err(bad());
    }
    let bytes = hex::decode(c).map_err(|_| bad())?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// `%needle%` for LIKE, lower case, with `\`, `%` and `_` escaped.
fn like_pattern(q: &str) -> String {
    let mut p = String::with_capacity(q.len() + 2);
    p.push('%');
    for c in q.to_lowercase().chars() {
        if matches!(c, '\\' | '%' | '_') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// A filter checked and ready to bind: parameters `$1`..`$10` of
/// [`Matching::clause`], in order.
#[derive(Debug)]
pub(crate) struct Matching {
    org_id: String,
    tag: Option<String>,
    hardware_class: Option<String>,
    version: Option<String>,
    status: Option<String>,
    offline_before: i64,
    link_class: Option<String>,
    site: Option<String>,
    pattern: Option<String>,
    seen_before: Option<i64>,
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

impl Matching {
    /// Checks `f` for operator `op`'s organisation.
    pub(crate) fn new(state: &AppState, op: &Operator, f: &DeviceFilter) -> Result<Self> {
        let clean = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let q = clean(&f.q);
        if let Some(q) = &q
            && q.chars().count() > MAX_QUERY_CHARS
        {
            return Err(Error::Invalid(format!(
                "q: at most {MAX_QUERY_CHARS} characters"
            )));
        }
        let status = clean(&f.status);
        if let Some(st) = &status
            && st != "attention"
            && !STATUSES.contains(&st.as_str())
        {
            return Err(Error::Invalid(format!(
                "status {st:?}: one of {}, attention",
                STATUSES.join(", ")
            )));
        }
        Ok(Matching {
            org_id: op.org_id.clone(),
            tag: clean(&f.tag),
            hardware_class: clean(&f.hardware_class),
            version: clean(&f.version),
            status,
            offline_before: now_ms().saturating_sub(offline_after_ms(state)),
            link_class: clean(&f.link_class),
            site: clean(&f.site),
            pattern: q.as_deref().map(like_pattern),
            seen_before: f.seen_before,
        })
    }

    /// The WHERE clause over `devices d` (parameters `$1`..`$10`). The
    /// statement's shape is fixed; an absent filter binds NULL and the
    /// `$n IS NULL OR ...` arm makes it a no-op.
    pub(crate) fn clause(state: &AppState) -> String {
        let (host, name) = match state.store.backend() {
            Backend::Sqlite => (
                "json_extract(d.hardware_metadata, '$.hostname')",
                "json_extract(d.hardware_metadata, '$.name')",
            ),
            Backend::Postgres => (
                "(d.hardware_metadata::jsonb ->> 'hostname')",
                "(d.hardware_metadata::jsonb ->> 'name')",
            ),
        };
        format!(
            "d.org_id = $1 \
             AND ($2 IS NULL OR EXISTS (SELECT 1 FROM device_tags t WHERE t.device_pk = d.id AND t.tag = $2)) \
             AND ($3 IS NULL OR d.hardware_class = $3) \
             AND ($4 IS NULL OR d.current_version = $4) \
             AND ($5 IS NULL \
                  OR ($5 = 'offline' AND (d.last_seen_at IS NULL OR d.last_seen_at < $6)) \
                  OR ($5 = 'attention' AND d.revoked = 0 AND (d.last_seen_at IS NULL OR d.last_seen_at < $6 OR d.status IN ('degraded', 'reverted', 'error'))) \
                  OR ($5 NOT IN ('offline', 'attention') AND d.status = $5 AND d.last_seen_at >= $6)) \
             AND ($7 IS NULL OR COALESCE(d.link_class, 'ethernet') = $7) \
             AND ($8 IS NULL OR d.site = $8) \
             AND ($9 IS NULL OR LOWER(d.device_id) LIKE $9 ESCAPE '\\' OR LOWER(d.id) LIKE $9 ESCAPE '\\' \
                  OR LOWER({host}) LIKE $9 ESCAPE '\\' OR LOWER({name}) LIKE $9 ESCAPE '\\' \
                  OR EXISTS (SELECT 1 FROM device_tags t WHERE t.device_pk = d.id AND LOWER(t.tag) LIKE $9 ESCAPE '\\')) \
             AND ($10 IS NULL OR d.last_seen_at IS NULL OR d.last_seen_at < $10)"
        )
    }

    /// Binds `$1`..`$10`.
    pub(crate) fn bind<'q>(&'q self, q: AnyQuery<'q>) -> AnyQuery<'q> {
        q.bind(&self.org_id)
            .bind(&self.tag)
            .bind(&self.hardware_class)
            .bind(&self.version)
            .bind(&self.status)
            .bind(self.offline_before)
            .bind(&self.link_class)
            .bind(&self.site)
            .bind(&self.pattern)
            .bind(self.seen_before)
    }
}
