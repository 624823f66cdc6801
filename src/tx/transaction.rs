//! Opt-in transactions: the guard, its options, savepoints and the drop path.
//!
//! A [`Transaction`] pins one pooled connection for its life. BEGIN is sent
//! lazily, pipelined with the first statement (one round trip saved; a
//! transaction that runs nothing sends nothing). Nested [`Transaction::begin`]
//! is a SAVEPOINT. The connection goes back to the pool only once the server
//! has confirmed COMMIT or ROLLBACK; otherwise it stays marked dirty and the
//! pool discards it (closing it makes the server roll back).
//!
//! Cancellation: every control statement (BEGIN, SAVEPOINT, RELEASE, ROLLBACK
//! TO) runs inside a critical section — a flag set synchronously before the
//! await and cleared after the server answered. A future dropped in between
//! leaves the flag set, and the transaction then refuses everything but a
//! rollback. Statement errors mark the transaction aborted, so `commit()`
//! rolls back and says so; and once a statement's future was dropped before
//! its answer came (an error pgassist could not see), COMMIT is sent as
//! `SELECT 1; COMMIT`: in an aborted transaction the probe fails and COMMIT
//! is skipped, so a COMMIT the server turned into a ROLLBACK is never
//! reported as a success.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use crate::error::{Error, Result, ends_session, is_connection_loss};
use crate::front::engine::{Conn, Engine};
use crate::front::sessions::ScopeRef;
use crate::pool::manager::{ConnState, Execute, One, Op, Opt, Params, Query};
use crate::tx::hooks::{Callback, Outcome, TxEvent, run_after_commit, run_after_rollback};

/// Transaction isolation levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsolationLevel {
    /// READ UNCOMMITTED (PostgreSQL treats it as READ COMMITTED).
    ReadUncommitted,
    /// READ COMMITTED, PostgreSQL's default.
    ReadCommitted,
    /// REPEATABLE READ.
    RepeatableRead,
    /// SERIALIZABLE.
    Serializable,
}

impl IsolationLevel {
    fn sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadUncommitted => "READ UNCOMMITTED",
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

/// How to begin a transaction, all sent in one BEGIN statement.
///
/// ```
/// use pgassist::{IsolationLevel, TxOptions};
/// let opts = TxOptions::new().isolation(IsolationLevel::Serializable).read_only(true).deferrable(true).retries(5);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxOptions {
    isolation: Option<IsolationLevel>,
    read_only: Option<bool>,
    deferrable: Option<bool>,
    pub(crate) retries: u32,
    pub(crate) durable: bool,
}

impl TxOptions {
    /// The server's defaults, no retries.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the isolation level.
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }
    /// READ ONLY (`true`) or READ WRITE (`false`).
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = Some(yes);
        self
    }
    /// DEFERRABLE (meaningful for SERIALIZABLE READ ONLY).
    pub fn deferrable(mut self, yes: bool) -> Self {
        self.deferrable = Some(yes);
        self
    }
    /// For [`crate::Session::transaction`]: how many times to run the closure
    /// again after a serialization failure or deadlock (default 0).
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// Requires an outermost transaction (Django's `atomic(durable=True)`):
    /// beginning it where it would become a savepoint — inside a
    /// transaction-per-request scope — fails with [`Error::Usage`], so a
    /// caller that needs its work committed when it returns can rely on it.
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// The BEGIN statement for these options.
    pub(crate) fn begin_sql(&self) -> Cow<'static, str> {
        if self.isolation.is_none() && self.read_only.is_none() && self.deferrable.is_none() {
            return Cow::Borrowed("BEGIN");
        }
        let mut sql = String::from("BEGIN");
        if let Some(level) = self.isolation {
            sql.push_str(" ISOLATION LEVEL ");
            sql.push_str(level.sql());
        }
        match self.read_only {
            Some(true) => sql.push_str(" READ ONLY"),
            Some(false) => sql.push_str(" READ WRITE"),
            None => {}
        }
        match self.deferrable {
            Some(true) => sql.push_str(" DEFERRABLE"),
            Some(false) => sql.push_str(" NOT DEFERRABLE"),
            None => {}
        }
        Cow::Owned(sql)
    }
}

