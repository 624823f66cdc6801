//! The autocommit session: every statement checks out a connection, runs,
//! and gives it back. No BEGIN is ever sent unless a transaction is asked for.

use futures::future::BoxFuture;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::manager::{Execute, One, Op, Opt, Params, Query};
use crate::replica::Target;
use crate::retry;
use crate::sessions::ScopeRef;
use crate::transaction::{Transaction, TxOptions};
use std::future::Future;
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
            &self.engine,
            None,
            sql,
            self.run_untraced::<O>(sql, params),
        );
        #[cfg(not(feature = "tracing"))]
        self.run_untraced::<O>(sql, params)
    }

    async fn run_untraced<O: Op>(&self, sql: &str, params: Params<'_>) -> Result<O::Out> {
        reject_transaction_control(sql)?;
        // The common case first: a plain engine, no request scope.
        if self.scope.is_none() && self.engine.primary().is_none() {
            let conn = self.engine.checkout().await?;
            self.engine.inner.counters.inc(|c| &c.statements);
            return conn
                .run::<O>(sql, params, true)
                .await
                .map_err(|e| Error::from_pg(self.engine.name(), e));
        }
        self.run_routed::<O>(sql, params).await
    }

    /// A statement of a request scope (maybe in the request's
    /// transaction), or on a replica (maybe falling back to the primary).
    async fn run_routed<O: Op>(&self, sql: &str, params: Params<'_>) -> Result<O::Out> {
        if self.scope.is_some() {
            if let Some(tx) = self.request_tx().await? {
                return tx.run_op::<O>(sql, params).await;
            }
        }
        let Some(primary) = self.engine.primary() else {
            return self.run_here::<O>(sql, params).await;
        };
        // A replica: read here unless this request wrote something it has
        // not replayed yet, or it is down.
        let required = self
            .scope
            .as_ref()
            .map_or(0, |s| s.required_lsn(self.engine.primary_index()));
        match self.engine.choose_target(required).await {
            Target::Replica => match self.run_here::<O>(sql, params).await {
                Err(e) if self.engine.should_fall_back(&e) => {
                    self.on(primary).run_here::<O>(sql, params).await
                }
                other => other,
            },
            Target::Primary => self.on(primary).run_here::<O>(sql, params).await,
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
    async fn run_here<O: Op>(&self, sql: &str, params: Params<'_>) -> Result<O::Out> {
        let conn = self.engine.checkout().await?;
        self.engine.inner.counters.inc(|c| &c.statements);
        let Some(scope) = &self.scope else {
            return conn
                .run::<O>(sql, params, true)
                .await
                .map_err(|e| Error::from_pg(self.engine.name(), e));
        };
        let started = Instant::now();
        let out = if self.engine.inner.has_replicas.load(Ordering::Relaxed) {
            self.run_noting_lsn::<O>(&conn, scope, sql, params).await
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

    /// Runs a statement that must return exactly one row.
    pub fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row>> + Send {
        self.run::<One>(sql, params)
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
    /// autocommit. A batch that starts with a transaction control statement is
    /// refused: use [`Session::begin`].
    pub async fn batch_execute(&self, sql: &str) -> Result<()> {
        reject_transaction_control(sql)?;
        if self.scope.is_some() {
            if let Some(tx) = self.request_tx().await? {
                return tx.batch_execute(sql).await;
            }
        }
        let conn = self.engine.checkout().await?;
        self.engine.inner.counters.inc(|c| &c.statements);
        conn.client
            .batch_execute(sql)
            .await
            .map_err(|e| Error::from_pg(self.engine.name(), e))
    }

    /// Runs a statement on a primary with replicas and records where this
    /// request's replicas must have got to (read-your-writes): the WAL
    /// insert position read right after it. A cached statement goes out in
    /// the first poll, so the position query is pipelined behind it (no
    /// extra round trip); otherwise (first use, a re-prepare) it follows.
    async fn run_noting_lsn<O: Op>(
        &self,
        conn: &crate::engine::Conn,
        scope: &ScopeRef,
        sql: &str,
        params: Params<'_>,
    ) -> std::result::Result<O::Out, tokio_postgres::Error> {
        let lsn_query = || conn.client.simple_query(crate::replica::INSERT_LSN_SQL);
        let replans = conn.replans.load(Ordering::Relaxed);
        let (out, mut lsn) = if conn.is_cached(sql) {
            let (out, lsn) =
                futures::future::join(conn.run::<O>(sql, params, true), lsn_query()).await;
            (out, lsn.ok())
        } else {
            (conn.run::<O>(sql, params, true).await, None)
        };
        if out.is_ok() && (lsn.is_none() || conn.replans.load(Ordering::Relaxed) != replans) {
            lsn = lsn_query().await.ok();
        }
        if let Some(lsn) = out
            .is_ok()
            .then(|| lsn.as_deref().and_then(crate::replica::lsn_of))
            .flatten()
        {
            scope.note_lsn(lsn);
        }
        out
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
        if let Some(primary) = self.engine.primary() {
            let required = self
                .scope
                .as_ref()
                .map_or(0, |s| s.required_lsn(self.engine.primary_index()));
            if let Target::Primary = self.engine.choose_target(required).await {
                return Box::pin(self.on(primary).begin_outermost_attempt(options, attempt)).await;
            }
        }
        let conn = self.engine.checkout().await?;
        Transaction::start(&self.engine, conn, options, attempt, self.scope.clone())
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
    pub async fn transaction<T, E, F>(
        &self,
        options: TxOptions,
        mut f: F,
    ) -> std::result::Result<T, E>
    where
        F: for<'t> FnMut(&'t mut Transaction<'_>) -> BoxFuture<'t, std::result::Result<T, E>>,
        E: From<Error>,
    {
        let mut attempt = 1;
        loop {
            let mut tx = self.begin_attempt(options.clone(), attempt).await?;
            let result = f(&mut tx).await;
            match result {
                Ok(value) => match tx.commit().await {
                    Ok(()) => return Ok(value),
                    Err(e) if e.is_retryable() && attempt <= options.retries => {}
                    Err(e) => return Err(e.into()),
                },
                Err(e) => {
                    let retryable = tx.saw_retryable();
                    let _ = tx.rollback().await;
                    if !(retryable && attempt <= options.retries) {
                        return Err(e);
                    }
                }
            }
            attempt += 1;
            tokio::time::sleep(retry::backoff(attempt)).await;
        }
    }
}

/// Refuses BEGIN / COMMIT / ROLLBACK / SAVEPOINT / … in autocommit: sent
/// through a session they would leave a pooled connection inside a
/// transaction without pgassist knowing. Only the first statement is looked
/// at (cheaply: no allocation, a few byte compares).
#[inline]
pub(crate) fn reject_transaction_control(sql: &str) -> Result<()> {
    if surely_not_control(sql) {
        return Ok(());
    }
    reject_if_control(sql)
}

/// The full check behind [`reject_transaction_control`].
fn reject_if_control(sql: &str) -> Result<()> {
    let word = first_keyword(sql);
    // By length first: the common statements (SELECT, INSERT, UPDATE, WITH…)
    // are out after one comparison at most.
    let is = |k: &str| word.eq_ignore_ascii_case(k);
    let is_control = match word.len() {
        3 => is("END"),
        5 => is("BEGIN") || is("START") || is("ABORT"),
        6 => is("COMMIT"),
        7 => {
            is("RELEASE")
                || (is("PREPARE") && {
                    // `word` borrows from `sql`: what follows it.
                    let after = word.as_ptr() as usize - sql.as_ptr() as usize + word.len();
                    first_keyword(&sql[after..]).eq_ignore_ascii_case("TRANSACTION")
                })
        }
        8 => is("ROLLBACK"),
        9 => is("SAVEPOINT"),
        _ => false,
    };
    if is_control {
        return Err(Error::Usage(format!(
            "`{word}` is a transaction control statement; in autocommit use session.begin() and the transaction's commit()/rollback()"
        )));
    }
    Ok(())
}

/// Decides most statements from their first two bytes: every control
/// keyword starts with a, b, c, e, p, r or s, and `SELECT` / `SET` (the
/// common statements among those) start with "se". Anything else — white
/// space, a comment — goes to the full check.
fn surely_not_control(sql: &str) -> bool {
    match sql.as_bytes() {
        [first, second, ..] => match first.to_ascii_lowercase() {
            b'a' | b'b' | b'c' | b'e' | b'p' | b'r' => false,
            b's' => second.eq_ignore_ascii_case(&b'e'),
            other => other.is_ascii_lowercase(),
        },
        _ => false,
    }
}

/// The first keyword of `sql`, after white space and comments (bytes only:
/// it runs on every statement).
pub(crate) fn first_keyword(sql: &str) -> &str {
    let b = sql.as_bytes();
    let find = |from: usize, pat: &[u8]| {
        b[from..]
            .windows(pat.len())
            .position(|w| w == pat)
            .map(|p| from + p)
    };
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if b[i..].starts_with(b"--") {
            i = find(i + 2, b"\n").map_or(b.len(), |p| p + 1);
        } else if b[i..].starts_with(b"/*") {
            i = find(i + 2, b"*/").map_or(b.len(), |p| p + 2);
        } else {
            break;
        }
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_alphabetic() {
        i += 1;
    }
    &sql[start..i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_statements_are_refused_in_autocommit() {
        for sql in [
            "BEGIN",
            "begin;",
            "  -- c\n START TRANSACTION",
            "/* x */ commit",
            "ROLLBACK",
            "savepoint a",
            "Prepare Transaction 'x'",
            "/* c */ PREPARE  TRANSACTION 'x'",
            "END",
        ] {
            assert!(
                matches!(reject_transaction_control(sql), Err(Error::Usage(_))),
                "{sql}"
            );
        }
        for sql in [
            "SELECT 1",
            "DO $$ BEGIN PERFORM 1; END $$",
            "PREPARE q AS SELECT 1",
            "INSERT INTO begin_log VALUES (1)",
            "",
            "beginning",
            "select 1",
            "SET search_path = x",
            "UPDATE t SET a = 1",
            "with x as (select 1) select * from x",
        ] {
            assert!(reject_transaction_control(sql).is_ok(), "{sql}");
        }
        // The two-byte shortcut never decides for a control statement.
        for sql in ["BEGIN", "start transaction", "Savepoint a", "end", "x"] {
            assert!(!surely_not_control(sql), "{sql}");
        }
    }
}
