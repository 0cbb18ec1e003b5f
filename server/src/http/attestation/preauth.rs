//! Pre-authorisation (operators, the factory line):
//! `POST /api/v1/tpm/preauthorizations` records a device id, optionally
//! with the EK of its TPM; an enrollment token can require it, and a
//! recorded EK binds the device id to that TPM.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use kernex_protocol::api::{NewPreauthorization, Preauthorization};

use crate::AppState;
use crate::auth::{Operator, Role};
use crate::http::{ApiJson, Result};
use crate::service::attestation::preauth::{self, Recorded};
use crate::service::audit::Audited;

/// Pre-authorise a device (ops): 201 when recorded, 200 when the same
/// device id and EK were already recorded (the factory line may retry).
#[utoipa::path(post, path = "/api/v1/tpm/preauthorizations", request_body = NewPreauthorization,
    responses((status = 201, body = Preauthorization), (status = 200, body = Preauthorization),
        (status = 403), (status = 409, description = "the device id or the EK is pre-authorised otherwise"),
        (status = 422, description = "not an EK, or the certificate is for another key")))]
pub async fn preauthorize(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(req): ApiJson<NewPreauthorization>,
) -> Result<(StatusCode, ApiJson<Preauthorization>)> {
    op.require(Role::Ops)?;
    let target = format!("device:{}", req.device_id);
    let audit_target = &target;
    let audit = Audited::new(&state, &op, "tpm.preauthorize", audit_target);
    let mut tx = audit.begin().await?;
    let outcome: crate::service::Result<_> = async {
        let answer = preauth::preauthorize(&state, &mut tx, &op.org_id, &op.user_id, &req).await?;
        Ok((answer, target.clone()))
    }
    .await;
    let (recorded, found) = audit.finish(tx, outcome).await?;
    let status = match recorded {
        Recorded::Created => StatusCode::CREATED,
        Recorded::Existing => StatusCode::OK,
    };
    Ok((status, ApiJson(found)))
}

/// List pre-authorised devices.
#[utoipa::path(get, path = "/api/v1/tpm/preauthorizations",
    responses((status = 200, body = [Preauthorization])))]
pub async fn list_preauthorizations(
    State(state): State<AppState>,
    op: Operator,
) -> Result<ApiJson<Vec<Preauthorization>>> {
    Ok(ApiJson(preauth::list(&state, &op.org_id).await?))
}

/// Remove a pre-authorisation (ops). A device already enrolled stays bound
/// to its TPM.
#[utoipa::path(delete, path = "/api/v1/tpm/preauthorizations/{device_id}",
    responses((status = 204), (status = 403), (status = 404)))]
pub async fn remove_preauthorization(
    State(state): State<AppState>,
    op: Operator,
    Path(device_id): Path<String>,
) -> Result<StatusCode> {
    op.require(Role::Ops)?;
    let target = format!("device:{device_id}");
    let audit_target = &target;
    let audit = Audited::new(&state, &op, "tpm.preauthorization.remove", audit_target);
    let mut tx = audit.begin().await?;
    let outcome: crate::service::Result<_> = async {
        preauth::remove(&mut tx, &op.org_id, &device_id).await?;
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await?;
    Ok(StatusCode::NO_CONTENT)
}
