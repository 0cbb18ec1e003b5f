//! A rollout's life: create (a draft), then start, pause, resume, abort
//! and roll back, each checked against the status under the write lock and
//! recorded in the audit log.

use std::collections::BTreeMap;

use super::progress::{Rollout, load, summary};
use super::spec::RolloutSpec;
use super::{Targets, scheduler};
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::anti_rollback::{self, AboveFloor};
use crate::service::audit::Audited;
use crate::service::users::require;
use crate::service::{Error, Result};
use crate::store::new_id;

/// Creates a rollout (ops): a draft until started.
pub async fn create(state: &AppState, op: &Operator, spec: RolloutSpec) -> Result<Rollout> {
    require(op, Role::Ops)?;
    let target = format!("release:{}", spec.release_id);
    let prepare = async {
        spec.validate()?;
        super::release(state, &op.org_id, &spec.release_id).await
    };
    let audit_target = &target;
    let audit = Audited::new(state, op, "rollout.create", audit_target);
    let release = match prepare.await {
        Ok(prepared) => prepared,
        Err(e) => return audit.fail(e).await,
    };
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        if let Some(c) = &spec.selector.hardware_class
            && c != &release.compatible
        {
            return Err(Error::Unprocessable(format!(
                "selector.hardware_class {c} does not match the release's {}",
                release.compatible
            )));
        }
        // Devices that would refuse the release (their anti-rollback floor
        // is above it) make the rollout a 409 now, not a wave that fails.
        let t = super::targets(state, &op.org_id, &spec, &release, None, false).await?;
        if !t.above_floor.is_empty() {
            return Err(anti_rollback::refusal(
                &format!("roll out {}", release.version),
                &t.above_floor,
                t.above_floor.len(),
            ));
        }
        let id = new_id()?;
        let now = state.clock.now_ms();
        // The planner starts now: the patches its devices need are built
        // while the operator previews.
        crate::service::patches::enqueue(
            &mut tx,
            state.config.server_patches,
            &op.org_id,
            &release.id,
            &super::from_releases(&t),
            now,
        )
        .await?;
        let text = serde_json::to_string(&spec).map_err(|e| Error::Internal(e.into()))?;
        sqlx::query(
            "INSERT INTO rollouts (id, org_id, name, release_id, spec, status, start_at, created_by, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'draft', $6, $7, $8, $8)",
        )
        .bind(&id)
        .bind(&op.org_id)
        .bind(&spec.name)
        .bind(&spec.release_id)
        .bind(&text)
        .bind(spec.start_at_ms)
        .bind(&op.user_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let target = format!("rollout:{id}");
        Ok((id, target))
    }
    .await;
    let id = audit.finish(tx, outcome).await?;
    crate::service::patches::build::spawn(state);
    // Read once committed (another connection).
    let (spec, row) = load(state, &op.org_id, &id).await?;
    summary(state, spec, &row).await
}

/// A state change an operator asks for.
enum Change {
    /// Start a draft, with its targets read before the write transaction.
    Start(Option<Result<Targets>>),
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Abort.
    Abort,
    /// Roll back.
    Rollback,
}

fn refuse(action: &str, status: &str) -> Error {
    Error::Conflict(format!("cannot {action} a rollout that is {status}"))
}

