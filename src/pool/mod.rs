//! The pool layer: one named bb8 pool of tokio-postgres connections.
//!
//! Everything that makes a checkout fast lives here — the ready stack in
//! front of bb8 and pipelined sharing ([`ready`]), the statement cache
//! ([`cache`]) — together with the pooled connection and the bb8 manager
//! that vets it ([`manager`]). This layer imports nothing from the layers
//! above it (`tx`, `front`).

pub(crate) mod cache;
pub(crate) mod manager;
pub(crate) mod ready;
