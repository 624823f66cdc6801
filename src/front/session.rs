//! The autocommit session: every statement checks out a connection, runs,
//! and gives it back. No BEGIN is ever sent unless a transaction is asked for.

use futures::future::BoxFuture;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::engine::Engine;
use super::pinned::{Pinned, probed_simple_query};
use super::replica::Target;
use super::sessions::ScopeRef;
use crate::error::{Error, Result};
use crate::pool::Lease;
use crate::pool::manager::{ConnParts, Execute, Op, Opt, Params, Query};
use crate::pool::stream::RowStream;
use crate::sql::control::{
    check_autocommit, check_autocommit_session_in_batch, reject_control_in_batch,
};
use crate::sql::lsn::{INSERT_LSN_SQL, first_lsn};
use crate::tx::options::TxOptions;
use crate::tx::transaction::Transaction;
use crate::tx::{Observer, retry};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A handle for running statements on one engine.
///
/// Holds no connection between statements: two sessions on a pool of one
/// connection can interleave freely. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Session {
    engine: Engine,
    /// Set for sessions handed out by a [`crate::Sessions`] container.
    scope: Option<ScopeRef>,
}

impl Session {
    pub(crate) fn new(engine: Engine) -> Session {
        Session {
            engine,
            scope: None,
        }
    }

    pub(crate) fn scoped(engine: Engine, scope: ScopeRef) -> Session {
        Session {
            engine,
            scope: Some(scope),
        }
    }

    /// A value from the request's info stash, for sessions handed out by a
    /// [`crate::Sessions`] container (`None` otherwise).
    pub fn info<T: std::any::Any + Send + Sync>(&self) -> Option<std::sync::Arc<T>> {
        self.scope.as_ref().and_then(ScopeRef::info)
    }

