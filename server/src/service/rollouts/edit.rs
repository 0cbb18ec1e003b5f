//! Editing a rollout's policy before it runs or while it is paused (ops),
//! audited as `rollout.edit`.
//!
//! - A **draft** takes any valid spec of the same release: nothing has been
//!   chosen or scheduled yet.
//! - A **paused** rollout keeps what its devices were assigned by: the
//!   release, the selector and the waves' sizes. Gates, soak times, the
//!   start time, maintenance windows and the bandwidth policy may change;
//!   the scheduler reads them on its next pass after the resume.

use super::progress::{Rollout, load, summary};
use super::spec::{RolloutSpec, Wave};
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::audit::Audited;
use crate::service::users::require;
use crate::service::{Error, Result};

fn same_sizes(a: &[Wave], b: &[Wave]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.count == y.count && x.percent == y.percent)
}

/// Replaces the spec of rollout `id` (a draft or paused) with `spec`.
pub async fn edit(state: &AppState, op: &Operator, id: &str, spec: RolloutSpec) -> Result<Rollout> {
    require(op, Role::Ops)?;
    let target = format!("rollout:{id}");
    let audit = Audited::new(state, op, "rollout.edit", &target);
    let checked: Result<_> = async {
        spec.validate()?;
        let (old, row) = load(state, &op.org_id, id).await?;
        if spec.release_id != old.release_id {
            return Err(Error::Invalid(
                "release_id: a rollout keeps its release; create another rollout for another release"
                    .into(),
            ));
        }
        match row.status.as_str() {
            "draft" => {}
            "paused" => {
                if spec.selector.tags != old.selector.tags
                    || spec.selector.current_versions != old.selector.current_versions
                    || spec.selector.hardware_class != old.selector.hardware_class
                {
                    return Err(Error::Invalid(
                        "selector: the devices of a paused rollout are chosen; only its gates, soak, start, windows and bandwidth can change"
                            .into(),
                    ));
                }
                if !same_sizes(&spec.waves, &old.waves) {
                    return Err(Error::Invalid(
                        "waves: the waves of a paused rollout are assigned; only their gates and soak can change"
                            .into(),
                    ));
                }
            }
            other => {
                return Err(Error::Conflict(format!(
                    "cannot edit a rollout that is {other}: only drafts and paused rollouts"
                )));
            }
        }
        Ok(row.status)
    }
    .await;
    let status = match checked {
        Ok(s) => s,
        Err(e) => return audit.fail(e).await,
    };
    let text = serde_json::to_string(&spec).map_err(|e| Error::Internal(e.into()))?;
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let done = sqlx::query(
            "UPDATE rollouts SET name = $1, spec = $2, start_at = $3, updated_at = $4 WHERE id = $5 AND org_id = $6 AND status = $7",
        )
        .bind(&spec.name)
        .bind(&text)
        .bind(spec.start_at_ms)
        .bind(state.clock.now_ms())
        .bind(id)
        .bind(&op.org_id)
        .bind(&status)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(Error::Conflict(
                "the rollout changed state while it was edited; reload it".into(),
            ));
        }
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await?;
    let (spec, row) = load(state, &op.org_id, id).await?;
    summary(state, spec, &row).await
}
