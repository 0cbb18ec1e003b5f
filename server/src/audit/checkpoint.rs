//! Signed checkpoints: the instance's Ed25519 key signs an organisation's
//! chain head (seq, hash, time) every `audit-checkpoint-entries` entries or
//! at the first entry `audit-checkpoint-minutes` after the last one, in the
//! transaction that appends it. Whoever rewrites history without the key
//! cannot make the signed checkpoints fit the rewritten chain.
//!
//! The key lives in DATA-DIR/audit-signing.key (PKCS#8 PEM, mode 0600),
//! made at first start. Its public half is shown at `GET /api/v1/audit/key`
//! and on the audit log page; `kernex-server audit verify --public-key`
//! takes it from there.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::sign::{Signer as OsslSigner, Verifier};
use serde::{Deserialize, Serialize};
use sqlx::Row;

/// The key file in the data directory.
pub const KEY_FILE: &str = "audit-signing.key";

/// The columns of a checkpoint row, in [`Checkpoint`] order.
pub const COLUMNS: &str = "org_id, seq, hash, at, public_key, signature";

/// A signed chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Organisation.
    pub org_id: String,
    /// The entry signed (the head when signed).
    pub seq: i64,
    /// That entry's hash.
    pub hash: String,
    /// When it was signed, unix ms.
    pub at: i64,
    /// The signer's Ed25519 public key, raw, hex.
    pub public_key: String,
    /// Ed25519 signature over [`Checkpoint::message`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// What is signed: the purpose, the organisation, seq, hash and time.
    pub fn message(org_id: &str, seq: i64, hash: &str, at: i64) -> Vec<u8> {
        format!("kernex-audit-checkpoint/v1\n{org_id}\n{seq}\n{hash}\n{at}\n").into_bytes()
    }

    /// Reads a row selected with [`COLUMNS`].
    pub fn from_row(row: &sqlx::any::AnyRow) -> sqlx::Result<Self> {
        Ok(Checkpoint {
            org_id: row.try_get("org_id")?,
            seq: row.try_get("seq")?,
            hash: row.try_get("hash")?,
            at: row.try_get("at")?,
            public_key: row.try_get("public_key")?,
            signature: row.try_get("signature")?,
        })
    }

    /// Whether the signature is valid for this checkpoint under its own
    /// `public_key` (whether that key is trusted is the caller's question).
    pub fn signature_valid(&self) -> bool {
        let check = || -> Result<bool> {
            let key =
                PKey::public_key_from_raw_bytes(&hex::decode(&self.public_key)?, Id::ED25519)?;
            let mut verifier = Verifier::new_without_digest(&key)?;
            Ok(verifier.verify_oneshot(
                &hex::decode(&self.signature)?,
                &Checkpoint::message(&self.org_id, self.seq, &self.hash, self.at),
            )?)
        };
        check().unwrap_or(false)
    }
}

/// The instance's signing key and when to sign.
pub struct Signer {
    key: PKey<Private>,
    public_hex: String,
    /// Sign every this many entries (0: not by count).
    pub every_entries: u64,
    /// ... or this long after the last checkpoint, ms (0: not by time).
    pub every_ms: i64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("public_key", &self.public_hex)
            .field("every_entries", &self.every_entries)
            .field("every_ms", &self.every_ms)
            .finish()
    }
}

