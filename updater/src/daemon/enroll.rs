//! The device's credential. Its identity is a key it made
//! ([`super::identity`]: in the TPM with `[tpm]`, else a key file; never
//! sent): it enrolls with the factory token,
//! its public key and a signature over a server nonce (with the TPM's
//! identity and credential activation when a TPM is configured); later
//! it signs a fresh nonce for an access token whenever the last one is
//! about to expire. A device enrolled before device keys registers one
//! with its old bearer credential on its next contact, which retires that
//! credential. Also the binding of a TPM configured after enrollment.

use anyhow::{Context as _, Result, anyhow};
use kernex_protocol::api;

use super::Daemon;
use super::ServerConfigExt as _;
use super::client::{ClientError, Enrollment};
use super::state::{self, Credential};

/// An access token is renewed this long before it expires, ms.
const RENEW_BEFORE_MS: i64 = 60_000;

impl Daemon<'_> {
    /// The credential to send: the current access token (renewed with
    /// the key when it is about to expire), after registering a key when
    /// the device still holds a bearer credential, or after enrolling.
    pub(super) fn ensure_enrolled(&mut self) -> Result<String> {
        if let Some(c) = self.credential.clone() {
            if !c.keyed {
                return self.migrate(c);
            }
            if c.expires_at
                .is_some_and(|at| super::now_ms().saturating_add(RENEW_BEFORE_MS) < at)
            {
                return Ok(c.credential);
            }
            match self.authenticate(&c) {
                Ok(token) => return Ok(token),
                Err(ClientError::Unauthorized { status, body }) => {
                    // The server no longer takes this key for this device
                    // (revoked, or an operator gave the id another key):
                    // enrolling tells which.
                    tracing::warn!(status, %body, "the server refused the device key; enrolling again");
                    self.forget_credential();
                }
                Err(e) => return Err(anyhow::Error::new(e).context("unable to authenticate")),
            }
        }
        self.enroll()
    }

    /// A fresh access token for `c`'s device: a server nonce signed with
    /// the device key.
    fn authenticate(&mut self, c: &Credential) -> Result<String, ClientError> {
        let key = self
            .tpm
            .device_key(&self.data)
            .map_err(|e| ClientError::BadAnswer(format!("device key: {e:#}")))?;
        let nonce = self.client.challenge()?.nonce;
        let auth = key
            .auth(&c.id, &nonce)
            .map_err(|e| ClientError::BadAnswer(format!("signing the nonce: {e}")))?;
        let token = self.client.auth(&auth)?;
        self.keep_token(&token.id, token.token, token.expires_in_secs)
            .map_err(|e| ClientError::BadAnswer(format!("{e:#}")))
    }

    /// Stores access token `token` of device `id` (valid `secs`).
    fn keep_token(&mut self, id: &str, token: String, secs: u64) -> Result<String> {
        let credential = Credential {
            server: self.server.url.clone(),
            device_id: self.server.device_id(),
            id: id.to_owned(),
            credential: token,
            keyed: true,
            expires_at: Some(
                super::now_ms()
                    .saturating_add(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
            ),
        };
        state::store_credential(&self.data, &credential)?;
        let token = credential.credential.clone();
        self.credential = Some(credential);
        Ok(token)
    }

    /// A device enrolled before device keys: registers its key with the
    /// bearer credential (once; the server retires that credential). A
    /// server that does not know device keys yet keeps taking the
    /// credential.
    fn migrate(&mut self, c: Credential) -> Result<String> {
        let key = self.tpm.device_key(&self.data)?;
        let registered = self.client.challenge().and_then(|challenge| {
            let proof = key
                .proof(&c.device_id, &challenge.nonce)
                .map_err(|e| ClientError::BadAnswer(format!("signing the nonce: {e:#}")))?;
            self.client.register_key(&c.credential, &proof)
        });
        match registered {
            Ok(token) => {
                tracing::info!(id = %c.id, "device key registered: the bearer credential is retired");
                self.keep_token(&c.id, token.token, token.expires_in_secs)
            }
            Err(ClientError::Rejected { status, body }) if status == 404 || status == 405 => {
                tracing::debug!(status, %body, "the server has no device keys yet: keeping the bearer credential");
                Ok(c.credential)
            }
            Err(e @ ClientError::Unauthorized { .. }) => Err(self
                .on_client_error(e)
                .context("unable to register the device key")),
            Err(e) => Err(anyhow::Error::new(e).context("unable to register the device key")),
        }
    }

    /// Forgets the stored credential (not the key).
    pub(super) fn forget_credential(&mut self) {
        self.credential = None;
        if let Err(err) = state::forget_credential(&self.data) {
            tracing::warn!(error = %err, "unable to remove the credential");
        }
    }

    /// Enrolls with the factory token and the device key.
    fn enroll(&mut self) -> Result<String> {
        let token = self.server.token()?.ok_or_else(|| {
            anyhow!("not enrolled and no enrollment token configured ([server] enrollment-token or enrollment-token-file)")
        })?;
        let device_id = self.server.device_id();
        // A TPM fault must not keep the device off the fleet: it enrolls
        // without a TPM identity (the server refuses it if its token needs
        // one, and the log says why).
        let tpm = self.tpm.identity().unwrap_or_else(|e| {
            tracing::warn!(error = %format!("{e:#}"), "unable to read the TPM identity: enrolling without it");
            None
        });
        let key = self.tpm.device_key(&self.data)?;
        let proof = match self.client.challenge() {
            Ok(challenge) => Some(
                key.proof(&device_id, &challenge.nonce)
                    .context("unable to sign the enrollment nonce")?,
            ),
            // A server older than device keys.
            Err(ClientError::Rejected {
                status: 404 | 405, ..
            }) => None,
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context("enrollment failed: unable to get a nonce to sign"));
            }
        };
        let answer = self
            .client
            .enroll(&api::EnrollRequest {
                enrollment_token: token,
                device_id: device_id.clone(),
                hardware_class: self.ctx.config.compatible.clone(),
                hardware_metadata: hardware_metadata(),
                tags: self.server.tags.clone(),
                link_class: self.server.link_class.clone(),
                site: self.server.site.clone(),
                time_zone: self.server.time_zone.clone(),
                tpm_slot_pcr: tpm.as_ref().and(self.tpm.slot_pcr()),
                tpm,
                key: proof,
            })
            // A 403 to an enrollment is a policy refusal (the detail says
            // which), not a refused credential: there is none yet.
            .map_err(ClientError::as_policy_refusal)
            .context("enrollment failed")?;
        let enrolled = match answer {
            Enrollment::Enrolled(enrolled) => enrolled,
            Enrollment::Pending(waiting) => {
                return Err(anyhow!(
                    "enrollment pending an operator's approval (request {}): {}",
                    waiting.request_id,
                    waiting.detail
                ));
            }
        };
        if let Some(challenge) = &enrolled.activation {
            // Not stored before the TPM proved itself: the next cycle
            // enrolls again (a new challenge).
            self.tpm
                .activate(&self.client, &enrolled.credential, challenge)
                .context("TPM credential activation failed")?;
            self.tpm.record_binding(&enrolled.id);
        }
        tracing::info!(device_id = %device_id, id = %enrolled.id, key_in_tpm = key.in_tpm(), "enrolled");
        match enrolled.expires_in_secs {
            Some(secs) => self.keep_token(&enrolled.id, enrolled.credential, secs),
            // A server without device keys: a bearer credential, traded
            // for a key registration once the server knows them.
            None => {
                let credential = Credential {
                    server: self.server.url.clone(),
                    device_id,
                    id: enrolled.id,
                    credential: enrolled.credential,
                    keyed: false,
                    expires_at: None,
                };
                state::store_credential(&self.data, &credential)?;
                let c = credential.credential.clone();
                self.credential = Some(credential);
                Ok(c)
            }
        }
    }

    /// Binds a TPM configured after enrollment ([`super::tpm::TpmSession::ensure_bound`]);
    /// a credential the server refuses meanwhile is forgotten.
    pub(super) fn ensure_tpm_bound(&mut self) {
        let Some(c) = self.credential.clone() else {
            return;
        };
        if let Err(refused) = self.tpm.ensure_bound(&self.client, &c) {
            let _ = self.on_client_error(refused);
        }
    }
}

/// Facts about the hardware sent at enrollment.
fn hardware_metadata() -> serde_json::Map<String, serde_json::Value> {
    let mut metadata = serde_json::Map::new();
    metadata.insert("updater".into(), env!("CARGO_PKG_VERSION").into());
    if let Some(os) = sysinfo::System::long_os_version() {
        metadata.insert("os".into(), os.into());
    }
    metadata.insert("arch".into(), std::env::consts::ARCH.into());
    metadata.insert(
        "memory_bytes".into(),
        sysinfo::System::new_with_specifics(
            sysinfo::RefreshKind::nothing().with_memory(sysinfo::MemoryRefreshKind::everything()),
        )
        .total_memory()
        .into(),
    );
    metadata
}
