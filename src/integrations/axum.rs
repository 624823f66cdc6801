//! The [`Db`] extractor for axum handlers, and [`Error`] as a response.
//!
//! A handler returns `pgassist::Result<_>` and uses `?` throughout: an
//! error answers with the status [`status_of`] gives it and a body of that
//! status' reason phrase only. SQL, parameters and the server's message
//! never reach the client; they are logged with `tracing` (target
//! `pgassist::http`).
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use pgassist::integrations::{axum::Db, tower::SessionsLayer};
//!
//! async fn count(db: Db) -> pgassist::Result<String> {
//!     let row = db.reader()?.query_one("SELECT count(*) FROM users", &[]).await?;
//!     Ok(row.try_get::<_, i64>(0)?.to_string())
//! }
//!
//! # fn app(registry: pgassist::Registry) -> Router {
//! Router::new()
//!     .route("/count", get(count))
//!     .layer(SessionsLayer::new(registry))
//! # }
//! ```

use std::fmt;
use std::ops::Deref;

use ::axum::extract::FromRequestParts;
use ::axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use super::tower::RequestSessions;
use crate::{Error, Sessions, SqlState};

/// The request's [`Sessions`], put there by
/// [`SessionsLayer`](super::tower::SessionsLayer). Derefs to [`Sessions`]:
/// `db.reader()?`, `db.writer()?`, `db.get("logger")?`, `db.report()`.
///
/// Without the layer on the route, extraction fails with [`MissingLayer`],
/// a 500 whose body says so.
#[derive(Clone, Debug)]
pub struct Db(pub RequestSessions);

impl Deref for Db {
    type Target = Sessions;

    fn deref(&self) -> &Sessions {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Db {
    type Rejection = MissingLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Db, MissingLayer> {
        RequestSessions::from_extensions(&parts.extensions)
            .cloned()
            .map(Db)
            .ok_or(MissingLayer)
    }
}

/// The rejection of [`Db`] when the request has no sessions: the route is
/// not behind [`SessionsLayer`](super::tower::SessionsLayer). A 500, since
/// that is a bug in the application, not in the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissingLayer;

impl fmt::Display for MissingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "pgassist: this request has no database sessions; add \
             pgassist::integrations::tower::SessionsLayer to the router (Router::layer) \
             in front of this route",
        )
    }
}

impl std::error::Error for MissingLayer {}

impl IntoResponse for MissingLayer {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

/// The HTTP status an [`Error`] answers with:
///
/// - 404 for [`Error::NotFound`] (`query_one` found no row);
/// - 409 for a conflict the client may resolve by trying again or
///   differently: a serialization failure or deadlock that outlived the
///   retries (40001, 40P01) and a unique violation (23505);
/// - 503 when the database cannot be had right now: the pool timed out,
///   the server could not be reached, the connection or engine closed;
/// - 500 for everything else (a bug in the SQL, a decode error, …).
pub fn status_of(e: &Error) -> StatusCode {
    let conflict = [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::UNIQUE_VIOLATION,
    ];
    match e {
        Error::NotFound { .. } => StatusCode::NOT_FOUND,
        Error::PoolTimeout { .. } | Error::Connect { .. } | Error::Closed { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Error::Db { .. } if e.code().is_some_and(|c| conflict.contains(c)) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `pgassist::Error` as an axum response: [`status_of`] and its reason
/// phrase. The error itself (which may quote the server's message, a key
/// value from a unique violation's DETAIL, an engine name) goes to
/// `tracing` only: a 5xx at level ERROR, a 4xx at DEBUG.
impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = status_of(&self);
        if status.is_server_error() {
            tracing::error!(target: "pgassist::http", status = status.as_u16(), error = %self, "database error");
        } else {
            tracing::debug!(target: "pgassist::http", status = status.as_u16(), error = %self, "database error");
        }
        let reason = status.canonical_reason().unwrap_or("error");
        (status, reason).into_response()
    }
}
