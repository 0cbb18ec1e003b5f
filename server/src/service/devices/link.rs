//! A device's link class, site and time zone, as the device itself sends
//! them (enrollment, heartbeat): checked, and stored over what was there
//! (an absent field leaves the stored one alone).

use crate::AppState;
use crate::service::rollouts::spec::check_label;
use crate::service::rollouts::time::time_zone;
use crate::service::{Error, Result};

/// Link fields a device sent.
#[derive(Debug, Clone, Default)]
pub struct Link {
    /// e.g. ethernet, wifi, metered-4g.
    pub link_class: Option<String>,
    /// Site or cell tag.
    pub site: Option<String>,
    /// IANA time zone, e.g. Europe/Berlin.
    pub time_zone: Option<String>,
}

impl Link {
    /// Checks the fields; the error names the field.
    pub fn check(&self) -> Result<()> {
        if let Some(c) = &self.link_class {
            check_label("link_class", c)?;
        }
        if let Some(s) = &self.site {
            check_label("site", s)?;
        }
        if let Some(tz) = &self.time_zone
            && time_zone(tz).is_none()
        {
            return Err(Error::Invalid(format!(
                "time_zone {tz:?}: not an IANA time zone (e.g. Europe/Berlin)"
            )));
        }
        Ok(())
    }

    /// Nothing was sent.
    pub fn is_empty(&self) -> bool {
        self.link_class.is_none() && self.site.is_none() && self.time_zone.is_none()
    }
}

/// Stores the link fields device `pk` sent (absent ones are left alone).
pub async fn store(state: &AppState, pk: &str, link: &Link) -> Result<()> {
    if link.is_empty() {
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

    fn link(link_class: Option<&str>, site: Option<&str>, time_zone: Option<&str>) -> Link {
        Link {
            link_class: link_class.map(Into::into),
            site: site.map(Into::into),
            time_zone: time_zone.map(Into::into),
        }
    }

    fn refusal(l: &Link) -> String {
        match l.check() {
            Err(Error::Invalid(why)) => why,
            other => format!("not refused as invalid: {other:?}"),
        }
    }

    #[test]
    fn the_error_names_the_field() {
        assert!(Link::default().is_empty());
        assert!(
            link(Some("metered-4g"), Some("plant/7"), Some("Europe/Berlin"))
                .check()
                .is_ok()
        );
        assert!(refusal(&link(Some("wi fi"), None, None)).starts_with("link_class "));
        assert!(refusal(&link(None, Some(""), None)).starts_with("site "));
        assert!(refusal(&link(None, None, Some("Mars/Olympus"))).starts_with("time_zone "));
    }
}
