//! The device's credential: enrollment with the factory token (with the
//! TPM's identity and credential activation when a TPM is configured), and
//! the binding of a TPM configured after enrollment.

use anyhow::{Context as _, Result, anyhow};
use kernex_protocol::api;

use super::Daemon;
use super::ServerConfigExt as _;
use super::client::ClientError;
use super::state::{self, Credential};

impl Daemon<'_> {
    /// Enrolls if there is no credential yet; the credential.
    pub(super) fn ensure_enrolled(&mut self) -> Result<String> {
        if let Some(c) = &self.credential {
            return Ok(c.credential.clone());
        }
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
        let enrolled = self
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
            })
            // A 403 to an enrollment is a policy refusal (the detail says
            // which), not a refused credential: there is none yet.
            .map_err(ClientError::as_policy_refusal)
            .context("enrollment failed")?;
        if let Some(challenge) = &enrolled.activation {
            // Not stored before the TPM proved itself: the next cycle
            // enrolls again (a new challenge).
            self.tpm
                .activate(&self.client, &enrolled.credential, challenge)
                .context("TPM credential activation failed")?;
            self.tpm.record_binding(&enrolled.id);
        }
        let credential = Credential {
            server: self.server.url.clone(),
            device_id: device_id.clone(),
            id: enrolled.id,
            credential: enrolled.credential,
        };
        state::store_credential(&self.data, &credential)?;
        tracing::info!(device_id = %device_id, id = %credential.id, "enrolled");
        let c = credential.credential.clone();
        self.credential = Some(credential);
        Ok(c)
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
