//! The control plane: axum API, sqlx store, rollout scheduler, web UI. Empty until the control-plane issue lands.
