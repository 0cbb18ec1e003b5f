-- Accounts with a lifecycle and organisations an instance admin manages
-- (server/README.md "Accounts" and "Organisations"). Portable SQL (SQLite
-- and PostgreSQL), as 0001.

-- A disabled user's sessions and tokens are refused; must_change_password
-- gates every call but the password change and logout (the bootstrap
-- admin, and each organisation's first admin); an instance admin manages
-- organisations.
ALTER TABLE users ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN must_change_password BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN instance_admin BIGINT NOT NULL DEFAULT 0;

-- A disabled organisation's operators and devices are refused.
ALTER TABLE organizations ADD COLUMN disabled BIGINT NOT NULL DEFAULT 0;

-- api_tokens holds login sessions (kind 'session') and API tokens for
-- automation (kind 'api': a name, a role no higher than the creator's,
-- a required expiry). A row is named, to list and revoke it, by the first
-- 24 hex digits of its hash (never the secret, never the whole hash).
ALTER TABLE api_tokens ADD COLUMN kind TEXT NOT NULL DEFAULT 'session';
ALTER TABLE api_tokens ADD COLUMN name TEXT;
ALTER TABLE api_tokens ADD COLUMN role TEXT;
