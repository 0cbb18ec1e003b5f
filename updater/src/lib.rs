//! The on-device updater: install, health watchdog, attestation, daemon. Empty until the updater issue lands.
