-- Bounded enrollment tokens and per-device log storage (issue 20).
-- Tokens get a use cap, a use count and the tags a device may ask for; an
-- expiry is required for new tokens (the server refuses one without;
-- older tokens without one expire `enrollment-token-max-ttl-days` after
-- they were made).
-- Portable SQL (SQLite and PostgreSQL), as 0001.

-- NULL: no cap (until the token expires).
ALTER TABLE enrollment_tokens ADD COLUMN max_uses BIGINT;
-- Devices enrolled with the token (new devices only: a device enrolling
-- again with its own token is not a new use).
ALTER TABLE enrollment_tokens ADD COLUMN uses BIGINT NOT NULL DEFAULT 0;
-- JSON array: the tags a device may ask for beyond the token's own.
ALTER TABLE enrollment_tokens ADD COLUMN allowed_tags TEXT NOT NULL DEFAULT '[]';

UPDATE enrollment_tokens SET uses = (SELECT COUNT(*) FROM devices WHERE devices.enrollment_token_id = enrollment_tokens.id);

-- Per-device log storage caps (`[limits] device-log-max-lines`,
-- `device-log-max-bytes`): the bytes of each stored message.
ALTER TABLE device_logs ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
UPDATE device_logs SET bytes = LENGTH(message);

-- Site, time zone and link class come from the token (or the operator);
-- what a device claims for itself (enrollment, heartbeat) is only a hint,
-- kept apart, that an operator may accept (JSON: link_class, site,
-- time_zone).
ALTER TABLE enrollment_tokens ADD COLUMN link_class TEXT;
ALTER TABLE enrollment_tokens ADD COLUMN site TEXT;
ALTER TABLE enrollment_tokens ADD COLUMN time_zone TEXT;
ALTER TABLE devices ADD COLUMN link_hint TEXT;
