//! The device identity key in the TPM: an ECDSA P-256 signing key
//! (unrestricted, sign-only, fixedTPM and fixedParent) created under the
//! SRK, which is recreated from the owner hierarchy's seed and the TCG
//! ECC storage template whenever needed (a primary key is deterministic,
//! so nothing is persisted in the TPM). The key's public and TPM-wrapped
//! private parts are kept in a file ([`SigningKeyBlob`]), useless outside
//! this TPM; each signature loads it under the SRK again.
//!
//! Signatures are over SHA-256 of the message (hashed outside the TPM,
//! signed with TPM2_Sign and a null hash-check ticket, which an
//! unrestricted key accepts) and returned in DER, as the server verifies
//! P-256 signatures (`kernex_protocol::device_key::verify`).

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use super::{DeviceError, Tpm, tpm};
use kernex_protocol::api::hex::bytes as hex_bytes;

/// The device key as stored on the device: its public part and its
/// private part wrapped by the TPM's SRK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SigningKeyBlob {
    /// The key's marshalled `TPMT_PUBLIC`.
    #[serde(with = "hex_bytes")]
    pub public: Vec<u8>,
    /// The `TPM2B_PRIVATE` buffer TPM2_Create returned.
    #[serde(with = "hex_bytes")]
    pub private: Vec<u8>,
}

impl SigningKeyBlob {
    /// The public key as DER `SubjectPublicKeyInfo` (what the server
    /// keeps), from the public area's ECC point.
    pub fn spki_der(&self) -> Result<Vec<u8>, DeviceError> {
        let public = Public::unmarshall(&self.public).map_err(tpm("unmarshal key public"))?;
        let Public::Ecc { unique, .. } = public else {
            return Err(DeviceError::Unexpected(
                "the device key's public area is not ECC".into(),
            ));
        };
        let bad = |e: openssl::error::ErrorStack| DeviceError::Unexpected(e.to_string());
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(bad)?;
        let x = BigNum::from_slice(unique.x().value()).map_err(bad)?;
        let y = BigNum::from_slice(unique.y().value()).map_err(bad)?;
        let key = EcKey::from_public_key_affine_coordinates(&group, &x, &y).map_err(bad)?;
        key.check_key().map_err(bad)?;
        PKey::from_ec_key(key)
            .and_then(|k| k.public_key_to_der())
            .map_err(bad)
    }
}

/// The SRK template (TCG "EK Credential Profile"-style ECC P-256 storage
/// key): restricted decryption, AES-128-CFB, fixedTPM and fixedParent.
fn srk_template() -> Result<Public, DeviceError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(tpm("SRK attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(tpm("SRK parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tpm("SRK template"))
}

/// The device key template: ECDSA-SHA256 on P-256, sign only, not
/// exportable (fixedTPM, fixedParent, made inside the TPM).
fn key_template() -> Result<Public, DeviceError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(tpm("device key attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_unrestricted_signing_key(
                EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)),
                EccCurve::NistP256,
            )
            .build()
            .map_err(tpm("device key parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(tpm("device key template"))
}

impl Tpm {
    fn create_srk(&mut self) -> Result<KeyHandle, DeviceError> {
        if let Some(srk) = self.srk {
            return Ok(srk);
        }
        let template = srk_template()?;
        let created = self
            .ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(tpm("CreatePrimary (storage root key)"))?;
        self.srk = Some(created.key_handle);
        Ok(created.key_handle)
    }

    /// Creates a new device key under the SRK.
    pub fn create_signing_key(&mut self) -> Result<SigningKeyBlob, DeviceError> {
        let srk = self.create_srk()?;
        let template = key_template()?;
        let created = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.create(srk, template, None, None, None, None))
            .map_err(tpm("Create (device key)"))?;
        Ok(SigningKeyBlob {
            public: created
                .out_public
                .marshall()
                .map_err(tpm("marshal device key public"))?,
            private: created.out_private.value().to_vec(),
        })
    }

    /// Signs SHA-256 of `message` with the device key `blob`: a DER ECDSA
    /// signature.
    pub fn sign_with_key(
        &mut self,
        blob: &SigningKeyBlob,
        message: &[u8],
    ) -> Result<Vec<u8>, DeviceError> {
        let public = Public::unmarshall(&blob.public).map_err(tpm("unmarshal key public"))?;
        let private =
            Private::try_from(blob.private.clone()).map_err(tpm("device key private blob"))?;
        let srk = self.create_srk()?;
        let key = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.load(srk, private, public))
            .map_err(tpm("Load (device key)"))?;
        let digest = Digest::try_from(Sha256::digest(message).to_vec()).map_err(tpm("digest"))?;
        let validation = TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        };
        let signed = self.ctx.execute_with_nullauth_session(|ctx| {
            ctx.sign(key, digest, SignatureScheme::Null, validation.try_into()?)
        });
        self.flush(key);
        let signature = signed.map_err(tpm("Sign (device key)"))?;
        let Signature::EcDsa(ecc) = signature else {
            return Err(DeviceError::Unexpected(
                "the device key did not return an ECDSA signature".into(),
            ));
        };
        let bad = |e: openssl::error::ErrorStack| DeviceError::Unexpected(e.to_string());
        let r = BigNum::from_slice(ecc.signature_r().value()).map_err(bad)?;
        let s = BigNum::from_slice(ecc.signature_s().value()).map_err(bad)?;
        EcdsaSig::from_private_components(r, s)
            .and_then(|sig| sig.to_der())
            .map_err(bad)
    }
}