impl Signer {
    /// Loads DATA-DIR/audit-signing.key, making it (0600) on first start.
    pub fn load_or_create(data_dir: &Path, every_entries: u64, every_minutes: u64) -> Result<Self> {
        let path = data_dir.join(KEY_FILE);
        let key = match std::fs::read(&path) {
            Ok(pem) => PKey::private_key_from_pem(&pem).with_context(|| {
                format!("unable to read the audit signing key {}", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&path)?,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("unable to read the audit signing key {}", path.display())
                });
            }
        };
        if key.id() != Id::ED25519 {
            anyhow::bail!("{} is not an Ed25519 key", path.display());
        }
        let public_hex = hex::encode(key.raw_public_key()?);
        Ok(Signer {
            key,
            public_hex,
            every_entries,
            every_ms: i64::try_from(every_minutes)
                .unwrap_or(i64::MAX / 60_000)
                .saturating_mul(60_000),
        })
    }

    /// The public key, raw, hex.
    pub fn public_hex(&self) -> &str {
        &self.public_hex
    }

    /// The public key as PEM (SubjectPublicKeyInfo).
    pub fn public_pem(&self) -> Result<String> {
        Ok(String::from_utf8(self.key.public_key_to_pem()?)?)
    }

    /// Signs a chain head.
    pub fn sign(&self, org_id: &str, seq: i64, hash: &str, at: i64) -> Result<Checkpoint> {
        let mut signer = OsslSigner::new_without_digest(&self.key)?;
        let signature = signer.sign_oneshot_to_vec(&Checkpoint::message(org_id, seq, hash, at))?;
        Ok(Checkpoint {
            org_id: org_id.to_string(),
            seq,
            hash: hash.to_string(),
            at,
            public_key: self.public_hex.clone(),
            signature: hex::encode(signature),
        })
    }

    /// Whether entry `seq` appended at `now` is due a checkpoint, given
    /// the last one (`None`: there is none yet, so yes).
    pub fn due(&self, seq: i64, now: i64, last: Option<(i64, i64)>) -> bool {
        let Some((last_seq, last_at)) = last else {
            return true;
        };
        let by_count = self.every_entries > 0
            && u64::try_from(seq - last_seq).unwrap_or(0) >= self.every_entries;
        let by_time = self.every_ms > 0 && now - last_at >= self.every_ms;
        by_count || by_time
    }
}

fn create(path: &PathBuf) -> Result<PKey<Private>> {
    let key = PKey::generate_ed25519()?;
    let pem = key.private_key_to_pem_pkcs8()?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("unable to create the audit signing key {}", path.display()))?;
    file.write_all(&pem)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("unable to write {}", path.display()))?;
    tracing::info!(path = %path.display(), public_key = %hex::encode(key.raw_public_key()?), "created the instance's audit signing key");
    Ok(key)
}

/// A trusted public key, from a PEM file: a public key, or the private key
/// file itself (its public half is taken).
pub fn read_public_key(path: &Path) -> Result<String> {
    let pem = std::fs::read(path).with_context(|| format!("unable to read {}", path.display()))?;
    let key: PKey<Public> = match PKey::public_key_from_pem(&pem) {
        Ok(k) => k,
        Err(_) => {
            let private = PKey::private_key_from_pem(&pem)
                .map_err(|_| anyhow!("{}: not a PEM public or private key", path.display()))?;
            PKey::public_key_from_raw_bytes(&private.raw_public_key()?, Id::ED25519)?
        }
    };
    if key.id() != Id::ED25519 {
        anyhow::bail!("{}: not an Ed25519 key", path.display());
    }
    Ok(hex::encode(key.raw_public_key()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_detects_a_changed_head() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::load_or_create(dir.path(), 10, 0).unwrap();
        let cp = signer.sign("org", 5, "ab", 7).unwrap();
        assert!(cp.signature_valid());
        let mut forged = cp.clone();
        forged.hash = "cd".into();
        assert!(!forged.signature_valid());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Loaded again: the same key.
        let again = Signer::load_or_create(dir.path(), 10, 0).unwrap();
        assert_eq!(again.public_hex(), signer.public_hex());
        assert_eq!(
            read_public_key(&dir.path().join(KEY_FILE)).unwrap(),
            signer.public_hex()
        );
        assert!(signer.due(20, 0, Some((10, 0))));
        assert!(!signer.due(19, 0, Some((10, 0))));
        assert!(signer.due(1, 0, None));
    }
}
