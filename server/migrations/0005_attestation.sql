-- TPM-rooted identity and attestation of the booted image (attest/,
-- DESIGN.md "Attestation"). Portable SQL (SQLite and PostgreSQL), as 0001.

-- The factory line pre-authorises a device: by serial alone, or by serial
-- and the EK of the TPM soldered on its board. An enrollment token can
-- require it; a pre-authorised EK binds the device id to that TPM.
CREATE TABLE tpm_preauthorizations (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    device_id TEXT NOT NULL,
    -- Hex of the EK's marshalled TPMT_PUBLIC; NULL: by serial only.
    ek_public TEXT,
    -- Hex of the EK certificate (DER), when the line read one.
    ek_certificate TEXT,
    -- Hex SHA-256 of the ek_public bytes.
    ek_fingerprint TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, device_id)
);
CREATE INDEX tpm_preauthorizations_ek ON tpm_preauthorizations (org_id, ek_fingerprint);

-- Operator policy per enrollment token (a factory batch).
ALTER TABLE enrollment_tokens ADD COLUMN require_preauthorization BIGINT NOT NULL DEFAULT 0;
ALTER TABLE enrollment_tokens ADD COLUMN require_tpm BIGINT NOT NULL DEFAULT 0;

-- A device's TPM binding and its latest attestation.
--   tpm_required: enrolled under a policy that needs a TPM; no release is
--     served before credential activation succeeded.
--   ek_fingerprint, ak_public: set only by a successful activation.
--   attestation: unattested (no TPM), pending (activated, no quote yet),
--     attested, mismatch (attestation_reason names the PCR). "stale" is
--     derived when read: attested, but for another version or too long ago.
ALTER TABLE devices ADD COLUMN tpm_required BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN ek_fingerprint TEXT;
ALTER TABLE devices ADD COLUMN ak_public TEXT;
ALTER TABLE devices ADD COLUMN slot_pcr BIGINT NOT NULL DEFAULT 14;
ALTER TABLE devices ADD COLUMN attestation TEXT NOT NULL DEFAULT 'unattested';
ALTER TABLE devices ADD COLUMN attestation_reason TEXT;
ALTER TABLE devices ADD COLUMN attested_version TEXT;
ALTER TABLE devices ADD COLUMN attested_at BIGINT;
-- The one outstanding quote nonce (hex) and when it was issued.
ALTER TABLE devices ADD COLUMN quote_nonce TEXT;
ALTER TABLE devices ADD COLUMN quote_nonce_at BIGINT;
CREATE INDEX devices_org_ek ON devices (org_id, ek_fingerprint);

-- An outstanding credential-activation challenge (one per device).
CREATE TABLE tpm_activations (
    device_pk TEXT PRIMARY KEY REFERENCES devices(id),
    ek_fingerprint TEXT NOT NULL,
    ak_public TEXT NOT NULL,
    slot_pcr BIGINT NOT NULL,
    -- Hex SHA-256 of the credential the TPM must release.
    credential_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
