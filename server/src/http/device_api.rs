//! The device API (`/api/v1/device/...`): enroll, poll, heartbeat, report,
//! logs, bundle download. Devices authenticate with the credential that
//! enrollment returned (`Authorization: Bearer kxd_...`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kernex_protocol::api::{
    DesiredState, EnrollRequest, EnrollResponse, Heartbeat, LogBatch, MAX_LOG_LINES,
    MAX_LOG_MESSAGE, NONCE_HEADER, POLL_AFTER_HEADER, Report, ReportState,
};
use sqlx::Row;

use crate::AppState;
use crate::audit;
use crate::auth::Device;
use crate::http::attestation::{TokenPolicy, check_enrollment, poll_nonce, store_activation};
use crate::http::enrollment::check_tags;
use crate::http::{ApiJson, Error, Result};
use crate::store::{new_id, new_secret, now_ms, secret_hash};

/// Routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/enroll", post(enroll))
        .route("/poll", get(poll))
        .route("/heartbeat", post(heartbeat))
        .route("/report", post(report))
        .route("/logs", post(logs))
        .route("/releases/{id}/bundle", get(download))
        .merge(crate::http::attestation::device_router())
}

pub use crate::service::names::check_name;

/// Enroll with an enrollment token. Idempotent: the same device id with the
/// same token is the same device (no new row); its credential is rotated
/// and the new one returned, since only a hash of the old one is kept.
#[utoipa::path(post, path = "/api/v1/device/enroll", request_body = EnrollRequest,
    responses((status = 200, body = EnrollResponse), (status = 201, body = EnrollResponse), (status = 401), (status = 403, description = "the device was revoked"), (status = 409)))]
