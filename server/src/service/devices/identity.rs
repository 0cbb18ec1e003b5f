//! The device's identity is a key pair it generated and never sends
//! (issue #20; `server/README.md`, "Device identity"). The server keeps
//! only the public key. To act, the device signs a server nonce
//! ([`challenge`]) and trades the signature for an access token that
//! lives `device-token-secs` ([`authenticate`]); the token is stored as
//! its SHA-256 and refused once expired. A device still on a long-lived
//! bearer credential registers a key with it once ([`register_key`]),
//! which retires that credential; a device on its key rotates it the
//! same way, proving the old key by the access token it obtained.

use kernex_protocol::api::{self, AccessToken, Challenge, DeviceAuth, KeyProof};
use kernex_protocol::device_key::{self, KeyError};

use crate::AppState;
use crate::audit;
use crate::auth::Device;
use crate::service::{Error, Result};
use crate::store::{new_secret, now_ms, secret_hash};

/// How long a nonce can be answered.
pub const CHALLENGE_TTL_SECS: u64 = 120;

/// Hex length of a nonce (32 bytes).
const NONCE_HEX: usize = 64;

/// A fresh nonce, accepted once within [`CHALLENGE_TTL_SECS`]. Expired
/// ones are dropped as new ones are made.
pub async fn challenge(state: &AppState) -> Result<Challenge> {
    let nonce = crate::store::new_id()? + &crate::store::new_id()?;
    let now = now_ms();
    sqlx::query("DELETE FROM device_challenges WHERE expires_at <= $1")
        .bind(now)
        .execute(state.store.pool())
        .await?;
    sqlx::query("INSERT INTO device_challenges (nonce, expires_at) VALUES ($1, $2)")
        .bind(&nonce)
        .bind(now + ttl_ms(CHALLENGE_TTL_SECS))
        .execute(state.store.pool())
        .await?;
    Ok(Challenge {
        nonce,
        expires_in_secs: CHALLENGE_TTL_SECS,
    })
}

fn ttl_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// Uses up `nonce`: [`Error::Unauthorized`] when it is unknown, expired or
/// was used already.
async fn take_nonce(state: &AppState, nonce: &str) -> Result<()> {
    if nonce.len() != NONCE_HEX {
        return Err(Error::Unauthorized);
    }
    let taken = sqlx::query("DELETE FROM device_challenges WHERE nonce = $1 AND expires_at > $2")
        .bind(nonce)
        .bind(now_ms())
        .execute(state.store.pool())
        .await?;
    if taken.rows_affected() == 1 {
        Ok(())
    } else {
        Err(Error::Unauthorized)
    }
}

fn key_error(e: KeyError) -> Error {
    match e {
        KeyError::PublicKey(d) => Error::Invalid(format!("key.public_key: {d}")),
        KeyError::Signature | KeyError::Private(_) => Error::Unauthorized,
    }
}

/// Checks that the sender of `proof` holds its key, for `device_id`: the
/// signature, then the nonce (used up). [`Error::Invalid`]: not a key
/// this scheme takes; [`Error::Unauthorized`]: a bad signature or nonce.
pub async fn check_proof(state: &AppState, device_id: &str, proof: &KeyProof) -> Result<()> {
    let message = api::enroll_message(device_id, &proof.nonce, &proof.public_key);
    device_key::verify(&proof.public_key, &message, &proof.signature).map_err(key_error)?;
    take_nonce(state, &proof.nonce).await
}

/// The hash of a credential nobody holds: what a device on its key keeps
/// in the (required, unique) bearer-credential column.
pub fn retired_credential() -> Result<String> {
    Ok(secret_hash(&new_secret("kxd")?))
}

/// A new access token for device `pk`, stored as its hash; the device's
/// expired tokens go.
pub async fn issue(state: &AppState, pk: &str) -> Result<AccessToken> {
    let token = new_secret("kxa")?;
    store_token(state, pk, &token).await?;
    Ok(AccessToken {
        id: pk.to_owned(),
        token,
        expires_in_secs: state.config.device_token_secs,
    })
}

