//! Anti-rollback on the server's side: a device refuses any release whose
//! manifest `security-version` is below its floor (the highest security
//! version it committed, reported in its heartbeats), so the server
//! refuses, with a 409 naming the devices, to assign one: a deployment, a
//! rollout (at create and at start) or a rollout's rollback.

use crate::service::Error;

/// Most devices named in a refusal.
pub const MAX_NAMED: usize = 10;

/// A device whose floor is above a release's security version.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AboveFloor {
    /// The device's own id.
    pub device_id: String,
    /// Its floor.
    pub security_floor: i64,
    /// The release it would be sent to.
    pub version: String,
    /// That release's security version.
    pub security_version: i64,
}

/// Whether a device with `floor` refuses a release of `security_version`.
pub fn refuses(floor: Option<i64>, security_version: i64) -> bool {
    floor.is_some_and(|f| f > security_version)
}

/// The 409 for `what` (e.g. "deploy 2.0.1", "roll back rollout r1"):
/// `total` devices would refuse, the first of them in `devices`.
pub fn refusal(what: &str, devices: &[AboveFloor], total: usize) -> Error {
    let named: Vec<String> = devices
        .iter()
        .take(MAX_NAMED)
        .map(|d| {
            format!(
                "{} (floor {}, {} has security version {})",
                d.device_id, d.security_floor, d.version, d.security_version
            )
        })
        .collect();
    let more = total.saturating_sub(named.len());
    Error::Conflict(format!(
        "cannot {what}: {total} device(s) would refuse it, the release's security version is below their anti-rollback floor: {}{}",
        named.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_devices_and_counts_the_rest() {
        let d = |i: usize| AboveFloor {
            device_id: format!("dev-{i}"),
            security_floor: 3,
            version: "2.0.1".into(),
            security_version: 2,
        };
        let all: Vec<AboveFloor> = (0..12).map(d).collect();
        let text = refusal("deploy 2.0.1", &all, all.len()).to_string();
        assert!(text.contains("12 device(s)"), "{text}");
        assert!(
            text.contains("dev-0 (floor 3, 2.0.1 has security version 2)"),
            "{text}"
        );
        assert!(text.contains("and 2 more"), "{text}");
        assert!(!text.contains("dev-11"), "{text}");
        assert!(refuses(Some(3), 2));
        assert!(!refuses(Some(2), 2));
        assert!(!refuses(None, 0));
    }
}
