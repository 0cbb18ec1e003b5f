-- The device's identity is a key pair it generated (issue #20): the server
-- keeps its public key, trades signed nonces for access tokens valid for
-- minutes, and parks a re-enrollment without proof for an operator.
-- Portable SQL (SQLite and PostgreSQL), as 0001.

-- Hex DER SubjectPublicKeyInfo (Ed25519 or P-256); NULL: a device still on
-- its long-lived bearer credential (it registers a key on its next contact).
ALTER TABLE devices ADD COLUMN public_key TEXT;

-- Access tokens, as SHA-256 hex; expired ones are pruned.
CREATE TABLE device_access_tokens (
    token_hash TEXT PRIMARY KEY,
    device_pk TEXT NOT NULL REFERENCES devices(id),
    expires_at BIGINT NOT NULL
);
CREATE INDEX device_access_tokens_device ON device_access_tokens (device_pk);
CREATE INDEX device_access_tokens_expiry ON device_access_tokens (expires_at);

-- Outstanding nonces (hex), each accepted once before it expires.
CREATE TABLE device_challenges (
    nonce TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX device_challenges_expiry ON device_challenges (expires_at);

-- A re-enrollment of an enrolled device id without proof: it waits for an
-- operator (status pending, approved, rejected). Approving makes its key
-- the device's.
CREATE TABLE enrollment_requests (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    device_pk TEXT NOT NULL REFERENCES devices(id),
    device_id TEXT NOT NULL,
    public_key TEXT NOT NULL,
    enrollment_token_id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    decided_by TEXT,
    decided_at BIGINT
);
-- One request per device and key: asking again is the same request.
CREATE UNIQUE INDEX enrollment_requests_key ON enrollment_requests (device_pk, public_key);
CREATE INDEX enrollment_requests_org ON enrollment_requests (org_id, status, created_at);

-- A re-enrollment of a TPM-bound device: the key it brings replaces the
-- device's only when that TPM answers the activation challenge.
ALTER TABLE tpm_activations ADD COLUMN pending_public_key TEXT;
