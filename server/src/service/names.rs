//! The names the API accepts: device ids, hardware classes, versions,
//! slots, tags; and the bound on free-form JSON objects devices send.

use super::{Error, Result};

/// Validates an identifier: 1-128 characters of `[A-Za-z0-9._:-]`.
pub fn check_name(what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what}: 1-128 characters of letters, digits and ._:-"
        )))
    }
}

/// Validates tags: at most 64, each 1-64 characters of `[A-Za-z0-9._:=-]`.
pub fn check_tags(tags: &[String]) -> Result<()> {
    if tags.len() > 64 {
        return Err(Error::Invalid("at most 64 tags".into()));
    }
    for t in tags {
        let ok = !t.is_empty()
            && t.len() <= 64
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._:=-".contains(c));
        if !ok {
            return Err(Error::Invalid(format!(
                "tag {t:?}: 1-64 characters of letters, digits and ._:=-"
            )));
        }
    }
    Ok(())
}

/// Bounds a free-form JSON object a device sends (a heartbeat's `extra`,
/// enrollment's `hardware_metadata`): at most `limit` bytes serialised,
/// else [`Error::OverLimit`] (413) naming `what` and the config `key`.
pub fn check_metadata(
    what: &str,
    object: &serde_json::Map<String, serde_json::Value>,
    limit: usize,
    key: &str,
) -> Result<()> {
    let size = serde_json::to_vec(object)
        .map_err(|e| Error::Internal(e.into()))?
        .len();
    if size > limit {
        return Err(Error::OverLimit(format!(
            "{what}: {size} bytes of JSON, at most {limit} ([limits] {key})"
        )));
    }
    Ok(())
}