pub async fn enroll(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EnrollRequest>,
) -> Result<(StatusCode, ApiJson<EnrollResponse>)> {
    check_name("device_id", &req.device_id)?;
    check_name("hardware_class", &req.hardware_class)?;
    check_tags(&req.tags)?;
    let link = crate::http::rollouts::DeviceLink {
        link_class: req.link_class.clone(),
        site: req.site.clone(),
        time_zone: req.time_zone.clone(),
    };
    crate::http::rollouts::check_link(&link)?;
    let token = sqlx::query(
        "SELECT id, org_id, tags, require_preauthorization, require_tpm FROM enrollment_tokens WHERE token_hash = $1 AND revoked = 0 AND (expires_at IS NULL OR expires_at > $2)",
    )
    .bind(secret_hash(&req.enrollment_token))
    .bind(now_ms())
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    let token_id: String = token.try_get("id")?;
    let org_id: String = token.try_get("org_id")?;
    let token_tags: String = token.try_get("tags")?;
    let policy = TokenPolicy {
        require_preauthorization: token.try_get::<i64, _>("require_preauthorization")? != 0,
        require_tpm: token.try_get::<i64, _>("require_tpm")? != 0,
    };
    let mut tags: Vec<String> = serde_json::from_str(&token_tags).unwrap_or_default();
    tags.extend(req.tags.iter().cloned());
    tags.sort();
    tags.dedup();

    let credential = new_secret("kxd")?;
    let now = now_ms();
    for _ in 0..3 {
        let existing = sqlx::query(
            "SELECT id, enrollment_token_id, revoked, ek_fingerprint, tpm_required FROM devices WHERE org_id = $1 AND device_id = $2",
        )
        .bind(&org_id)
        .bind(&req.device_id)
        .fetch_optional(state.store.pool())
        .await?;
        if let Some(row) = existing {
            let id: String = row.try_get("id")?;
            let by: Option<String> = row.try_get("enrollment_token_id")?;
            let bound: Option<String> = row.try_get("ek_fingerprint")?;
            // A row that must prove a TPM and never did holds nothing: it
            // may be someone squatting on a pre-authorised serial with
            // another token. The board itself (its TPM checked below) takes
            // it over.
            let unproven = bound.is_none() && row.try_get::<i64, _>("tpm_required")? != 0;
            if by.as_deref() != Some(token_id.as_str()) && !unproven {
                return Err(Error::Conflict(format!(
                    "device {} is already enrolled with another token",
                    req.device_id
                )));
            }
            if row.try_get::<i64, _>("revoked")? != 0 {
                return Err(Error::Forbidden);
            }
            let check = match check_enrollment(
                &state,
                &org_id,
                &req.device_id,
                policy,
                req.tpm.as_ref(),
                req.tpm_slot_pcr,
                bound.as_deref(),
            )
            .await
            {
                Ok(check) => check,
                Err(e) => return Err(refused(&state, &org_id, &req.device_id, e).await),
            };
            if bound.is_some() {
                // Bound to a TPM: the new credential replaces the old one
                // only when that TPM answers the challenge. The EK is public;
                // knowing it must not be enough to take the device over.
            } else {
                sqlx::query(
                    "UPDATE devices SET credential_hash = $1, enrollment_token_id = $2 WHERE id = $3 AND revoked = 0",
                )
                .bind(secret_hash(&credential))
                .bind(&token_id)
                .bind(&id)
                .execute(state.store.pool())
                .await?;
                crate::poll_cache::forget_device(&state, &id).await;
            }
            set_link(&state, &id, &link).await?;
            let pending = bound.is_some().then(|| secret_hash(&credential));
            let activation = store_activation(&state, &id, &check, pending.as_deref()).await?;
            record(&state, &org_id, &req.device_id, "device.re-enroll", &id).await?;
            return Ok((
                StatusCode::OK,
                ApiJson(EnrollResponse {
                    id,
                    credential,
                    activation,
                }),
            ));
        }
        let check = match check_enrollment(
            &state,
            &org_id,
            &req.device_id,
            policy,
            req.tpm.as_ref(),
            req.tpm_slot_pcr,
            None,
        )
        .await
        {
            Ok(check) => check,
            Err(e) => return Err(refused(&state, &org_id, &req.device_id, e).await),
        };
        let id = new_id()?;
        let mut tx = state.store.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO devices (id, org_id, device_id, hardware_class, hardware_metadata, status, credential_hash, enrollment_token_id, revoked, registered_at) VALUES ($1, $2, $3, $4, $5, 'offline', $6, $7, 0, $8)",
        )
        .bind(&id)
        .bind(&org_id)
        .bind(&req.device_id)
        .bind(&req.hardware_class)
        .bind(serde_json::Value::Object(req.hardware_metadata.clone()).to_string())
        .bind(secret_hash(&credential))
        .bind(&token_id)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // Enrolled concurrently: go round and take the existing row.
            Err(e) if crate::http::error::is_unique_violation(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        for tag in &tags {
            sqlx::query("INSERT INTO device_tags (device_pk, org_id, tag) VALUES ($1, $2, $3)")
                .bind(&id)
                .bind(&org_id)
                .bind(tag)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        set_link(&state, &id, &link).await?;
        let activation = store_activation(&state, &id, &check, None).await?;
        record(&state, &org_id, &req.device_id, "device.enroll", &id).await?;
        return Ok((
            StatusCode::CREATED,
            ApiJson(EnrollResponse {
                id,
                credential,
                activation,
            }),
        ));
    }
    Err(Error::Conflict("enrollment raced; retry".into()))
}

/// Stores the link fields a device sent (absent ones are left alone).
async fn set_link(
    state: &AppState,
    pk: &str,
    link: &crate::http::rollouts::DeviceLink,
) -> Result<()> {
    if link.link_class.is_none() && link.site.is_none() && link.time_zone.is_none() {
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

/// An enrollment its TPM checks refused (policy, pre-authorisation, the
/// vendor CAs): the reason goes to the device, the log and the audit log.
async fn refused(state: &AppState, org_id: &str, device_id: &str, e: Error) -> Error {
    let reason = e.summary();
    tracing::warn!(device = %device_id, %reason, "enrollment refused");
    let appended = audit::append(
        &state.store,
        audit::Entry {
            org_id,
            actor: &format!("device:{device_id}"),
            action: "device.enroll",
            target: &format!("device:{device_id}"),
            result: &format!("error: {reason}"),
            detail: serde_json::json!({}),
        },
    )
    .await;
    if let Err(a) = appended {
        tracing::error!(error = %format!("{a:#}"), "unable to record the refused enrollment in the audit log");
    }
    e
}

async fn record(
    state: &AppState,
    org_id: &str,
    device_id: &str,
    action: &str,
    id: &str,
) -> Result<()> {
    audit::append(
        &state.store,
        audit::Entry {
            org_id,
            actor: &format!("device:{device_id}"),
            action,
            target: &format!("device:{id}"),
            result: "ok",
            detail: serde_json::json!({}),
        },
    )
    .await?;
    Ok(())
}

/// Poll for desired state: 200 with the release to install, 204 when there
/// is nothing to do. A device bound to a TPM whose attestation is missing,
/// old or for another version also gets a fresh quote nonce in the
/// `Kernex-Attestation-Nonce` header, to answer at `POST /device/attestation`.
/// A device a rollout acts on (waiting in a reached wave, holding a
/// download window, committed: a rollback may come) gets
/// `Kernex-Poll-After` (`rollout-poll-secs`) on 200 and 204.
#[utoipa::path(get, path = "/api/v1/device/poll", responses(
    (status = 200, body = DesiredState, headers(("kernex-attestation-nonce" = String, description = "hex nonce to quote"),
        ("kernex-poll-after" = u64, description = "poll again after this many seconds"))),
    (status = 204, headers(("kernex-attestation-nonce" = String, description = "hex nonce to quote"),
        ("kernex-poll-after" = u64, description = "poll again after this many seconds"))),
    (status = 401),
    (status = 403, description = "the device must complete TPM credential activation first")))]