/// Stores access token `token` of device `pk`, valid `device-token-secs`
/// from now (as its hash); the device's expired tokens go.
pub async fn store_token(state: &AppState, pk: &str, token: &str) -> Result<()> {
    let now = now_ms();
    sqlx::query("DELETE FROM device_access_tokens WHERE device_pk = $1 AND expires_at <= $2")
        .bind(pk)
        .bind(now)
        .execute(state.store.pool())
        .await?;
    sqlx::query(
        "INSERT INTO device_access_tokens (token_hash, device_pk, expires_at) VALUES ($1, $2, $3)",
    )
    .bind(secret_hash(token))
    .bind(pk)
    .bind(now + ttl_ms(state.config.device_token_secs))
    .execute(state.store.pool())
    .await?;
    Ok(())
}

/// The stored key of a device.
#[derive(Debug, sqlx::FromRow)]
struct KeyRow {
    public_key: Option<String>,
}

/// Trades a signed nonce for an access token. [`Error::Unauthorized`]
/// for anything wrong (no such device, revoked, no key, a bad signature,
/// an unknown or used nonce): the caller learns nothing more.
pub async fn authenticate(state: &AppState, req: &DeviceAuth) -> Result<AccessToken> {
    if req.id.len() > 64 {
        return Err(Error::Unauthorized);
    }
    let row =
        sqlx::query_as::<_, KeyRow>("SELECT public_key FROM devices WHERE id = $1 AND revoked = 0")
            .bind(&req.id)
            .fetch_optional(state.store.pool())
            .await?;
    let key = row.and_then(|r| r.public_key).ok_or(Error::Unauthorized)?;
    device_key::verify(
        &key,
        &api::auth_message(&req.id, &req.nonce),
        &req.signature,
    )
    .map_err(|_| Error::Unauthorized)?;
    take_nonce(state, &req.nonce).await?;
    issue(state, &req.id).await
}

/// Makes `proof`'s key the key of `device`, which authenticated with its
/// bearer credential (a device migrating to the key scheme: that
/// credential stops working now) or with an access token (key rotation:
/// the old key signed for that token). Its other access tokens go.
pub async fn register_key(
    state: &AppState,
    device: &Device,
    proof: &KeyProof,
) -> Result<AccessToken> {
    check_proof(state, &device.device_id, proof).await?;
    let rotation = device.expires_at.is_some();
    replace_key(state, &device.pk, &proof.public_key).await?;
    let action = if rotation {
        "device.key-rotate"
    } else {
        "device.key-register"
    };
    audit::append(
        &state.store,
        audit::Entry {
            org_id: &device.org_id,
            actor: &format!("device:{}", device.device_id),
            action,
            target: &format!("device:{}", device.pk),
            result: "ok",
            detail: serde_json::json!({"key": device_key::fingerprint(&proof.public_key)}),
        },
    )
    .await?;
    tracing::info!(device = %device.device_id, action, "device key registered");
    issue(state, &device.pk).await
}

/// Sets device `pk`'s key: its bearer credential is retired and every
/// access token of the old key goes, here and in the caches.
pub async fn replace_key(state: &AppState, pk: &str, public_key: &str) -> Result<()> {
    let mut tx = state.store.begin_write().await?;
    replace_key_in(&mut tx, pk, public_key).await?;
    tx.commit().await?;
    crate::poll_cache::forget_device(state, pk).await;
    Ok(())
}

/// [`replace_key`]'s writes, in the caller's transaction; the caller
/// forgets the device in the caches (`poll_cache::forget_device`) once
/// it commits.
pub async fn replace_key_in(
    conn: &mut sqlx::AnyConnection,
    pk: &str,
    public_key: &str,
) -> Result<()> {
    sqlx::query("UPDATE devices SET public_key = $1, credential_hash = $2 WHERE id = $3")
        .bind(public_key)
        .bind(retired_credential()?)
        .bind(pk)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM device_access_tokens WHERE device_pk = $1")
        .bind(pk)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
