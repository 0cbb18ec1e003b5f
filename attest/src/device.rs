//! The device side: talks to the TPM through tpm2-tss (`tss-esapi`).
//!
//! The EK is recreated from the TCG default template (RSA-2048) whenever
//! needed: a primary key is a deterministic function of the endorsement
//! seed and the template, so it is the same key every time and nothing needs
//! to be persisted in the TPM. The AK is created once under it; its public
//! and (TPM-wrapped) private parts are kept in a file ([`AkBlob`]) and
//! loaded under the EK again for each use.
//!
//! Also the device's identity key ([`signing`]) and the anti-rollback
//! floor counter ([`counter`]).

pub mod counter;
pub mod signing;

use std::collections::BTreeMap;
use std::str::FromStr;

use kernex_protocol::Sha256Digest;
use serde::{Deserialize, Serialize};
use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey, ak, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestValues, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot,
    Private, Public, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::measure::{MAX_SLOT_PCR, extend};
use crate::quote::{MAX_NONCE_SIZE, Quote};
use kernex_protocol::api::hex::{bytes as hex_bytes, opt_bytes as opt_hex};

/// A TPM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The TCTI string did not parse or the TPM could not be reached.
    #[error("unable to open the TPM through TCTI {tcti:?}")]
    Open {
        /// The TCTI string.
        tcti: String,
        /// What tpm2-tss said.
        #[source]
        source: tss_esapi::Error,
    },
    /// A TPM command failed.
    #[error("TPM {operation} failed")]
    Tpm {
        /// What was being done.
        operation: &'static str,
        /// What the TPM (or tpm2-tss) said.
        #[source]
        source: tss_esapi::Error,
    },
    /// Not a PCR this code extends or quotes.
    #[error("PCR {pcr} is out of range (0..={max})")]
    PcrIndex {
        /// The index given.
        pcr: u8,
        /// The highest allowed.
        max: u8,
    },
    /// The slot PCR already holds a measurement in this boot: extending it
    /// again would make it match no release.
    #[error("PCR {pcr} was already extended in this boot (holds {value}); not extending again")]
    AlreadyMeasured {
        /// The PCR.
        pcr: u8,
        /// Its value.
        value: Sha256Digest,
    },
    /// The PCR holds another value than expected after the extend.
    #[error("PCR {pcr} reads {found} after extending, expected {expected}")]
    ExtendMismatch {
        /// The PCR.
        pcr: u8,
        /// What it should hold.
        expected: Sha256Digest,
        /// What it holds.
        found: Sha256Digest,
    },
    /// A nonce longer than a TPM accepts.
    #[error("nonce is {found} bytes, more than the limit of {limit}")]
    NonceTooLong {
        /// The limit.
        limit: usize,
        /// Its length.
        found: usize,
    },
    /// The TPM answered with something unexpected.
    #[error("unexpected TPM answer: {0}")]
    Unexpected(String),
}

fn tpm(operation: &'static str) -> impl FnOnce(tss_esapi::Error) -> DeviceError {
    move |source| DeviceError::Tpm { operation, source }
}

/// The endorsement identity of a TPM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Endorsement {
    /// The EK's marshalled `TPMT_PUBLIC` (RSA-2048, TCG default template).
    #[serde(with = "hex_bytes")]
    pub public: Vec<u8>,
    /// The manufacturer's EK certificate (DER) from NV index 0x01c00002,
    /// when the TPM has one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_hex")]
    pub certificate: Option<Vec<u8>>,
}

/// An attestation key as stored on the device: its public part and its
/// private part wrapped by the TPM (useless outside that TPM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AkBlob {
    /// The AK's marshalled `TPMT_PUBLIC`.
    #[serde(with = "hex_bytes")]
    pub public: Vec<u8>,
    /// The `TPM2B_PRIVATE` buffer TPM2_Create returned.
    #[serde(with = "hex_bytes")]
    pub private: Vec<u8>,
}

/// An open TPM.
#[allow(missing_debug_implementations)]
pub struct Tpm {
    ctx: Context,
    /// The EK, created on first use and flushed on drop: recreating it is
    /// an RSA key generation inside the TPM (the bulk of a quote's time).
    ek: Option<KeyHandle>,
    /// The SRK (owner hierarchy), likewise.
    srk: Option<KeyHandle>,
}

impl Drop for Tpm {
    fn drop(&mut self) {
        if let Some(ek) = self.ek.take() {
            self.flush(ek);
        }
        if let Some(srk) = self.srk.take() {
            self.flush(srk);
        }
    }
}

impl Tpm {
    /// Opens the TPM named by a TCTI string: `device:/dev/tpmrm0` on
    /// hardware, `swtpm:host=127.0.0.1,port=2321` for swtpm,
    /// `mssim:...` for the reference simulator.
    pub fn open(tcti: &str) -> Result<Self, DeviceError> {
        let open_err = |source| DeviceError::Open {
            tcti: tcti.to_owned(),
            source,
        };
        let conf = TctiNameConf::from_str(tcti).map_err(open_err)?;
        let ctx = Context::new(conf).map_err(open_err)?;
        Ok(Self {
            ctx,
            ek: None,
            srk: None,
        })
    }

