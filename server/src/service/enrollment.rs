//! Enrollment tokens: issued per factory batch by an operator, presented
//! by devices at enrollment. Only their SHA-256 is stored; the secret is
//! shown once, when created.
//!
//! A token is bounded: it expires (an expiry is required, at most
//! `[limits] enrollment-token-max-ttl-days` away), it may carry a use cap
//! (`max_uses`: new devices enrolled with it), and it names the only tags
//! a device may ask for (`allowed_tags`). [`redeem`] applies all of that,
//! and the per-token and per-address rate limits (`service::admission`),
//! when a device enrolls.

use std::net::IpAddr;

use kernex_protocol::api::{EnrollmentToken, NewEnrollmentToken};
use sqlx::FromRow;

use super::audit::Audited;
use super::names::check_tags;
use super::users::require;
use super::{Error, Result};
use crate::AppState;
use crate::auth::{Operator, Role};
use crate::service::rollouts::link::{DeviceLink as Link, check_link};
use crate::store::{new_id, new_secret, now_ms, secret_hash};

const COLUMNS: &str = "id, org_id, label, tags, allowed_tags, created_at, expires_at, revoked, require_preauthorization, require_tpm, max_uses, uses, link_class, site, time_zone";

/// The highest `max_uses` accepted.
pub const MAX_USES_LIMIT: i64 = 1_000_000;

/// A token is live (not revoked, not expired, counting a token without an
/// expiry as expiring `max_ttl` ms after it was made). Binds: `$2` now,
/// `$3` max_ttl.
const LIVE: &str = "revoked = 0 AND COALESCE(expires_at, created_at + $3) > $2 \
    AND org_id NOT IN (SELECT id FROM organizations WHERE disabled = 1)";

/// A stored token (flags are 0/1).
#[derive(FromRow)]
struct TokenRow {
    id: String,
    org_id: String,
    label: String,
    tags: String,
    allowed_tags: String,
    created_at: i64,
    expires_at: Option<i64>,
    revoked: i64,
    require_preauthorization: i64,
    require_tpm: i64,
    max_uses: Option<i64>,
    uses: i64,
    link_class: Option<String>,
    site: Option<String>,
    time_zone: Option<String>,
}

impl From<TokenRow> for EnrollmentToken {
    fn from(r: TokenRow) -> Self {
        EnrollmentToken {
            id: r.id,
            label: r.label,
            tags: serde_json::from_str(&r.tags).unwrap_or_default(),
            allowed_tags: serde_json::from_str(&r.allowed_tags).unwrap_or_default(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked: r.revoked != 0,
            require_preauthorization: r.require_preauthorization != 0,
            require_tpm: r.require_tpm != 0,
            max_uses: r.max_uses,
            uses: r.uses,
            link_class: r.link_class,
            site: r.site,
            time_zone: r.time_zone,
            token: None,
        }
    }
}

/// The token (no secret) when devices can enroll with it now (ops); 404
/// when it is unknown in the organisation, revoked, expired or used up.
pub async fn check(state: &AppState, op: &Operator, token: &str) -> Result<EnrollmentToken> {
    require(op, Role::Ops)?;
    if token.len() > 200 {
        return Err(Error::Invalid("token: at most 200 characters".into()));
    }
    let row = sqlx::query_as::<_, TokenRow>(&format!(
        "SELECT {COLUMNS} FROM enrollment_tokens WHERE token_hash = $1 AND {LIVE} AND org_id = $4 AND (max_uses IS NULL OR uses < max_uses)"
    ))
    .bind(secret_hash(token))
    .bind(now_ms())
    .bind(state.config.limits.enrollment_token_max_ttl_ms())
    .bind(&op.org_id)
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::NotFound(
        "no such enrollment token in this organisation (unknown, revoked, expired or used up)",
    ))?;
    Ok(row.into())
}