/// What one outermost transaction shares with its savepoints.
pub(crate) struct TxCore {
    conn: Conn,
    engine: Engine,
    event: TxEvent,
    begin_sql: Cow<'static, str>,
    /// BEGIN has been sent (it goes out with the first statement).
    begun: AtomicBool,
    /// Critical-section flag: a control statement was sent and its answer
    /// not yet seen. Still set after the await means the future was dropped
    /// (or the connection failed): the server state is unknown.
    in_doubt: AtomicBool,
    /// Shallowest savepoint (depth, number) dropped without commit or
    /// rollback; rolled back before the next operation.
    pending_rollback: Mutex<Option<(u32, u32)>>,
    /// Numbers savepoints, so names never repeat within a transaction.
    savepoints: AtomicU32,
    /// A statement failed with 40001 / 40P01: the closure form may retry.
    saw_retryable: AtomicBool,
    /// A statement's future was dropped before its answer came: the server
    /// may have aborted the transaction without our knowing, so COMMIT is
    /// sent behind a probe (`SELECT 1; COMMIT`) that fails in that case.
    statement_cut: AtomicBool,
    /// COMMIT is on the wire. Still set when the transaction is dropped
    /// means its commit future was cut off: the outcome is unknown.
    committing: AtomicBool,
    on_commit: Mutex<Vec<Callback>>,
    attempt: u32,
    /// Savepoints open now.
    depth_now: AtomicU32,
    /// Set once the outermost transaction has ended.
    ended: AtomicBool,
    /// The per-request container this transaction reports to, if any.
    scope: Option<ScopeRef>,
    span: crate::telemetry::TxSpan,
    /// The runtime the transaction began on: the drop path spawns its
    /// ROLLBACK there, from whatever thread the guard is dropped on.
    runtime: Option<tokio::runtime::Handle>,
}

/// `text` as a SQL string literal.
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Sets a flag if dropped while armed: a future cut off between sending its
/// request and reading the answer (diesel-async's critical section, as a
/// guard, so that statements pipelined alongside on `&self` still run).
struct CutOffGuard<'a>(Option<&'a AtomicBool>);

impl<'a> CutOffGuard<'a> {
    fn arm(flag: &'a AtomicBool) -> Self {
        CutOffGuard(Some(flag))
    }
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CutOffGuard<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(true, Ordering::Release);
        }
    }
}

fn savepoint_name(number: u32) -> String {
    format!("pgassist_sp_{number}")
}

impl TxCore {
    /// The transaction id.
    pub(crate) fn id(&self) -> u64 {
        self.event.id
    }

    /// Savepoints open now.
    pub(crate) fn depth_now(&self) -> u32 {
        self.depth_now.load(Ordering::Relaxed)
    }

    /// Whether BEGIN has gone out.
    pub(crate) fn is_begun(&self) -> bool {
        self.begun.load(Ordering::Relaxed)
    }

    /// Whether the outermost transaction is still open.
    pub(crate) fn is_open(&self) -> bool {
        !self.ended.load(Ordering::Relaxed)
    }

    fn name(&self) -> &str {
        &self.event.engine
    }

    fn state(&self) -> ConnState {
        self.conn.state.get()
    }

