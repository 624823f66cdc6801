//! # pgassist
//!
//! PostgreSQL sessions that run in **autocommit** until you ask for a
//! transaction, over a **registry of named engines** (bb8 pools of
//! tokio-postgres connections).
//!
//! - A [`Session`] sends no BEGIN: each statement checks out a connection,
//!   runs and gives it back, so a session holds nothing between statements.
//!   A connection that comes back clean waits in front of bb8 for the next
//!   statement, and with [`EngineConfig::pipeline`] autocommit statements
//!   share busy connections while the pool is saturated.
//! - [`Session::begin`] pins one connection for a [`Transaction`]; nested
//!   [`Transaction::begin`] is a SAVEPOINT; commit, rollback or drop restore
//!   the connection to autocommit before it returns to the pool, and a
//!   connection whose state is in doubt is discarded instead.
//! - Listeners see every outermost transaction begin and end; the
//!   per-transaction connection map shows which connections are out of
//!   autocommit ([`Registry::stats`]).
//! - [`Table`] builds and runs the everyday statements (by key, by column
//!   ignoring case, by prefix, a page, a race-free find-or-create) on
//!   anything [`Queryable`], with names quoted and values bound.
//!
//! ```no_run
//! use pgassist::{EngineConfig, Registry};
//!
//! # async fn demo() -> Result<(), pgassist::Error> {
//! let registry = Registry::builder()
//!     .engine("writer", EngineConfig::from_url("postgres://app@localhost/app")?.max_size(16))
//!     .engine("reader", EngineConfig::from_url("postgres://app@replica/app")?.read_only(true))
//!     .default_engine("writer")
//!     .build()
//!     .await?;
//!
//! let reader = registry.session("reader")?;
//! let rows = reader.query("SELECT id, name FROM users WHERE id = $1", &[&7_i64]).await?;
//!
//! let writer = registry.session("writer")?;
//! let mut tx = writer.begin().await?;
//! tx.execute("INSERT INTO users(name) VALUES ($1)", &[&"ann"]).await?;
//! {
//!     let sp = tx.begin().await?; // SAVEPOINT
//!     sp.execute("UPDATE users SET name = 'x'", &[]).await?;
//!     sp.rollback().await?; // ROLLBACK TO SAVEPOINT
//! }
//! tx.commit().await?;
//! # let _ = rows; Ok(()) }
//! ```
//!
//! ## How transactions work
//!
//! A [`Transaction`] pins one pooled connection for its life. BEGIN is sent
//! lazily, pipelined with the first statement (one round trip saved; a
//! transaction that runs nothing sends nothing). Nested [`Transaction::begin`]
//! is a SAVEPOINT. The connection goes back to the pool only once the server
//! has confirmed COMMIT or ROLLBACK; otherwise it stays marked dirty and the
//! pool discards it (closing it makes the server roll back).
//!
//! Every pooled connection has one state (idle, begin pending, open,
//! aborted, committing, rolling back, in doubt, broken), changed only by one
//! transition function; a step the state does not allow is refused before
//! anything is sent — so a savepoint whose transaction has ended, whoever
//! ended it, cannot run a statement. Only an idle connection goes back to
//! the pool; any other is discarded.
//!
//! Cancellation: every control statement (BEGIN, SAVEPOINT, RELEASE, ROLLBACK
//! TO, COMMIT) runs in a critical section — a guard armed before the await
//! and disarmed after the server answered. A future dropped in between puts
//! the connection in doubt, and the transaction then refuses everything but a
//! rollback. Statement errors make the transaction aborted, so `commit()`
//! rolls back and says so; and once a statement's future was dropped before
//! its answer came (an error pgassist could not see), COMMIT is sent as
//! `SELECT 1; COMMIT`: in an aborted transaction the probe fails and COMMIT
//! is skipped, so a COMMIT the server turned into a ROLLBACK is never
//! reported as a success.
//!
//! Transaction control sent as a statement (BEGIN, COMMIT, SAVEPOINT, …) is
//! refused: a single statement is checked by its first keyword, a batch
//! statement by statement. Batches are also checked by the server itself: a
//! probe of the transaction status rides behind every batch (in the same
//! round trip), and a batch that left a transaction open, or ended one
//! early, is reported and its connection never reused as it is.
//!
//! ## Session state
//!
//! A pooled connection carries nothing from one user to the next.
//! Statements that change session state — `SET`, `RESET`, `CREATE TEMP`,
//! `PREPARE`, `DEALLOCATE`, `LISTEN`, `UNLISTEN`, `DECLARE … WITH HOLD`,
//! `LOAD`, `DISCARD` — are refused in autocommit, with advice: `SET LOCAL`
//! in a transaction, a pinned connection, or the engine's connect-time
//! [`EngineConfig::setting`] / [`EngineConfig::after_connect`]. A connection
//! whose session state changed or may have — such a statement inside a
//! transaction, a pinned connection, a call of `set_config` or a session
//! advisory lock — is reset (`RESET ALL`, `UNLISTEN *`, advisory locks
//! released, temporary objects dropped, cursors closed, SQL-`PREPARE`d
//! statements deallocated; pgassist's statement cache stays valid) before
//! anyone else gets it, or discarded if the reset fails. The whole policy,
//! and what it cannot see, is in `docs/session-state.md`.
//!
//! ## The per-request container
//!
//! A request asks for `reader()`, `writer()`, `logger()` or any engine by
//! name; each session is created on first use and memoised, and nothing is
//! checked out until a statement runs. The container records what the
//! request used (engine states INIT / START / END, statements, time, backend
//! pids, open transactions) for [`Sessions::report`], carries a typed info
//! stash that every session it hands out can read, and — in
//! transaction-per-request mode — holds one transaction per engine the
//! request touched, committed or rolled back by [`Sessions::finish`].
//! Dropping the container rolls back whatever it holds, at once.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod error;
mod front;
mod guard;
mod pool;
mod sql;
mod telemetry;
mod two_phase;
mod tx;

