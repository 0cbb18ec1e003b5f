//! Password hashing with a bound on memory: argon2id with the configured
//! parameters (`[login] argon2-m-kib`, `argon2-t`, `argon2-p`), at most
//! `hash-concurrency` hashes at once, each in a reused memory buffer.
//!
//! argon2 is memory-hard on purpose: one hash at the default parameters
//! touches 19 MiB. Unbounded, 256 concurrent logins asked for 4.8 GB, and
//! the allocator kept most of it. Here a semaphore admits
//! `hash-concurrency` hashes (default: twice the cores); a caller that
//! does not get a permit within `hash-queue-ms` is refused (the caller
//! answers 429 with `Retry-After`). Each admitted hash runs in one of at
//! most `hash-concurrency` block buffers, allocated once and reused, so the
//! memory for hashing is `hash-concurrency × m` and never grows.
//!
//! Stored hashes carry their own parameters (PHC string): a hash made with
//! other parameters (an older configuration, the crate's defaults) still
//! verifies, in a buffer grown to its `m` (and kept).

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::anyhow;
use argon2::password_hash::{PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::Semaphore;

use crate::service::Error;

/// Largest `m` (KiB) a stored hash may ask for: 1 GiB. A hash beyond it is
/// not ours and is refused rather than allocated.
const MAX_M_KIB: u32 = 1 << 20;

/// Hashing settings (from `[login]`).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// argon2 memory, KiB.
    pub m_kib: u32,
    /// argon2 passes.
    pub t: u32,
    /// argon2 lanes.
    pub p: u32,
    /// Hashes at once (0: twice the cores).
    pub concurrency: usize,
    /// How long a caller waits for a hashing slot before it is refused.
    pub queue: Duration,
}

/// The password hasher every login and password change goes through.
pub struct Hasher {
    params: Params,
    permits: Semaphore,
    queue: Duration,
    /// Block buffers not in use (at most `concurrency` exist).
    buffers: Mutex<Vec<Vec<Block>>>,
    /// A hash of a password nobody knows, with `params`, checked for
    /// unknown accounts so that timing does not tell them apart.
    dummy: OnceLock<String>,
    concurrency: usize,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hasher")
            .field("params", &self.params)
            .field("concurrency", &self.concurrency)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Hasher {
    /// A hasher for `settings`; an error names the parameter argon2 refused.
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        if settings.m_kib > MAX_M_KIB {
            anyhow::bail!("argon2-m-kib: at most {MAX_M_KIB} KiB (1 GiB)");
        }
        let params = Params::new(settings.m_kib, settings.t, settings.p, None).map_err(|e| {
            anyhow!("invalid argon2 parameters (argon2-m-kib, argon2-t, argon2-p): {e}")
        })?;
        let concurrency = match settings.concurrency {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get() * 2),
            n => n,
        };
        Ok(Hasher {
            params,
            permits: Semaphore::new(concurrency),
            queue: settings.queue,
            buffers: Mutex::new(Vec::new()),
            dummy: OnceLock::new(),
            concurrency,
        })
    }

    /// Hashes at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Hashes `password` with the configured parameters and a random salt
    /// (PHC string). 429 when no slot frees up in time.
    pub async fn hash(&self, password: &str) -> Result<String, Error> {
        let _permit = self.admit().await?;
        let mut salt = [0u8; 16];
        openssl::rand::rand_bytes(&mut salt).map_err(|e| Error::Internal(e.into()))?;
        let params = self.params.clone();
        let password = password.to_string();
        let mut buffer = self.take_buffer();
        let (buffer, hash) = tokio::task::spawn_blocking(move || {
            let hash = phc(&params, &password, &salt, &mut buffer);
            (buffer, hash)
        })
        .await
        .map_err(|e| Error::Internal(e.into()))?;
        self.put_buffer(buffer);
        Ok(hash?)
    }

    /// Whether `password` matches the PHC string `hash` (`None`: an unknown
    /// account, checked against a dummy hash so it takes as long). 429 when
    /// no slot frees up in time.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, Error> {
        let _permit = self.admit().await?;
        let stored = hash.map(str::to_string);
        let dummy = self.dummy.get().cloned();
        let params = self.params.clone();
        let password = password.to_string();
        let mut buffer = self.take_buffer();
        let (buffer, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = (|| -> anyhow::Result<(bool, Option<String>)> {
                match stored {
                    Some(h) => Ok((check(&password, &h, &mut buffer)?, None)),
                    None => {
                        // Made once, with the configured parameters, by
                        // the first unknown-account login.
                        let dummy = match dummy {
                            Some(d) => d,
                            None => {
                                let mut salt = [0u8; 16];
                                openssl::rand::rand_bytes(&mut salt)?;
                                phc(&params, "\u{0}unknown account", &salt, &mut buffer)?
                            }
                        };
                        check(&password, &dummy, &mut buffer)?;
                        Ok((false, Some(dummy)))
                    }
                }
            })();
            (buffer, outcome)
        })
        .await
        .map_err(|e| Error::Internal(e.into()))?;
        self.put_buffer(buffer);
        let (ok, dummy) = outcome?;
        if let Some(d) = dummy {
            let _ = self.dummy.set(d);
        }
        Ok(ok)
    }

    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
        match tokio::time::timeout(self.queue, self.permits.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::Internal(anyhow!("the hashing semaphore is closed"))),
            Err(_) => {
                tracing::warn!(
                    concurrency = self.concurrency,
                    queue_ms = self.queue.as_millis() as u64,
                    "password hashing saturated: request refused"
                );
                Err(Error::TooManyRequests(1))
            }
        }
    }

    fn take_buffer(&self) -> Vec<Block> {
        self.buffers
            .lock()
            .ok()
            .and_then(|mut b| b.pop())
            .unwrap_or_default()
    }

    fn put_buffer(&self, buffer: Vec<Block>) {
        if let Ok(mut b) = self.buffers.lock()
            && b.len() < self.concurrency
        {
            b.push(buffer);
        }
    }
}

