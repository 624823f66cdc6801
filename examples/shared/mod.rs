//! What the web examples share, framework aside: where the database is, the
//! registry and schema, the user type, error messages and the HTML report.
#![allow(dead_code)] // each example uses its part

use pgassist::{EngineConfig, EngineState, Registry, SessionsReport, SqlState};
use serde::{Deserialize, Serialize};

/// `DATABASE_URL`, or a throwaway database on a server started for this
/// process (initdb + postgres from the machine's packages, removed at exit).
pub async fn database_url() -> Result<String, Box<dyn std::error::Error>> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => {
            let db = pgassist_testing::TestCluster::shared()
                .create_database()
                .await?;
            println!("throwaway database: {}", db.name);
            // The database lives as long as the throwaway server.
            Ok(db.keep())
        }
    }
}

/// `BIND`, default 127.0.0.1:3000.
pub fn bind_addr() -> String {
    std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".into())
}

/// The registry: writer (default), read-only reader (a replica in
/// production) and logger (an audit database), here all on `url`.
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

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NewUser {
    pub name: String,
}

pub const LIST_USERS: &str = "SELECT id, name FROM users ORDER BY id";
pub const INSERT_USER: &str = "INSERT INTO users(name) VALUES ($1) RETURNING id";
pub const INSERT_AUDIT: &str = "INSERT INTO audit(message) VALUES ($1)";

/// An error answer, framework aside: an HTTP status and a message (each
/// example renders it as `{"error": "..."}`).
#[derive(Debug)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl From<pgassist::Error> for Failure {
    /// A unique violation (the name is taken) is a 409, anything else a 500.
    fn from(e: pgassist::Error) -> Failure {
        let conflict = e.code() == Some(&SqlState::UNIQUE_VIOLATION);
        Failure {
            status: if conflict { 409 } else { 500 },
            message: error_message(&e),
        }
    }
}

/// `GET /users`: through the reader, in autocommit.
pub async fn list_users(db: &pgassist::Sessions) -> Result<Vec<User>, Failure> {
    let rows = db.reader()?.query(LIST_USERS, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| User {
            id: r.get(0),
            name: r.get(1),
        })
        .collect())
}

/// `POST /users`: the user through the writer and an audit row through the
/// logger, in this request's transactions (committed by the framework layer
/// when the answer is a success).
pub async fn create_user(db: &pgassist::Sessions, new: &NewUser) -> Result<User, Failure> {
    let name = new.name.trim();
    if name.is_empty() {
        return Err(Failure {
            status: 422,
            message: "name must not be empty".into(),
        });
    }
    let row = db.writer()?.query_one(INSERT_USER, &[&name]).await?;
    let user = User {
        id: row.get(0),
        name: name.to_owned(),
    };
    let message = format!("created user {} ({})", user.id, user.name);
    db.logger()?.execute(INSERT_AUDIT, &[&message]).await?;
    Ok(user)
}

/// The error and its causes: the server's own message is in the source.
pub fn error_message(e: &pgassist::Error) -> String {
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.ends_with(&text) {
            message = format!("{message}: {text}");
        }
        cause = c.source();
    }
    message
}

/// Touches every engine once (`SELECT 1`), so the report shows each pool,
/// its state for this request and the backend that served it.
pub async fn ping_all(db: &pgassist::Sessions) -> Result<(), pgassist::Error> {
    let names: Vec<String> = db.registry().engine_names().map(str::to_owned).collect();
    for name in names {
        db.get(&name)?.query_one("SELECT 1", &[]).await?;
    }
    Ok(())
}

/// sqlassist's debug panel, as one table.
pub fn render_html(report: &SessionsReport) -> String {
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
