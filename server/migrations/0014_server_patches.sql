-- Chunk patches the server builds itself (service::patches): one job per
-- new release, old release and image class the new bundle carries no
-- patch from. The patch is a content-addressed blob (blob_key), shared by
-- every rollout and deployment of the pair. No foreign keys to releases:
-- garbage collection removes the rows of releases no device runs.
-- Portable SQL (SQLite and PostgreSQL), as 0001.
CREATE TABLE server_patches (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    to_release_id TEXT NOT NULL,
    from_release_id TEXT NOT NULL,
    slot_class TEXT NOT NULL,
    base_sha256 TEXT NOT NULL,
    base_version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'building', 'ready', 'empty', 'failed')),
    blob_key TEXT,
    size BIGINT,
    table_size BIGINT,
    table_sha256 TEXT,
    done_bytes BIGINT NOT NULL DEFAULT 0,
    total_bytes BIGINT NOT NULL DEFAULT 0,
    error TEXT,
    claimed_by TEXT,
    claimed_until BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (to_release_id, from_release_id, slot_class)
);
CREATE INDEX server_patches_status ON server_patches (status);
CREATE INDEX server_patches_from ON server_patches (from_release_id);

-- The planner's choice for a device on one release installing another,
-- once every patch of the pair is built: the method and its exact bytes.
CREATE TABLE release_plans (
    from_release_id TEXT NOT NULL,
    to_release_id TEXT NOT NULL,
    method TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    PRIMARY KEY (from_release_id, to_release_id)
);
