//! Opt-in transactions: the guard, savepoints and the one end path. How
//! they behave is told once, in [the crate docs](crate#how-transactions-work);
//! this module runs each step through the connection's state machine
//! (`pool::state`) with the SQL of [`super::sql`].

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::hooks::{Callback, Outcome, TxEvent, run_after_commit, run_after_rollback};
use super::options::TxOptions;
use super::{Env, Observer, sql};
use crate::error::{Error, Result, ends_session, is_connection_loss};
use crate::guard::DropGuard;
use crate::pool::Conn;
use crate::pool::manager::{ConnParts, Execute, Op, Opt, Params, Query};
use crate::pool::state::{ConnState, Event, Refusal};
use crate::pool::stream::{CopyIn, CopyOut, RowStream};

/// The connection a transaction runs on.
pub(crate) enum TxConn {
    /// Checked out for this transaction alone: back to the pool when the
    /// transaction (and its drop-path ROLLBACK) is done with it.
    Own(Conn),
    /// Lent by a pinned connection, which keeps it checked out. The lock
    /// is held until the transaction is done with the connection — its
    /// COMMIT or ROLLBACK answered, a spawned drop-path ROLLBACK included —
    /// so that the pinned connection sends nothing before that.
    Lent {
        parts: Arc<ConnParts>,
        _until_ended: tokio::sync::OwnedMutexGuard<()>,
    },
}

impl TxConn {
    /// A connection lent by its holder, which waits on `until_ended`'s
    /// mutex before using it again.
    pub(crate) fn lent(
        parts: Arc<ConnParts>,
        until_ended: tokio::sync::OwnedMutexGuard<()>,
    ) -> TxConn {
        TxConn::Lent {
            parts,
            _until_ended: until_ended,
        }
    }
}

impl From<Conn> for TxConn {
    fn from(conn: Conn) -> TxConn {
        TxConn::Own(conn)
    }
}

impl std::ops::Deref for TxConn {
    type Target = ConnParts;
    fn deref(&self) -> &ConnParts {
        match self {
            TxConn::Own(conn) => conn,
            TxConn::Lent { parts, .. } => parts,
        }
    }
}

/// What one outermost transaction shares with its savepoints.
pub(crate) struct TxCore {
    conn: TxConn,
    env: Arc<Env>,
    event: TxEvent,
    begin_sql: Cow<'static, str>,
    /// The transaction's own bookkeeping; its state is the connection's.
    book: Mutex<Book>,
    on_commit: Mutex<Vec<Callback>>,
    attempt: u32,
    /// The per-request container this transaction reports to, if any.
    observer: Option<Box<dyn Observer>>,
    span: crate::telemetry::TxSpan,
    /// The runtime the transaction began on: the drop path spawns its
    /// ROLLBACK there, from whatever thread the guard is dropped on.
    runtime: Option<tokio::runtime::Handle>,
}

/// What a transaction remembers besides its connection's state.
#[derive(Debug, Default)]
struct Book {
    /// Savepoints open now.
    depth: u32,
    /// Savepoints begun so far: numbers their names, never reused.
    savepoints: u32,
    /// Shallowest savepoint (depth, number) dropped without commit or
    /// rollback; rolled back before the next operation.
    pending_rollback: Option<(u32, u32)>,
    /// A statement's future was dropped before its answer came: the server
    /// may have aborted the transaction without our knowing, so COMMIT goes
    /// behind a probe ([`sql::commit`]).
    statement_cut: bool,
    /// A statement failed with 40001 / 40P01: the closure form may retry.
    saw_retryable: bool,
    /// COMMIT or PREPARE TRANSACTION was sent: a guard dropped after that
    /// without an answer ends with an unknown outcome, not a rollback.
    commit_sent: bool,
    /// The outermost transaction has ended (for reports).
    ended: bool,
    /// The server answered BEGIN: from then on a cancel request can only
    /// stop a statement inside the transaction (see
    /// [`TxCore::cancel_if_dropped`]).
    begin_answered: bool,
}