pub async fn poll(
    State(state): State<AppState>,
    polled: crate::http::device_poll::PollAuth,
) -> Result<Response> {
    crate::last_seen::touch(&state, &polled.device.pk).await?;
    let nonce = if polled.tpm {
        poll_nonce(&state, &polled.device).await?
    } else {
        None
    };
    let answer = crate::service::devices::poll::answer(&state, &polled).await?;
    let mut response = match answer.desired {
        Some(desired) => ApiJson(desired).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    };
    if let Some(nonce) = nonce
        && let Ok(value) = axum::http::HeaderValue::from_str(&nonce)
    {
        response.headers_mut().insert(NONCE_HEADER, value);
    }
    if let Some(secs) = answer.poll_after_secs {
        response
            .headers_mut()
            .insert(POLL_AFTER_HEADER, axum::http::HeaderValue::from(secs));
    }
    Ok(response)
}

/// Memory use above which a device is degraded, percent.
pub const DEGRADED_MEMORY_PERCENT: f64 = 90.0;

/// Heartbeat with inventory.
#[utoipa::path(post, path = "/api/v1/device/heartbeat", request_body = Heartbeat,
    responses((status = 204), (status = 400), (status = 401),
        (status = 403, description = "the device must complete TPM credential activation first")))]
pub async fn heartbeat(
    State(state): State<AppState>,
    device: Device,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<StatusCode> {
    device.require_proven()?;
    for (what, v) in [
        ("booted_slot", &hb.booted_slot),
        ("primary_slot", &hb.primary_slot),
        ("version", &hb.version),
    ] {
        if let Some(v) = v {
            check_name(what, v)?;
        }
    }
    let memory_percent = match (hb.memory_used_bytes, hb.memory_total_bytes) {
        (Some(used), Some(total)) if total > 0 => Some(used as f64 * 100.0 / total as f64),
        _ => None,
    };
    let degraded = memory_percent.is_some_and(|m| m > DEGRADED_MEMORY_PERCENT);
    let link = crate::http::rollouts::DeviceLink {
        link_class: hb.link_class.clone(),
        site: hb.site.clone(),
        time_zone: hb.time_zone.clone(),
    };
    crate::http::rollouts::check_link(&link)?;
    let now = state.clock.now_ms();
    let inventory = serde_json::to_string(&hb).map_err(|e| Error::Internal(e.into()))?;
    let mut tx = state.store.begin_write().await?;
    sqlx::query(
        "INSERT INTO heartbeats (id, device_pk, org_id, at, cpu_percent, memory_percent, status, inventory) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(new_id()?)
    .bind(&device.pk)
    .bind(&device.org_id)
    .bind(now)
    .bind(hb.cpu_percent)
    .bind(memory_percent)
    .bind(if degraded { "degraded" } else { "healthy" })
    .bind(&inventory)
    .execute(&mut *tx)
    .await?;
    // Degraded, else an install's status (updating, reverted, error)
    // stays until its report, else online.
    sqlx::query(
        "UPDATE devices SET last_seen_at = $1, status = CASE WHEN $2 = 1 THEN 'degraded' WHEN status IN ('updating', 'reverted', 'error') THEN status ELSE 'online' END, booted_slot = COALESCE($3, booted_slot), primary_slot = COALESCE($4, primary_slot) WHERE id = $5",
    )
    .bind(now)
    .bind(i64::from(degraded))
    .bind(&hb.booted_slot)
    .bind(&hb.primary_slot)
    .bind(&device.pk)
    .execute(&mut *tx)
    .await?;
    // The version only when it changed (a reflashed device): what the
    // device's poll answers depends on it.
    let new_version = match &hb.version {
        Some(v) => {
            sqlx::query(
                "UPDATE devices SET current_version = $1 WHERE id = $2 AND (current_version IS NULL OR current_version <> $1)",
            )
            .bind(v)
            .bind(&device.pk)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                > 0
        }
        None => false,
    };
    tx.commit().await?;
    set_link(&state, &device.pk, &link).await?;
    if new_version {
        crate::poll_cache::forget_device(&state, &device.pk).await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Report progress or outcome of an install.
#[utoipa::path(post, path = "/api/v1/device/report", request_body = Report,
    responses((status = 204), (status = 400), (status = 401),
        (status = 403, description = "the device must complete TPM credential activation first")))]
pub async fn report(
    State(state): State<AppState>,
    device: Device,
    ApiJson(r): ApiJson<Report>,
) -> Result<StatusCode> {
    device.require_proven()?;
    let status = match r.state {
        ReportState::Downloading | ReportState::Installed | ReportState::Rebooted => "updating",
        ReportState::Committed | ReportState::RolledBack => "online",
        ReportState::Reverted => "reverted",
        ReportState::Failed => "error",
    };
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
        crate::service::rollouts::device::report(&mut tx, &device, &r, reason.as_deref(), now)
            .await?;
    // The deployment this report belongs to: the newest one for this device
    // (for the named release if one is given).
    let dep = sqlx::query(
        "SELECT dd.deployment_id, p.release_id FROM deployment_devices dd JOIN deployments p ON p.id = dd.deployment_id WHERE dd.device_pk = $1 AND ($2 IS NULL OR p.release_id = $2) ORDER BY p.created_at DESC LIMIT 1",
    )
    .bind(&device.pk)
    .bind(&r.release_id)
    .fetch_optional(&mut *tx)
    .await?;
    let mut version = r.version.clone().or(rollout_version);
    if let Some(dep) = &dep {
        let deployment_id: String = dep.try_get("deployment_id")?;
        let release_id: String = dep.try_get("release_id")?;
        sqlx::query(
            "UPDATE deployment_devices SET state = $1, bytes_done = COALESCE($2, bytes_done), bytes_total = COALESCE($3, bytes_total), reason = $4, updated_at = $5 WHERE deployment_id = $6 AND device_pk = $7",
        )
        .bind(r.state.as_str())
        .bind(r.bytes_done)
        .bind(r.bytes_total)
        .bind(&reason)
        .bind(now)
        .bind(&deployment_id)
        .bind(&device.pk)
        .execute(&mut *tx)
        .await?;
        if r.state == ReportState::Failed {
            // SEED behaviour: a release that fails on a device is marked
            // unstable for operators to see.
            sqlx::query("UPDATE releases SET unstable = 1 WHERE id = $1")
                .bind(&release_id)
                .execute(&mut *tx)
                .await?;
        }
        if r.state == ReportState::Committed && version.is_none() {
            version = Some(
                sqlx::query("SELECT version FROM releases WHERE id = $1")
                    .bind(&release_id)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("version")?,
            );
        }
        // Close the deployment when every device has an outcome.
        let open: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM deployment_devices WHERE deployment_id = $1 AND state NOT IN ('committed', 'reverted', 'failed')",
        )
        .bind(&deployment_id)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if open == 0 {
            let failed: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM deployment_devices WHERE deployment_id = $1 AND state <> 'committed'",
            )
            .bind(&deployment_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
            sqlx::query("UPDATE deployments SET status = $1, completed_at = $2 WHERE id = $3 AND status = 'in_progress'")
                .bind(if failed == 0 { "success" } else { "failed" })
                .bind(now)
                .bind(&deployment_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    let status_reason = if status == "online" {
        None
    } else {
        reason.clone()
    };
    sqlx::query(
        "UPDATE devices SET last_seen_at = $1, status = $2, status_reason = $3, current_version = COALESCE($4, current_version), booted_slot = COALESCE($5, booted_slot) WHERE id = $6",
    )
    .bind(now)
    .bind(status)
    .bind(&status_reason)
    .bind(if matches!(r.state, ReportState::Committed | ReportState::Reverted | ReportState::RolledBack) { version.clone() } else { None })
    .bind(&r.booted_slot)
    .bind(&device.pk)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Upload a batch of log lines.
#[utoipa::path(post, path = "/api/v1/device/logs", request_body = LogBatch,
    responses((status = 204), (status = 400), (status = 401),
        (status = 403, description = "the device must complete TPM credential activation first")))]
pub async fn logs(
    State(state): State<AppState>,
    device: Device,
    ApiJson(batch): ApiJson<LogBatch>,
) -> Result<StatusCode> {
    device.require_proven()?;
    if batch.entries.len() > MAX_LOG_LINES {
        return Err(Error::BadRequest(format!(
            "at most {MAX_LOG_LINES} log lines per batch"
        )));
    }
    let now = state.clock.now_ms();
    let mut tx = state.store.begin_write().await?;
    for line in &batch.entries {
        let mut message = line.message.clone();
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        sqlx::query(
            "INSERT INTO device_logs (id, device_pk, org_id, at, level, message) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(new_id()?)
        .bind(&device.pk)
        .bind(&device.org_id)
        .bind(line.at.unwrap_or(now))
        .bind(line.level.as_str())
        .bind(&message)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("UPDATE devices SET last_seen_at = $1 WHERE id = $2")
        .bind(now)
        .bind(&device.pk)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download a release bundle of the device's organisation, with `Range`.
#[utoipa::path(get, path = "/api/v1/device/releases/{id}/bundle",
    responses((status = 200), (status = 206), (status = 401),
        (status = 403, description = "the device must complete TPM credential activation first"),
        (status = 404), (status = 416)))]
pub async fn download(
    State(state): State<AppState>,
    device: Device,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    device.require_proven()?;
    let response =
        crate::http::releases::serve_bundle(&state, &device.org_id, &id, &headers).await?;
    if response.status().is_success()
        && let Some(n) = response
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    {
        state.egress.add(&device.org_id, state.clock.now_ms(), n);
    }
    Ok(response)
}
