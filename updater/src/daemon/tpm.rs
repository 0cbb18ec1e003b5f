//! The daemon's TPM session (`[tpm]`, compiled in with the cargo feature
//! `tpm`): the identity sent at enrollment, credential activation, the
//! binding of a TPM configured after enrollment, the boot-time measurement
//! of the booted slot, quotes over the server's nonces, and the device
//! key kept in the TPM. Without the
//! feature, or without `[tpm]`, the session has nothing to do and the
//! device is shown unattested. The protocol is in attest/README.md.

use std::path::{Path, PathBuf};

use anyhow::Result;
use kernex_bootloader::BootFlow;
use kernex_protocol::api;

use super::client::{Client, ClientError};
use super::identity::DeviceIdentity;
use super::state::Credential;
use crate::cli::attest::TpmConfig;
use crate::status::Status;
use crate::store::DataDir;

/// How a TPM step that talks to the server failed.
#[derive(Debug)]
#[cfg_attr(not(feature = "tpm"), allow(dead_code))]
pub(super) enum TpmError {
    /// The server's answer to the request: the daemon decides what it
    /// means for its credential.
    Server(ClientError),
    /// Anything else (the TPM, its answer, the server's verdict).
    Other(anyhow::Error),
}

impl From<anyhow::Error> for TpmError {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// The TPM of one boot of the daemon.
#[derive(Debug)]
#[cfg_attr(not(feature = "tpm"), allow(dead_code))]
pub(super) struct TpmSession {
    /// `[tpm]`, when configured.
    config: Option<TpmConfig>,
    /// The data dir (the AK and the binding record live under it).
    data_dir: PathBuf,
    /// The server the binding record is for.
    server: String,
    /// This boot has checked that a configured TPM is bound to the
    /// credential (bound it, or was refused).
    bind_done: bool,
}

impl TpmSession {
    /// The session for `config` (`None`: no TPM), keeping its AK under
    /// `data_dir`, with `server`.
    pub fn new(config: Option<TpmConfig>, data_dir: &Path, server: &str) -> Self {
        Self {
            config,
            data_dir: data_dir.to_owned(),
            server: server.to_owned(),
            bind_done: false,
        }
    }

    /// The PCR the booted slot is measured into, with a TPM.
    pub fn slot_pcr(&self) -> Option<u8> {
        self.config.as_ref().map(|t| t.pcr)
    }
}

#[cfg(feature = "tpm")]
impl TpmSession {
    /// Extends the booted slot's measurement into the slot PCR, early in
    /// each boot. Failures are logged: the device keeps updating, and the
    /// server shows it unattested or mismatched.
    pub fn measure_boot(&self, data: &DataDir, flow: &dyn BootFlow) {
        let Some(tpm) = &self.config else {
            return;
        };
        let measured = flow
            .booted_slot()
            .map_err(anyhow::Error::from)
            .and_then(|slot| crate::attest::measure(tpm, data, slot, None));
        match measured {
            Ok(Some(m)) => {
                tracing::info!(slot = %m.slot, version = %m.version, pcr = m.pcr, value = %m.value, already = m.already, "booted slot measured")
            }
            Ok(None) => {
                tracing::info!("the booted slot has no recorded release: nothing to measure")
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "unable to measure the booted slot")
            }
        }
    }

    /// The device key: the one in the TPM when its blob exists, else an
    /// existing key file (a device enrolled before its `[tpm]` keeps its
    /// identity), else a new key in the configured TPM; without `[tpm]`
    /// the key file ([`super::state::device_key`]).
    pub fn device_key(&self, data: &DataDir) -> Result<DeviceIdentity> {
        let Some(tpm) = &self.config else {
            return Ok(DeviceIdentity::File(super::state::device_key(data)?));
        };
        let path = crate::attest::device_key_path(&self.data_dir);
        if !path.exists() && data.root().join(kernex_device::layout::DEVICE_KEY).exists() {
            return Ok(DeviceIdentity::File(super::state::device_key(data)?));
        }
        Ok(DeviceIdentity::Tpm {
            config: tpm.clone(),
            blob: crate::attest::device_key(tpm, &path)?,
        })
    }

