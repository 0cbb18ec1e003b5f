-- Kernex control plane schema, version 1.
-- Portable SQL: runs unchanged on SQLite and PostgreSQL. Ids are TEXT,
-- times are BIGINT unix milliseconds, JSON is TEXT, booleans are BIGINT 0/1.
-- Never edit this file once landed: add 0002_*.sql instead.

CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    keyring_pem TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    email TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'ops', 'read_only')),
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, email)
);

CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX enrollment_tokens_org ON enrollment_tokens (org_id, created_at);

CREATE TABLE releases (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    version TEXT NOT NULL,
    compatible TEXT NOT NULL,
    manifest TEXT NOT NULL,
    signer TEXT NOT NULL,
    blob_key TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    unstable BIGINT NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (org_id, version)
);
CREATE INDEX releases_org_created ON releases (org_id, created_at);
CREATE INDEX releases_blob ON releases (blob_key);

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    device_id TEXT NOT NULL,
    hardware_class TEXT NOT NULL,
    hardware_metadata TEXT NOT NULL DEFAULT '{}',
    current_version TEXT,
    desired_release_id TEXT REFERENCES releases(id),
    booted_slot TEXT,
    primary_slot TEXT,
    status TEXT NOT NULL DEFAULT 'offline',
    status_reason TEXT,
    credential_hash TEXT NOT NULL UNIQUE,
    enrollment_token_id TEXT REFERENCES enrollment_tokens(id),
    revoked BIGINT NOT NULL DEFAULT 0,
    last_seen_at BIGINT,
    registered_at BIGINT NOT NULL,
    UNIQUE (org_id, device_id)
);
CREATE INDEX devices_org_status ON devices (org_id, status);
CREATE INDEX devices_org_class ON devices (org_id, hardware_class);
CREATE INDEX devices_org_version ON devices (org_id, current_version);
CREATE INDEX devices_desired_release ON devices (desired_release_id);

CREATE TABLE device_tags (
    device_pk TEXT NOT NULL REFERENCES devices(id),
    org_id TEXT NOT NULL REFERENCES organizations(id),
    tag TEXT NOT NULL,
    PRIMARY KEY (device_pk, tag)
);
CREATE INDEX device_tags_org_tag ON device_tags (org_id, tag);

CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    release_id TEXT NOT NULL REFERENCES releases(id),
    status TEXT NOT NULL CHECK (status IN ('pending', 'in_progress', 'success', 'failed', 'rolled_back')),
    description TEXT NOT NULL DEFAULT '',
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    completed_at BIGINT,
    error TEXT
);
CREATE INDEX deployments_org_created ON deployments (org_id, created_at);
CREATE INDEX deployments_release ON deployments (release_id);

CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments(id),
    device_pk TEXT NOT NULL REFERENCES devices(id),
    state TEXT NOT NULL,
    bytes_done BIGINT,
    bytes_total BIGINT,
    reason TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (deployment_id, device_pk)
);
CREATE INDEX deployment_devices_device ON deployment_devices (device_pk, updated_at);

CREATE TABLE heartbeats (
    id TEXT PRIMARY KEY,
    device_pk TEXT NOT NULL REFERENCES devices(id),
    org_id TEXT NOT NULL REFERENCES organizations(id),
    at BIGINT NOT NULL,
    cpu_percent DOUBLE PRECISION,
    memory_percent DOUBLE PRECISION,
    status TEXT NOT NULL,
    inventory TEXT NOT NULL
);
CREATE INDEX heartbeats_device_at ON heartbeats (device_pk, at);
CREATE INDEX heartbeats_at ON heartbeats (at);

CREATE TABLE device_logs (
    id TEXT PRIMARY KEY,
    device_pk TEXT NOT NULL REFERENCES devices(id),
    org_id TEXT NOT NULL REFERENCES organizations(id),
    at BIGINT NOT NULL,
    level TEXT NOT NULL CHECK (level IN ('debug', 'info', 'warn', 'error')),
    message TEXT NOT NULL
);
CREATE INDEX device_logs_device_at ON device_logs (device_pk, at);
CREATE INDEX device_logs_at ON device_logs (at);

-- Append-only. Each row holds the SHA-256 of the previous row of its
-- organisation (`prev_hash`) and its own (`hash`): a hash chain.
CREATE TABLE audit_log (
    org_id TEXT NOT NULL REFERENCES organizations(id),
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    result TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (org_id, seq)
);
CREATE INDEX audit_log_org_at ON audit_log (org_id, at);