/// The expiry of a new token, unix ms: exactly one of `expires_at` and
/// `expires_in_secs`, in the future, at most `max_ttl_ms` from `now`.
fn expiry(req: &NewEnrollmentToken, now: i64, max_ttl_ms: i64) -> Result<i64> {
    let max_days = max_ttl_ms / 86_400_000;
    let at = match (req.expires_at, req.expires_in_secs) {
        (Some(_), Some(_)) => {
            return Err(Error::Invalid(
                "expires_at and expires_in_secs: give one, not both".into(),
            ));
        }
        (None, None) => {
            return Err(Error::Invalid(format!(
                "an expiry is required: expires_in_secs (1 to {} s) or expires_at (unix ms)",
                max_ttl_ms / 1000
            )));
        }
        (Some(at), None) => at,
        (None, Some(secs)) => {
            if secs <= 0 {
                return Err(Error::Invalid(format!(
                    "expires_in_secs: must be positive, got {secs}"
                )));
            }
            now.saturating_add(secs.saturating_mul(1000))
        }
    };
    if at <= now {
        return Err(Error::Invalid("expiry: must be in the future".into()));
    }
    if at - now > max_ttl_ms {
        return Err(Error::Invalid(format!(
            "expiry: at most {max_days} days from now (enrollment-token-max-ttl-days)"
        )));
    }
    Ok(at)
}

/// Creates a token (ops); the answer holds its secret, shown only here.
pub async fn create(
    state: &AppState,
    op: &Operator,
    req: NewEnrollmentToken,
) -> Result<EnrollmentToken> {
    require(op, Role::Ops)?;
    let audit = Audited::new(state, op, "enrollment_token.create", "enrollment_token");
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        check_tags(&req.tags)?;
        check_tags(&req.allowed_tags).map_err(|e| match e {
            Error::Invalid(d) => Error::Invalid(format!("allowed_tags: {d}")),
            other => other,
        })?;
        if req.label.len() > 200 {
            return Err(Error::Invalid("label: at most 200 characters".into()));
        }
        check_link(&Link {
            link_class: req.link_class.clone(),
            site: req.site.clone(),
            time_zone: req.time_zone.clone(),
        })?;
        if let Some(n) = req.max_uses
            && !(1..=MAX_USES_LIMIT).contains(&n)
        {
            return Err(Error::Invalid(format!(
                "max_uses: 1 to {MAX_USES_LIMIT}, got {n}"
            )));
        }
        let now = now_ms();
        let expires_at = expiry(&req, now, state.config.limits.enrollment_token_max_ttl_ms())?;
        let id = new_id()?;
        let token = new_secret("kxe")?;
        let json = |tags: &Vec<String>| serde_json::to_string(tags).map_err(|e| Error::Internal(e.into()));
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, org_id, token_hash, label, tags, created_by, created_at, expires_at, revoked, require_preauthorization, require_tpm, max_uses, uses, allowed_tags, link_class, site, time_zone) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10, $11, 0, $12, $13, $14, $15)",
        )
        .bind(&id)
        .bind(&op.org_id)
        .bind(secret_hash(&token))
        .bind(&req.label)
        .bind(json(&req.tags)?)
        .bind(&op.user_id)
        .bind(now)
        .bind(expires_at)
        .bind(i64::from(req.require_preauthorization))
        .bind(i64::from(req.require_tpm))
        .bind(req.max_uses)
        .bind(json(&req.allowed_tags)?)
        .bind(&req.link_class)
        .bind(&req.site)
        .bind(&req.time_zone)
        .execute(&mut *tx)
        .await?;
        let target = format!("enrollment_token:{id}");
        Ok((
            EnrollmentToken {
                id,
                label: req.label.clone(),
                tags: req.tags.clone(),
                allowed_tags: req.allowed_tags.clone(),
                created_at: now,
                expires_at: Some(expires_at),
                revoked: false,
                require_preauthorization: req.require_preauthorization,
                require_tpm: req.require_tpm,
                max_uses: req.max_uses,
                uses: 0,
                link_class: req.link_class.clone(),
                site: req.site.clone(),
                time_zone: req.time_zone.clone(),
                token: Some(token),
            },
            target,
        ))
    }
    .await;
    audit.finish(tx, outcome).await
}

/// The organisation's tokens (without secrets), newest first.
pub async fn list(state: &AppState, op: &Operator) -> Result<Vec<EnrollmentToken>> {
    let rows = sqlx::query_as::<_, TokenRow>(&format!(
        "SELECT {COLUMNS} FROM enrollment_tokens WHERE org_id = $1 ORDER BY created_at DESC"
    ))
    .bind(&op.org_id)
    .fetch_all(state.store.pool())
    .await?;
    Ok(rows.into_iter().map(EnrollmentToken::from).collect())
}

