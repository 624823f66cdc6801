//! Pinned connections: one pooled connection held in autocommit for
//! session-scoped work, and row streams that hold a connection only while
//! they run.
//!
//! Autocommit sessions refuse statements that change session state (see
//! [the policy](crate#session-state)), because the connection goes to
//! someone else right after. Work that needs the session — advisory locks,
//! temporary tables, `SET`, `LISTEN`, a migration tool, COPY — takes a
//! [`Pinned`] connection from [`Session::pin`](crate::Session::pin)
//! instead: everything runs on one connection until the `Pinned` is
//! dropped. Then the connection is reset (`RESET ALL`, `UNLISTEN *`,
//! advisory locks released, temporary objects dropped, cursors closed)
//! before anyone else gets it, or discarded if that fails.
//!
//! Transaction control sent as SQL stays refused (the pool must know when
//! a connection is inside a transaction); a batch that opened one through
//! SQL the text check could not see is caught by the server-side probe and
//! its connection discarded.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;

use tokio_postgres::types::{BorrowToSql, ToSql, Type};
use tokio_postgres::{Row, SimpleQueryMessage, Statement};

use super::engine::Engine;
use super::session::{noting_lsn, run_noting_lsn};
use super::sessions::{PinnedLink, ScopeRef};
use crate::error::{Error, Result};
use crate::pool::Conn;
use crate::pool::manager::{ConnParts, Execute, Op, Opt, Query};
use crate::pool::state::{ConnState, Event};
use crate::pool::stream::{CopyIn, CopyOut, RowStream};
use crate::sql::control::{reject_control_in_batch, reject_transaction_control};
use crate::tx::Observer;
use crate::tx::options::TxOptions;
use crate::tx::retry;
use crate::tx::sql;
use crate::tx::transaction::{Transaction, TxConn};

/// One pooled connection held for session-scoped work, in autocommit.
///
/// Made by [`Session::pin`](crate::Session::pin). Session state is allowed
/// here (`SET`, `CREATE TEMP TABLE`, `LISTEN`, `pg_advisory_lock`, SQL
/// `PREPARE` …) and lasts until the `Pinned` is dropped; the connection is
/// then reset before it returns to the pool, so nothing reaches its next
/// user. Dropping it at any await (a cancelled request) is safe: whatever
/// was in flight is answered before the reset runs.
///
/// Besides [`Queryable`](crate::Queryable) it offers the driver's own
/// surface: [`Pinned::query_raw`] (a stream of rows), [`Pinned::copy_in`] /
/// [`Pinned::copy_out`] (text or binary COPY), [`Pinned::prepare_typed`]
/// with [`Pinned::query_prepared`], and [`Pinned::simple_query`].
///
/// ```no_run
/// # async fn demo(session: pgassist::Session) -> Result<(), pgassist::Error> {
/// let pinned = session.pin().await?;
/// pinned.query("SELECT pg_advisory_lock(42)", &[]).await?;
/// pinned.batch_execute("CREATE TEMP TABLE scratch (id int)").await?;
/// // … work that relies on the lock and the temp table …
/// drop(pinned); // lock released, table dropped, connection back to the pool
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Pinned {
    /// `Some` until dropped (see the `Drop` impl).
    conn: Option<Conn>,
    engine: Engine,
    /// Held by a transaction begun on this connection until it is done
    /// with it (its drop-path ROLLBACK answered included): every use of
    /// the connection waits for it first, so nothing of ours goes out
    /// while the server may still be inside that transaction.
    lent: Arc<tokio::sync::Mutex<()>>,
    /// Set when pinned from a session of a [`crate::Sessions`] container:
    /// the request this connection's work belongs to.
    scope: Option<ScopeRef>,
    /// With a scope: the request's link to this connection, alive as long
    /// as this `Pinned` (see `PinnedLink`).
    link: Option<Arc<PinnedLink>>,
}

