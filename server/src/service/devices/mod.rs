//! Devices: what they ask of the control plane and what operators see of
//! them.

pub mod fleet;
pub mod poll;
