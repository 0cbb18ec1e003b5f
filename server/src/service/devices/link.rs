//! A device's link class, site and time zone. The enrollment token sets
//! them ([`store`]); what the device itself sends (enrollment, heartbeat)
//! is checked (`service::rollouts::link`) and kept only as a hint
//! ([`store_hint`]) that an operator may accept
//! (`service::rollouts::link::accept_hint`): a device does not choose its
//! own site, time zone or link class, which decide when a rollout reaches
//! it.

use crate::AppState;
pub use crate::service::rollouts::link::{DeviceLink as Link, check_link};
use crate::service::{Error, Result};

/// Stores link fields for device `pk` (absent ones are left alone).
pub async fn store(state: &AppState, pk: &str, link: &Link) -> Result<()> {
    if link.link_class.is_none() && link.site.is_none() && link.time_zone.is_none() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE devices SET link_class = COALESCE($1, link_class), site = COALESCE($2, site), time_zone = COALESCE($3, time_zone) WHERE id = $4",
    )
    .bind(&link.link_class)
    .bind(&link.site)
    .bind(&link.time_zone)
    .bind(pk)
    .execute(state.store.pool())
    .await?;
    Ok(())
}

/// Keeps what device `pk` claimed as its link hint (nothing claimed: the
/// hint stays). Written only when it changed.
pub async fn store_hint(state: &AppState, pk: &str, claim: &Link) -> Result<()> {
    if claim.link_class.is_none() && claim.site.is_none() && claim.time_zone.is_none() {
        return Ok(());
    }
    let hint = serde_json::to_string(claim).map_err(|e| Error::Internal(e.into()))?;
    sqlx::query(
        "UPDATE devices SET link_hint = $1 WHERE id = $2 AND (link_hint IS NULL OR link_hint <> $1)",
    )
    .bind(&hint)
    .bind(pk)
    .execute(state.store.pool())
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Error;

    fn link(link_class: Option<&str>, site: Option<&str>, time_zone: Option<&str>) -> Link {
        Link {
            link_class: link_class.map(Into::into),
            site: site.map(Into::into),
            time_zone: time_zone.map(Into::into),
        }
    }

    fn refusal(l: &Link) -> String {
        match check_link(l) {
            Err(Error::Invalid(why)) => why,
            other => format!("not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn the_error_names_the_field() {
        assert!(
            check_link(&link(
                Some("metered-4g"),
                Some("plant/7"),
                Some("Europe/Berlin")
            ))
            .is_ok()
        );
        assert!(refusal(&link(Some("wi fi"), None, None)).starts_with("link_class "));
        assert!(refusal(&link(None, Some(""), None)).starts_with("site "));
        assert!(refusal(&link(None, None, Some("Mars/Olympus"))).starts_with("time_zone "));
    }
}