impl Pinned {
    /// Takes `conn` for session work: flagged at once, so it is reset when
    /// it goes back, whatever ran on it. With a `scope`, tied to that
    /// request (see [`crate::Session::pin`]).
    pub(crate) fn new(engine: Engine, conn: Conn, scope: Option<ScopeRef>) -> Result<Pinned> {
        if engine.pool().config().is_pgbouncer() {
            return Err(Error::Usage(format!(
                "engine `{}`: a pinned connection needs a server session of its own, which \
                 PgBouncer's transaction pooling does not give; connect this engine directly",
                engine.name()
            )));
        }
        let _ = conn.state.apply(Event::SessionChanged);
        let link = scope.as_ref().map(|scope| scope.pinned(conn.share()));
        Ok(Pinned {
            conn: Some(conn),
            engine,
            lent: Arc::default(),
            scope,
            link,
        })
    }

    /// Waits until a transaction begun on this connection is done with it,
    /// and checks that the connection is in autocommit: a transaction whose
    /// end the server did not confirm leaves it unusable (and it is
    /// discarded when this `Pinned` is dropped).
    ///
    /// Refuses everything once the request this connection was pinned in
    /// has ended ([`Error::Closed`]).
    async fn settle(&self) -> Result<()> {
        if let Some(scope) = &self.scope {
            scope.touch(self.engine.name())?;
        }
        if self.lent.try_lock().is_err() {
            drop(self.lent.lock().await);
        }
        match self.conn().state.get() {
            ConnState::Idle => Ok(()),
            state => Err(Error::Closed {
                engine: self.engine.name().to_owned(),
                reason: format!(
                    "the pinned connection is unusable ({state:?}): a transaction on it did \
                     not end cleanly, or the connection broke; drop it and pin another"
                ),
            }),
        }
    }

