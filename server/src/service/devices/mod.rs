//! Devices: what they ask of the control plane and what operators see of
//! them.

pub mod bulk;
pub mod credential;
pub mod download;
pub mod enroll;
pub mod fleet;
pub mod history;
pub mod identity;
pub mod link;
pub mod log_store;
pub mod pending;
pub mod poll;
pub mod report;
pub mod selection;
pub mod telemetry;
