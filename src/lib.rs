//! # pgassist
//!
//! PostgreSQL sessions that run in **autocommit** until you ask for a
//! transaction, over a **registry of named engines** (bb8 pools of
//! tokio-postgres connections).
//!
//! - A [`Session`] sends no BEGIN: each statement checks out a connection,
//!   runs and gives it back, so a session holds nothing between statements.
//! - [`Session::begin`] pins one connection for a [`Transaction`]; nested
//!   [`Transaction::begin`] is a SAVEPOINT; commit, rollback or drop restore
//!   the connection to autocommit before it returns to the pool, and a
//!   connection whose state is in doubt is discarded instead.
//! - Listeners see every outermost transaction begin and end; the
//!   per-transaction connection map shows which connections are out of
//!   autocommit ([`Registry::stats`]).
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
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod config;
mod engine;
mod error;
mod hooks;
mod manager;
mod queryable;
mod registry;
mod retry;
mod session;
mod sessions;
mod tracker;
mod transaction;

#[cfg(feature = "tower")]
pub mod integrations;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{DEFAULT_STATEMENT_CACHE, EngineConfig};
pub use engine::{Engine, EngineStats};
pub use error::{Error, Result};
pub use hooks::{Outcome, TxEvent};
pub use manager::PgConn;
pub use queryable::Queryable;
pub use registry::{Registry, RegistryBuilder, RegistryStats};
pub use session::Session;
pub use sessions::{EngineReport, EngineState, InfoMut, OpenTransaction, Sessions, SessionsReport};
pub use transaction::{IsolationLevel, Transaction, TxOptions};

pub use tokio_postgres;
pub use tokio_postgres::types::{FromSql, ToSql};
pub use tokio_postgres::{Row, error::SqlState};

/// The README's examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