impl TxCore {
    /// The transaction id.
    pub(crate) fn id(&self) -> u64 {
        self.event.id
    }

    /// Savepoints open now.
    pub(crate) fn depth_now(&self) -> u32 {
        self.book().depth
    }

    /// Whether BEGIN has gone out.
    pub(crate) fn is_begun(&self) -> bool {
        !matches!(self.conn.state.get(), ConnState::BeginPending)
    }

    /// Whether the outermost transaction is still open.
    pub(crate) fn is_open(&self) -> bool {
        !self.book().ended
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // Nothing panics while holding it; a poisoned lock is still consistent.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn name(&self) -> &str {
        &self.event.engine
    }

    fn aborted(&self, reason: &str) -> Error {
        Error::TransactionAborted {
            engine: self.name().to_owned(),
            reason: reason.to_owned(),
        }
    }

    /// The error for a step the state machine refused: nothing was sent.
    fn refused(&self, refusal: Refusal) -> Error {
        match refusal {
            Refusal::Aborted | Refusal::InDoubt => self.aborted(refusal.reason()),
            // The protocol went out of step, or a dropped statement was
            // cancelled (the request may land on any later statement): the
            // transaction cannot go on, and the pool discards the connection.
            Refusal::Broken => self.aborted(
                "the connection is broken (the protocol went out of step, or a statement \
                 dropped while the server ran it was cancelled)",
            ),
            Refusal::Ended | Refusal::Ending | Refusal::NotIdle => Error::Usage(format!(
                "engine `{}`: {}; nothing was sent",
                self.name(),
                refusal.reason()
            )),
        }
    }

    /// Applies `event` to the connection's state machine.
    #[inline]
    fn apply(&self, event: Event) -> Result<ConnState> {
        self.conn.state.apply(event).map_err(|r| self.refused(r))
    }

    /// Runs a control statement inside the critical section.
    async fn control(&self, sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        let cut_off = DropGuard::new(|| self.lost());
        let r = self.conn.client.batch_execute(sql).await;
        cut_off.disarm();
        self.after_control(r)
    }

