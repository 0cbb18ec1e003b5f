//! Pre-authorisation (operators, the factory line): a device id,
//! optionally with the EK of its TPM. An enrollment token can require it;
//! a recorded EK binds the device id to that TPM.

use kernex_protocol::api::{NewPreauthorization, Preauthorization};

use super::policy::{
    MAX_CERTIFICATE_HEX, MAX_PUBLIC_HEX, check_ek, check_vendor_ca, decode_hex, fingerprint,
};
use crate::AppState;
use crate::service::names::check_name;
use crate::service::{Error, Result};
use crate::store::{new_id, now_ms};

/// Whether [`preauthorize`] recorded something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// A new pre-authorisation.
    Created,
    /// The same device id and EK were recorded already (a retry).
    Existing,
}

/// A row of `tpm_preauthorizations`.
#[derive(Debug, sqlx::FromRow)]
struct PreauthRow {
    id: String,
    device_id: String,
    ek_fingerprint: Option<String>,
    ek_certificate: Option<String>,
    created_at: i64,
}

impl From<PreauthRow> for Preauthorization {
    fn from(r: PreauthRow) -> Self {
        Preauthorization {
            id: r.id,
            device_id: r.device_id,
            ek_fingerprint: r.ek_fingerprint,
            ek_certificate: r.ek_certificate.is_some(),
            created_at: r.created_at,
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
struct DeviceIdRow {
    device_id: String,
}

const COLUMNS: &str = "id, device_id, ek_fingerprint, ek_certificate, created_at";

async fn find(
    conn: &mut sqlx::AnyConnection,
    org_id: &str,
    device_id: &str,
) -> Result<Option<Preauthorization>> {
    let row = sqlx::query_as::<_, PreauthRow>(&format!(
        "SELECT {COLUMNS} FROM tpm_preauthorizations WHERE org_id = $1 AND device_id = $2"
    ))
    .bind(org_id)
    .bind(device_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(Preauthorization::from))
}

/// Pre-authorises `req.device_id` in organisation `org_id` for user
/// `user_id`: recorded, or already recorded with the same EK (the factory
/// line may retry). Another EK for the device id, or this EK for another
/// device id, is a conflict. Reads and writes go through `conn` (the
/// audited transaction).
pub async fn preauthorize(
    state: &AppState,
    conn: &mut sqlx::AnyConnection,
    org_id: &str,
    user_id: &str,
    req: &NewPreauthorization,
) -> Result<(Recorded, Preauthorization)> {
    check_name("device_id", &req.device_id)?;
    let public = req
        .ek_public
        .as_deref()
        .map(|t| decode_hex("ek_public", t, MAX_PUBLIC_HEX))
        .transpose()?;
    let certificate = req
        .ek_certificate
        .as_deref()
        .map(|t| decode_hex("ek_certificate", t, MAX_CERTIFICATE_HEX))
        .transpose()?;
    let fp = match &public {
        Some(public) => {
            let ek = check_ek(public, certificate.as_deref())?;
            // The factory line's word stands for an EK without a
            // certificate; a certificate it sends must be a vendor's.
            if certificate.is_some() {
                check_vendor_ca(state, &ek, certificate.as_deref()).map_err(|e| match e {
                    Error::Refused(why) => Error::Unprocessable(why),
                    other => other,
                })?;
            }
            Some(fingerprint(public))
        }
        None if certificate.is_some() => {
            return Err(Error::Invalid(
                "ek_certificate without ek_public: send the EK's TPMT_PUBLIC too".into(),
            ));
        }
        None => None,
    };
    if let Some(fp) = &fp {
        let other = sqlx::query_as::<_, DeviceIdRow>(
            "SELECT device_id FROM tpm_preauthorizations WHERE org_id = $1 AND ek_fingerprint = $2 AND device_id <> $3",
        )
        .bind(org_id)
        .bind(fp)
        .bind(&req.device_id)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(other) = other {
            return Err(Error::Conflict(format!(
                "this EK is already pre-authorised for device {}",
                other.device_id
            )));
        }
    }
    if let Some(found) = find(conn, org_id, &req.device_id).await? {
        if found.ek_fingerprint != fp {
            return Err(Error::Conflict(format!(
                "device {} is already pre-authorised with {}; remove that first",
                req.device_id,
                found
                    .ek_fingerprint
                    .map_or("no EK".to_string(), |f| format!("the EK {f}"))
            )));
        }
        return Ok((Recorded::Existing, found));
    }
    let id = new_id()?;
    let now = now_ms();
    // ON CONFLICT DO NOTHING: a unique violation would abort the
    // (PostgreSQL) transaction this runs in.
    let inserted = sqlx::query(
        "INSERT INTO tpm_preauthorizations (id, org_id, device_id, ek_public, ek_certificate, ek_fingerprint, created_by, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(org_id)
    .bind(&req.device_id)
    .bind(public.as_deref().map(hex::encode))
    .bind(certificate.as_deref().map(hex::encode))
    .bind(&fp)
    .bind(user_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        // Recorded concurrently: answer as a retry would.
        {
            let found = find(conn, org_id, &req.device_id)
                .await?
                .ok_or(Error::Conflict(
                    "pre-authorisation raced with a removal; retry".into(),
                ))?;
            if found.ek_fingerprint != fp {
                return Err(Error::Conflict(format!(
                    "device {} was pre-authorised with another EK meanwhile",
                    req.device_id
                )));
            }
            return Ok((Recorded::Existing, found));
        }
    }
    Ok((
        Recorded::Created,
        Preauthorization {
            id,
            device_id: req.device_id.clone(),
            ek_fingerprint: fp,
            ek_certificate: certificate.is_some(),
            created_at: now,
        },
    ))
}

/// The organisation's pre-authorisations, newest first.
pub async fn list(state: &AppState, org_id: &str) -> Result<Vec<Preauthorization>> {
    let rows = sqlx::query_as::<_, PreauthRow>(&format!(
        "SELECT {COLUMNS} FROM tpm_preauthorizations WHERE org_id = $1 ORDER BY created_at DESC, device_id"
    ))
    .bind(org_id)
    .fetch_all(state.store.pool())
    .await?;
    Ok(rows.into_iter().map(Preauthorization::from).collect())
}

/// Removes the pre-authorisation of `device_id`. A device already enrolled
/// stays bound to its TPM.
pub async fn remove(conn: &mut sqlx::AnyConnection, org_id: &str, device_id: &str) -> Result<()> {
    let done =
        sqlx::query("DELETE FROM tpm_preauthorizations WHERE org_id = $1 AND device_id = $2")
            .bind(org_id)
            .bind(device_id)
            .execute(conn)
            .await?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound("no such pre-authorisation"));
    }
    Ok(())
}
