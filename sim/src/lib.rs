//! `kernex-sim`: a fleet simulator for Kernex rollouts. It drives N
//! simulated devices over real HTTP against a running kernex-server (whose
//! `test-clock` it steps): enroll, poll, heartbeat, download with Range at
//! each device's link rate, install, commit or revert, roll back, report.
//! It is a separate binary; nothing here is linked into kernex-updater.

pub mod fleet;
pub mod releases;
