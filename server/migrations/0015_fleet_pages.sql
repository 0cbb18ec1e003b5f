-- The web UI at fleet scale (issue 24). Portable SQL (SQLite and
-- PostgreSQL), as 0001.
--
-- A device's history on its page: the audit entries whose target is the
-- device ("device:<id>"), newest first, without scanning the whole log.
CREATE INDEX audit_log_org_target ON audit_log (org_id, target, seq);

-- A rollout's devices, one page at a time in wave order (keyset on
-- wave, position).
CREATE INDEX rollout_devices_order ON rollout_devices (rollout_id, wave, position);