    /// [`TxCore::control`], returning what the statements returned.
    async fn control_rows(
        &self,
        sql: &str,
    ) -> std::result::Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
        let cut_off = DropGuard::new(|| self.lost());
        let r = self.conn.client.simple_query(sql).await;
        cut_off.disarm();
        self.after_control(r)
    }

    /// The server's state is unknown from here on.
    fn lost(&self) {
        let _ = self.conn.state.apply(Event::Lost);
    }

    /// The server answered a control statement (even with an error): its
    /// state is known, unless the connection itself is gone.
    fn after_control<T>(
        &self,
        r: std::result::Result<T, tokio_postgres::Error>,
    ) -> std::result::Result<T, tokio_postgres::Error> {
        if let Err(e) = &r {
            if is_connection_loss(e) {
                self.lost();
            } else {
                self.conn.vet(e);
            }
        }
        r
    }

    /// The transaction holds its connection alone, so a statement dropped
    /// while the server runs it is cancelled (see
    /// `ConnParts::cancel_if_dropped`) — but only once the server has
    /// answered BEGIN. A cancel request stops whatever the backend runs
    /// when it lands, and BEGIN goes out pipelined with the first
    /// statement: a cancel that stopped the BEGIN would leave that
    /// statement, and any queued behind it, to run and commit in
    /// autocommit. Before that, a cut statement is left to finish and the
    /// connection is discarded as before (the randomized cancellation test
    /// caught this: an abandoned transaction's row committed).
    fn cancel_if_dropped(&self) -> Option<crate::guard::DropGuard<impl FnOnce() + '_>> {
        self.book()
            .begin_answered
            .then(|| self.conn.cancel_if_dropped())
    }

    /// Classifies a statement error and moves the machine. The server's
    /// "current transaction is aborted" (25P02) is
    /// [`Error::TransactionAborted`], as when the machine knew already: the
    /// server can know first when an earlier statement was cut off before
    /// its error came (the first one, pipelined behind BEGIN, has no
    /// cancel to make the connection refuse what follows).
    pub(crate) fn statement_error(&self, e: tokio_postgres::Error) -> Error {
        self.note_error(&e);
        if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION) {
            return self.aborted(
                "an earlier statement failed on the server (it was cut off before its answer came)",
            );
        }
        Error::from_pg(self.name(), e)
    }

    /// Moves the machine for a statement error (a server error aborts the
    /// transaction); also for errors met by a stream or a COPY after their
    /// statement returned.
    pub(crate) fn note_error(&self, e: &tokio_postgres::Error) {
        if let Some(code) = e.code() {
            let _ = self.conn.state.apply(Event::Failed);
            if *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
            {
                self.book().saw_retryable = true;
            }
        } else if is_connection_loss(e) {
            self.lost();
        } else {
            self.conn.vet(e);
        }
    }

    /// Checks that the transaction can run something, first rolling back a
    /// savepoint that was dropped unfinished.
    async fn ready(&self) -> Result<()> {
        let now = self.conn.state.apply(Event::Statement);
        if let Err(refusal) = now {
            if refusal != Refusal::Aborted {
                return Err(self.refused(refusal));
            }
        }
        let Some((_, number)) = self.book().pending_rollback.take() else {
            // The common case: nothing to undo first, and the state says go.
            return now.map(drop).map_err(|r| self.refused(r));
        };
        self.control(&sql::rollback_to(number))
            .await
            .map_err(|e| self.statement_error(e))?;
        self.apply(Event::Restored)?;
        self.apply(Event::Statement).map(drop)
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

    /// A statement that changes (or may change) session state is allowed in
    /// a transaction — a plain `SET` there outlives the COMMIT — and flags
    /// the connection: the pool resets it before its next user.
    fn note_session_effect(&self, effect: crate::sql::control::SessionEffect) {
        if effect != crate::sql::control::SessionEffect::None {
            let _ = self.conn.state.apply(Event::SessionChanged);
        }
    }

    async fn run<O: Op>(&self, sql: &str, params: Params<'_>) -> Result<O::Out> {
        self.statement(sql, || self.conn.run::<O>(sql, params, false))
            .await
    }

    /// Runs `sql` for a stream of rows ([`Transaction::query_raw`]).
    async fn query_raw<P, I>(&self, sql: &str, params: I) -> Result<tokio_postgres::RowStream>
    where
        P: tokio_postgres::types::BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        self.statement(sql, move || self.conn.query_raw(sql, params, true))
            .await
    }

    /// Runs the statement `statement` makes (its future, made where it is
    /// awaited: see [`TxCore::in_transaction`]), which sends `sql`, as a statement of the transaction: refused if it is transaction
    /// control, flagged if it changes session state, after a dropped
    /// savepoint's rollback, with the lazy BEGIN, cancelled if dropped
    /// while the server runs it.
    async fn statement<T, F>(&self, sql: &str, statement: impl FnOnce() -> F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        self.refuse_control(crate::sql::control::reject_transaction_control(sql))?;
        let effect = crate::sql::control::session_effect(sql);
        self.note_session_effect(effect);
        self.ready().await?;
        self.env.pool.counters().inc(|c| &c.statements);
        let started = self.observer.as_ref().map(|_| Instant::now());
        let cut_off = DropGuard::new(|| self.book().statement_cut = true);
        let cancel = self.cancel_if_dropped();
        #[cfg(feature = "tracing")]
        let out = crate::telemetry::statement(
            self.env.pool.telemetry(),
            Some(&self.span),
            sql,
            self.in_transaction(statement),
        )
        .await;
        #[cfg(not(feature = "tracing"))]
        let out = self.in_transaction(statement).await;
        cut_off.disarm();
        if let Some(cancel) = cancel {
            cancel.disarm();
        }
        if effect != crate::sql::control::SessionEffect::None {
            self.conn.after_session_statement(sql);
        }
        if let (Some(observer), Some(started)) = (&self.observer, started) {
            observer.statement_ran(self.conn.backend_pid, started.elapsed());
        }
        out
    }

    /// Runs one statement in the transaction. The first statement carries
    /// the lazy BEGIN: both requests leave in the same poll, BEGIN first,
    /// so the statement runs inside the transaction.
    ///
    /// The statement comes as a function that makes its future, made where
    /// it is awaited: a future passed down by value is moved again at each
    /// async layer, and a statement's future is large (~500 instructions of
    /// copying per statement, callgrind W2).
    async fn in_transaction<T, F>(&self, statement: impl FnOnce() -> F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
    {
        let result = if self.apply(Event::BeginSent)? != ConnState::BeginPending {
            statement().await
        } else {
            let (began, result) =
                futures::future::join(self.control(&self.begin_sql), statement()).await;
            if let Err(e) = began {
                // The statement may have run outside a transaction: refuse to go on.
                self.lost();
                return Err(Error::from_pg(self.name(), e));
            }
            self.book().begin_answered = true;
            result
        };
        result.map_err(|e| self.statement_error(e))
    }

    /// Runs a batch in the transaction, with the transaction-status probe
    /// pipelined behind it (no extra round trip): should a statement the
    /// text check could not see have ended the transaction on the server,
    /// the machine learns it here, and the transaction goes no further.
    async fn batch(&self, sql: &str) -> Result<()> {
        self.refuse_control(crate::sql::control::reject_control_in_batch(sql))?;
        let effect = crate::sql::control::session_effect_in_batch(sql);
        self.note_session_effect(effect);
        self.ready().await?;
        self.env.pool.counters().inc(|c| &c.statements);
        let cut_off = DropGuard::new(|| self.book().statement_cut = true);
        let cancel = self.cancel_if_dropped();
        let client = &self.conn.client;
        let both = || async {
            let (batch, probe) = futures::future::join(
                client.batch_execute(sql),
                client.simple_query(sql::STATUS_PROBE),
            )
            .await;
            batch.map(|()| probe)
        };
        let r = self.in_transaction(both).await;
        cut_off.disarm();
        if let Some(cancel) = cancel {
            cancel.disarm();
        }
        if effect != crate::sql::control::SessionEffect::None {
            self.conn.after_session_statement(sql);
        }
        match r? {
            Ok(messages) if sql::probe_says_in_block(&messages) == Some(false) => {
                self.lost();
                Err(self.aborted(
                    "the batch ended the transaction on the server (a transaction control \
                     statement the text check did not recognise); the transaction cannot go on",
                ))
            }
            _ => Ok(()),
        }
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
            .field("state", &core.conn.state.get())
            .finish()
    }
}