    /// The TPM identity for enrollment, when a TPM is configured.
    pub fn identity(&self) -> Result<Option<api::TpmIdentity>> {
        let Some(tpm) = &self.config else {
            return Ok(None);
        };
        let ak = crate::attest::ak_path(&self.data_dir);
        Ok(Some(crate::attest::identity(tpm, &ak, false)?))
    }

    /// Opens a credential-activation challenge with the TPM and gives the
    /// server the credential.
    pub fn activate(
        &self,
        client: &Client,
        credential: &str,
        challenge: &api::Activation,
    ) -> Result<()> {
        use anyhow::Context as _;
        let Some(tpm) = &self.config else {
            anyhow::bail!("the server sent a TPM challenge, but no [tpm] is configured");
        };
        let ak = crate::attest::ak_path(&self.data_dir);
        let secret = crate::attest::activate(tpm, &ak, challenge)?;
        client
            .activate(
                credential,
                &api::ActivationAnswer {
                    credential: hex::encode(secret),
                },
            )
            .context("the server refused the activation")?;
        tracing::info!("TPM bound: credential activation succeeded");
        Ok(())
    }

    /// Remembers that the server bound credential `id` to the stored AK, so
    /// later starts need not ask (best effort: without the record the next
    /// start asks the server, which answers "bound").
    pub fn record_binding(&self, id: &str) {
        if let Err(e) = crate::attest::record_binding(&self.data_dir, &self.server, id) {
            tracing::warn!(error = %format!("{e:#}"), "unable to record the TPM binding");
        }
    }

    /// A device enrolled without a TPM identity that has a `[tpm]` now (its
    /// config gained one, or reading the TPM failed at enrollment) binds
    /// it: `POST /device/tpm` with its identity, then the credential
    /// activation. Once per boot; a network failure retries next cycle, a
    /// refusal (the reason is logged) waits for the next start. The device
    /// keeps being served meanwhile. `Err`: the server refused the
    /// credential itself.
    pub fn ensure_bound(&mut self, client: &Client, c: &Credential) -> Result<(), ClientError> {
        if self.bind_done {
            return Ok(());
        }
        let Some(tpm) = self.config.clone() else {
            self.bind_done = true;
            return Ok(());
        };
        if crate::attest::is_bound(&self.data_dir, &c.server, &c.id) {
            self.bind_done = true;
            return Ok(());
        }
        tracing::info!(
            "a TPM is configured but this device's enrollment is not bound to it: binding"
        );
        match self.bind(client, &tpm, c) {
            Ok(()) => {
                self.bind_done = true;
                Ok(())
            }
            Err(TpmError::Server(refused)) => {
                tracing::warn!(error = %refused, "unable to bind the TPM: the device stays unattested until the next start");
                self.bind_done = true;
                Err(refused)
            }
            Err(TpmError::Other(e)) => {
                let offline = e
                    .downcast_ref::<ClientError>()
                    .is_some_and(|c| matches!(c, ClientError::Offline(_)));
                if offline {
                    tracing::warn!(error = %format!("{e:#}"), "unable to bind the TPM: retrying next cycle");
                } else {
                    tracing::warn!(error = %format!("{e:#}"), "unable to bind the TPM: the device stays unattested until the next start");
                    self.bind_done = true;
                }
                Ok(())
            }
        }
    }

