-- Devices a rollout's start left out, by reason, as JSON text
-- ({"no_tpm": n, "unactivated": n}): no TPM while every wave they could
-- join requires attestation; enrolled under a TPM policy without having
-- completed credential activation. Portable SQL, as 0001.
ALTER TABLE rollouts ADD COLUMN left_out TEXT;
