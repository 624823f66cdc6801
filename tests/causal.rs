//! Causal tokens against real servers (features `causal` and `axum`).