    /// `POST /device/tpm`, then the activation it asks for. A refused
    /// credential (401) is [`TpmError::Server`]; a 403 here is the binding
    /// refused by policy.
    fn bind(&self, client: &Client, tpm: &TpmConfig, c: &Credential) -> Result<(), TpmError> {
        use anyhow::Context as _;
        let ak = crate::attest::ak_path(&self.data_dir);
        let identity =
            crate::attest::identity(tpm, &ak, false).context("unable to read the TPM identity")?;
        let binding = api::TpmBinding {
            tpm: identity,
            tpm_slot_pcr: Some(tpm.pcr),
        };
        let answer = match client.bind_tpm(&c.credential, &binding) {
            Ok(a) => a,
            Err(e @ ClientError::Unauthorized { status: 401, .. }) => {
                return Err(TpmError::Server(e));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e.as_policy_refusal())
                    .context(format!("POST {} failed", api::paths::TPM_BIND))
                    .into());
            }
        };
        match answer.state {
            api::BindingState::Bound => {}
            api::BindingState::Challenge => {
                let challenge = answer.activation.as_ref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "the server asked for credential activation without a challenge"
                    )
                })?;
                self.activate(client, &c.credential, challenge)
                    .context("TPM credential activation failed")?;
            }
        }
        self.record_binding(&c.id);
        tracing::info!(ek = %answer.ek_fingerprint, "TPM bound to this device's enrollment");
        Ok(())
    }

    /// Answers the server's nonce with a quote of the slot PCR, naming the
    /// release the booted slot holds.
    pub fn answer_quote(
        &self,
        client: &Client,
        credential: &str,
        nonce: &str,
        status: &Status,
    ) -> Result<(), TpmError> {
        use anyhow::Context as _;
        let Some(tpm) = &self.config else {
            return Ok(());
        };
        let version = status
            .slots
            .iter()
            .find(|s| s.slot == status.booted_slot)
            .and_then(|s| s.version.clone())
            .ok_or_else(|| anyhow::anyhow!("the booted slot has no recorded release to attest"))?;
        let nonce = hex::decode(nonce).context("the nonce is not hex")?;
        let ak = crate::attest::ak_path(&self.data_dir);
        let quote = crate::attest::quote(tpm, &ak, &nonce)?;
        let verdict = client
            .attest_quote(
                credential,
                &api::QuoteReport {
                    version: version.clone(),
                    quote,
                },
            )
            .map_err(TpmError::Server)?;
        tracing::info!(%version, attestation = %verdict.attestation, reason = ?verdict.reason, "quote verified by the server");
        Ok(())
    }
}

/// Without TPM support: nothing to measure, bind or quote; a `[tpm]` in
/// the config is reported once, at enrollment.
#[cfg(not(feature = "tpm"))]
impl TpmSession {
    /// Nothing to measure.
    pub fn measure_boot(&self, _data: &DataDir, _flow: &dyn BootFlow) {}

    /// The key file: no TPM to keep a key in.
    pub fn device_key(&self, data: &DataDir) -> Result<DeviceIdentity> {
        Ok(DeviceIdentity::File(super::state::device_key(data)?))
    }

    /// No identity: the device enrolls without one.
    pub fn identity(&self) -> Result<Option<api::TpmIdentity>> {
        if self.config.is_some() {
            tracing::warn!(
                "[tpm] is configured but this kernex-updater was built without TPM support (cargo feature `tpm`): enrolling without a TPM identity"
            );
        }
        Ok(None)
    }

    /// A challenge cannot be answered.
    pub fn activate(
        &self,
        _client: &Client,
        _credential: &str,
        _challenge: &api::Activation,
    ) -> Result<()> {
        anyhow::bail!("the server sent a TPM challenge, but this kernex-updater has no TPM support")
    }

    /// Nothing to record.
    pub fn record_binding(&self, _id: &str) {}

    /// Nothing to bind.
    pub fn ensure_bound(&mut self, _client: &Client, _c: &Credential) -> Result<(), ClientError> {
        self.bind_done = true;
        Ok(())
    }

    /// No quote.
    pub fn answer_quote(
        &self,
        _client: &Client,
        _credential: &str,
        _nonce: &str,
        _status: &Status,
    ) -> Result<(), TpmError> {
        Ok(())
    }
}