/// `params`' argon2id hash of `password` with `salt`, in `buffer`.
fn phc(
    params: &Params,
    password: &str,
    salt: &[u8],
    buffer: &mut Vec<Block>,
) -> anyhow::Result<String> {
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    grow(buffer, params.block_count());
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut buffer[..])
        .map_err(|e| anyhow!("unable to hash the password: {e}"))?;
    let salt = SaltString::encode_b64(salt).map_err(|e| anyhow!("salt: {e}"))?;
    let output = argon2::password_hash::Output::new(&out).map_err(|e| anyhow!("hash: {e}"))?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: params
            .try_into()
            .map_err(|e| anyhow!("argon2 parameters: {e}"))?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `stored`, with the stored
/// hash's own algorithm, version and parameters.
fn check(password: &str, stored: &str, buffer: &mut Vec<Block>) -> anyhow::Result<bool> {
    let Ok(hash) = PasswordHash::new(stored) else {
        return Ok(false);
    };
    let algorithm =
        Algorithm::try_from(hash.algorithm).map_err(|e| anyhow!("stored hash algorithm: {e}"))?;
    let version = hash
        .version
        .map(Version::try_from)
        .transpose()
        .map_err(|e| anyhow!("stored hash version: {e}"))?
        .unwrap_or_default();
    let params = Params::try_from(&hash).map_err(|e| anyhow!("stored hash parameters: {e}"))?;
    let (Some(salt), Some(expected)) = (hash.salt.as_ref(), hash.hash.as_ref()) else {
        return Ok(false);
    };
    if params.m_cost() > MAX_M_KIB {
        anyhow::bail!("a stored password hash asks for {} KiB", params.m_cost());
    }
    let mut salt_bytes = [0u8; 64];
    let salt = salt
        .decode_b64(&mut salt_bytes)
        .map_err(|e| anyhow!("stored hash salt: {e}"))?;
    grow(buffer, params.block_count());
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut buffer[..])
        .map_err(|e| anyhow!("unable to hash the password: {e}"))?;
    let out = argon2::password_hash::Output::new(&out).map_err(|e| anyhow!("hash: {e}"))?;
    // `Output`'s equality is constant-time.
    Ok(out == *expected)
}

fn grow(buffer: &mut Vec<Block>, blocks: usize) {
    if buffer.len() < blocks {
        buffer.resize(blocks, Block::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher(m_kib: u32, concurrency: usize) -> Hasher {
        Hasher::new(Settings {
            m_kib,
            t: 1,
            p: 1,
            concurrency,
            queue: Duration::from_millis(50),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn hashes_verify_and_old_hashes_still_verify() {
        let h = hasher(1024, 2);
        let stored = h.hash("correct horse").await.unwrap();
        assert!(
            stored.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"),
            "{stored}"
        );
        assert!(h.verify("correct horse", Some(&stored)).await.unwrap());
        assert!(!h.verify("wrong horse", Some(&stored)).await.unwrap());
        // A hash made by the argon2 crate's defaults (what every server
        // before `[login]` stored) verifies under other parameters.
        let old = crate::auth::hash_password("old password").unwrap();
        assert!(old.contains("m=19456,t=2,p=1"), "{old}");
        assert!(h.verify("old password", Some(&old)).await.unwrap());
        assert!(!h.verify("other", Some(&old)).await.unwrap());
        // And ours verify with the crate's own verifier.
        assert!(crate::auth::verify_password("correct horse", &stored));
        // Unknown accounts never match; garbage never matches.
        assert!(!h.verify("correct horse", None).await.unwrap());
        assert!(!h.verify("x", Some("not a hash")).await.unwrap());
    }

    #[tokio::test]
    async fn saturation_is_refused_not_queued_forever() {
        let h = std::sync::Arc::new(hasher(64 * 1024, 1));
        let held = h.permits.acquire().await.unwrap();
        match h.verify("x", None).await {
            Err(Error::TooManyRequests(1)) => {}
            other => panic!("{other:?}"),
        }
        drop(held);
        assert!(!h.verify("x", None).await.unwrap());
        // One buffer per slot, reused.
        assert_eq!(h.buffers.lock().unwrap().len(), 1);
    }

    #[test]
    fn parameters_are_checked() {
        let bad = Hasher::new(Settings {
            m_kib: 1,
            t: 1,
            p: 1,
            concurrency: 1,
            queue: Duration::from_millis(1),
        });
        assert!(bad.unwrap_err().to_string().contains("argon2-m-kib"));
        assert!(hasher(1024, 0).concurrency() >= 2);
    }
}
