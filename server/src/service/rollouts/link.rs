//! A device's link: its link class, site and time zone, which the rollout
//! planner spreads downloads by. The enrollment token sets it, operators
//! set it; what a device claims for itself (at enrollment, in heartbeats)
//! is only a hint, kept apart (`devices.link_hint`), that an operator may
//! accept ([`accept_hint`]).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::spec::check_label;
use super::time::time_zone;
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::audit::Audited;
use crate::service::users::require;
use crate::service::{Error, Result};

/// A device's link class, site and time zone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceLink {
    /// e.g. ethernet, wifi, metered-4g (null: ethernet).
    pub link_class: Option<String>,
    /// Site or cell tag: devices sharing one are spread over time.
    pub site: Option<String>,
    /// IANA time zone, e.g. Europe/Berlin (null: UTC).
    pub time_zone: Option<String>,
}

/// Checks link fields; the error names the field.
pub fn check_link(link: &DeviceLink) -> Result<()> {
    if let Some(c) = &link.link_class {
        check_label("link_class", c)?;
    }
    if let Some(s) = &link.site {
        check_label("site", s)?;
    }
    if let Some(tz) = &link.time_zone
        && time_zone(tz).is_none()
    {
        return Err(Error::Invalid(format!(
            "time_zone {tz:?}: not an IANA time zone (e.g. Europe/Berlin)"
        )));
    }
    Ok(())
}

/// Sets a device's link class, site and time zone (ops).
pub async fn set_link(
    state: &AppState,
    op: &Operator,
    id: &str,
    link: DeviceLink,
) -> Result<DeviceLink> {
    require(op, Role::Ops)?;
    let target = format!("device:{id}");
    let audit = Audited::new(state, op, "device.link", &target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        check_link(&link)?;
        let done = sqlx::query(
            "UPDATE devices SET link_class = $1, site = $2, time_zone = $3 WHERE id = $4 AND org_id = $5",
        )
        .bind(&link.link_class)
        .bind(&link.site)
        .bind(&link.time_zone)
        .bind(id)
        .bind(&op.org_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("no such device"));
        }
        Ok((link, String::new()))
    }
    .await;
    audit.finish(tx, outcome).await
}

/// A device's link and what the device claims.
#[derive(Debug, Serialize, ToSchema)]
pub struct LinkView {
    /// What the rollout planner uses (the token's or an operator's).
    pub link: DeviceLink,
    /// What the device last claimed (enrollment, heartbeat), if anything.
    pub hint: Option<DeviceLink>,
}

#[derive(sqlx::FromRow)]
struct LinkRow {
    link_class: Option<String>,
    site: Option<String>,
    time_zone: Option<String>,
    link_hint: Option<String>,
}

/// The device's link and claim, read through `db` (the pool, or a
/// change's transaction).
async fn read<'e>(
    db: impl sqlx::Executor<'e, Database = sqlx::Any>,
    op: &Operator,
    id: &str,
) -> Result<LinkView> {
    let row = sqlx::query_as::<_, LinkRow>(
        "SELECT link_class, site, time_zone, link_hint FROM devices WHERE id = $1 AND org_id = $2",
    )
    .bind(id)
    .bind(&op.org_id)
    .fetch_optional(db)
    .await?
    .ok_or(Error::NotFound("no such device"))?;
    Ok(LinkView {
        link: DeviceLink {
            link_class: row.link_class,
            site: row.site,
            time_zone: row.time_zone,
        },
        hint: row
            .link_hint
            .and_then(|h| serde_json::from_str::<DeviceLink>(&h).ok()),
    })
}

/// A device's link and its own claim (any role).
pub async fn link_view(state: &AppState, op: &Operator, id: &str) -> Result<LinkView> {
    read(state.store.pool(), op, id).await
}

/// Takes the device's claim as its link (ops): each field it claimed
/// replaces the stored one; [`Error::Conflict`] when it claimed nothing.
pub async fn accept_hint(state: &AppState, op: &Operator, id: &str) -> Result<DeviceLink> {
    require(op, Role::Ops)?;
    let target = format!("device:{id}");
    let audit = Audited::new(state, op, "device.link.accept", &target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let view = read(&mut *tx, op, id).await?;
        let Some(hint) = view.hint else {
            return Err(Error::Conflict(
                "the device has claimed no link class, site or time zone".into(),
            ));
        };
        check_link(&hint)?;
        let link = DeviceLink {
            link_class: hint.link_class.or(view.link.link_class),
            site: hint.site.or(view.link.site),
            time_zone: hint.time_zone.or(view.link.time_zone),
        };
        sqlx::query(
            "UPDATE devices SET link_class = $1, site = $2, time_zone = $3 WHERE id = $4 AND org_id = $5",
        )
        .bind(&link.link_class)
        .bind(&link.site)
        .bind(&link.time_zone)
        .bind(id)
        .bind(&op.org_id)
        .execute(&mut *tx)
        .await?;
        Ok((link, String::new()))
    }
    .await;
    audit.finish(tx, outcome).await
}
