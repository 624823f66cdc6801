//! The front layer: what users touch — the registry and its builder,
//! engines, the autocommit [`Session`](session::Session), the per-request
//! container and replica routing.

#[cfg(feature = "causal")]
pub(crate) mod causal;
pub(crate) mod engine;
pub(crate) mod listener;
pub(crate) mod pinned;
pub(crate) mod registry;
pub(crate) mod replica;
pub(crate) mod session;
pub(crate) mod sessions;
