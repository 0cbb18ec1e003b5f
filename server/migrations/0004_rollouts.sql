-- Rollouts: staggered waves with health gates and bandwidth-aware
-- scheduling. Portable SQL (SQLite and PostgreSQL), as 0001.

-- What the scheduler needs to know about a device's link and locality.
-- All optional: a device without them is `ethernet`, no site, UTC.
ALTER TABLE devices ADD COLUMN link_class TEXT;
ALTER TABLE devices ADD COLUMN site TEXT;
ALTER TABLE devices ADD COLUMN time_zone TEXT;

-- A rollout. `spec` is the validated JSON the operator sent (selector,
-- waves with gates, maintenance windows, bandwidth policy).
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    release_id TEXT NOT NULL REFERENCES releases(id),
    spec TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('draft', 'scheduled', 'running', 'paused', 'completed', 'aborted', 'rolled_back')),
    status_reason TEXT,
    start_at BIGINT,
    current_wave BIGINT NOT NULL DEFAULT 0,
    wave_started_at BIGINT,
    wave_settled_at BIGINT,
    gate_accepted BIGINT NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    completed_at BIGINT
);
CREATE INDEX rollouts_org_created ON rollouts (org_id, created_at);
CREATE INDEX rollouts_status ON rollouts (status);

-- One row per targeted device, made when the rollout starts. `active` = 1
-- while the device holds bandwidth (scheduled with a window, or
-- downloading); the scheduler admits a device only while the sum of the
-- active rates stays under the cap.
CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    device_pk TEXT NOT NULL REFERENCES devices(id),
    org_id TEXT NOT NULL REFERENCES organizations(id),
    wave BIGINT NOT NULL,
    position BIGINT NOT NULL,
    state TEXT NOT NULL,
    from_release_id TEXT REFERENCES releases(id),
    from_version TEXT,
    link_class TEXT NOT NULL,
    site TEXT,
    delta_bytes BIGINT NOT NULL,
    rate BIGINT NOT NULL,
    active BIGINT NOT NULL DEFAULT 0,
    window_start BIGINT,
    window_end BIGINT,
    bytes_done BIGINT NOT NULL DEFAULT 0,
    bytes_total BIGINT,
    windows_given BIGINT NOT NULL DEFAULT 0,
    reason TEXT,
    last_progress_at BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (rollout_id, device_pk)
);
CREATE INDEX rollout_devices_device ON rollout_devices (device_pk);
CREATE INDEX rollout_devices_state ON rollout_devices (rollout_id, state);

-- Metered accounting: bytes granted (windows given) and reported per
-- device and UTC day.
CREATE TABLE device_daily_bytes (
    device_pk TEXT NOT NULL REFERENCES devices(id),
    day BIGINT NOT NULL,
    granted BIGINT NOT NULL DEFAULT 0,
    reported BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (device_pk, day)
);

-- What one scheduler pass saw, per running rollout: the server's own
-- egress accounting.
CREATE TABLE rollout_samples (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    at BIGINT NOT NULL,
    reserved_bytes_per_sec BIGINT NOT NULL,
    active BIGINT NOT NULL,
    states TEXT NOT NULL,
    PRIMARY KEY (rollout_id, at)
);

-- Exact download bytes between two releases, computed once from their
-- chunk indexes. from_release_id '' = a device with nothing to seed from.
CREATE TABLE release_deltas (
    from_release_id TEXT NOT NULL,
    to_release_id TEXT NOT NULL REFERENCES releases(id),
    bytes BIGINT NOT NULL,
    max_chunk BIGINT NOT NULL,
    PRIMARY KEY (from_release_id, to_release_id)
);

-- One scheduler at a time across replicas: whoever holds an unexpired
-- lease row runs the pass.
CREATE TABLE scheduler_lease (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