/// Revokes a token (ops). Devices already enrolled stay.
pub async fn revoke(state: &AppState, op: &Operator, id: &str) -> Result<()> {
    require(op, Role::Ops)?;
    let target = format!("enrollment_token:{id}");
    let audit = Audited::new(state, op, "enrollment_token.revoke", &target);
    let mut tx = audit.begin().await?;
    let outcome: Result<_> = async {
        let done =
            sqlx::query("UPDATE enrollment_tokens SET revoked = 1 WHERE id = $1 AND org_id = $2")
                .bind(id)
                .bind(&op.org_id)
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() == 0 {
            return Err(Error::NotFound("no such enrollment token"));
        }
        Ok(((), String::new()))
    }
    .await;
    audit.finish(tx, outcome).await
}

/// A live token a device presented, as enrollment needs it.
#[derive(Debug)]
pub struct Redeemed {
    /// Token id.
    pub id: String,
    /// Its organisation.
    pub org_id: String,
    /// The device's tags: the token's, and those it asked for (sorted).
    pub tags: Vec<String>,
    /// Only pre-authorised devices.
    pub require_preauthorization: bool,
    /// Only devices with a TPM.
    pub require_tpm: bool,
    /// The link the token gives its devices (fields it leaves unset: none).
    pub link: Link,
}

/// The live token `secret`, for a device asking for `requested` tags from
/// `source` (none: unknown, e.g. a test calling the router directly).
/// Refused, in this order: over the per-address rate limit (429, before
/// any lookup); no such live token ([`Error::Unauthorized`]); over the
/// per-token rate limit (429); a tag outside the token's `tags` and
/// `allowed_tags` ([`Error::Refused`], naming it). The use cap is taken
/// when a new device is stored: [`take_use`].
pub async fn redeem(
    state: &AppState,
    secret: &str,
    requested: &[String],
    source: Option<IpAddr>,
) -> Result<Redeemed> {
    let limits = &state.config.limits;
    if let Some(ip) = source {
        state
            .admission
            .address(ip, limits.enrollments_per_address_per_minute)
            .inspect_err(
                |_| tracing::warn!(source = %ip, "enrollment over the per-address rate limit"),
            )?;
    }
    let row = sqlx::query_as::<_, TokenRow>(&format!(
        "SELECT {COLUMNS} FROM enrollment_tokens WHERE token_hash = $1 AND {LIVE}"
    ))
    .bind(secret_hash(secret))
    .bind(now_ms())
    .bind(limits.enrollment_token_max_ttl_ms())
    .fetch_optional(state.store.pool())
    .await?
    .ok_or(Error::Unauthorized)?;
    state
        .admission
        .token(&row.id, limits.enrollments_per_token_per_minute)
        .inspect_err(
            |_| tracing::warn!(token = %row.id, "enrollment over the per-token rate limit"),
        )?;
    let org_id = row.org_id.clone();
    let token = EnrollmentToken::from(row);
    if let Some(tag) = requested
        .iter()
        .find(|t| !token.tags.contains(t) && !token.allowed_tags.contains(t))
    {
        return Err(Error::Refused(format!(
            "tag {tag:?} is not allowed by this enrollment token (allowed: {})",
            token.allowed_tags.join(", ")
        )));
    }
    let mut tags = token.tags;
    tags.extend(requested.iter().cloned());
    tags.sort();
    tags.dedup();
    Ok(Redeemed {
        id: token.id,
        org_id,
        tags,
        require_preauthorization: token.require_preauthorization,
        require_tpm: token.require_tpm,
        link: Link {
            link_class: token.link_class,
            site: token.site,
            time_zone: token.time_zone,
        },
    })
}

/// Counts one use of token `id` for a new device, inside the transaction
/// that stores it; [`Error::Refused`] when its `max_uses` are used up.
pub async fn take_use(conn: &mut sqlx::AnyConnection, id: &str) -> Result<()> {
    let taken = sqlx::query(
        "UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = $1 AND (max_uses IS NULL OR uses < max_uses)",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if taken == 0 {
        return Err(Error::Refused(
            "this enrollment token is used up (max_uses reached)".into(),
        ));
    }
    Ok(())
}
