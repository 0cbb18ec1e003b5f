//! Re-enrollments waiting for an operator (Mender's admission): an
//! enrollment of a device id that is enrolled already, whose sender did
//! not prove it is that device (no signature by its current key, no TPM
//! credential activation with its EK). The request gets no credential
//! and the enrolled device keeps working. An operator approves (the
//! request's key becomes the device's, and the old key's tokens stop
//! working) or rejects it; both are audited.

use kernex_protocol::api::{EnrollPending, EnrollmentRequest};
use kernex_protocol::device_key;

use super::identity;
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::audit::Audited;
use crate::service::users::require;
use crate::service::{Error, Result};
use crate::store::{new_id, now_ms};

/// The most requests one device may have waiting: a token holder cannot
/// flood the operators' list for one device.
pub const MAX_PENDING_PER_DEVICE: i64 = 10;

/// A request as stored.
#[derive(Debug, sqlx::FromRow)]
struct RequestRow {
    id: String,
    device_pk: String,
    device_id: String,
    public_key: String,
    enrollment_token_id: String,
    status: String,
    created_at: i64,
    decided_by: Option<String>,
}

impl From<RequestRow> for EnrollmentRequest {
    fn from(r: RequestRow) -> Self {
        EnrollmentRequest {
            key_fingerprint: device_key::fingerprint(&r.public_key),
            id: r.id,
            device_pk: r.device_pk,
            device_id: r.device_id,
            enrollment_token_id: r.enrollment_token_id,
            status: r.status,
            created_at: r.created_at,
            decided_by: r.decided_by,
        }
    }
}

const COLUMNS: &str =
    "id, device_pk, device_id, public_key, enrollment_token_id, status, created_at, decided_by";

/// Parks an unproven re-enrollment of device `device_pk` with
/// `public_key`: the same device and key is the same request.
/// [`Error::Refused`]: an operator rejected this key for this device.
pub async fn park(
    state: &AppState,
    org_id: &str,
    device_pk: &str,
    device_id: &str,
    public_key: &str,
    token_id: &str,
) -> Result<EnrollPending> {
    let existing = sqlx::query_as::<_, RequestRow>(&format!(
        "SELECT {COLUMNS} FROM enrollment_requests WHERE device_pk = $1 AND public_key = $2"
    ))
    .bind(device_pk)
    .bind(public_key)
    .fetch_optional(state.store.pool())
    .await?;
    let id = match existing {
        Some(r) if r.status == "rejected" => {
            return Err(Error::Refused(format!(
                "an operator rejected this key for device {device_id}"
            )));
        }
        // Approved, then the device's key changed again: it waits anew.
        Some(r) => {
            sqlx::query("UPDATE enrollment_requests SET status = 'pending' WHERE id = $1")
                .bind(&r.id)
                .execute(state.store.pool())
                .await?;
            r.id
        }
        None => {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM enrollment_requests WHERE device_pk = $1 AND status = 'pending'",
            )
            .bind(device_pk)
            .fetch_one(state.store.pool())
            .await?;
            if waiting >= MAX_PENDING_PER_DEVICE {
                return Err(Error::TooManyRequests(3600));
            }
            let id = new_id()?;
            let inserted = sqlx::query(
                "INSERT INTO enrollment_requests (id, org_id, device_pk, device_id, public_key, enrollment_token_id, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)",
            )
            .bind(&id)
            .bind(org_id)
            .bind(device_pk)
            .bind(device_id)
            .bind(public_key)
            .bind(token_id)
            .bind(now_ms())
            .execute(state.store.pool())
            .await;
            match inserted {
                Ok(_) => {}
                Err(e) if crate::store::is_unique_violation(&e) => {
                    return Err(Error::Conflict("the same request raced; retry".into()));
                }
                Err(e) => return Err(e.into()),
            }
            id
        }
    };
    tracing::warn!(device = %device_id, request = %id, "re-enrollment without proof: pending an operator's decision");
    Ok(EnrollPending {
        request_id: id,
        detail: format!(
            "device {device_id} is enrolled already and this request does not prove it is that device: an operator must approve it"
        ),
    })
}

/// The organisation's requests, newest first: `status` only (pending by
/// default), at most 500.
pub async fn list(
    state: &AppState,
    op: &Operator,
    status: Option<&str>,
) -> Result<Vec<EnrollmentRequest>> {
    let status = status.unwrap_or("pending");
    if !["pending", "approved", "rejected"].contains(&status) {
        return Err(Error::Invalid(
            "status: pending, approved or rejected".into(),
        ));
    }
    let rows = sqlx::query_as::<_, RequestRow>(&format!(
        "SELECT {COLUMNS} FROM enrollment_requests WHERE org_id = $1 AND status = $2 ORDER BY created_at DESC LIMIT 500"
    ))
    .bind(&op.org_id)
    .bind(status)
    .fetch_all(state.store.pool())
    .await?;
    Ok(rows.into_iter().map(EnrollmentRequest::from).collect())
}

/// Approves or rejects a pending request (ops), audited. Approving makes
/// its key the device's: the device's old key and its tokens stop
/// working, and the requester's next enrollment with that key succeeds.
pub async fn decide(state: &AppState, op: &Operator, id: &str, approve: bool) -> Result<()> {
    require(op, Role::Ops)?;
    let action = if approve {
        "device.enrollment-approve"
    } else {
        "device.enrollment-reject"
    };
    let target = format!("enrollment_request:{id}");
    let audit = Audited::new(state, op, action, &target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let row = sqlx::query_as::<_, RequestRow>(&format!(
            "SELECT {COLUMNS} FROM enrollment_requests WHERE id = $1 AND org_id = $2"
        ))
        .bind(id)
        .bind(&op.org_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::NotFound("no such enrollment request"))?;
        let status = if approve { "approved" } else { "rejected" };
        let decided = sqlx::query(
            "UPDATE enrollment_requests SET status = $1, decided_by = $2, decided_at = $3 WHERE id = $4 AND status = 'pending'",
        )
        .bind(status)
        .bind(op.actor())
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if decided.rows_affected() == 0 {
            return Err(Error::Conflict(format!(
                "the request is {} already",
                row.status
            )));
        }
        if approve {
            identity::replace_key_in(&mut tx, &row.device_pk, &row.public_key).await?;
            sqlx::query("UPDATE devices SET enrollment_token_id = $1 WHERE id = $2")
                .bind(&row.enrollment_token_id)
                .bind(&row.device_pk)
                .execute(&mut *tx)
                .await?;
        }
        let label = format!("device:{}", row.device_pk);
        Ok((row.device_pk, label))
    }
    .await;
    let device_pk = audit.finish(tx, outcome).await?;
    if approve {
        // The old key's tokens are gone from the store; now from the caches.
        crate::poll_cache::forget_device(state, &device_pk).await;
    }
    Ok(())
}