    fn aborted(&self, reason: &str) -> Error {
        Error::TransactionAborted {
            engine: self.name().to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// Runs a control statement inside the critical section.
    async fn control(&self, sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        let cut_off = CutOffGuard::arm(&self.in_doubt);
        let r = self.conn.client.batch_execute(sql).await;
        cut_off.disarm();
        self.after_control(r)
    }

    /// [`TxCore::control`], returning what the statements returned.
    async fn control_rows(
        &self,
        sql: &str,
    ) -> std::result::Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
        let cut_off = CutOffGuard::arm(&self.in_doubt);
        let r = self.conn.client.simple_query(sql).await;
        cut_off.disarm();
        self.after_control(r)
    }

    /// The server answered a control statement (even with an error): its
    /// state is known, unless the connection itself is gone.
    fn after_control<T>(
        &self,
        r: std::result::Result<T, tokio_postgres::Error>,
    ) -> std::result::Result<T, tokio_postgres::Error> {
        if matches!(&r, Err(e) if is_connection_loss(e)) {
            self.in_doubt.store(true, Ordering::Release);
        }
        r
    }

    /// Classifies a statement error and updates the transaction state.
    fn statement_error(&self, e: tokio_postgres::Error) -> Error {
        if let Some(code) = e.code() {
            self.conn.state.set(ConnState::Aborted);
            if *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
            {
                self.saw_retryable.store(true, Ordering::Release);
            }
        } else if is_connection_loss(&e) {
            self.in_doubt.store(true, Ordering::Release);
        }
        Error::from_pg(self.name(), e)
    }

    /// Checks that the transaction can run something, first rolling back a
    /// savepoint that was dropped unfinished.
    async fn ready(&self) -> Result<()> {
        if self.in_doubt.load(Ordering::Acquire) {
            return Err(self
                .aborted("a transaction control statement was cut off or the connection failed"));
        }
        let pending = self.pending_rollback.lock().expect("pending").take();
        if let Some((_, number)) = pending {
            let sp = savepoint_name(number);
            self.control(&format!(
                "ROLLBACK TO SAVEPOINT {sp}; RELEASE SAVEPOINT {sp}"
            ))
            .await
            .map_err(|e| self.statement_error(e))?;
            self.conn.state.set(ConnState::InTransaction);
        }
        if self.state() == ConnState::Aborted {
            return Err(self.aborted("an earlier statement failed"));
        }
        Ok(())
    }

    /// Refuses BEGIN / COMMIT / ROLLBACK / SAVEPOINT / RELEASE / … sent as a
    /// statement: the server would end or reshape the transaction behind our
    /// back (after a COMMIT, later statements would run in autocommit).
    fn refuse_control(&self, checked: Result<()>) -> Result<()> {
        checked.map_err(|_| {
            Error::Usage(format!(
                "engine `{}`: a transaction control statement cannot run inside a transaction; \
                 use commit() / rollback(), and begin() for a savepoint",
                self.name()
            ))
        })
    }

    async fn run<O: Op>(&self, sql: &str, params: Params<'_>) -> Result<O::Out> {
        self.refuse_control(crate::sql::control::reject_transaction_control(sql))?;
        self.ready().await?;
        self.engine.inner.counters.inc(|c| &c.statements);
        let started = self.scope.as_ref().map(|_| Instant::now());
        let cut_off = CutOffGuard::arm(&self.statement_cut);
        #[cfg(feature = "tracing")]
        let out = crate::telemetry::statement(
            &self.engine,
            Some(&self.span),
            sql,
            self.in_transaction(self.conn.run::<O>(sql, params, false)),
        )
        .await;
        #[cfg(not(feature = "tracing"))]
        let out = self
            .in_transaction(self.conn.run::<O>(sql, params, false))
            .await;
        cut_off.disarm();
        if let (Some(scope), Some(started)) = (&self.scope, started) {
            scope.record(self.conn.backend_pid, started.elapsed());
        }
        out
    }

    /// Runs one statement's (not yet polled) future in the transaction. The
    /// first statement carries the lazy BEGIN: both requests leave in the
    /// same poll, BEGIN first, so the statement runs inside the transaction.
    async fn in_transaction<T>(
        &self,
        statement: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    ) -> Result<T> {
        let result = if self.begun.swap(true, Ordering::AcqRel) {
            statement.await
        } else {
            let (began, result) =
                futures::future::join(self.control(&self.begin_sql), statement).await;
            if let Err(e) = began {
                // The statement may have run outside a transaction: refuse to go on.
                self.in_doubt.store(true, Ordering::Release);
                return Err(Error::from_pg(self.name(), e));
            }
            result
        };
        result.map_err(|e| self.statement_error(e))
    }

    async fn batch(&self, sql: &str) -> Result<()> {
        self.refuse_control(crate::sql::control::reject_control_in_batch(sql))?;
        self.ready().await?;
        self.engine.inner.counters.inc(|c| &c.statements);
        let cut_off = CutOffGuard::arm(&self.statement_cut);
        let r = self
            .in_transaction(self.conn.client.batch_execute(sql))
            .await;
        cut_off.disarm();
        r
    }
}

/// An open transaction or savepoint. See [how transactions work](crate#how-transactions-work) and [the per-request container](crate#the-per-request-container).
///
/// Statements take `&self`, so several can be in flight at once and are
/// pipelined on the one connection. `commit` / `rollback` consume the guard;
/// dropping it unfinished rolls back (a savepoint rolls back to itself before
/// the parent's next operation; an outermost transaction's ROLLBACK is sent
/// at once on a spawned task, and the connection discarded if that fails).
pub struct Transaction<'a> {
    core: Arc<TxCore>,
    depth: u32,
    /// This savepoint's number (0 for the outermost transaction).
    number: u32,
    /// Length of the on-commit queue when this savepoint began.
    mark: usize,
    done: bool,
    _borrow: PhantomData<&'a mut ()>,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let core = self.core();
        f.debug_struct("Transaction")
            .field("engine", &core.name())
            .field("id", &core.event.id)
            .field("depth", &self.depth)
            .field("begun", &core.begun.load(Ordering::Relaxed))
            .field("state", &core.state())
            .finish()
    }
}

