//! A device's link: its link class, site and time zone, which the rollout
//! planner spreads downloads by. Operators set it; devices report it at
//! enrollment and in heartbeats.

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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
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
