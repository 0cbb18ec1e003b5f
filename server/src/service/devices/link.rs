//! A device's link class, site and time zone, as the device itself sends
//! them (enrollment, heartbeat): checked (`service::rollouts::link`), and
//! stored over what was there (an absent field leaves the stored one
//! alone).

use crate::AppState;
use crate::service::Result;
pub use crate::service::rollouts::link::{DeviceLink as Link, check_link};

/// Stores the link fields device `pk` sent (absent ones are left alone).
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