impl<'a> Transaction<'a> {
    /// Pins `conn` for a new outermost transaction and records it in the
    /// per-transaction connection map. Nothing is sent yet.
    pub(crate) fn start(
        engine: &Engine,
        conn: Conn,
        options: TxOptions,
        attempt: u32,
        scope: Option<ScopeRef>,
    ) -> Result<Transaction<'a>> {
        let inner = &engine.inner;
        let id = inner.tracker.next_id();
        inner
            .tracker
            .after_begin(id, &inner.name, conn.id, &conn.state)?;
        let event = TxEvent {
            engine: inner.name.clone(),
            id,
            options,
        };
        inner.counters.inc(|c| &c.begun);
        inner.hooks.begin(&event);
        let tx = Transaction {
            core: Arc::new(TxCore {
                conn,
                engine: engine.clone(),
                begin_sql: event.options.begin_sql(),
                event,
                begun: AtomicBool::new(false),
                in_doubt: AtomicBool::new(false),
                pending_rollback: Mutex::new(None),
                savepoints: AtomicU32::new(0),
                saw_retryable: AtomicBool::new(false),
                committing: AtomicBool::new(false),
                statement_cut: AtomicBool::new(false),
                on_commit: Mutex::new(Vec::new()),
                attempt,
                depth_now: AtomicU32::new(0),
                ended: AtomicBool::new(false),
                scope,
                span: crate::telemetry::transaction_span(engine, id),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
            depth: 0,
            number: 0,
            mark: 0,
            done: false,
            _borrow: PhantomData,
        };
        if let Some(scope) = &tx.core.scope {
            scope.register(&tx.core);
        }
        Ok(tx)
    }

    fn core(&self) -> &TxCore {
        &self.core
    }

    /// The engine this transaction runs on.
    pub fn engine_name(&self) -> &str {
        self.core().name()
    }

    /// 0 for the outermost transaction, 1 for its first savepoint, and so on.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// Which attempt this is in [`crate::Session::transaction`] (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.core().attempt
    }

    /// The transaction's id (the key of the per-transaction connection map).
    pub fn id(&self) -> u64 {
        self.core().event.id
    }

    /// Runs one statement in this transaction (for sessions routed into a
    /// request transaction).
    pub(crate) async fn run_op<O: Op>(&self, sql: &str, params: Params<'_>) -> Result<O::Out> {
        self.core().run::<O>(sql, params).await
    }

    pub(crate) fn saw_retryable(&self) -> bool {
        self.core().saw_retryable.load(Ordering::Acquire)
    }

