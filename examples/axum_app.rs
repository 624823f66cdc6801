//! A users service on axum with per-request sessions.
//!
//! ```text
//! cargo run --example axum_app --features axum,serde
//! curl -i -X POST localhost:3000/users -H 'content-type: application/json' -d '{"name":"ann"}'
//! curl localhost:3000/users
//! curl localhost:3000/debug/db          # this request's Sessions::report() as JSON
//! open http://localhost:3000/debug/db.html
//! ```
//!
//! Three engines, as in a real deployment: `writer` (the default), `reader`
//! (read-only; a replica in production) and `logger` (an audit database).
//! Reads run in autocommit behind `SessionsLayer::new`; `POST /users` runs
//! behind `SessionsLayer::per_request_transaction`, so the user row (writer)
//! and its audit row (logger) are committed when the handler answers 201 and
//! rolled back when it answers 4xx / 5xx or the client goes away.
//!
//! Uses `DATABASE_URL` when set; otherwise starts a throwaway PostgreSQL
//! (initdb + postgres from the machine's packages) and removes it at exit.
//! Listens on `BIND` (default 127.0.0.1:3000).

mod shared;

use axum::Router;
use axum::extract::Json;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pgassist::integrations::axum::Db;
use pgassist::integrations::tower::SessionsLayer;
use pgassist::{Registry, SessionsReport, TxOptions};
pub use shared::{NewUser, User, connect, create_schema};

/// The application: reads in autocommit, writes in a transaction per request.
pub fn app(registry: Registry) -> Router {
    let reads = Router::new()
        .route("/users", get(list_users))
        .route("/debug/db", get(debug_json))
        .route("/debug/db.html", get(debug_html))
        .layer(SessionsLayer::new(registry.clone()));
    let writes = Router::new().route("/users", post(create_user)).layer(
        SessionsLayer::per_request_transaction(registry, TxOptions::new()),
    );
    reads.merge(writes)
}

/// `GET /users`: through the reader, in autocommit.
async fn list_users(db: Db) -> Result<Json<Vec<User>>, AppError> {
    Ok(Json(shared::list_users(&db).await?))
}

/// `POST /users`: the user through the writer and an audit row through the
/// logger, both in this request's transactions. Any error status rolls both
/// back; the 201 commits them.
async fn create_user(db: Db, Json(new): Json<NewUser>) -> Result<Response, AppError> {
    let user = shared::create_user(&db, &new).await?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

/// `GET /debug/db`: this request's `Sessions::report()` as JSON.
async fn debug_json(db: Db) -> Result<Json<SessionsReport>, AppError> {
    shared::ping_all(&db).await?;
    Ok(Json(db.report()))
}

/// `GET /debug/db.html`: the same report as a small HTML page.
async fn debug_html(db: Db) -> Result<Response, AppError> {
    shared::ping_all(&db).await?;
    let html = shared::render_html(&db.report());
    Ok(([(CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response())
}

/// An error answer: a status and a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct AppError(shared::Failure);

impl<E: Into<shared::Failure>> From<E> for AppError {
    fn from(e: E) -> AppError {
        AppError(e.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(serde_json::json!({ "error": self.0.message }))).into_response()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = shared::database_url().await?;
    let registry = connect(&url, "axum_app").await?;
    create_schema(&registry).await?;
    let listener = tokio::net::TcpListener::bind(shared::bind_addr()).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(registry)).await?;
    Ok(())
}
