-- Anti-rollback. A release's manifest `security-version` (0 for bundles
-- made before the field existed, so existing rows are right as 0), and
-- each device's floor as its heartbeat reports it: the highest security
-- version it committed, NULL until it reports one. The server refuses
-- deployments and rollouts that would send a device below its floor.
-- Portable SQL, as 0001.
ALTER TABLE releases ADD COLUMN security_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN security_floor BIGINT;
