-- Heartbeats older than a day are folded into one row per device and day
-- (count, averages, peaks); raw rows are deleted after that.
CREATE TABLE heartbeats_daily (
    device_pk TEXT NOT NULL REFERENCES devices(id),
    org_id TEXT NOT NULL REFERENCES organizations(id),
    day BIGINT NOT NULL,
    samples BIGINT NOT NULL,
    cpu_percent_sum DOUBLE PRECISION NOT NULL,
    cpu_samples BIGINT NOT NULL,
    memory_percent_sum DOUBLE PRECISION NOT NULL,
    memory_percent_max DOUBLE PRECISION,
    memory_samples BIGINT NOT NULL,
    degraded_samples BIGINT NOT NULL,
    PRIMARY KEY (device_pk, day)
);
CREATE INDEX heartbeats_daily_day ON heartbeats_daily (day);
