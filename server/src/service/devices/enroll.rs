//! Enrollment: a device trades an enrollment token, its public key and
//! the proof that it holds the private key (`super::identity`) for an
//! access token. A device id that is enrolled already keeps its identity
//! unless the request proves it is that device: a signature by its
//! current key (the same key: a device that lost its token, or retrying
//! its TPM activation) or TPM credential activation with its EK. Without
//! proof the request waits for an operator (`super::pending`) and gets
//! no credential. A TPM identity, or a token or pre-authorisation that
//! demands one, adds the checks of `service::attestation::policy` and a
//! credential-activation challenge.
//!
//! An enrollment without a key (an updater older than device keys) gets
//! a long-lived bearer credential when `legacy-device-credentials` allows
//! it; it can only create a device, never take one over.

use std::net::IpAddr;

use kernex_protocol::api::{EnrollPending, EnrollRequest, EnrollResponse};

use super::identity;
use super::link::{self, Link, check_link};
use super::pending;
use crate::AppState;
use crate::audit;
use crate::service::attestation::policy::{
    EnrollmentCheck, TokenPolicy, check_enrollment, store_activation,
};
use crate::service::enrollment;
use crate::service::names::{check_metadata, check_name, check_tags};
use crate::service::{Error, Result};
use crate::store::{new_id, new_secret, now_ms, secret_hash};

/// What an enrollment came to.
#[derive(Debug)]
pub enum Outcome {
    /// A new device (HTTP 201).
    Created(EnrollResponse),
    /// The device was enrolled already and proved it (200).
    Renewed(EnrollResponse),
    /// The device id is enrolled already and the request did not prove it
    /// is that device: it waits for an operator (202), no credential.
    Pending(EnrollPending),
    /// The TPM checks refused it (policy, pre-authorisation, the vendor
    /// CAs): the caller tells the device, the log and the audit log.
    Refused {
        /// The organisation of the enrollment token.
        org_id: String,
        /// Why.
        error: Error,
    },
}

/// A device already enrolled with the same id.
#[derive(Debug, sqlx::FromRow)]
struct ExistingRow {
    id: String,
    enrollment_token_id: Option<String>,
    revoked: i64,
    ek_fingerprint: Option<String>,
    tpm_required: i64,
    public_key: Option<String>,
}

