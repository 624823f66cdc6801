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

use axum::Router;
use axum::extract::Json;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pgassist::integrations::axum::Db;
use pgassist::integrations::tower::SessionsLayer;
use pgassist::{EngineConfig, EngineState, Registry, SqlState, TxOptions};
use serde::{Deserialize, Serialize};

/// The registry: writer (default), read-only reader, logger, all on `url`.
pub async fn connect(url: &str, application_name: &str) -> Result<Registry, pgassist::Error> {
    let config =
        || EngineConfig::from_url(url).map(|c| c.max_size(8).application_name(application_name));
    Registry::builder()
        .engine("writer", config()?)
        .engine("reader", config()?.read_only(true))
        .engine("logger", config()?)
        .default_engine("writer")
        .build()
        .await
}

/// Creates the tables if they are missing.
pub async fn create_schema(registry: &Registry) -> Result<(), pgassist::Error> {
    registry
        .session("writer")?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS users (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE);
             CREATE TABLE IF NOT EXISTS audit (id bigserial PRIMARY KEY, message text NOT NULL)",
        )
        .await
}

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

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NewUser {
    pub name: String,
}

/// `GET /users`: through the reader, in autocommit.
async fn list_users(db: Db) -> Result<Json<Vec<User>>, AppError> {
    let rows = db
        .reader()?
        .query("SELECT id, name FROM users ORDER BY id", &[])
        .await?;
    Ok(Json(
        rows.iter()
            .map(|r| User {
                id: r.get(0),
                name: r.get(1),
            })
            .collect(),
    ))
}

/// `POST /users`: the user through the writer and an audit row through the
/// logger, both in this request's transactions. Any error status rolls both
/// back; the 201 commits them.
async fn create_user(db: Db, Json(new): Json<NewUser>) -> Result<Response, AppError> {
    let name = new.name.trim();
    if name.is_empty() {
        return Err(AppError(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name must not be empty".into(),
        ));
    }
    let row = db
        .writer()?
        .query_one("INSERT INTO users(name) VALUES ($1) RETURNING id", &[&name])
        .await?;
    let user = User {
        id: row.get(0),
        name: name.to_owned(),
    };
    db.logger()?
        .execute(
            "INSERT INTO audit(message) VALUES ($1)",
            &[&format!("created user {} ({})", user.id, user.name)],
        )
        .await?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

/// Touches every engine once (`SELECT 1`), so the report shows each pool,
/// its state for this request and the backend that served it.
async fn ping_all(db: &Db) -> Result<(), AppError> {
    let names: Vec<String> = db.registry().engine_names().map(str::to_owned).collect();
    for name in names {
        db.get(&name)?.query_one("SELECT 1", &[]).await?;
    }
    Ok(())
}

/// `GET /debug/db`: this request's `Sessions::report()` as JSON.
async fn debug_json(db: Db) -> Result<Json<pgassist::SessionsReport>, AppError> {
    ping_all(&db).await?;
    Ok(Json(db.report()))
}

/// `GET /debug/db.html`: the same report as a small HTML page.
async fn debug_html(db: Db) -> Result<Response, AppError> {
    ping_all(&db).await?;
    Ok((
        [(CONTENT_TYPE, "text/html; charset=utf-8")],
        render_html(&db.report()),
    )
        .into_response())
}

/// sqlassist's debug panel, as one table.
pub fn render_html(report: &pgassist::SessionsReport) -> String {
    let mut html = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>pgassist: this request</title>\n\
         <style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px}\
         table{border-collapse:collapse}</style></head><body>\n\
         <h1>Database sessions of this request</h1>\n<table>\n<tr><th>engine</th><th>default</th>\
         <th>read-only</th><th>state</th><th>statements</th><th>time (ms)</th>\
         <th>pool size / idle / in use</th><th>backend pids</th><th>open transactions</th></tr>\n",
    );
    for e in &report.engines {
        let state = match e.state {
            EngineState::Init => "INIT",
            EngineState::Start => "START",
            EngineState::End => "END",
        };
        let pids: Vec<String> = e.backend_pids.iter().map(i32::to_string).collect();
        let txs: Vec<String> = e
            .open_transactions
            .iter()
            .map(|t| format!("#{} depth {}", t.id, t.depth))
            .collect();
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{state}</td><td>{}</td><td>{:.3}</td>\
             <td>{} / {} / {}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&e.name),
            if e.is_default { "yes" } else { "" },
            if e.read_only { "yes" } else { "" },
            e.statements,
            e.time_ms,
            e.pool_size,
            e.pool_idle,
            e.pool_in_use,
            pids.join(", "),
            txs.join(", "),
        ));
    }
    html.push_str("</table>\n</body></html>\n");
    html
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An error answer: a status and a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct AppError(StatusCode, String);

impl From<pgassist::Error> for AppError {
    fn from(e: pgassist::Error) -> AppError {
        let status = if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            StatusCode::CONFLICT
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        // The error and its causes: the server's message is in the source.
        let mut message = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message = format!("{message}: {c}");
            cause = c.source();
        }
        AppError(status, message)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => {
            let db = pgassist::testing::TestCluster::shared()
                .create_database()
                .await?;
            println!("throwaway database: {}", db.name);
            db.url
        }
    };
    let registry = connect(&url, "axum_app").await?;
    create_schema(&registry).await?;
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(registry)).await?;
    Ok(())
}
