-- Idempotency keys are now scoped by organisation and principal
-- ("org:<id>/token:<hash>", "org:<id>/device:<pk>"); the rows stored under
-- the old scopes (the raw Authorization header, or "anonymous") go.
DELETE FROM idempotency_keys;

-- Signed checkpoints of each organisation's audit chain: the instance's
-- Ed25519 key over (org, seq, hash, at).
CREATE TABLE audit_checkpoints (
    org_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    at BIGINT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (org_id, seq)
);

-- How far each organisation's chain was verified by the server (page
-- views verify only the entries after it).
CREATE TABLE audit_verified (
    org_id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL,
    at BIGINT NOT NULL
);
