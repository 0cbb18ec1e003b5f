//! What the factory line (`kernex-image provision`), the simulator and
//! operators' tools send to prepare devices: enrollment tokens and TPM
//! pre-authorisations. These routes take an operator's credential.

use serde::{Deserialize, Serialize};

/// A new enrollment token (`POST /api/v1/enrollment-tokens`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewEnrollmentToken {
    /// What the batch is, e.g. `factory line 2, 2026-11`.
    pub label: String,
    /// Tags every device enrolled with it gets.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The only tags a device may ask for at enrollment, beyond `tags`
    /// (empty: none). Asking for another one is refused, naming it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_tags: Vec<String>,
    /// Expiry, unix ms. An expiry is required: this or `expires_in_secs`
    /// (not both), at most the server's `enrollment-token-max-ttl-days`
    /// away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Expiry, seconds from now (instead of `expires_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<i64>,
    /// How many devices may enroll with it (none: no cap until it
    /// expires). `kernex-image provision` makes single-use tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<i64>,
    /// Link class of the devices enrolled with it (e.g. metered-4g); what
    /// a device claims is only a hint an operator may accept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_class: Option<String>,
    /// Site or cell of the devices enrolled with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// IANA time zone of the devices enrolled with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Accept only devices the factory line pre-authorised
    /// (`POST /api/v1/tpm/preauthorizations`).
    #[serde(default)]
    pub require_preauthorization: bool,
    /// Accept only devices that enroll with a TPM identity and complete
    /// credential activation.
    #[serde(default)]
    pub require_tpm: bool,
}

/// An enrollment token (the secret only in the creation answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollmentToken {
    /// Id.
    pub id: String,
    /// Label.
    pub label: String,
    /// Tags given to enrolled devices.
    pub tags: Vec<String>,
    /// The tags a device may ask for beyond `tags`.
    #[serde(default)]
    pub allowed_tags: Vec<String>,
    /// Created, unix ms.
    pub created_at: i64,
    /// Expiry, unix ms (none only for tokens made before expiries were
    /// required: they expire `enrollment-token-max-ttl-days` after
    /// creation).
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// How many devices may enroll with it (none: no cap).
    #[serde(default)]
    pub max_uses: Option<i64>,
    /// How many devices enrolled with it.
    #[serde(default)]
    pub uses: i64,
    /// Link class given to enrolled devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_class: Option<String>,
    /// Site given to enrolled devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Time zone given to enrolled devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Revoked.
    pub revoked: bool,
    /// Only pre-authorised devices.
    pub require_preauthorization: bool,
    /// Only devices with a TPM.
    pub require_tpm: bool,
    /// The secret: returned once, at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// An enrollment token secret to look up
/// (`POST /api/v1/enrollment-tokens/check`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenCheck {
    /// The secret (`kxe_...`).
    pub token: String,
}

/// A device the factory line pre-authorises
/// (`POST /api/v1/tpm/preauthorizations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewPreauthorization {
    /// The device's own id (serial), as it will enroll.
    pub device_id: String,
    /// Hex of the EK's marshalled `TPMT_PUBLIC` (`kernex-updater attest
    /// identity` prints it); absent: pre-authorised by serial only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_public: Option<String>,
    /// Hex of the EK certificate (DER), when the TPM has one: checked to
    /// certify `ek_public`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ek_certificate: Option<String>,
}

impl NewPreauthorization {
    /// The `ek_fingerprint` the server records for this request: lowercase
    /// hex of the SHA-256 of the EK's `TPMT_PUBLIC` bytes. None without
    /// `ek_public` (by serial only) or when `ek_public` is not hex (the
    /// server refuses it).
    pub fn ek_fingerprint(&self) -> Option<String> {
        use sha2::{Digest, Sha256};
        let public = hex::decode(self.ek_public.as_deref()?).ok()?;
        Some(hex::encode(Sha256::digest(public)))
    }
}

/// A pre-authorised device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Preauthorization {
    /// Id.
    pub id: String,
    /// The device id.
    pub device_id: String,
    /// Hex SHA-256 of the EK's `TPMT_PUBLIC`; none: by serial only.
    #[serde(default)]
    pub ek_fingerprint: Option<String>,
    /// An EK certificate was recorded.
    pub ek_certificate: bool,
    /// Recorded, unix ms.
    pub created_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ek_fingerprint_is_the_sha256_of_the_ek_public_bytes() {
        let request = |ek: Option<&str>| NewPreauthorization {
            device_id: "SN-1".into(),
            ek_public: ek.map(str::to_owned),
            ek_certificate: None,
        };
        assert_eq!(
            request(Some("616263")).ek_fingerprint().as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            "SHA-256 of the bytes \"abc\", not of their hex"
        );
        assert_eq!(request(None).ek_fingerprint(), None);
        assert_eq!(request(Some("not hex")).ek_fingerprint(), None);
    }
}
