//! Trying a failed patch job again (an operator's action, audited).
//!
//! A job fails when its bundles cannot be read or the build itself fails
//! (a blob store outage, a full scratch disk). Its devices were not held
//! back: the planner kept the chunk delta for the pair (`release_plans`)
//! and they install with it. A retry puts the job back in the queue and
//! forgets that choice, so devices of the pair that have not started yet
//! wait for the patch again ([`super::waiting`]) and then get the cheaper
//! method; devices already installing keep what they were given.

use super::build;
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::audit::Audited;
use crate::service::users::require;
use crate::service::{Error, Result};

/// Puts the failed job `job` of release `release` back in the queue
/// (ops). 404 for a job of another release or organisation, 409 for one
/// that has not failed.
pub async fn retry(state: &AppState, op: &Operator, release: &str, job: &str) -> Result<()> {
    require(op, Role::Ops)?;
    let target = format!("release:{release}/patch-job:{job}");
    let audit = Audited::new(state, op, "release.patch.retry", &target);
    let mut tx = audit.begin().await?;
    let outcome: Result<((), String)> = async {
        let row: Option<(String, String, String)> = sqlx::query_as(
            "SELECT status, from_release_id, slot_class FROM server_patches WHERE id = $1 AND org_id = $2 AND to_release_id = $3",
        )
        .bind(job)
        .bind(&op.org_id)
        .bind(release)
        .fetch_optional(&mut *tx)
        .await?;
        let (status, from, class) = row.ok_or(Error::NotFound("no such patch job"))?;
        if status != "failed" {
            return Err(Error::Conflict(format!(
                "the patch job is {status}: only a failed job can be retried"
            )));
        }
        let now = crate::store::now_ms();
        sqlx::query(
            "UPDATE server_patches SET status = 'pending', error = NULL, done_bytes = 0, claimed_by = NULL, claimed_until = NULL, updated_at = $1 \
             WHERE id = $2 AND status = 'failed'",
        )
        .bind(now)
        .bind(job)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM release_plans WHERE from_release_id = $1 AND to_release_id = $2")
            .bind(&from)
            .bind(release)
            .execute(&mut *tx)
            .await?;
        tracing::info!(release, job, from, class, "patch job queued again");
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await?;
    build::spawn(state);
    Ok(())
}