    fn create_ek(&mut self) -> Result<KeyHandle, DeviceError> {
        if let Some(ek) = self.ek {
            return Ok(ek);
        }
        let ek = ek::create_ek_object_2(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            DefaultKey,
        )
        .map_err(tpm("CreatePrimary (endorsement key)"))?;
        self.ek = Some(ek);
        Ok(ek)
    }

    fn flush(&mut self, handle: impl Into<ObjectHandle>) {
        if let Err(e) = self.ctx.flush_context(handle.into()) {
            tracing::warn!(error = %e, "unable to flush a TPM object");
        }
    }

    /// The EK public key and, when present, its certificate.
    pub fn endorsement(&mut self) -> Result<Endorsement, DeviceError> {
        let ek = self.create_ek()?;
        let read = self.ctx.read_public(ek);
        let (public, _, _) = read.map_err(tpm("ReadPublic (endorsement key)"))?;
        let public = public.marshall().map_err(tpm("marshal EK public"))?;
        let certificate = match ek::retrieve_ek_pubcert(
            &mut self.ctx,
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        ) {
            Ok(der) => Some(der),
            Err(e) => {
                tracing::info!(error = %e, "no RSA EK certificate in NV 0x01c00002");
                None
            }
        };
        Ok(Endorsement {
            public,
            certificate,
        })
    }

    /// Creates a new AK under the EK: RSA-2048, restricted signing,
    /// RSASSA-SHA256, fixedTPM and fixedParent.
    pub fn create_ak(&mut self) -> Result<AkBlob, DeviceError> {
        let ek = self.create_ek()?;
        let created = ak::create_ak(
            &mut self.ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::RsaSsa,
            None,
            DefaultKey,
        );
        let created = created.map_err(tpm("Create (attestation key)"))?;
        Ok(AkBlob {
            public: created
                .out_public
                .marshall()
                .map_err(tpm("marshal AK public"))?,
            private: created.out_private.value().to_vec(),
        })
    }

    /// Loads `blob` under a freshly created EK; returns (EK, AK) handles.
    fn load_ak(&mut self, blob: &AkBlob) -> Result<(KeyHandle, KeyHandle), DeviceError> {
        let public = Public::unmarshall(&blob.public).map_err(tpm("unmarshal AK public"))?;
        let private = Private::try_from(blob.private.clone()).map_err(tpm("AK private blob"))?;
        let ek = self.create_ek()?;
        match ak::load_ak(&mut self.ctx, ek, None, private, public) {
            Ok(handle) => Ok((ek, handle)),
            Err(e) => Err(DeviceError::Tpm {
                operation: "Load (attestation key)",
                source: e,
            }),
        }
    }

