//! The pooled connection type and the bb8 manager that makes and vets it.
//!
//! Each connection carries its transaction state. bb8 asks
//! [`ManageConnection::has_broken`] when a connection comes back; anything but
//! [`ConnState::Idle`] — in a transaction, aborted, or with a BEGIN / COMMIT /
//! ROLLBACK / SAVEPOINT cut off mid-flight — makes bb8 discard the connection
//! (closing it makes the server roll back), so a dirty connection is never
//! handed to another user.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use crate::engine::Counters;

/// The transaction state of a pooled connection, as pgassist knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum ConnState {
    /// Autocommit, no transaction open: the only state fit for the pool.
    Idle = 0,
    /// Taken out of autocommit by a transaction (BEGIN sent or about to be).
    InTransaction = 1,
    /// A statement failed inside the transaction: only a rollback is possible.
    Aborted = 2,
}

impl ConnState {
    fn from_u8(v: u8) -> ConnState {
        match v {
            0 => ConnState::Idle,
            1 => ConnState::InTransaction,
            _ => ConnState::Aborted,
        }
    }
}

/// A connection's state cell, shared with the per-transaction connection map.
#[derive(Debug, Default)]
pub(crate) struct StateCell(AtomicU8);

impl StateCell {
    pub(crate) fn get(&self) -> ConnState {
        ConnState::from_u8(self.0.load(Ordering::Acquire))
    }
    pub(crate) fn set(&self, s: ConnState) {
        self.0.store(s as u8, Ordering::Release);
    }
}

/// A pooled tokio-postgres client with its state and statement cache.
pub struct PgConn {
    pub(crate) client: Client,
    pub(crate) state: Arc<StateCell>,
    pub(crate) id: u64,
    /// The server process serving this connection (`pg_backend_pid()`).
    pub(crate) backend_pid: i32,
    cache: Mutex<StatementCache>,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn")
            .field("id", &self.id)
            .field("backend_pid", &self.backend_pid)
            .field("state", &self.state.get())
            .finish_non_exhaustive()
    }
}

/// What a statement should return.
#[derive(Clone, Copy)]
pub(crate) enum Op {
    Query,
    One,
    Opt,
    Execute,
}

/// The result of an [`Op`].
pub(crate) enum Out {
    Rows(Vec<Row>),
    Row(Row),
    MaybeRow(Option<Row>),
    Count(u64),
}

impl PgConn {
    /// Runs one statement through the statement cache.
    ///
    /// `may_replan`: outside a transaction, a cached plan invalidated by a
    /// schema change (SQLSTATE 0A000, "cached plan must not change result
    /// type") is evicted and the statement prepared and run once more.
    /// Inside a transaction that error has already aborted it, so it is
    /// surfaced (the entry is still evicted for the next transaction).
    pub(crate) async fn run(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        op: Op,
        may_replan: bool,
    ) -> Result<Out, tokio_postgres::Error> {
        let stmt = self.prepared(sql).await?;
        match self.exec(&stmt, params, op).await {
            Err(e) if is_stale_plan(&e) => {
                self.forget(sql);
                if !may_replan {
                    return Err(e);
                }
                let stmt = self.prepared(sql).await?;
                self.exec(&stmt, params, op).await
            }
            other => other,
        }
    }

    async fn exec(
        &self,
        stmt: &Statement,
        params: &[&(dyn ToSql + Sync)],
        op: Op,
    ) -> Result<Out, tokio_postgres::Error> {
        Ok(match op {
            Op::Query => Out::Rows(self.client.query(stmt, params).await?),
            Op::One => Out::Row(self.client.query_one(stmt, params).await?),
            Op::Opt => Out::MaybeRow(self.client.query_opt(stmt, params).await?),
            Op::Execute => Out::Count(self.client.execute(stmt, params).await?),
        })
    }

    /// The cached prepared statement for `sql`, preparing it on a miss.
    async fn prepared(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(stmt) = self.cache.lock().expect("statement cache").get(sql) {
            return Ok(stmt);
        }
        let stmt = self.client.prepare(sql).await?;
        self.cache
            .lock()
            .expect("statement cache")
            .insert(sql, stmt.clone());
        Ok(stmt)
    }

    fn forget(&self, sql: &str) {
        self.cache.lock().expect("statement cache").remove(sql);
    }
}

fn is_stale_plan(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED
            && db.message().contains("cached plan")
    })
}

/// A small LRU of prepared statements keyed by SQL text.
///
/// Eviction scans for the least recently used entry, which only happens on
/// a miss with a full cache; hits cost one hash lookup.
struct StatementCache {
    capacity: usize,
    tick: u64,
    map: HashMap<Box<str>, (Statement, u64)>,
}

impl StatementCache {
    fn new(capacity: usize) -> Self {
        StatementCache {
            capacity,
            tick: 0,
            map: HashMap::with_capacity(capacity.min(64)),
        }
    }

    fn get(&mut self, sql: &str) -> Option<Statement> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(sql).map(|(stmt, used)| {
            *used = tick;
            stmt.clone()
        })
    }

    fn insert(&mut self, sql: &str, stmt: Statement) {
        if self.capacity == 0 {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(sql) {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.map.remove(&k);
            }
        }
        self.tick += 1;
        self.map.insert(sql.into(), (stmt, self.tick));
    }

    fn remove(&mut self, sql: &str) {
        self.map.remove(sql);
    }
}

/// bb8 manager: connects through bb8-postgres and wraps the client.
pub struct Manager {
    inner: PostgresConnectionManager<NoTls>,
    statement_cache: usize,
    counters: Arc<Counters>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // bb8-postgres' own Debug prints tokio-postgres' Config, which redacts the password.
        f.debug_struct("Manager")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Manager {
    pub(crate) fn new(
        pg: tokio_postgres::Config,
        statement_cache: usize,
        counters: Arc<Counters>,
    ) -> Self {
        Manager {
            inner: PostgresConnectionManager::new(pg, NoTls),
            statement_cache,
            counters,
            next_id: AtomicU64::new(1),
        }
    }
}

/// Asks the server for its process id once per connection (one round trip
/// at connect time), for reports and for debugging fork and pool problems.
async fn backend_pid(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let messages = client.simple_query("SELECT pg_backend_pid()").await?;
    Ok(messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or(0))
}

impl bb8::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PgConn, tokio_postgres::Error> {
        let client = self.inner.connect().await?;
        let backend_pid = backend_pid(&client).await?;
        Ok(PgConn {
            client,
            backend_pid,
            state: Arc::new(StateCell::default()),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cache: Mutex::new(StatementCache::new(self.statement_cache)),
        })
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), tokio_postgres::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        if conn.client.is_closed() {
            return true;
        }
        if conn.state.get() != ConnState::Idle {
            self.counters
                .discarded_dirty
                .fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_cell_round_trips() {
        let c = StateCell::default();
        assert_eq!(c.get(), ConnState::Idle);
        for s in [
            ConnState::InTransaction,
            ConnState::Aborted,
            ConnState::Idle,
        ] {
            c.set(s);
            assert_eq!(c.get(), s);
        }
    }
}
