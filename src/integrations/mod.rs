//! Per-request [`Sessions`](crate::Sessions) in web frameworks.
//!
//! - [`tower`] (cargo feature `tower`): [`SessionsLayer`](tower::SessionsLayer)
//!   gives every request its own container through the request extensions,
//!   as a [`RequestSessions`](tower::RequestSessions) handle, and ends it when
//!   the inner service has produced the response, or drops it (rolling back)
//!   when the request is cancelled. With
//!   [`SessionsLayer::per_request_transaction`](tower::SessionsLayer::per_request_transaction)
//!   every engine the request touches runs in one transaction, committed on a
//!   1xx–3xx response and rolled back on a 4xx / 5xx response or an error.
//! - [`axum`] (cargo feature `axum`): the [`Db`](axum::Db) extractor.
//!
//! Other frameworks use the framework-agnostic API directly: create
//! `registry.sessions()` (or `sessions_in_transaction`) when a request
//! starts, share it with the handler, and call
//! [`Sessions::finish`](crate::Sessions::finish) when the handler is done;
//! dropping the container instead rolls back. `examples/actix_app.rs` does
//! this for actix-web.

#[cfg(feature = "axum")]
pub mod axum;
pub mod tower;
