//! The boot-state contract (filled by issue #3).