    /// In transaction-per-request mode, the request's transaction on this
    /// engine (begun on first use); otherwise `None`.
    async fn request_tx(&self) -> Result<Option<std::sync::Arc<Transaction<'static>>>> {
        let Some(scope) = &self.scope else {
            return Ok(None);
        };
        scope.touch(self.engine.name())?;
        if scope.per_request_tx().is_none() {
            return Ok(None);
        }
        scope.request_tx(self).await.map(Some)
    }

    /// The engine this session runs on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine's name.
    pub fn engine_name(&self) -> &str {
        self.engine.name()
    }

    /// Runs one statement. Without the `tracing` feature this adds no
    /// layer of its own: each layer would move the statement's future once
    /// more.
    fn run<O: Op>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<O::Out>> + Send {
        #[cfg(feature = "tracing")]
        return crate::telemetry::statement(
            self.engine.pool().telemetry(),
            None,
            sql,
            self.run_untraced::<O>(sql, params),
        );
        #[cfg(not(feature = "tracing"))]
        self.run_untraced::<O>(sql, params)
    }

    async fn run_untraced<O: Op>(&self, sql: &str, params: Params<'_>) -> Result<O::Out> {
        // Transaction control and session-state statements are refused;
        // calls that may change session state unseen run on a connection
        // flagged for a reset.
        let flagged = check_autocommit(sql)?;
        // The common case first: a plain engine, no request scope.
        if self.scope.is_none() && self.engine.primary().is_none() && !flagged {
            let conn = self.engine.lease().await?;
            self.engine.pool().counters().inc(|c| &c.statements);
            return conn
                .run::<O>(sql, params, true)
                .await
                .map_err(|e| Error::from_pg(self.engine.name(), e));
        }
        self.run_routed::<O>(sql, params, flagged).await
    }

    /// A connection for one autocommit statement; `flagged`: one of its
    /// own, reset before its next user (see [`crate::pool::Pool::lease_flagged`]).
    async fn lease_for(&self, flagged: bool) -> Result<Lease> {
        if flagged {
            self.engine.pool().lease_flagged().await
        } else {
            self.engine.lease().await
        }
    }

    /// A statement of a request scope (maybe in the request's
    /// transaction), or on a replica (maybe falling back to the primary).
    async fn run_routed<O: Op>(
        &self,
        sql: &str,
        params: Params<'_>,
        flagged: bool,
    ) -> Result<O::Out> {
        if self.scope.is_some() {
            if let Some(tx) = self.request_tx().await? {
                return tx.run_op::<O>(sql, params).await;
            }
        }
        self.routed(|s| async move { s.run_here::<O>(sql, params, flagged).await })
            .await
    }

    /// The routing decision for every kind of autocommit statement (single
    /// statements and batches alike) and for BEGIN: on a replica, `here`
    /// runs on a member of its group that has replayed what this request
    /// wrote (or on its primary); elsewhere, on this session's own engine.
    ///
    /// A member found unreachable (connection error, pool timeout) is
    /// marked down and `here` runs again on another member, then on the
    /// primary's read-only pool (`replica_fallback`). Safe because nothing
    /// routed here can have written: an autocommit statement on a replica
    /// runs on a standby (in recovery, a member found not in recovery gets
    /// no reads) or on a read-only pool, and a BEGIN that failed had only
    /// reached the checkout. Never a retry for any other error.
    async fn routed<T, F, Fut>(&self, here: F) -> Result<T>
    where
        F: Fn(Session) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let Some(primary) = self.engine.primary() else {
            return here(self.clone()).await;
        };
        let required = self
            .scope
            .as_ref()
            .map_or(0, |s| s.required_lsn(self.engine.primary_index()));
        // Members that failed this read, and the last failure. Each pass
        // marks one more member down, so the choice soon turns to the
        // primary (or, without `replica_fallback`, back to a member tried:
        // then the error stands).
        let mut tried: Vec<Engine> = Vec::new();
        let mut failure = None;
        loop {
            let member = match self.engine.choose_target(required).await {
                Target::Primary => return here(self.on(primary)).await,
                Target::Replica(member) => member,
            };
            if tried.iter().any(|t| Arc::ptr_eq(&t.inner, &member.inner)) {
                if let Some(e) = failure {
                    return Err(e);
                }
            }
            match here(self.on(&member)).await {
                Err(e) if member.read_failed(&e) => {
                    tried.push(member);
                    failure = Some(e);
                }
                other => return other,
            }
        }
    }

    /// This session's scope, on another engine.
    fn on(&self, engine: &Engine) -> Session {
        Session {
            engine: engine.clone(),
            scope: self.scope.as_ref().map(|s| s.for_index(engine.inner.index)),
        }
    }

    /// Runs one statement on this session's own engine.
    async fn run_here<O: Op>(
        &self,
        sql: &str,
        params: Params<'_>,
        flagged: bool,
    ) -> Result<O::Out> {
        let conn = self.lease_for(flagged).await?;
        self.engine.pool().counters().inc(|c| &c.statements);
        let Some(scope) = &self.scope else {
            return conn
                .run::<O>(sql, params, true)
                .await
                .map_err(|e| Error::from_pg(self.engine.name(), e));
        };
        let started = Instant::now();
        let out = if self.engine.inner.has_replicas {
            run_noting_lsn::<O>(&conn, scope, sql, params).await
        } else {
            conn.run::<O>(sql, params, true).await
        };
        scope.record(conn.backend_pid, started.elapsed());
        out.map_err(|e| Error::from_pg(self.engine.name(), e))
    }

    /// Runs a statement and returns its rows.
    pub fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send {
        self.run::<Query>(sql, params)
    }

    /// Runs a statement that must return exactly one row: no row is
    /// [`Error::NotFound`], more than one [`Error::TooManyRows`].
    pub fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row>> + Send {
        crate::error::one_row(self.engine.name(), self.run::<Opt>(sql, params))
    }

    /// Runs a statement that returns at most one row.
    pub fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>>> + Send {
        self.run::<Opt>(sql, params)
    }

    /// Runs a statement and returns the number of rows it affected.
    pub fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64>> + Send {
        self.run::<Execute>(sql, params)
    }

    /// Runs one or more statements without parameters (simple protocol), in
    /// autocommit. A batch holding a transaction control statement (anywhere
    /// in it, not only first) is refused: use [`Session::begin`]; so is one
    /// holding a statement that changes session state (`SET`, `LISTEN`, …;
    /// see [the policy](crate#session-state)).
    ///
    /// The text check is backed by the server's word: a probe of the
    /// transaction status goes out pipelined behind the batch (no extra
    /// round trip), and a batch that left its connection inside a
    /// transaction — through SQL the text check could not see — gets an
    /// error, and the connection is discarded (the server rolls back).
    pub async fn batch_execute(&self, sql: &str) -> Result<()> {
        reject_control_in_batch(sql)?;
        let flagged = check_autocommit_session_in_batch(sql)?;
        if self.scope.is_some() {
            if let Some(tx) = self.request_tx().await? {
                return tx.batch_execute(sql).await;
            }
        }
        self.routed(|s| async move { s.batch_here(sql, flagged).await })
            .await
    }

    /// Runs a batch on this session's own engine, on a connection held
    /// alone (a dropped batch is cancelled, see `probed_simple_query`). On
    /// a primary with replicas, inside a request scope, the WAL insert
    /// position is read pipelined behind it and noted, as for every other
    /// autocommit write (read-your-writes).
    async fn batch_here(&self, sql: &str, flagged: bool) -> Result<()> {
        let conn = self.engine.checkout().await?;
        if flagged {
            let _ = conn.state.apply(crate::pool::state::Event::SessionChanged);
        }
        self.engine.pool().counters().inc(|c| &c.statements);
        let name = self.engine.name();
        let Some(scope) = self
            .scope
            .as_ref()
            .filter(|_| self.engine.inner.has_replicas)
        else {
            return probed_simple_query(name, &conn, sql).await.map(drop);
        };
        let started = Instant::now();
        let out = noting_lsn(&conn, scope, probed_simple_query(name, &conn, sql)).await;
        scope.record(conn.backend_pid, started.elapsed());
        out.map(drop)
    }

    /// Sends a notification on `channel` with `payload` (`pg_notify`, values
    /// bound as parameters, so any text is safe). Inside the request's
    /// transaction it is delivered when that commits, as NOTIFY is. Receive
    /// with [`Engine::listener`].
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        self.execute("SELECT pg_catalog.pg_notify($1, $2)", &[&channel, &payload])
            .await
            .map(drop)
    }

    /// Holds one connection of this engine for session-scoped work, in
    /// autocommit: session state (`SET`, temporary tables, advisory locks,
    /// `LISTEN`) is allowed there and lasts until the [`Pinned`] is
    /// dropped, when the connection is reset and returned to the pool. Not
    /// routed: a pinned connection is always on this session's own engine.
    ///
    /// Inside a [`crate::Sessions`] container the pinned connection is part
    /// of the request, as this session is: its statements and transactions
    /// count in [`crate::Sessions::report`], its writes are seen by the
    /// request's later reads on replicas (read-your-writes), and it refuses
    /// work once the request has ended, when a transaction still open on it
    /// is rolled back (see [`crate::Sessions::finish`]). It is not part of
    /// a transaction-per-request: a transaction on it is its own.
    pub async fn pin(&self) -> Result<Pinned> {
        if let Some(scope) = &self.scope {
            scope.touch(self.engine.name())?;
        }
        Pinned::new(
            self.engine.clone(),
            self.engine.checkout().await?,
            self.scope.clone(),
        )
    }

    /// Runs a statement and streams its rows as the server sends them, in
    /// bounded memory, on a connection of its own that the stream holds
    /// until it ends or is dropped (it is not routed to a request's
    /// transaction or a replica). The same session-state rules apply as to
    /// [`Session::query`]. In PgBouncer mode ([`crate::EngineConfig::pgbouncer`])
    /// it runs as one unnamed statement, as every statement there does.
    pub async fn query_raw<P, I>(&self, sql: &str, params: I) -> Result<RowStream<'static>>
    where
        P: tokio_postgres::types::BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        // Like every statement of a scoped session: refused once the
        // request has ended.
        if let Some(scope) = &self.scope {
            scope.touch(self.engine.name())?;
        }
        let flagged = check_autocommit(sql)?;
        let conn = self.engine.checkout().await?;
        if flagged {
            let _ = conn.state.apply(crate::pool::state::Event::SessionChanged);
        }
        self.engine.pool().counters().inc(|c| &c.statements);
        let name = self.engine.name();
        let rows = conn.query_raw(sql, params, false).await.map_err(|e| {
            conn.vet(&e);
            Error::from_pg(name, e)
        })?;
        Ok(RowStream::owning(rows, conn, name))
    }

    /// Begins a transaction with the server's default options.
    pub async fn begin(&self) -> Result<Transaction<'static>> {
        self.begin_with(TxOptions::new()).await
    }

    /// Begins a transaction: pins a connection and takes it out of
    /// autocommit. BEGIN (with every option in one statement) goes out
    /// pipelined with the first statement.
    pub async fn begin_with(&self, options: TxOptions) -> Result<Transaction<'static>> {
        self.begin_attempt(options, 1).await
    }

    async fn begin_attempt(
        &self,
        options: TxOptions,
        attempt: u32,
    ) -> Result<Transaction<'static>> {
        if self.scope.is_some() {
            if let Some(tx) = self.request_tx().await? {
                if options.durable {
                    return Err(Error::Usage(format!(
                        "engine `{}`: a durable transaction cannot be nested, and this session runs inside the request's transaction",
                        self.engine.name()
                    )));
                }
                // Inside the request's transaction, a transaction is a savepoint.
                return tx.savepoint().await;
            }
        }
        self.begin_outermost_attempt(options, attempt).await
    }

    /// Begins an outermost transaction, never routed into a request transaction.
    pub(crate) async fn begin_outermost(&self, options: TxOptions) -> Result<Transaction<'static>> {
        self.begin_outermost_attempt(options, 1).await
    }

    async fn begin_outermost_attempt(
        &self,
        options: TxOptions,
        attempt: u32,
    ) -> Result<Transaction<'static>> {
        self.routed(|s| {
            let options = options.clone();
            async move { s.begin_here(options, attempt).await }
        })
        .await
    }

    /// Begins a transaction on this session's own engine.
    async fn begin_here(&self, options: TxOptions, attempt: u32) -> Result<Transaction<'static>> {
        let conn = self.engine.checkout().await?;
        let observer = self.scope.as_ref().map(|scope| {
            Box::new(scope.reporter(self.engine.inner.has_replicas)) as Box<dyn Observer>
        });
        Transaction::start(self.engine.env(), conn.into(), options, attempt, observer)
    }

    /// Runs `f` in a transaction: commit on `Ok`, roll back on `Err`.
    ///
    /// With [`TxOptions::retries`], an attempt that failed with a
    /// serialization failure or deadlock (in a statement or at COMMIT) is
    /// rolled back and `f` runs again after a jittered backoff;
    /// [`Transaction::attempt`] tells which attempt is running. A commit whose
    /// outcome is unknown is never retried.
    ///
    /// ```no_run
    /// # async fn demo(mut writer: pgassist::Session) -> Result<(), pgassist::Error> {
    /// use pgassist::{IsolationLevel, TxOptions};
    /// let id: i64 = writer
    ///     .transaction(TxOptions::new().isolation(IsolationLevel::Serializable).retries(5), |tx| {
    ///         Box::pin(async move {
    ///             let row = tx.query_one("INSERT INTO users(name) VALUES ($1) RETURNING id", &[&"bo"]).await?;
    ///             Ok::<_, pgassist::Error>(row.get(0))
    ///         })
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn transaction<T, E, F>(&self, options: TxOptions, f: F) -> std::result::Result<T, E>
    where
        F: for<'t> FnMut(&'t mut Transaction<'_>) -> BoxFuture<'t, std::result::Result<T, E>>,
        E: From<Error>,
    {
        retry::transaction(&mut &*self, options, f).await
    }
}