#[cfg(feature = "tower")]
pub mod integrations;

pub use config::tls::SslMode;
pub use config::{DEFAULT_STATEMENT_CACHE, EngineConfig};
pub use error::{CausalTokenError, Error, Result};
#[cfg(feature = "causal")]
#[cfg_attr(docsrs, doc(cfg(feature = "causal")))]
pub use front::causal::{DEFAULT_CAUSAL_MAX_AGE, MAX_CAUSAL_TOKEN_LEN, ObservedToken};
pub use front::engine::{CheckoutWaits, Engine, EngineStats};
pub use front::listener::Listener;
pub use front::pinned::Pinned;
pub use front::registry::{EngineHealth, Health, Registry, RegistryBuilder, RegistryStats};
pub use front::replica::{ReplicaHealth, ReplicaStats};
pub use front::session::Session;
pub use front::sessions::{
    EngineReport, EngineState, InfoMut, OpenTransaction, Sessions, SessionsReport,
};
pub use pool::stream::{CopyIn, CopyOut, RowStream};
pub use sql::helpers::{
    Direction, MAX_IDENTIFIER_LEN, RangeQuery, Similar, Table, escape_like, quote_ident,
};
#[cfg(feature = "value")]
pub use sql::helpers::{Value, columns_as_dict};
pub use sql::queryable::Queryable;
pub use two_phase::recovery::{DEFAULT_RECOVERY_GRACE, InDoubt, RecoveryReport};
#[cfg(feature = "testing")]
pub use two_phase::unit_of_work::CrashPoint;
pub use two_phase::unit_of_work::UnitOfWork;
pub use tx::hooks::{Outcome, TxEvent};
pub use tx::options::{IsolationLevel, TxOptions};
/// The transaction-status probe that rides behind every batch, for this
/// crate's tests to check against a real server (feature `testing`).
#[cfg(feature = "testing")]
#[doc(hidden)]
pub use tx::sql::STATUS_PROBE;
pub use tx::transaction::Transaction;

/// Typed rows: `#[derive(pgassist::FromRow)]` on a struct (fields by column
/// name; `#[from_row(rename = "..")]`, `#[from_row(flatten)]` for a nested
/// struct, `#[from_row(from = "T")]` / `try_from`), then
/// [`Queryable::query_as`]. The derive comes from the `postgres-from-row`
/// crate; its generated code names that crate, so bring it into scope with
/// `use pgassist::postgres_from_row;` (or depend on it directly).
#[cfg(feature = "derive")]
#[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
pub use postgres_from_row::{self, FromRow};
pub use tokio_postgres;
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
pub use tokio_postgres::types::Json;
pub use tokio_postgres::types::{FromSql, ToSql};
pub use tokio_postgres::{Notification, Row, error::SqlState};

/// The README's examples, compiled as doc tests so they cannot rot (they
/// use typed rows and the axum integration: `./scripts/test` turns every
/// feature on).
#[cfg(all(doctest, feature = "derive", feature = "axum"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// docs/guide.md's examples, compiled likewise.
#[cfg(all(doctest, feature = "derive", feature = "json"))]
#[doc = include_str!("../docs/guide.md")]
pub struct GuideDoctests;

/// docs/high-availability.md's examples, compiled likewise.
#[cfg(all(doctest, feature = "axum", feature = "causal"))]
#[doc = include_str!("../docs/high-availability.md")]
pub struct HighAvailabilityDoctests;

/// docs/web.md's examples, compiled likewise.
#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../docs/web.md")]
pub struct WebDoctests;

/// docs/replicas.md's examples, compiled likewise.
#[cfg(doctest)]
#[doc = include_str!("../docs/replicas.md")]
pub struct ReplicasDoctests;
