//! Install reports: a device's progress or outcome moves its rollout
//! entry, its deployment entry (closing the deployment when every device
//! has an outcome), and its status and version.

use kernex_protocol::api::{Report, ReportState};

use crate::AppState;
use crate::auth::Device;
use crate::service::Result;
use crate::service::names::check_name;

/// The deployment a report belongs to.
#[derive(Debug, sqlx::FromRow)]
struct DeploymentRow {
    deployment_id: String,
    release_id: String,
}

#[derive(Debug, sqlx::FromRow)]
struct VersionRow {
    version: String,
}

#[derive(Debug, sqlx::FromRow)]
struct CountRow {
    n: i64,
}

/// The device status a report state leaves.
fn status(state: ReportState) -> &'static str {
    match state {
        ReportState::Downloading | ReportState::Installed | ReportState::Rebooted => "updating",
        ReportState::Committed | ReportState::RolledBack => "online",
        ReportState::Reverted => "reverted",
        ReportState::Failed => "error",
    }
}

/// Records a report (see the module). A failure marks the release
/// unstable; a committed, reverted or rolled-back install sets the
/// device's version.
pub async fn record(state: &AppState, device: &Device, r: &Report) -> Result<()> {
    device.require_proven()?;
    let status = status(r.state);
    if let Some(v) = &r.version {
        check_name("version", v)?;
    }
    if let Some(v) = &r.booted_slot {
        check_name("booted_slot", v)?;
    }
    let reason = r
        .reason
        .as_deref()
        .map(|s| s.chars().take(2000).collect::<String>());
    let now = state.clock.now_ms();
    let mut tx = state.store.begin_write().await?;
    let rollout_version =
        crate::service::rollouts::device::report(&mut tx, device, r, reason.as_deref(), now)
            .await?;
    // The deployment this report belongs to: the newest one for this device
    // (for the named release if one is given).
    let dep = sqlx::query_as::<_, DeploymentRow>(
        "SELECT dd.deployment_id, p.release_id FROM deployment_devices dd JOIN deployments p ON p.id = dd.deployment_id WHERE dd.device_pk = $1 AND ($2 IS NULL OR p.release_id = $2) ORDER BY p.created_at DESC LIMIT 1",
    )
    .bind(&device.pk)
    .bind(&r.release_id)
    .fetch_optional(&mut *tx)
    .await?;
    let mut version = r.version.clone().or(rollout_version);
    if let Some(DeploymentRow {
        deployment_id,
        release_id,
    }) = &dep
    {
        sqlx::query(
            "UPDATE deployment_devices SET state = $1, bytes_done = COALESCE($2, bytes_done), bytes_total = COALESCE($3, bytes_total), reason = $4, updated_at = $5 WHERE deployment_id = $6 AND device_pk = $7",
        )
        .bind(r.state.as_str())
        .bind(r.bytes_done)
        .bind(r.bytes_total)
        .bind(&reason)
        .bind(now)
        .bind(deployment_id)
        .bind(&device.pk)
        .execute(&mut *tx)
        .await?;
        if r.state == ReportState::Failed {
            // SEED behaviour: a release that fails on a device is marked
            // unstable for operators to see.
            sqlx::query("UPDATE releases SET unstable = 1 WHERE id = $1")
                .bind(release_id)
                .execute(&mut *tx)
                .await?;
        }
        if r.state == ReportState::Committed && version.is_none() {
            let row = sqlx::query_as::<_, VersionRow>("SELECT version FROM releases WHERE id = $1")
                .bind(release_id)
                .fetch_one(&mut *tx)
                .await?;
            version = Some(row.version);
        }
        // Close the deployment when every device has an outcome.
        let open = sqlx::query_as::<_, CountRow>(
            "SELECT COUNT(*) AS n FROM deployment_devices WHERE deployment_id = $1 AND state NOT IN ('committed', 'reverted', 'failed')",
        )
        .bind(deployment_id)
        .fetch_one(&mut *tx)
        .await?
        .n;
        if open == 0 {
            let failed = sqlx::query_as::<_, CountRow>(
                "SELECT COUNT(*) AS n FROM deployment_devices WHERE deployment_id = $1 AND state <> 'committed'",
            )
            .bind(deployment_id)
            .fetch_one(&mut *tx)
            .await?
            .n;
            sqlx::query("UPDATE deployments SET status = $1, completed_at = $2 WHERE id = $3 AND status = 'in_progress'")
                .bind(if failed == 0 { "success" } else { "failed" })
                .bind(now)
                .bind(deployment_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    let status_reason = if status == "online" { None } else { reason };
    let settled = matches!(
        r.state,
        ReportState::Committed | ReportState::Reverted | ReportState::RolledBack
    );
    sqlx::query(
        "UPDATE devices SET last_seen_at = $1, status = $2, status_reason = $3, current_version = COALESCE($4, current_version), booted_slot = COALESCE($5, booted_slot) WHERE id = $6",
    )
    .bind(now)
    .bind(status)
    .bind(&status_reason)
    .bind(if settled { version } else { None })
    .bind(&r.booted_slot)
    .bind(&device.pk)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_install_shows_as_updating_until_its_outcome() {
        for (state, want) in [
            (ReportState::Downloading, "updating"),
            (ReportState::Installed, "updating"),
            (ReportState::Rebooted, "updating"),
            (ReportState::Committed, "online"),
            (ReportState::RolledBack, "online"),
            (ReportState::Reverted, "reverted"),
            (ReportState::Failed, "error"),
        ] {
            assert_eq!(status(state), want, "{state:?}");
        }
    }
}
