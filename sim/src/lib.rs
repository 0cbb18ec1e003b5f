//! `kernex-sim`: a fleet simulator for Kernex rollouts. It drives N
//! simulated devices over real HTTP against a running kernex-server (whose
//! `test-clock` it steps): enroll, poll, heartbeat, download with Range at
//! each device's link rate, install, commit or revert, roll back, report.
//! It is a separate binary; nothing here is linked into kernex-updater.
//!
//! - [`fleet`]: the run — options, the simulated clock, every device's step.
//! - [`operator`]: the operator's API calls (login, keyring, uploads,
//!   enrollment token, rollouts, test clock).
//! - `device`: one simulated device, speaking the device API of
//!   [`kernex_protocol::api`] as kernex-updater does.
//! - [`report`]: the timeline and the summary it prints or returns.
//! - [`releases`]: test bundles and the byte ranges a device fetches.

pub(crate) mod device;
pub mod fleet;
pub mod operator;
pub mod releases;
pub mod report;
