-- Devices a rollout's start left out, by reason, as JSON text
-- ({"no_tpm": n, "unactivated": n}): no TPM while every wave they could
-- join requires attestation; enrolled under a TPM policy without having
-- completed credential activation. Portable SQL, as 0001.
ALTER TABLE rollouts ADD COLUMN left_out TEXT;
-- Pending devices with a position below this are next in line for a
-- download window: their polls get the rollout poll hint (set by every
-- scheduler pass: the first pending position in the waves reached, plus
-- twice the concurrency limit).
ALTER TABLE rollouts ADD COLUMN poll_horizon BIGINT NOT NULL DEFAULT 0;
