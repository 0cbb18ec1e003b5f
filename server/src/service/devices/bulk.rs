//! Bulk actions on devices (ops): tag, untag, set the link, revoke, on a
//! selection of devices or on every device a list filter matches (the
//! same WHERE clause as the list, `selection::Matching`). Each bulk action
//! is one transaction and one audit entry that names the selection and
//! how many devices it changed.

use sqlx::Row;

use super::fleet::DeviceFilter;
use super::selection::Matching;
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::audit::Audited;
use crate::service::names::check_tags;
use crate::service::rollouts::link::{DeviceLink, check_link};
use crate::service::users::require;
use crate::service::{Error, Result};

/// The most devices one selection may name (a filter has no limit).
pub const MAX_SELECTION: usize = 5000;
/// The most tags a device may have (as `PUT /devices/{id}/tags`).
const MAX_TAGS: i64 = 64;

/// Which devices a bulk action applies to.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every device the filter matches (its `after` and `limit` ignored).
    Filter(DeviceFilter),
    /// These devices (internal ids) of the organisation.
    Devices(Vec<String>),
}

/// What to do to each device.
#[derive(Debug, Clone)]
pub enum Action {
    /// Add this tag (devices that have it, or 64 tags, are left alone).
    Tag(String),
    /// Remove this tag.
    Untag(String),
    /// Set the fields given (absent ones are left alone).
    Link(DeviceLink),
    /// Revoke the credential.
    Revoke,
}

impl Action {
    fn audit_name(&self) -> &'static str {
        match self {
            Action::Tag(_) => "device.bulk_tag",
            Action::Untag(_) => "device.bulk_untag",
            Action::Link(_) => "device.bulk_link",
            Action::Revoke => "device.bulk_revoke",
        }
    }
}

fn describe(t: &Target) -> String {
    match t {
        Target::Devices(ids) => format!("devices:selection:{}", ids.len()),
        Target::Filter(f) => {
            let mut parts = Vec::new();
            for (k, v) in [
                ("q", &f.q),
                ("status", &f.status),
                ("tag", &f.tag),
                ("hardware_class", &f.hardware_class),
                ("version", &f.version),
                ("link_class", &f.link_class),
                ("site", &f.site),
            ] {
                if let Some(v) = v.as_deref().filter(|v| !v.trim().is_empty()) {
                    parts.push(format!("{k}={v}"));
                }
            }
            if let Some(t) = f.seen_before {
                parts.push(format!("seen_before={t}"));
            }
            format!("devices:filter:{}", parts.join(","))
        }
    }
}

/// Applies `action` to the devices of `target`; how many it changed.
pub async fn apply(
    state: &AppState,
    op: &Operator,
    target: &Target,
    action: &Action,
) -> Result<u64> {
    require(op, Role::Ops)?;
    match action {
        Action::Tag(t) | Action::Untag(t) => check_tags(std::slice::from_ref(t))?,
        Action::Link(l) => {
            check_link(l)?;
            if l.link_class.is_none() && l.site.is_none() && l.time_zone.is_none() {
                return Err(Error::Invalid(
                    "link: give a link class, a site or a time zone".into(),
                ));
            }
        }
        Action::Revoke => {}
    }
    let (filter, ids) = match target {
        Target::Filter(f) => (f.clone(), Vec::new()),
        Target::Devices(ids) => {
            if ids.is_empty() {
                return Err(Error::Invalid("no device selected".into()));
            }
            if ids.len() > MAX_SELECTION {
                return Err(Error::Invalid(format!(
                    "at most {MAX_SELECTION} selected devices; act on a filter instead"
                )));
            }
            (DeviceFilter::default(), ids.clone())
        }
    };
    let m = Matching::new(state, op, &filter)?;
    // `$11`.. are the action's values, then the selection's ids.
    let values = match action {
        Action::Tag(_) | Action::Untag(_) => 1,
        Action::Link(_) => 3,
        Action::Revoke => 0,
    };
    let selected = if ids.is_empty() {
        String::new()
    } else {
        let marks: Vec<String> = (0..ids.len())
            .map(|i| format!("${}", 11 + values + i))
            .collect();
        format!(" AND d.id IN ({})", marks.join(", "))
    };
    let chosen = format!(
        "SELECT d.id FROM devices d WHERE {}{selected}",
        Matching::clause(state)
    );
    let sql = match action {
        Action::Tag(_) => format!(
            "INSERT INTO device_tags (device_pk, org_id, tag) SELECT d.id, d.org_id, $11 FROM devices d \
             WHERE {}{selected} AND NOT EXISTS (SELECT 1 FROM device_tags x WHERE x.device_pk = d.id AND x.tag = $11) \
             AND (SELECT COUNT(*) FROM device_tags c WHERE c.device_pk = d.id) < {MAX_TAGS}",
            Matching::clause(state)
        ),
        Action::Untag(_) => {
            format!("DELETE FROM device_tags WHERE tag = $11 AND device_pk IN ({chosen})")
        }
        Action::Link(_) => format!(
            "UPDATE devices SET link_class = COALESCE($11, link_class), site = COALESCE($12, site), \
             time_zone = COALESCE($13, time_zone) WHERE id IN ({chosen})"
        ),
        Action::Revoke => {
            format!("UPDATE devices SET revoked = 1 WHERE revoked = 0 AND id IN ({chosen})")
        }
    };
    let target_name = describe(target);
    let audit = Audited::new(state, op, action.audit_name(), &target_name);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        // The revoked devices' caches are dropped after the commit.
        let revoked: Vec<String> = if matches!(action, Action::Revoke) {
            let sql = format!("{chosen} AND d.revoked = 0");
            let mut q = m.bind(sqlx::query(&sql));
            for id in &ids {
                q = q.bind(id);
            }
            let rows = q.fetch_all(&mut *tx).await?;
            rows.iter()
                .map(|r| r.try_get::<String, _>("id"))
                .collect::<std::result::Result<_, _>>()?
        } else {
            Vec::new()
        };
        let mut q = m.bind(sqlx::query(&sql));
        match action {
            Action::Tag(t) | Action::Untag(t) => q = q.bind(t),
            Action::Link(l) => q = q.bind(&l.link_class).bind(&l.site).bind(&l.time_zone),
            Action::Revoke => {}
        }
        for id in &ids {
            q = q.bind(id);
        }
        let n = q.execute(&mut *tx).await?.rows_affected();
        Ok(((n, revoked), format!("{target_name} ({n})")))
    }
    .await;
    let (n, revoked) = audit.finish(tx, outcome).await?;
    for pk in &revoked {
        crate::poll_cache::forget_device(state, pk).await;
    }
    Ok(n)
}