crate::sql::queryable::delegate_queryable!(Session);

/// Each attempt of [`Session::transaction`] begins on a connection of its own.
impl<'a> retry::Begin for &'a Session {
    fn begin_attempt(
        &mut self,
        options: TxOptions,
        attempt: u32,
    ) -> impl Future<Output = Result<Transaction<'_>>> + Send {
        let session: &'a Session = self;
        // A `Transaction<'static>`, handed out as one borrowing `self`.
        async move { session.begin_attempt(options, attempt).await }
    }
}

/// Runs a statement on a primary with replicas and records where this
/// request's replicas must have got to (read-your-writes): the WAL
/// insert position read right after it. A cached statement goes out in
/// the first poll, so the position query is pipelined behind it (no
/// extra round trip); otherwise (first use, a re-prepare) it follows.
pub(super) async fn run_noting_lsn<O: Op>(
    conn: &ConnParts,
    scope: &ScopeRef,
    sql: &str,
    params: Params<'_>,
) -> std::result::Result<O::Out, tokio_postgres::Error> {
    let lsn_query = || conn.client.simple_query(INSERT_LSN_SQL);
    let replans = conn.replans.load(Ordering::Relaxed);
    let (out, mut lsn) = if conn.is_cached(sql) {
        let (out, lsn) = futures::future::join(conn.run::<O>(sql, params, true), lsn_query()).await;
        (out, lsn.ok())
    } else {
        (conn.run::<O>(sql, params, true).await, None)
    };
    if out.is_ok() && (lsn.is_none() || conn.replans.load(Ordering::Relaxed) != replans) {
        lsn = lsn_query().await.ok();
    }
    if let Some(lsn) = out
        .is_ok()
        .then(|| lsn.as_deref().and_then(first_lsn))
        .flatten()
    {
        scope.note_lsn(lsn);
    }
    out
}

/// Runs `work` — whose request goes out in its first poll — with the WAL
/// insert position read pipelined behind it (no extra round trip), and
/// notes that position for the request's later reads on replicas
/// (read-your-writes) if `work` succeeded.
pub(super) async fn noting_lsn<T, E>(
    conn: &ConnParts,
    scope: &ScopeRef,
    work: impl Future<Output = std::result::Result<T, E>>,
) -> std::result::Result<T, E> {
    let (out, lsn) = futures::future::join(work, conn.client.simple_query(INSERT_LSN_SQL)).await;
    if out.is_ok() {
        if let Some(lsn) = lsn.ok().as_deref().and_then(first_lsn) {
            scope.note_lsn(lsn);
        }
    }
    out
}
