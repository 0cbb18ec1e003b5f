//! The server clock the simulator steps, only with `test-clock = true`
//! (never enabled by default): read it, move it forward, run a scheduler
//! pass.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::scheduler;
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::users::require;
use crate::service::{Error, Result};

/// Set or advance the test clock.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClockRequest {
    /// Set the clock to this (unix ms).
    pub set_ms: Option<i64>,
    /// Or move it forward by this many ms.
    pub advance_ms: Option<i64>,
    /// Then run one scheduler pass (default true).
    pub tick: Option<bool>,
}

/// The test clock.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClockState {
    /// Now (unix ms).
    pub now_ms: i64,
    /// Whether this call ran a scheduler pass that held the lease.
    pub scheduler_ran: bool,
}

/// 404 unless the server runs with a test clock, then admin only.
fn enabled(state: &AppState, op: &Operator) -> Result<()> {
    if !state.config.test_clock {
        return Err(Error::NotFound("no such endpoint"));
    }
    require(op, Role::Admin)
}

/// The server clock.
pub fn get(state: &AppState, op: &Operator) -> Result<ClockState> {
    enabled(state, op)?;
    Ok(ClockState {
        now_ms: state.clock.now_ms(),
        scheduler_ran: false,
    })
}

/// Steps the server clock (only forward) and runs a scheduler pass.
pub async fn set(state: &AppState, op: &Operator, req: ClockRequest) -> Result<ClockState> {
    enabled(state, op)?;
    let now = state.clock.now_ms();
    let target = match (req.set_ms, req.advance_ms) {
        (Some(t), None) => t,
        (None, Some(d)) if d >= 0 => now.saturating_add(d),
        (None, None) => now,
        _ => {
            return Err(Error::Invalid(
                "give set_ms or a non-negative advance_ms, not both".into(),
            ));
        }
    };
    if target < now {
        return Err(Error::Invalid(format!(
            "the clock only moves forward (now {now}, asked {target})"
        )));
    }
    if !state.clock.set_ms(target) {
        return Err(Error::Conflict("this server's clock cannot be set".into()));
    }
    let ran = if req.tick.unwrap_or(true) {
        scheduler::tick(state).await?
    } else {
        false
    };
    Ok(ClockState {
        now_ms: target,
        scheduler_ran: ran,
    })
}