    /// TPM2_ActivateCredential: recovers the credential the verifier
    /// encrypted to this TPM's EK for `ak` (see
    /// [`crate::CredentialChallenge`]). Fails inside the TPM when the
    /// challenge was made for another EK or another AK.
    pub fn activate_credential(
        &mut self,
        ak: &AkBlob,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, DeviceError> {
        let blob = IdObject::try_from(id_object.to_vec()).map_err(tpm("credential blob"))?;
        let secret = EncryptedSecret::try_from(encrypted_secret.to_vec())
            .map_err(tpm("encrypted secret"))?;
        let (ek, ak_handle) = self.load_ak(ak)?;
        let result = self.activate_with_sessions(ak_handle, ek, blob, secret);
        self.ctx.clear_sessions();
        self.flush(ak_handle);
        result.map(|d| d.value().to_vec())
    }

    fn activate_with_sessions(
        &mut self,
        ak: KeyHandle,
        ek: KeyHandle,
        blob: IdObject,
        secret: EncryptedSecret,
    ) -> Result<Digest, DeviceError> {
        // Session 1 authorises the AK (empty auth, HMAC session); session 2
        // satisfies the EK's policy: PolicySecret(endorsement hierarchy).
        let hmac = self.start_session(SessionType::Hmac)?;
        let policy = match self.start_session(SessionType::Policy) {
            Ok(p) => p,
            Err(e) => {
                self.flush(SessionHandle::from(hmac));
                return Err(e);
            }
        };
        let result = (|| {
            let policy_session = PolicySession::try_from(policy).map_err(tpm("policy session"))?;
            self.ctx
                .execute_with_session(Some(hmac), |ctx| {
                    ctx.policy_secret(
                        policy_session,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
                .map_err(tpm("PolicySecret (endorsement)"))?;
            self.ctx.set_sessions((Some(hmac), Some(policy), None));
            self.ctx
                .activate_credential(ak, ek, blob, secret)
                .map_err(tpm("ActivateCredential"))
        })();
        self.ctx.clear_sessions();
        self.flush(SessionHandle::from(hmac));
        self.flush(SessionHandle::from(policy));
        result
    }

    fn start_session(&mut self, kind: SessionType) -> Result<AuthSession, DeviceError> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(tpm("StartAuthSession"))?
            .ok_or_else(|| {
                DeviceError::Unexpected("StartAuthSession returned no session".into())
            })?;
        let (attributes, mask) = SessionAttributesBuilder::new().build();
        self.ctx
            .tr_sess_set_attributes(session, attributes, mask)
            .map_err(tpm("TRSess_SetAttributes"))?;
        Ok(session)
    }

    /// Reads SHA-256 bank PCRs.
    pub fn read_pcrs(&mut self, pcrs: &[u8]) -> Result<BTreeMap<u8, Sha256Digest>, DeviceError> {
        let mut out = BTreeMap::new();
        // PCR_Read returns at most 8 digests per call: read one at a time.
        for &pcr in pcrs {
            let selection = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &[pcr_slot(pcr)?])
                .build()
                .map_err(tpm("PCR selection"))?;
            let (_, _, digests) = self
                .ctx
                .execute_without_session(|ctx| ctx.pcr_read(selection))
                .map_err(tpm("PCR_Read"))?;
            let value = digests.value().first().ok_or_else(|| {
                DeviceError::Unexpected(format!("PCR_Read returned no value for PCR {pcr}"))
            })?;
            let bytes: [u8; 32] = value.value().try_into().map_err(|_| {
                DeviceError::Unexpected(format!(
                    "PCR {pcr} SHA-256 value is {} bytes",
                    value.value().len()
                ))
            })?;
            out.insert(pcr, Sha256Digest(bytes));
        }
        Ok(out)
    }

    /// Extends `measurement` into `pcr` (SHA-256 bank), refusing when the PCR
    /// is not at its reset value (a second measurement in the same boot would
    /// make the PCR match no release). Returns the new value, checked against
    /// [`crate::expected_slot_pcr`].
    pub fn extend_slot_measurement(
        &mut self,
        pcr: u8,
        measurement: &Sha256Digest,
    ) -> Result<Sha256Digest, DeviceError> {
        if pcr > MAX_SLOT_PCR {
            return Err(DeviceError::PcrIndex {
                pcr,
                max: MAX_SLOT_PCR,
            });
        }
        let before = self.read_pcrs(&[pcr])?;
        let zero = Sha256Digest([0; 32]);
        let before = before.get(&pcr).copied().unwrap_or(zero);
        if before != zero {
            return Err(DeviceError::AlreadyMeasured { pcr, value: before });
        }
        self.extend_pcr(pcr, measurement)?;
        let expected = extend(&zero, measurement);
        let found = self.read_pcrs(&[pcr])?.get(&pcr).copied().unwrap_or(zero);
        if found != expected {
            return Err(DeviceError::ExtendMismatch {
                pcr,
                expected,
                found,
            });
        }
        Ok(found)
    }

    /// One raw TPM2_PCR_Extend of `digest` into `pcr`'s SHA-256 bank.
    pub fn extend_pcr(&mut self, pcr: u8, digest: &Sha256Digest) -> Result<(), DeviceError> {
        let handle = PcrHandle::try_from(u32::from(pcr)).map_err(tpm("PCR handle"))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.0.to_vec()).map_err(tpm("digest"))?,
        );
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .map_err(tpm("PCR_Extend"))
    }

    /// Quotes `pcrs` (SHA-256 bank) over `nonce` with the AK, and reads the
    /// quoted PCR values for the verifier.
    pub fn quote(&mut self, ak: &AkBlob, nonce: &[u8], pcrs: &[u8]) -> Result<Quote, DeviceError> {
        if nonce.len() > MAX_NONCE_SIZE {
            return Err(DeviceError::NonceTooLong {
                limit: MAX_NONCE_SIZE,
                found: nonce.len(),
            });
        }
        let slots = pcrs
            .iter()
            .map(|&p| pcr_slot(p))
            .collect::<Result<Vec<_>, _>>()?;
        let selection = PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(tpm("PCR selection"))?;
        let data = Data::try_from(nonce.to_vec()).map_err(tpm("nonce"))?;
        let (_, ak_handle) = self.load_ak(ak)?;
        let quoted = self.ctx.execute_with_nullauth_session(|ctx| {
            ctx.quote(ak_handle, data, SignatureScheme::Null, selection)
        });
        self.flush(ak_handle);
        let (attest, signature) = quoted.map_err(tpm("Quote"))?;
        let pcr_values = self.read_pcrs(pcrs)?;
        Ok(Quote {
            attest: attest.marshall().map_err(tpm("marshal TPMS_ATTEST"))?,
            signature: signature
                .marshall()
                .map_err(tpm("marshal TPMT_SIGNATURE"))?,
            pcrs: pcr_values,
        })
    }
}

fn pcr_slot(pcr: u8) -> Result<PcrSlot, DeviceError> {
    if pcr > 23 {
        return Err(DeviceError::PcrIndex { pcr, max: 23 });
    }
    PcrSlot::try_from(1u32 << pcr).map_err(tpm("PCR slot"))
}