    /// Runs `f` after the outermost COMMIT succeeds, in registration order
    /// with the other commit callbacks (`commit()` returns after they ran).
    /// A rollback drops it; a savepoint rollback drops only the callbacks
    /// registered inside that savepoint, as does a failed retry attempt.
    /// A panicking callback is logged, never turned into a failed commit.
    pub fn on_commit(&self, f: impl FnOnce() + Send + 'static) {
        self.push_callback(Callback::Commit(Box::new(f)));
    }

    /// [`Transaction::on_commit`] for async work: `commit()` awaits the
    /// future `f` returns, in registration order.
    ///
    /// ```no_run
    /// # async fn demo(tx: pgassist::Transaction<'static>) {
    /// tx.on_commit_async(|| Box::pin(async { /* send the welcome mail */ }));
    /// # }
    /// ```
    pub fn on_commit_async(
        &self,
        f: impl FnOnce() -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    ) {
        self.push_callback(Callback::CommitAsync(Box::new(f)));
    }

    /// Runs `f` when the work it was registered with is undone: when this
    /// savepoint (or a savepoint registered inside) rolls back, or when the
    /// outermost transaction rolls back, is dropped, or fails to commit.
    /// Dropped after a successful commit.
    pub fn on_rollback(&self, f: impl FnOnce() + Send + 'static) {
        self.push_callback(Callback::Rollback(Box::new(f)));
    }

    fn push_callback(&self, callback: Callback) {
        self.core()
            .on_commit
            .lock()
            .expect("on_commit")
            .push(callback);
    }

    /// Takes the callbacks registered since this savepoint began.
    fn callbacks_since_mark(&self) -> Vec<Callback> {
        let mut list = self.core().on_commit.lock().expect("on_commit");
        let mark = self.mark.min(list.len());
        list.split_off(mark)
    }

    /// Runs a statement and returns its rows.
    pub fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send {
        self.core().run::<Query>(sql, params)
    }

    /// Runs a statement that must return exactly one row.
    pub fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row>> + Send {
        self.core().run::<One>(sql, params)
    }

    /// Runs a statement that returns at most one row.
    pub fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>>> + Send {
        self.core().run::<Opt>(sql, params)
    }

    /// Runs a statement and returns the number of rows it affected.
    pub fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64>> + Send {
        self.core().run::<Execute>(sql, params)
    }

    /// Runs one or more statements without parameters (simple protocol).
    pub async fn batch_execute(&self, sql: &str) -> Result<()> {
        self.core().batch(sql).await
    }

