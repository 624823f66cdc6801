//! The transaction layer: the transaction guard and what it runs on —
//! options, listeners and callbacks, the per-transaction connection map,
//! retry. It drives the connection state machine of the pool layer and
//! imports nothing from the layers above it (`front`, `two_phase`).

pub(crate) mod hooks;
pub(crate) mod retry;
pub(crate) mod tracker;
pub(crate) mod transaction;