#[allow(clippy::too_many_arguments)] // one transition's whole context
async fn apply(
    tx: &mut scheduler::Tx,
    op: &Operator,
    id: &str,
    spec: &RolloutSpec,
    status: &str,
    now: i64,
    change: Change,
    server_patches: bool,
) -> Result<()> {
    match change {
        Change::Start(prepared) => {
            if status != "draft" {
                return Err(refuse("start", status));
            }
            let t = prepared.ok_or_else(|| refuse("start", status))??;
            // A floor may have risen since the draft was made.
            if !t.above_floor.is_empty() {
                return Err(anti_rollback::refusal(
                    &format!("start rollout {id}"),
                    &t.above_floor,
                    t.above_floor.len(),
                ));
            }
            if t.targets.is_empty() {
                return Err(Error::Unprocessable(format!(
                    "the selector matches no device that needs this release ({} already run it, {} are in another rollout, {} have not activated their TPM, {} have no TPM and every wave requires attestation)",
                    t.already_current, t.busy, t.unactivated, t.no_tpm_left_out
                )));
            }
            // Jobs for every release the targets run, in the transaction
            // that makes their rows: the scheduler admits no device whose
            // patch is still being built, and none can slip in before its
            // job exists.
            crate::service::patches::enqueue(
                tx,
                server_patches,
                &op.org_id,
                &spec.release_id,
                &super::from_releases(&t),
                now,
            )
            .await?;
            let sizes = t.sizes.clone();
            let mut left_out = BTreeMap::new();
            if t.no_tpm_left_out > 0 {
                left_out.insert("no_tpm", t.no_tpm_left_out);
            }
            if t.unactivated > 0 {
                left_out.insert("unactivated", t.unactivated);
            }
            if !left_out.is_empty() {
                sqlx::query("UPDATE rollouts SET left_out = $1 WHERE id = $2")
                    .bind(serde_json::to_string(&left_out).map_err(|e| Error::Internal(e.into()))?)
                    .bind(id)
                    .execute(&mut **tx)
                    .await?;
            }
            let mut position = 0usize;
            for (wave, size) in sizes.iter().enumerate() {
                for d in t.targets.iter().skip(position).take(*size) {
                    sqlx::query(
                        "INSERT INTO rollout_devices (rollout_id, device_pk, org_id, wave, position, state, from_release_id, from_version, link_class, site, delta_bytes, rate, active, bytes_done, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9, $10, $11, 0, 0, $12)",
                    )
                    .bind(id)
                    .bind(&d.pk)
                    .bind(&op.org_id)
                    .bind(wave as i64)
                    .bind(position as i64)
                    .bind(&d.from_release_id)
                    .bind(&d.from_version)
                    .bind(&d.link_class)
                    .bind(&d.site)
                    .bind(i64::try_from(d.bytes).map_err(|e| Error::Internal(e.into()))?)
                    .bind(
                        i64::try_from(spec.bandwidth.rate(&d.link_class))
                            .map_err(|e| Error::Internal(e.into()))?,
                    )
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                    position += 1;
                }
            }
            let future = spec.start_at_ms.is_some_and(|t| t > now);
            sqlx::query(
                "UPDATE rollouts SET status = $1, current_wave = 0, wave_started_at = $2, updated_at = $2 WHERE id = $3",
            )
            .bind(if future { "scheduled" } else { "running" })
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        }
        Change::Pause => {
            if status != "running" && status != "scheduled" {
                return Err(refuse("pause", status));
            }
            scheduler::set_status(tx, id, "paused", Some("paused by the operator"), now).await?;
            scheduler::unschedule(tx, id, now).await?;
        }
        Change::Resume => {
            if status != "paused" {
                return Err(refuse("resume", status));
            }
            sqlx::query(
                "UPDATE rollouts SET status = 'running', status_reason = NULL, gate_accepted = 1, updated_at = $1 WHERE id = $2",
            )
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        }
        Change::Abort => {
            if !matches!(status, "draft" | "scheduled" | "running" | "paused") {
                return Err(refuse("abort", status));
            }
            scheduler::set_status(tx, id, "aborted", Some("aborted by the operator"), now).await?;
            scheduler::cancel_unstarted(tx, id, now).await?;
        }
        Change::Rollback => {
            if !matches!(
                status,
                "scheduled" | "running" | "paused" | "completed" | "aborted"
            ) {
                return Err(refuse("roll back", status));
            }
            check_rollback_floors(tx, id).await?;
            scheduler::roll_back(tx, id, now, "rolled back by the operator").await?;
        }
    }
    Ok(())
}