    /// Opens a savepoint inside this transaction. The returned guard borrows
    /// this one, so the parent cannot be used until the savepoint ends.
    pub async fn begin(&mut self) -> Result<Transaction<'_>> {
        self.savepoint().await
    }

    /// Opens a savepoint without borrowing this guard mutably: for a
    /// transaction shared by a request's sessions (see `Sessions`).
    pub(crate) async fn savepoint<'b>(&self) -> Result<Transaction<'b>> {
        let core = self.core();
        core.ready().await?;
        if !core.engine.inner.tracker.holds(core.event.id, core.conn.id) {
            return Err(Error::Usage(format!(
                "engine `{}`: nested begin on a connection that is not out of autocommit",
                core.name()
            )));
        }
        let number = core.savepoints.fetch_add(1, Ordering::Relaxed) + 1;
        let sql = if core.begun.swap(true, Ordering::AcqRel) {
            format!("SAVEPOINT {}", savepoint_name(number))
        } else {
            format!("{}; SAVEPOINT {}", core.begin_sql, savepoint_name(number))
        };
        core.control(&sql)
            .await
            .map_err(|e| core.statement_error(e))?;
        let mark = core.on_commit.lock().expect("on_commit").len();
        core.depth_now.fetch_add(1, Ordering::Relaxed);
        Ok(Transaction {
            core: self.core.clone(),
            depth: self.depth + 1,
            number,
            mark,
            done: false,
            _borrow: PhantomData,
        })
    }

    /// Commits: COMMIT for the outermost transaction, RELEASE SAVEPOINT for a
    /// savepoint. If a statement failed inside, the work is rolled back and
    /// [`Error::TransactionAborted`] returned — never `Ok`.
    pub async fn commit(mut self) -> Result<()> {
        if self.depth == 0 {
            self.commit_outermost().await
        } else {
            self.release_savepoint().await
        }
    }

    /// Rolls back: ROLLBACK, or ROLLBACK TO SAVEPOINT for a savepoint.
    pub async fn rollback(mut self) -> Result<()> {
        if self.depth == 0 {
            self.rollback_outermost().await;
            Ok(())
        } else {
            self.rollback_savepoint().await
        }
    }

    /// First phase of a two-phase commit: `PREPARE TRANSACTION gid`,
    /// confirmed through `pg_prepared_xacts` in the same round trip (the
    /// server answers a PREPARE of an aborted transaction with a ROLLBACK,
    /// not an error). Returns `None` if the transaction ran nothing (there
    /// is nothing to prepare), else its commit callbacks, to run once the
    /// whole unit of work has committed. The connection goes back clean.
    pub(crate) async fn prepare(mut self, gid: &str) -> Result<Option<Vec<Callback>>> {
        debug_assert_eq!(self.depth, 0, "only an outermost transaction is prepared");
        let core = self.core();
        if let Err(e) = core.ready().await {
            self.rollback_outermost().await;
            return Err(e);
        }
        if !core.begun.load(Ordering::Acquire) {
            let _ = self.finish(Outcome::RolledBack, true);
            return Ok(None);
        }
        let gid = quote_literal(gid);
        let sql = format!(
            "SELECT 1; PREPARE TRANSACTION {gid}; SELECT count(*) FROM pg_prepared_xacts WHERE gid = {gid}"
        );
        match core.control_rows(&sql).await {
            Ok(messages) => {
                let prepared = messages.iter().any(|m| {
                    matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("1"))
                });
                if prepared {
                    Ok(Some(self.finish(Outcome::Prepared, true)))
                } else {
                    let _ = self.finish(Outcome::RolledBack, true);
                    Err(self
                        .core()
                        .aborted("PREPARE TRANSACTION rolled back instead of preparing"))
                }
            }
            Err(e) if is_connection_loss(&e) => {
                let engine = core.name().to_owned();
                let _ = self.finish(Outcome::Unknown, false);
                Err(Error::Closed {
                    engine,
                    reason: format!("connection lost during PREPARE TRANSACTION: {e}"),
                })
            }
            Err(e) => Err(self.refused_at_end(e).await),
        }
    }

    /// The server refused the statement that ends the transaction (COMMIT or
    /// PREPARE TRANSACTION): either its probe found the transaction aborted
    /// (the ending statement was skipped) or the ending statement itself
    /// failed (the server rolled back). Roll back either way (harmless if the
    /// server already did) and say which.
    async fn refused_at_end(&mut self, e: tokio_postgres::Error) -> Error {
        let aborted = e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION);
        self.rollback_outermost().await;
        if aborted {
            self.core()
                .aborted("an earlier statement failed; rolled back")
        } else {
            Error::from_pg(self.core().name(), e)
        }
    }

    /// The engine this transaction runs on.
    pub(crate) fn engine(&self) -> &Engine {
        &self.core().engine
    }

    async fn commit_outermost(&mut self) -> Result<()> {
        let core = self.core();
        if let Err(e) = core.ready().await {
            self.rollback_outermost().await;
            return Err(match e {
                Error::TransactionAborted { .. } => e,
                other => self.core().aborted(&other.to_string()),
            });
        }
        if !core.begun.load(Ordering::Acquire) {
            run_after_commit(self.finish(Outcome::Committed, true)).await;
            return Ok(());
        }
        if core.conn.client.is_closed() {
            // The connection died before COMMIT could be sent (the backend was
            // terminated while idle in the transaction): the server rolled back.
            self.rollback_outermost().await;
            return Err(self.core().aborted(
                "the connection was lost before COMMIT was sent; the server rolled back",
            ));
        }
        // With replicas to keep up with, read the WAL insert position in the
        // same round trip: it covers this commit's record.
        let track_lsn =
            core.scope.is_some() && core.engine.inner.has_replicas.load(Ordering::Relaxed);
        // Every statement error was seen (it marks the transaction aborted),
        // unless a statement was cut off: then COMMIT goes behind a probe
        // that fails in an aborted transaction, so a COMMIT the server would
        // turn into a ROLLBACK is never reported as a success.
        let probe = core.statement_cut.load(Ordering::Acquire);
        let sql = match (probe, track_lsn) {
            (false, false) => "COMMIT",
            (true, false) => "SELECT 1; COMMIT",
            (false, true) => "COMMIT; SELECT pg_current_wal_insert_lsn()::text",
            (true, true) => "SELECT 1; COMMIT; SELECT pg_current_wal_insert_lsn()::text",
        };
        core.committing.store(true, Ordering::Release);
        let committed = if track_lsn {
            core.control_rows(sql)
                .await
                .map(|messages| crate::front::replica::lsn_of(&messages))
        } else {
            core.control(sql).await.map(|()| None)
        };
        core.committing.store(false, Ordering::Release);
        match committed {
            Ok(lsn) => {
                if let (Some(scope), Some(lsn)) = (&core.scope, lsn) {
                    scope.note_lsn(lsn);
                }
                run_after_commit(self.finish(Outcome::Committed, true)).await;
                Ok(())
            }
            // The connection broke, or the server ended the session (FATAL),
            // while COMMIT was in flight: it may have committed.
            Err(e) if is_connection_loss(&e) || ends_session(&e) => {
                let engine = core.name().to_owned();
                let _ = self.finish(Outcome::Unknown, false);
                Err(Error::CommitOutcomeUnknown { engine, source: e })
            }
            Err(e) => Err(self.refused_at_end(e).await),
        }
    }

    /// Sends ROLLBACK if BEGIN went out. A connection that does not confirm
    /// it is discarded, which rolls back on the server as well.
    async fn rollback_outermost(&mut self) {
        let core = self.core();
        let clean = !core.begun.load(Ordering::Acquire) || core.control("ROLLBACK").await.is_ok();
        let _ = self.finish(Outcome::RolledBack, clean);
    }

    async fn release_savepoint(&mut self) -> Result<()> {
        let core = self.core();
        let before = core.ready().await;
        if let Err(e) = before {
            if !matches!(&e, Error::TransactionAborted { .. })
                || core.in_doubt.load(Ordering::Acquire)
            {
                return Err(e);
            }
            self.rollback_savepoint().await?;
            return Err(self
                .core()
                .aborted("a statement in the savepoint failed; rolled back to the savepoint"));
        }
        match core
            .control(&format!(
                "RELEASE SAVEPOINT {}",
                savepoint_name(self.number)
            ))
            .await
        {
            Ok(()) => {
                self.end_savepoint();
                Ok(())
            }
            Err(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) => {
                self.rollback_savepoint().await?;
                Err(self
                    .core()
                    .aborted("a statement in the savepoint failed; rolled back to the savepoint"))
            }
            Err(e) => Err(core.statement_error(e)),
        }
    }

    async fn rollback_savepoint(&mut self) -> Result<()> {
        let core = self.core();
        if core.in_doubt.load(Ordering::Acquire) {
            return Err(core
                .aborted("a transaction control statement was cut off or the connection failed"));
        }
        // Savepoints nested in this one are undone with it.
        core.pending_rollback
            .lock()
            .expect("pending")
            .take_if(|(d, _)| *d > self.depth);
        let sp = savepoint_name(self.number);
        core.control(&format!(
            "ROLLBACK TO SAVEPOINT {sp}; RELEASE SAVEPOINT {sp}"
        ))
        .await
        .map_err(|e| core.statement_error(e))?;
        core.conn.state.set(ConnState::InTransaction);
        run_after_rollback(self.callbacks_since_mark());
        self.end_savepoint();
        Ok(())
    }

    fn end_savepoint(&mut self) {
        self.done = true;
        self.core.depth_now.fetch_sub(1, Ordering::Relaxed);
    }

    /// Ends the outermost transaction: the connection map restores the
    /// connection (or leaves it dirty for the pool to discard), counters and
    /// hooks see the outcome. Returns the registered callbacks: the caller
    /// runs the commit ones after a commit (they may be async).
    #[must_use = "commit callbacks must run after a commit"]
    fn finish(&mut self, outcome: Outcome, clean: bool) -> Vec<Callback> {
        self.done = true;
        let core = self.core();
        core.ended.store(true, Ordering::Relaxed);
        let inner = &core.engine.inner;
        inner.tracker.after_end(core.event.id, clean);
        match outcome {
            Outcome::Committed => inner.counters.inc(|c| &c.committed),
            Outcome::RolledBack => inner.counters.inc(|c| &c.rolled_back),
            Outcome::Unknown => inner.counters.inc(|c| &c.commit_unknown),
            Outcome::Prepared => {}
        }
        inner.hooks.end(&core.event, outcome);
        crate::telemetry::record_outcome(&core.span, outcome);
        let callbacks = std::mem::take(&mut *core.on_commit.lock().expect("on_commit"));
        match outcome {
            Outcome::Committed | Outcome::Prepared => return callbacks,
            Outcome::RolledBack => run_after_rollback(callbacks),
            // Neither committed nor rolled back for sure: run neither kind.
            Outcome::Unknown => drop(callbacks),
        }
        Vec::new()
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let core = self.core.clone();
        if self.depth > 0 {
            core.depth_now.fetch_sub(1, Ordering::Relaxed);
            run_after_rollback(self.callbacks_since_mark());
            let mut pending = core.pending_rollback.lock().expect("pending");
            if pending.is_none_or(|(d, _)| d > self.depth) {
                *pending = Some((self.depth, self.number));
            }
            return;
        }
        if !core.begun.load(Ordering::Acquire) {
            let _ = self.finish(Outcome::RolledBack, true);
            return;
        }
        // Fire the end hooks now; the map entry stays until the server confirms.
        self.done = true;
        core.ended.store(true, Ordering::Relaxed);
        let inner = core.engine.inner.clone();
        // A commit future cut off while COMMIT was on the wire: the server
        // may have committed, so the outcome is unknown, not a rollback.
        let outcome = if core.committing.load(Ordering::Acquire) {
            inner.counters.inc(|c| &c.commit_unknown);
            Outcome::Unknown
        } else {
            inner.counters.inc(|c| &c.rolled_back);
            Outcome::RolledBack
        };
        inner.hooks.end(&core.event, outcome);
        crate::telemetry::record_outcome(&core.span, outcome);
        let callbacks = std::mem::take(&mut *core.on_commit.lock().expect("on_commit"));
        if outcome == Outcome::RolledBack {
            run_after_rollback(callbacks);
        }
        // The runtime the transaction began on, even when dropped on a thread
        // outside it. Entered while spawning: should that runtime be shutting
        // down, the task is dropped at once, its connection goes back to the
        // pool, and the pool may spawn a replacement.
        match core.runtime.clone() {
            Some(rt) => {
                let _entered = rt.enter();
                // Should the task never finish (dropped with its runtime),
                // the guard still ends the entry, dirty.
                let ending = EndGuard {
                    inner: inner.clone(),
                    tx: core.event.id,
                    clean: false,
                };
                rt.spawn(async move {
                    let clean = core.conn.client.batch_execute("ROLLBACK").await.is_ok();
                    ending.end(clean);
                });
            }
            // No runtime to send ROLLBACK on: the pool discards the connection.
            None => inner.tracker.after_end(core.event.id, false),
        }
    }
}

/// Ends a dropped transaction's entry in the connection map when dropped:
/// clean if [`EndGuard::end`] reported the ROLLBACK answered, else dirty (the
/// task carrying it was dropped with a runtime shutting down), so that the
/// pool discards the connection and no entry stays behind.
struct EndGuard {
    inner: Arc<crate::front::engine::EngineInner>,
    tx: u64,
    clean: bool,
}

impl EndGuard {
    fn end(mut self, clean: bool) {
        self.clean = clean;
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.inner.tracker.after_end(self.tx, self.clean);
    }
}