    /// Begins a transaction on this connection, with the server's default
    /// options: see [`Pinned::begin_with`].
    pub async fn begin(&mut self) -> Result<Transaction<'_>> {
        self.begin_with(TxOptions::new()).await
    }

    /// Begins a transaction on this connection. It is an ordinary
    /// [`Transaction`] — lazy BEGIN, savepoints, the same end path and
    /// state machine as one begun by [`Session::begin`](crate::Session::begin)
    /// — that borrows this `Pinned` mutably, so the connection cannot be
    /// used beside it. After `commit()`, `rollback()` or a drop, the
    /// connection is back in autocommit and still pinned: session state
    /// (temporary tables, advisory locks, settings) is kept. A transaction
    /// dropped unfinished is rolled back at once on a spawned task, and
    /// this `Pinned` waits for that ROLLBACK's answer before its next use
    /// (dropped itself, it returns the connection once the answer came, so
    /// the pool keeps it rather than discarding it).
    ///
    /// ```no_run
    /// # async fn demo(session: pgassist::Session) -> Result<(), pgassist::Error> {
    /// let mut pinned = session.pin().await?;
    /// pinned.batch_execute("CREATE TEMP TABLE staging (id int)").await?;
    /// let tx = pinned.begin().await?;
    /// tx.execute("INSERT INTO staging VALUES (1)", &[]).await?;
    /// tx.commit().await?;
    /// pinned.query("SELECT * FROM staging", &[]).await?; // same session
    /// # Ok(()) }
    /// ```
    ///
    /// While the transaction is open, the pinned connection cannot be used:
    ///
    /// ```compile_fail,E0502
    /// # async fn demo(session: pgassist::Session) -> Result<(), pgassist::Error> {
    /// let mut pinned = session.pin().await?;
    /// let tx = pinned.begin().await?;
    /// pinned.query("SELECT 1", &[]).await?; // error: `pinned` is borrowed by `tx`
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn begin_with(&mut self, options: TxOptions) -> Result<Transaction<'_>> {
        self.begin_lent(options, 1).await
    }

    async fn begin_lent(&mut self, options: TxOptions, attempt: u32) -> Result<Transaction<'_>> {
        self.settle().await?;
        let until_ended = self.lent.clone().lock_owned().await;
        // Inside a request, the transaction reports to it as a session's
        // does: its statements, and its commit's WAL position.
        let observer = self.scope.as_ref().map(|scope| {
            Box::new(scope.reporter(self.engine.inner.has_replicas)) as Box<dyn Observer>
        });
        Transaction::start(
            self.engine.env(),
            TxConn::lent(self.conn().share(), until_ended),
            options,
            attempt,
            observer,
        )
    }

    /// Runs `f` in a transaction on this connection: commit on `Ok`, roll
    /// back on `Err`, retrying serialization failures and deadlocks as
    /// [`TxOptions::retries`] allows — the closure form of
    /// [`Pinned::begin_with`], as [`Session::transaction`](crate::Session::transaction)
    /// is of `Session::begin_with`. Session state survives every attempt.
    ///
    /// ```no_run
    /// # async fn demo(session: pgassist::Session) -> Result<(), pgassist::Error> {
    /// use pgassist::TxOptions;
    /// let mut pinned = session.pin().await?;
    /// let n: i64 = pinned
    ///     .transaction(TxOptions::new().retries(3), |tx| {
    ///         Box::pin(async move {
    ///             tx.execute("INSERT INTO items(name) VALUES ('x')", &[]).await?;
    ///             Ok::<_, pgassist::Error>(tx.query_one("SELECT count(*) FROM items", &[]).await?.get(0))
    ///         })
    ///     })
    ///     .await?;
    /// # let _ = n; Ok(()) }
    /// ```
    pub async fn transaction<T, E, F>(
        &mut self,
        options: TxOptions,
        f: F,
    ) -> std::result::Result<T, E>
    where
        F: for<'t> FnMut(&'t mut Transaction<'_>) -> BoxFuture<'t, std::result::Result<T, E>>,
        E: From<Error>,
    {
        retry::transaction(self, options, f).await
    }

    fn conn(&self) -> &Conn {
        self.conn
            .as_ref()
            .expect("a pinned connection until dropped")
    }

    /// The engine this connection belongs to.
    pub fn engine_name(&self) -> &str {
        self.engine.name()
    }

    /// The server process serving this connection (`pg_backend_pid()`).
    pub fn backend_pid(&self) -> i32 {
        self.conn().backend_pid
    }

    fn error(&self, e: tokio_postgres::Error) -> Error {
        self.conn().vet(&e);
        Error::from_pg(self.engine.name(), e)
    }

    /// The request scope, if this connection's writes must be noted for
    /// its reads on replicas (a primary with replicas).
    fn lsn_scope(&self) -> Option<&ScopeRef> {
        self.scope
            .as_ref()
            .filter(|_| self.engine.inner.has_replicas)
    }

    /// Counts a statement that began at `started` in the request's report.
    fn record(&self, started: Instant) {
        if let Some(scope) = &self.scope {
            scope.record(self.conn().backend_pid, started.elapsed());
        }
    }

    /// Runs the (not yet polled) future `start`, which sends `sql` and
    /// returns a handle on its answer (a COPY), as a statement of this
    /// connection: checked, counted, reported to the request.
    async fn start<T>(
        &self,
        sql: &str,
        start: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        reject_transaction_control(sql)?;
        self.settle().await?;
        self.engine.pool().counters().inc(|c| &c.statements);
        let started = Instant::now();
        let out = start.await;
        self.record(started);
        out.map_err(|e| self.error(e))
    }

    async fn run<O: Op>(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<O::Out> {
        reject_transaction_control(sql)?;
        self.settle().await?;
        self.engine.pool().counters().inc(|c| &c.statements);
        let started = Instant::now();
        let out = match self.lsn_scope() {
            Some(scope) => run_noting_lsn::<O>(self.conn(), scope, sql, params).await,
            None => self.conn().run::<O>(sql, params, true).await,
        };
        self.record(started);
        self.conn().after_session_statement(sql);
        out.map_err(|e| Error::from_pg(self.engine.name(), e))
    }

    /// Runs a statement and returns its rows.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.run::<Query>(sql, params).await
    }

    /// Runs a statement that must return exactly one row.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        crate::error::exactly_one(self.engine.name(), self.run::<Opt>(sql, params).await?)
    }

    /// Runs a statement that returns at most one row.
    pub async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        self.run::<Opt>(sql, params).await
    }

    /// Runs a statement and returns the number of rows it affected.
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.run::<Execute>(sql, params).await
    }

    /// Runs one or more statements without parameters (simple protocol).
    pub async fn batch_execute(&self, sql: &str) -> Result<()> {
        self.simple_query(sql).await.map(drop)
    }

    /// Runs statements without parameters (simple protocol) and returns the
    /// server's messages, rows as text. Transaction control is refused, as
    /// in a session's batch, and backed by the same server-side probe.
    pub async fn simple_query(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>> {
        reject_control_in_batch(sql)?;
        self.settle().await?;
        self.engine.pool().counters().inc(|c| &c.statements);
        let started = Instant::now();
        let batch = probed_simple_query(self.engine.name(), self.conn(), sql);
        let out = match self.lsn_scope() {
            Some(scope) => noting_lsn(self.conn(), scope, batch).await,
            None => batch.await,
        };
        self.record(started);
        self.conn().after_session_statement(sql);
        out
    }

    /// Prepares a statement with explicit parameter types (an empty slice
    /// lets the server infer them), for [`Pinned::query_prepared`] and
    /// [`Pinned::query_raw_prepared`] on this connection.
    pub async fn prepare_typed(&self, sql: &str, types: &[Type]) -> Result<Statement> {
        reject_transaction_control(sql)?;
        self.settle().await?;
        self.conn()
            .client
            .prepare_typed(sql, types)
            .await
            .map_err(|e| self.error(e))
    }

    /// Runs a statement prepared by [`Pinned::prepare_typed`].
    pub async fn query_prepared(
        &self,
        statement: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        self.settle().await?;
        self.engine.pool().counters().inc(|c| &c.statements);
        let started = Instant::now();
        let rows = self.conn().client.query(statement, params);
        let out = match self.lsn_scope() {
            Some(scope) => noting_lsn(self.conn(), scope, rows).await,
            None => rows.await,
        };
        self.record(started);
        out.map_err(|e| self.error(e))
    }

    /// Runs a statement and streams its rows as the server sends them, so
    /// a result of any size runs in bounded memory. The stream borrows this
    /// connection mutably, as a transaction's does: a statement awaited on
    /// the same connection while rows are still unread would wait for ever
    /// behind them, so that does not compile. Dropping the stream early is
    /// safe (the rest is discarded).
    ///
    /// ```compile_fail,E0499
    /// # use futures::StreamExt;
    /// # async fn demo(session: pgassist::Session) -> Result<(), pgassist::Error> {
    /// let mut pinned = session.pin().await?;
    /// let mut rows = pinned.query_raw("SELECT 1", std::iter::empty::<i32>()).await?;
    /// pinned.query("SELECT 2", &[]).await?; // error: `pinned` is borrowed by `rows`
    /// rows.next().await;
    /// # Ok(()) }
    /// ```
    pub async fn query_raw<P, I>(&mut self, sql: &str, params: I) -> Result<RowStream<'_>>
    where
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        reject_transaction_control(sql)?;
        self.settle().await?;
        let statement = self
            .conn()
            .statement(sql)
            .await
            .map_err(|e| self.error(e))?;
        self.query_raw_prepared(&statement, params).await
    }

    /// [`Pinned::query_raw`] for a statement prepared on this connection.
    pub async fn query_raw_prepared<P, I>(
        &mut self,
        statement: &Statement,
        params: I,
    ) -> Result<RowStream<'_>>
    where
        P: BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        self.settle().await?;
        self.engine.pool().counters().inc(|c| &c.statements);
        let started = Instant::now();
        let rows = self.conn().client.query_raw(statement, params).await;
        self.record(started);
        let rows = rows.map_err(|e| self.error(e))?;
        let conn = self.conn();
        Ok(RowStream::borrowed(
            rows,
            self.engine.name(),
            Box::new(move |e| conn.vet(e)),
        ))
    }

    /// Starts `COPY … FROM STDIN` (text, CSV or binary, as `sql` says):
    /// write the data into the returned [`CopyIn`] — the same sink as
    /// [`Transaction::copy_in`]'s — and [`CopyIn::finish`] it for the
    /// number of rows. The sink borrows this connection mutably: nothing
    /// else can be sent on it while the COPY runs (the server would answer
    /// nothing), and the connection cannot go back to the pool mid-COPY. A
    /// sink dropped unfinished aborts the COPY (nothing of it is kept) and
    /// the connection serves the next statement.
    ///
    /// Inside a request with replicas, the COPY's rows are not noted for
    /// read-your-writes (a statement or batch is): run it in a
    /// [`Pinned::begin`] transaction, whose commit is.
    pub async fn copy_in<T>(&mut self, sql: &str) -> Result<CopyIn<'_, T>>
    where
        T: bytes::Buf + 'static + Send,
    {
        let sink = self.start(sql, self.conn().client.copy_in(sql)).await?;
        let conn = self.conn();
        Ok(CopyIn::new(
            sink,
            self.engine.name(),
            Box::new(move |e| conn.vet(e)),
            // The driver sends CopyFail and Sync for the dropped sink ahead
            // of anything sent later: the server fails the COPY and is
            // ready for the next statement, in autocommit.
            Box::new(|| {}),
        ))
    }

    /// Starts `COPY … TO STDOUT` (text, CSV or binary): a stream of data
    /// chunks, the same [`CopyOut`] as [`Transaction::copy_out`]'s. It
    /// borrows this connection mutably, as the sink of [`Pinned::copy_in`]
    /// does; dropping it early is safe (the rest is discarded).
    pub async fn copy_out(&mut self, sql: &str) -> Result<CopyOut<'_>> {
        let data = self.start(sql, self.conn().client.copy_out(sql)).await?;
        let conn = self.conn();
        Ok(CopyOut::new(
            data,
            self.engine.name(),
            Box::new(move |e| conn.vet(e)),
        ))
    }
}