/// Refuses (409) a rollback that would send a device that committed the
/// rollout's release back to a release below its anti-rollback floor.
async fn check_rollback_floors(tx: &mut scheduler::Tx, id: &str) -> Result<()> {
    let above: Vec<AboveFloor> = sqlx::query_as(
        "SELECT d.device_id, d.security_floor, r.version, r.security_version FROM rollout_devices rd JOIN devices d ON d.id = rd.device_pk JOIN releases r ON r.id = rd.from_release_id \
         WHERE rd.rollout_id = $1 AND rd.state = 'committed' AND d.security_floor IS NOT NULL AND d.security_floor > r.security_version ORDER BY d.device_id",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    if above.is_empty() {
        return Ok(());
    }
    Err(anti_rollback::refusal(
        &format!("roll back rollout {id}"),
        &above,
        above.len(),
    ))
}

async fn transition(
    state: &AppState,
    op: &Operator,
    id: &str,
    action: &str,
    change: Change,
) -> Result<Rollout> {
    require(op, Role::Ops)?;
    let target = format!("rollout:{id}");
    let prepare = load(state, &op.org_id, id);
    let audit_target = &target;
    let audit = Audited::new(state, op, action, audit_target);
    let (spec, row) = match prepare.await {
        Ok(prepared) => prepared,
        Err(e) => return audit.fail(e).await,
    };
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let status = row.status;
        let now = state.clock.now_ms();
        // Re-read under the write lock.
        let (current,): (String,) = sqlx::query_as("SELECT status FROM rollouts WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if current != status {
            return Err(Error::Conflict(
                "the rollout changed meanwhile; retry".into(),
            ));
        }
        let patches = state.config.server_patches;
        apply(&mut tx, op, id, &spec, &status, now, change, patches).await?;
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await?;
    crate::service::patches::build::spawn(state);
    // Read once committed (another connection).
    let (spec, row) = load(state, &op.org_id, id).await?;
    summary(state, spec, &row).await
}

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a draft: selects the devices now, splits them into waves
    /// (diversity first) and hands them to the scheduler; `scheduled`
    /// until `start_at_ms`.
    Start,
    /// No new download windows, granted ones not yet started are taken
    /// back; devices already downloading or installing finish.
    Pause,
    /// Resuming a rollout that a gate paused accepts the current wave's
    /// error rate: it promotes after its soak.
    Resume,
    /// Devices that have not installed are cancelled; devices already on
    /// the release stay on it.
    Abort,
    /// Devices that committed the release get `action: rollback` on their
    /// next poll; devices not yet installing are cancelled.
    Rollback,
}

impl Action {
    /// The action's name in URLs (`start`, `pause`, ...).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "start" => Some(Action::Start),
            "pause" => Some(Action::Pause),
            "resume" => Some(Action::Resume),
            "abort" => Some(Action::Abort),
            "rollback" => Some(Action::Rollback),
            _ => None,
        }
    }

    /// The audit log's name of the action.
    fn audit_name(self) -> &'static str {
        match self {
            Action::Start => "rollout.start",
            Action::Pause => "rollout.pause",
            Action::Resume => "rollout.resume",
            Action::Abort => "rollout.abort",
            Action::Rollback => "rollout.rollback",
        }
    }
}

/// Does `action` to the rollout `id` (ops).
pub async fn act(state: &AppState, op: &Operator, id: &str, action: Action) -> Result<Rollout> {
    let change = match action {
        Action::Start => {
            require(op, Role::Ops)?;
            // Targets and deltas are read before the write transaction.
            let (spec, row) = load(state, &op.org_id, id).await?;
            let prepared = if row.status == "draft" {
                let release = super::release(state, &op.org_id, &spec.release_id).await?;
                Some(super::targets(state, &op.org_id, &spec, &release, Some(id), true).await)
            } else {
                None
            };
            Change::Start(prepared)
        }
        Action::Pause => Change::Pause,
        Action::Resume => Change::Resume,
        Action::Abort => Change::Abort,
        Action::Rollback => Change::Rollback,
    };
    transition(state, op, id, action.audit_name(), change).await
}
