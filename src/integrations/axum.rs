//! The [`Db`] extractor for axum handlers.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use pgassist::integrations::{axum::Db, tower::SessionsLayer};
//!
//! async fn count(db: Db) -> String {
//!     match db.reader() {
//!         Ok(reader) => match reader.query_one("SELECT count(*) FROM users", &[]).await {
//!             Ok(row) => row.get::<_, i64>(0).to_string(),
//!             Err(e) => format!("error: {e}"),
//!         },
//!         Err(e) => format!("error: {e}"),
//!     }
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
use crate::Sessions;

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