/// Enrolls a device with an enrollment token (see the module).
/// [`Error::Unauthorized`]: no such live token, or a key proof that does
/// not verify; [`Error::Forbidden`]: the device was revoked;
/// [`Error::Conflict`]: the device id is enrolled with another token, or
/// enrolled and the request has no key to wait with.
/// The token's bounds (expiry, use cap, allowed tags, rate limits per
/// token and per `source` address) are `service::enrollment::redeem`'s.
pub async fn enroll(
    state: &AppState,
    req: &EnrollRequest,
    source: Option<IpAddr>,
) -> Result<Outcome> {
    check_name("device_id", &req.device_id)?;
    check_name("hardware_class", &req.hardware_class)?;
    check_tags(&req.tags)?;
    check_metadata(
        "hardware_metadata",
        &req.hardware_metadata,
        state.config.limits.max_hardware_metadata_bytes,
        "max-hardware-metadata-bytes",
    )?;
    let claim = Link {
        link_class: req.link_class.clone(),
        site: req.site.clone(),
        time_zone: req.time_zone.clone(),
    };
    check_link(&claim)?;
    let token = enrollment::redeem(state, &req.enrollment_token, &req.tags, source).await?;
    let org_id = &token.org_id;
    let policy = TokenPolicy {
        require_preauthorization: token.require_preauthorization,
        require_tpm: token.require_tpm,
    };
    let tags = &token.tags;

    // The key first: a request that claims one must prove it holds it.
    let key = match &req.key {
        Some(proof) => {
            identity::check_proof(state, &req.device_id, proof).await?;
            Some(proof.public_key.as_str())
        }
        None if state.config.legacy_device_credentials => None,
        None => {
            return Err(Error::Invalid(
                "key: enrollment needs the device's public key and proof (update the updater)"
                    .into(),
            ));
        }
    };
    // With a key, an access token; without, a long-lived bearer credential.
    let credential = new_secret(if key.is_some() { "kxa" } else { "kxd" })?;
    let expires_in_secs = key.map(|_| state.config.device_token_secs);
    let now = now_ms();
    let check = |bound: Option<String>| async move {
        check_enrollment(
            state,
            org_id,
            &req.device_id,
            policy,
            req.tpm.as_ref(),
            req.tpm_slot_pcr,
            bound.as_deref(),
        )
        .await
    };
    for _ in 0..3 {
        let existing = sqlx::query_as::<_, ExistingRow>(
            "SELECT id, enrollment_token_id, revoked, ek_fingerprint, tpm_required, public_key FROM devices WHERE org_id = $1 AND device_id = $2",
        )
        .bind(org_id)
        .bind(&req.device_id)
        .fetch_optional(state.store.pool())
        .await?;
        if let Some(row) = existing {
            let id = row.id;
            let bound = row.ek_fingerprint;
            // Proof by the device's current key: the same key, its
            // possession shown above.
            let proven_key =
                matches!((key, row.public_key.as_deref()), (Some(k), Some(c)) if k == c);
            // A row that must prove a TPM and never did holds nothing: it
            // may be someone squatting on a pre-authorised serial with
            // another token. The board itself (its TPM checked below) takes
            // it over.
            let unproven = bound.is_none() && row.tpm_required != 0;
            // Proof by TPM credential activation: with the bound EK (the
            // new credential waits for the TPM's answer), or any TPM the
            // policy accepts for a row that never proved one.
            let tpm_proof = req.tpm.is_some() && (bound.is_some() || unproven);
            if !proven_key
                && row.enrollment_token_id.as_deref() != Some(token.id.as_str())
                && !unproven
            {
                return Err(Error::Conflict(format!(
                    "device {} is already enrolled with another token",
                    req.device_id
                )));
            }
            if row.revoked != 0 {
                return Err(Error::Forbidden);
            }
            if !proven_key && !tpm_proof {
                // No proof: the enrolled device keeps its identity. One
                // bound to its TPM says why (the policy's refusal).
                if bound.is_some()
                    && let Err(error) = check(bound.clone()).await
                {
                    return Ok(Outcome::Refused {
                        org_id: org_id.clone(),
                        error,
                    });
                }
                let Some(key) = key else {
                    return Err(Error::Conflict(format!(
                        "device {} is enrolled already: re-enrolling it needs its device key (an updater with device keys) or its TPM",
                        req.device_id
                    )));
                };
                let waiting =
                    pending::park(state, org_id, &id, &req.device_id, key, &token.id).await?;
                record(
                    state,
                    org_id,
                    &req.device_id,
                    "device.re-enroll-pending",
                    &id,
                )
                .await?;
                return Ok(Outcome::Pending(waiting));
            }
            let check: EnrollmentCheck = match check(bound.clone()).await {
                Ok(check) => check,
                Err(error) => {
                    return Ok(Outcome::Refused {
                        org_id: org_id.clone(),
                        error,
                    });
                }
            };
            // Bound to a TPM and not proven by the key: the new credential
            // (and key) replace the old ones only when that TPM answers the
            // challenge. The EK is public; knowing it must not be enough to
            // take the device over.
            let wait_for_tpm = bound.is_some() && !proven_key;
            if !wait_for_tpm {
                match key {
                    Some(key) => {
                        // A fresh start: the key's earlier tokens go too.
                        identity::replace_key(state, &id, key).await?;
                        identity::store_token(state, &id, &credential).await?;
                    }
                    None => {
                        sqlx::query(
                            "UPDATE devices SET credential_hash = $1, enrollment_token_id = $2 WHERE id = $3 AND revoked = 0",
                        )
                        .bind(secret_hash(&credential))
                        .bind(&token.id)
                        .bind(&id)
                        .execute(state.store.pool())
                        .await?;
                    }
                }
                crate::poll_cache::forget_device(state, &id).await;
            }
            link::store_hint(state, &id, &claim).await?;
            let pending = wait_for_tpm.then(|| secret_hash(&credential));
            let activation = store_activation(state, &id, &check, pending.as_deref()).await?;
            if wait_for_tpm && let Some(key) = key {
                sqlx::query(
                    "UPDATE tpm_activations SET pending_public_key = $1 WHERE device_pk = $2",
                )
                .bind(key)
                .bind(&id)
                .execute(state.store.pool())
                .await?;
            }
            record(state, org_id, &req.device_id, "device.re-enroll", &id).await?;
            return Ok(Outcome::Renewed(EnrollResponse {
                id,
                credential,
                activation,
                expires_in_secs,
            }));
        }
        let check = match check(None).await {
            Ok(check) => check,
            Err(error) => {
                return Ok(Outcome::Refused {
                    org_id: org_id.clone(),
                    error,
                });
            }
        };
        let id = new_id()?;
        let mut tx = state.store.begin_write().await?;
        enrollment::take_use(&mut tx, &token.id).await?;
        let inserted = sqlx::query(
            "INSERT INTO devices (id, org_id, device_id, hardware_class, hardware_metadata, status, credential_hash, enrollment_token_id, revoked, registered_at, public_key) VALUES ($1, $2, $3, $4, $5, 'offline', $6, $7, 0, $8, $9)",
        )
        .bind(&id)
        .bind(org_id)
        .bind(&req.device_id)
        .bind(&req.hardware_class)
        .bind(serde_json::Value::Object(req.hardware_metadata.clone()).to_string())
        .bind(match key {
            Some(_) => identity::retired_credential()?,
            None => secret_hash(&credential),
        })
        .bind(&token.id)
        .bind(now)
        .bind(key)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // Enrolled concurrently: go round and take the existing row.
            Err(e) if crate::store::is_unique_violation(&e) => continue,
            Err(e) => return Err(e.into()),
        }
        for tag in tags {
            sqlx::query("INSERT INTO device_tags (device_pk, org_id, tag) VALUES ($1, $2, $3)")
                .bind(&id)
                .bind(org_id)
                .bind(tag)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if key.is_some() {
            identity::store_token(state, &id, &credential).await?;
        }
        link::store(state, &id, &token.link).await?;
        link::store_hint(state, &id, &claim).await?;
        let activation = store_activation(state, &id, &check, None).await?;
        record(state, org_id, &req.device_id, "device.enroll", &id).await?;
        return Ok(Outcome::Created(EnrollResponse {
            id,
            credential,
            activation,
            expires_in_secs,
        }));
    }
    Err(Error::Conflict("enrollment raced; retry".into()))
}

/// Records a successful enrollment in the audit log.
async fn record(
    state: &AppState,
    org_id: &str,
    device_id: &str,
    action: &str,
    id: &str,
) -> Result<()> {
    audit::coalesce::append(
        &state.store,
        &state.audit_coalescer,
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