impl<'a> Transaction<'a> {
    /// Pins `conn` for a new outermost transaction and records it in the
    /// per-transaction connection map. Nothing is sent yet.
    pub(crate) fn start(
        env: &Arc<Env>,
        conn: TxConn,
        options: TxOptions,
        attempt: u32,
        observer: Option<Box<dyn Observer>>,
    ) -> Result<Transaction<'a>> {
        let pool = &env.pool;
        let id = env.tracker.next_id();
        env.tracker
            .after_begin(id, pool.name_arc(), conn.id, &conn.state)?;
        let event = TxEvent {
            engine: pool.name_arc().clone(),
            id,
            options,
        };
        pool.counters().inc(|c| &c.begun);
        env.hooks.begin(&event);
        let tx = Transaction {
            core: Arc::new(TxCore {
                conn,
                env: env.clone(),
                begin_sql: event.options.begin_sql(),
                event,
                book: Mutex::new(Book::default()),
                on_commit: Mutex::new(Vec::new()),
                attempt,
                observer,
                span: crate::telemetry::transaction_span(pool.telemetry(), id),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
            depth: 0,
            number: 0,
            mark: 0,
            done: false,
            _borrow: PhantomData,
        };
        if let Some(observer) = &tx.core.observer {
            observer.opened(&tx.core);
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
        self.core().book().saw_retryable
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

    /// Runs a statement that must return exactly one row: no row is
    /// [`Error::NotFound`], more than one [`Error::TooManyRows`].
    pub fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row>> + Send {
        crate::error::one_row(self.core().name(), self.core().run::<Opt>(sql, params))
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

    /// Runs a statement and streams its rows as the server sends them, so
    /// a result of any size runs in bounded memory. The stream borrows the
    /// transaction mutably: nothing else runs on it until the stream is
    /// dropped (a statement awaited beside it would wait behind the unread
    /// rows). Dropping the stream early is safe: the transaction goes on,
    /// and its next statement runs once the server has sent the rest of
    /// the rows, which are read and discarded (no cancel request: inside a
    /// transaction it would abort it) — for a long result, bound it with
    /// `LIMIT` or a cursor. An error met while streaming aborts the
    /// transaction, as any failed statement does.
    ///
    /// The borrow also keeps a stream from outliving its transaction: one
    /// still held when the transaction commits (or is dropped, which rolls
    /// it back) does not compile, since its rows would be read from a
    /// connection that has moved on:
    ///
    /// ```compile_fail,E0505
    /// # async fn demo(mut tx: pgassist::Transaction<'static>) -> Result<(), pgassist::Error> {
    /// let rows = tx.query_raw("SELECT 1", std::iter::empty::<i32>()).await?;
    /// tx.commit().await?; // error: `tx` is borrowed by the stream
    /// drop(rows);
    /// # Ok(()) }
    /// ```
    ///
    /// ```no_run
    /// # async fn demo(mut tx: pgassist::Transaction<'static>) -> Result<(), pgassist::Error> {
    /// use futures::TryStreamExt;
    /// let mut rows = tx.query_raw("SELECT id FROM big WHERE id > $1", [&0_i64]).await?;
    /// while let Some(row) = rows.try_next().await? {
    ///     let _id: i64 = row.get(0);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn query_raw<P, I>(&mut self, sql: &str, params: I) -> Result<RowStream<'_>>
    where
        P: tokio_postgres::types::BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let core = self.core();
        let rows = core.query_raw(sql, params).await?;
        Ok(RowStream::borrowed(
            rows,
            core.name(),
            Box::new(move |e| core.note_error(e)),
        ))
    }

    /// Starts `COPY … FROM STDIN` (text, CSV or binary, as `sql` says) in
    /// this transaction: write the data into the returned [`CopyIn`] and
    /// [`CopyIn::finish`] it. The rows are visible to others once the
    /// transaction commits, and gone if it rolls back. A sink dropped
    /// unfinished aborts the COPY and the transaction (see [`CopyIn`]).
    ///
    /// In PgBouncer mode ([`crate::EngineConfig::pgbouncer`]) this works
    /// too: the driver prepares the COPY as a named statement and closes it
    /// inside this transaction, so nothing outlives it on the server.
    ///
    /// ```no_run
    /// # async fn demo(mut tx: pgassist::Transaction<'static>) -> Result<(), pgassist::Error> {
    /// use futures::SinkExt;
    /// let mut sink = tx.copy_in("COPY items (id, name) FROM STDIN").await?;
    /// sink.send(bytes::Bytes::from_static(b"1\tone\n2\ttwo\n")).await?;
    /// let rows = sink.finish().await?;
    /// # let _ = rows;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn copy_in<T>(&mut self, sql: &str) -> Result<CopyIn<'_, T>>
    where
        T: bytes::Buf + 'static + Send,
    {
        let core = self.core();
        let sink = core
            .statement(sql, || core.conn.client.copy_in(sql))
            .await?;
        Ok(CopyIn::new(
            sink,
            core.name(),
            Box::new(move |e| core.note_error(e)),
            // The driver answers the dropped sink with CopyFail: the server
            // fails the COPY, and with it the transaction.
            Box::new(move || {
                let _ = core.conn.state.apply(Event::Failed);
            }),
        ))
    }

    /// Starts `COPY … TO STDOUT` (text, CSV or binary) in this transaction:
    /// a stream of data chunks, which sees the transaction's own writes.
    /// Borrows the transaction mutably, as [`Transaction::query_raw`] does;
    /// dropping the stream early is safe.
    pub async fn copy_out(&mut self, sql: &str) -> Result<CopyOut<'_>> {
        let core = self.core();
        let data = core
            .statement(sql, || core.conn.client.copy_out(sql))
            .await?;
        Ok(CopyOut::new(
            data,
            core.name(),
            Box::new(move |e| core.note_error(e)),
        ))
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
        if !core.env.tracker.holds(core.event.id, core.conn.id) {
            return Err(Error::Usage(format!(
                "engine `{}`: nested begin on a connection that is not out of autocommit",
                core.name()
            )));
        }
        let number = {
            let mut book = core.book();
            book.savepoints += 1;
            book.savepoints
        };
        let begin =
            (core.apply(Event::BeginSent)? == ConnState::BeginPending).then_some(&*core.begin_sql);
        core.control(&sql::savepoint(begin, number))
            .await
            .map_err(|e| core.statement_error(e))?;
        core.book().begin_answered = true;
        let mark = core.on_commit.lock().expect("on_commit").len();
        core.book().depth += 1;
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
        if core.conn.state.get() == ConnState::BeginPending {
            let _ = self.finish(Outcome::RolledBack, true);
            return Ok(None);
        }
        core.apply(Event::Commit)?;
        core.book().commit_sent = true;
        match core.control_rows(&sql::prepare(gid)).await {
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

    async fn commit_outermost(&mut self) -> Result<()> {
        let core = self.core();
        if let Err(e) = core.ready().await {
            self.rollback_outermost().await;
            return Err(match e {
                Error::TransactionAborted { .. } => e,
                other => self.core().aborted(&other.to_string()),
            });
        }
        if core.conn.state.get() == ConnState::BeginPending {
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
        let track_lsn = core.observer.as_ref().is_some_and(|o| o.wants_commit_lsn());
        core.apply(Event::Commit)?;
        let probe = {
            let mut book = core.book();
            book.commit_sent = true;
            book.statement_cut
        };
        let sql = sql::commit(probe, track_lsn);
        let committed = if track_lsn {
            core.control_rows(sql)
                .await
                .map(|messages| crate::sql::first_lsn(&messages))
        } else {
            core.control(sql).await.map(|()| None)
        };
        match committed {
            Ok(lsn) => {
                if let (Some(observer), Some(lsn)) = (&core.observer, lsn) {
                    observer.committed_at(lsn);
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
        let clean = match core.conn.state.apply(Event::Rollback) {
            Ok(ConnState::BeginPending) => true,
            Ok(_) => core.control(sql::ROLLBACK).await.is_ok(),
            Err(_) => false,
        };
        let _ = self.finish(Outcome::RolledBack, clean);
    }

    async fn release_savepoint(&mut self) -> Result<()> {
        let core = self.core();
        let before = core.ready().await;
        if let Err(e) = before {
            if !matches!(&e, Error::TransactionAborted { .. })
                || core.conn.state.get() != ConnState::Aborted
            {
                return Err(e);
            }
            self.rollback_savepoint().await?;
            return Err(self
                .core()
                .aborted("a statement in the savepoint failed; rolled back to the savepoint"));
        }
        match core.control(&sql::release(self.number)).await {
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
        // Only an open or aborted transaction can roll back to a savepoint.
        if let Err(refusal) = crate::pool::state::next(core.conn.state.get(), Event::Restored) {
            return Err(core.refused(refusal));
        }
        // Savepoints nested in this one are undone with it.
        core.book()
            .pending_rollback
            .take_if(|(d, _)| *d > self.depth);
        core.control(&sql::rollback_to(self.number))
            .await
            .map_err(|e| core.statement_error(e))?;
        core.apply(Event::Restored)?;
        run_after_rollback(self.callbacks_since_mark());
        self.end_savepoint();
        Ok(())
    }

    fn end_savepoint(&mut self) {
        self.done = true;
        self.core.book().depth -= 1;
    }

    /// Ends the outermost transaction: counters, listeners and the span see
    /// the outcome, and the callbacks are settled. The one end path, for
    /// commit, rollback, prepare and drop alike; the connection map entry
    /// is closed by [`Transaction::finish`] or, on drop, once the spawned
    /// ROLLBACK is answered. Returns the commit callbacks for the caller to
    /// run (they may be async).
    #[must_use = "commit callbacks must run after a commit"]
    fn end(&mut self, outcome: Outcome) -> Vec<Callback> {
        self.done = true;
        let core = self.core();
        core.book().ended = true;
        let counters = core.env.pool.counters();
        match outcome {
            Outcome::Committed => counters.inc(|c| &c.committed),
            Outcome::RolledBack => counters.inc(|c| &c.rolled_back),
            Outcome::Unknown => counters.inc(|c| &c.commit_unknown),
            Outcome::Prepared => {}
        }
        core.env.hooks.end(&core.event, outcome);
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

    /// [`Transaction::end`], and the connection map restores the connection
    /// (`clean`: the server confirmed the end) or leaves it for the pool to
    /// discard.
    #[must_use = "commit callbacks must run after a commit"]
    fn finish(&mut self, outcome: Outcome, clean: bool) -> Vec<Callback> {
        let callbacks = self.end(outcome);
        self.core.env.tracker.after_end(self.core.event.id, clean);
        callbacks
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let core = self.core.clone();
        if self.depth > 0 {
            core.book().depth -= 1;
            run_after_rollback(self.callbacks_since_mark());
            let mut book = core.book();
            if book.pending_rollback.is_none_or(|(d, _)| d > self.depth) {
                book.pending_rollback = Some((self.depth, self.number));
            }
            return;
        }
        // A commit future cut off while COMMIT was on the wire: the server
        // may have committed, so the outcome is unknown, not a rollback.
        let outcome = if core.book().commit_sent {
            Outcome::Unknown
        } else {
            Outcome::RolledBack
        };
        let state = core.conn.state.apply(Event::Rollback);
        if state == Ok(ConnState::BeginPending) {
            // Nothing was sent: nothing to roll back.
            let _ = self.finish(Outcome::RolledBack, true);
            return;
        }
        let _ = self.end(outcome);
        let runtime = core.runtime.clone();
        let (Ok(_), Some(rt)) = (state, runtime) else {
            // Broken, or no runtime to send ROLLBACK on: the pool discards
            // the connection.
            core.env.tracker.after_end(core.event.id, false);
            return;
        };
        // The runtime the transaction began on, even when dropped on a thread
        // outside it. Entered while spawning: should that runtime be shutting
        // down, the task is dropped at once, its connection goes back to the
        // pool, and the pool may spawn a replacement.
        let _entered = rt.enter();
        // Should the task never finish — or never start, dropped with its
        // runtime — the entry still ends, dirty.
        let (env, id) = (core.env.clone(), core.event.id);
        let unconfirmed = DropGuard::new(move || env.tracker.after_end(id, false));
        rt.spawn(async move {
            let clean = core.conn.client.batch_execute(sql::ROLLBACK).await.is_ok();
            unconfirmed.disarm();
            core.env.tracker.after_end(core.event.id, clean);
        });
    }
}

crate::sql::queryable::delegate_queryable!(Transaction<'_>);