impl Drop for Pinned {
    /// Returns the connection to the pool (which resets it) — once a
    /// transaction begun on it is done with it: a `Pinned` dropped right
    /// after its transaction (a cancelled request) would otherwise hand
    /// back a connection whose drop-path ROLLBACK is still in flight, and
    /// the pool would discard it.
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            link.release();
        }
        let Some(conn) = self.conn.take() else {
            return;
        };
        if self.lent.try_lock().is_ok() {
            return drop(conn);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return drop(conn);
        };
        let lent = self.lent.clone();
        runtime.spawn(async move {
            drop(lent.lock().await);
            drop(conn);
        });
    }
}

/// Each attempt of [`Pinned::transaction`] begins on the pinned connection.
impl retry::Begin for Pinned {
    fn begin_attempt(
        &mut self,
        options: TxOptions,
        attempt: u32,
    ) -> impl std::future::Future<Output = Result<Transaction<'_>>> + Send {
        self.begin_lent(options, attempt)
    }
}

crate::sql::queryable::delegate_queryable!(Pinned);

/// Runs a simple-protocol batch with the transaction-status probe pipelined
/// behind it (no extra round trip): a batch that left its connection inside
/// a transaction — through SQL the text check could not see — gets an
/// error, and the connection is marked broken (the pool discards it, which
/// makes the server roll back).
pub(crate) async fn probed_simple_query(
    engine: &str,
    conn: &ConnParts,
    sql: &str,
) -> Result<Vec<SimpleQueryMessage>> {
    let client = &conn.client;
    // A batch dropped while the server runs it is cancelled (see
    // `ConnParts::cancel_if_dropped`): callers hold the connection alone.
    let cancel = conn.cancel_if_dropped();
    let (batch, probe) = futures::future::join(
        client.simple_query(sql),
        client.simple_query(sql::STATUS_PROBE),
    )
    .await;
    cancel.disarm();
    let in_block = match &probe {
        Ok(messages) => sql::probe_says_in_block(messages) != Some(false),
        Err(e) => {
            conn.vet(e);
            e.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
        }
    };
    if in_block {
        conn.state.mark_broken();
    }
    let messages = batch.map_err(|e| {
        conn.vet(&e);
        Error::from_pg(engine, e)
    })?;
    if in_block {
        return Err(Error::Usage(format!(
            "engine `{engine}`: the batch left its connection inside a transaction (a transaction \
             control statement the text check did not recognise); the connection was \
             discarded, which rolled it back: use session.begin()"
        )));
    }
    Ok(messages)
}
