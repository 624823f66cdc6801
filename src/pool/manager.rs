//! The pooled connection type and the bb8 manager that makes and vets it.
//!
//! Each connection carries its state (see [`super::state`]). bb8 asks
//! [`ManageConnection::has_broken`] when a connection comes back; anything but
//! idle — in a transaction, aborted, with a BEGIN / COMMIT / ROLLBACK /
//! SAVEPOINT cut off mid-flight, or with the protocol out of step — makes bb8
//! discard the connection (closing it makes the server roll back), so a
//! dirty connection is never handed to another user.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_postgres::types::ToSql;
use tokio_postgres::types::Type;
use tokio_postgres::{CancelToken, Client, NoTls, Row, Statement};

use super::cache::Lru;
use super::state::{Event, StateCell};
use super::stats::Counters;

/// A pooled tokio-postgres client with its state and statement cache.
///
/// One pointer wide: bb8 moves pooled connections by value on every checkout
/// and return, so the fields live behind a pointer — an `Arc`, so that
/// autocommit statements can share a connection (see
/// [`crate::EngineConfig::pipeline`]).
pub(crate) struct PgConn(Arc<ConnParts>);

impl PgConn {
    /// A handle on the connection's parts for a statement sharing it.
    pub(crate) fn share(&self) -> Arc<ConnParts> {
        self.0.clone()
    }
}

/// The fields of a [`PgConn`].
pub(crate) struct ConnParts {
    pub(crate) client: Client,
    pub(crate) state: Arc<StateCell>,
    pub(crate) id: u64,
    /// The server process serving this connection (`pg_backend_pid()`).
    pub(crate) backend_pid: i32,
    cache: Mutex<Lru<Statement>>,
    cache_capacity: usize,
    /// Unnamed-statement mode (`statement_cache(0)`, PgBouncer): parameter
    /// types per SQL text, so each statement runs as one unnamed
    /// Parse/Bind/Execute; no prepared statement outlives it on the server.
    types: Option<Mutex<Lru<Arc<[Type]>>>>,
    /// Statements prepared again after a schema change (0A000).
    pub(crate) replans: AtomicU64,
    /// Cancels the statement the server runs for this connection.
    canceller: Canceller,
    /// The engine's `after_connect` hook, run again after a session reset.
    after_connect: Option<crate::config::AfterConnect>,
    /// What the server reports about itself (read-only now or not).
    server: Arc<ServerRole>,
    /// For a writer engine: the pool generation this connection belongs to,
    /// to discard the pool when its server stopped being the primary.
    follower: Option<super::Follower>,
}

/// What the server says of its role, from the `ParameterStatus` messages
/// it sends whenever a reported setting changes (PostgreSQL 14 and later
/// report `in_hot_standby` and `default_transaction_read_only`): copied by
/// the task that drives the connection, once asked to watch.
///
/// Why only once asked: the driver keeps those reports in a map keyed by
/// name, and two hashed lookups on every poll of every connection were
/// about a thousand instructions per autocommit statement (callgrind, W1),
/// to serve a refusal that comes once per failover. A writer's connection
/// starts watching at its first 25006 (see [`ConnParts::after_refusal`]).
#[derive(Debug, Default)]
pub(crate) struct ServerRole {
    watching: std::sync::atomic::AtomicBool,
    /// `in_hot_standby` reported on: a standby, whatever anyone set.
    standby: std::sync::atomic::AtomicBool,
    /// `default_transaction_read_only` reported on: by the server's
    /// configuration, or by the caller's own session (see
    /// [`ConnParts::demoted`]).
    default_read_only: std::sync::atomic::AtomicBool,
    /// `default_transaction_read_only` was already on when the connection
    /// was made (the role's, the database's or the engine's setting): the
    /// server is configured so, a new pool would be refused the same way.
    read_only_at_connect: bool,
    /// `in_hot_standby` was already on when the connection was made (a
    /// writer pointed at a standby, by its one host or its DNS name): a new
    /// pool would dial the same server, so replacing it would only storm.
    standby_at_connect: bool,
    /// Held by the connection task through each poll while watching, so
    /// that [`ServerRole::settled`] can wait for the poll that delivered
    /// an answer to have copied the reports too.
    polling: std::sync::Mutex<()>,
}

impl ServerRole {
    /// Whether the server said it is a standby (as of the last poll since
    /// watching began).
    fn is_standby(&self) -> bool {
        !self.standby_at_connect && self.standby.load(Ordering::Relaxed)
    }

    /// Whether the server said it refuses writes by default now, and did
    /// not when the connection was made (as of the last poll since
    /// watching began).
    fn turned_read_only(&self) -> bool {
        !self.read_only_at_connect && self.default_read_only.load(Ordering::Relaxed)
    }

    /// Copies the server's reports from now on (from the connection's
    /// next poll).
    fn watch(&self) {
        self.watching.store(true, Ordering::Relaxed);
    }

    /// Waits (microseconds: one poll) until the poll that delivered the
    /// last answer has copied the reports that came before it.
    fn settled(&self) {
        drop(self.polling.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Drives a connection on a task of its own (as bb8-postgres does), and
/// once [`ServerRole::watch`] was called, after each step copies what the
/// server reports of its role into the returned [`ServerRole`].
fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>) -> Arc<ServerRole>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let role = Arc::new(ServerRole {
        read_only_at_connect: connection.parameter("default_transaction_read_only") == Some("on"),
        standby_at_connect: connection.parameter("in_hot_standby") == Some("on"),
        ..ServerRole::default()
    });
    let seen = role.clone();
    let mut connection = Box::pin(connection);
    tokio::spawn(futures::future::poll_fn(move |cx| {
        if !seen.watching.load(Ordering::Relaxed) {
            return connection.as_mut().poll(cx).map(|_| ());
        }
        let _polling = seen.polling.lock().unwrap_or_else(|e| e.into_inner());
        let step = connection.as_mut().poll(cx);
        let on = |name| connection.parameter(name) == Some("on");
        seen.standby.store(on("in_hot_standby"), Ordering::Relaxed);
        let default_read_only = on("default_transaction_read_only");
        seen.default_read_only
            .store(default_read_only, Ordering::Relaxed);
        step.map(|_| ())
    }));
    role
}

/// Sends cancel requests for one connection (see [`ConnParts::cancel_if_dropped`]).
struct Canceller {
    token: CancelToken,
    connector: Connector,
}

/// The longest a cancel request may take (connecting to the server included).
const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl std::ops::Deref for PgConn {
    type Target = ConnParts;
    fn deref(&self) -> &ConnParts {
        &self.0
    }
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

/// The parameters of a statement, as the driver takes them.
pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// What a statement returns, as a type: each public method (`query`,
/// `query_opt` (which `query_one` runs through), `execute`) gets its own path through the
/// crate, with no result enum to match and unwrap and futures no larger
/// than the one driver call each wraps.
pub(crate) trait Op: Copy + Send + Sync + 'static {
    /// What the statement returns.
    type Out: Send;

    /// Runs a prepared statement.
    fn prepared<'a>(
        client: &'a Client,
        stmt: &'a Statement,
        params: Params<'a>,
    ) -> impl Future<Output = Result<Self::Out, tokio_postgres::Error>> + Send + 'a;

    /// Runs SQL text as one unnamed statement with explicit parameter types.
    fn typed<'a>(
        client: &'a Client,
        sql: &'a str,
        params: &'a [(&'a (dyn ToSql + Sync), Type)],
    ) -> impl Future<Output = Result<Self::Out, tokio_postgres::Error>> + Send + 'a;
}

/// Every row ([`Client::query`]).
#[derive(Clone, Copy)]
pub(crate) struct Query;
/// At most one row ([`Client::query_opt`]).
#[derive(Clone, Copy)]
pub(crate) struct Opt;
/// The number of rows affected ([`Client::execute`]).
#[derive(Clone, Copy)]
pub(crate) struct Execute;

/// Implements [`Op`] for one marker type from the driver's two methods.
macro_rules! op {
    ($marker:ty, $out:ty, $prepared:ident, $typed:ident) => {
        impl Op for $marker {
            type Out = $out;
            fn prepared<'a>(
                client: &'a Client,
                stmt: &'a Statement,
                params: Params<'a>,
            ) -> impl Future<Output = Result<$out, tokio_postgres::Error>> + Send + 'a {
                client.$prepared(stmt, params)
            }
            fn typed<'a>(
                client: &'a Client,
                sql: &'a str,
                params: &'a [(&'a (dyn ToSql + Sync), Type)],
            ) -> impl Future<Output = Result<$out, tokio_postgres::Error>> + Send + 'a {
                client.$typed(sql, params)
            }
        }
    };
}
op!(Query, Vec<Row>, query, query_typed);
op!(Opt, Option<Row>, query_opt, query_typed_opt);
op!(Execute, u64, execute, execute_typed);

impl ConnParts {
    /// Runs one statement through the statement cache.
    ///
    /// `may_replan`: outside a transaction, a cached plan invalidated by a
    /// schema change (SQLSTATE 0A000, "cached plan must not change result
    /// type") is evicted and the statement prepared and run once more; so
    /// is a cached statement the server no longer has (26000, after a
    /// `DEALLOCATE` / `DISCARD ALL` the text check did not see, such as one
    /// in a `DO` block), and then the whole cache is cleared, since the
    /// others went with it. Inside a transaction either error has already
    /// aborted it, so it is surfaced (the cache still mended for the next
    /// transaction).
    pub(crate) async fn run<O: Op>(
        &self,
        sql: &str,
        params: Params<'_>,
        may_replan: bool,
    ) -> Result<O::Out, tokio_postgres::Error> {
        if let Some(types) = &self.types {
            let out = self.run_unnamed::<O>(types, sql, params, !may_replan).await;
            if let Err(e) = &out {
                if self.follower.is_some() && is_read_only_refusal(e) {
                    // Judged once, after the round trip (`vet` would judge
                    // on reports that may not have arrived yet).
                    Box::pin(self.after_refusal()).await;
                } else {
                    self.vet(e);
                }
            }
            return out;
        }
        let cached = self.cache.lock().expect("statement cache").get(sql);
        let stmt = match cached {
            Some(stmt) => stmt,
            None => self
                .prepare_cached(sql)
                .await
                .inspect_err(|e| self.vet(e))?,
        };
        match O::prepared(&self.client, &stmt, params).await {
            Err(e) if !leaves_connection_usable(&e) => {
                self.state.mark_broken();
                Err(e)
            }
            Err(e) if self.follower.is_some() && is_read_only_refusal(&e) => {
                // Rare: boxed, so the common path's future stays small.
                Box::pin(self.after_refusal()).await;
                Err(e)
            }
            Err(e) if is_stale_plan(&e) || is_missing_statement(&e) => {
                if is_missing_statement(&e) {
                    self.forget_all();
                } else {
                    self.forget(sql);
                }
                if !may_replan {
                    return Err(e);
                }
                self.replans.fetch_add(1, Ordering::Relaxed);
                // Rare: boxed, so the common path's future stays small.
                Box::pin(async move {
                    let stmt = self.prepare_cached(sql).await?;
                    O::prepared(&self.client, &stmt, params).await
                })
                .await
            }
            other => other,
        }
    }

    /// Runs `sql` as an unnamed statement with explicit parameter types, all
    /// in one round trip (see [`ConnParts::unnamed_types`]).
    async fn run_unnamed<O: Op>(
        &self,
        types: &Mutex<Lru<Arc<[Type]>>>,
        sql: &str,
        params: Params<'_>,
        in_transaction: bool,
    ) -> Result<O::Out, tokio_postgres::Error> {
        let tys = self.unnamed_types(types, sql, in_transaction).await?;
        if tys.len() != params.len() {
            // The driver's own error for the mismatch (raised before it
            // sends anything), from a statement that lives only inside a
            // transaction (see `with_transient_statement`).
            return self
                .with_transient_statement(sql, in_transaction, |stmt| async move {
                    O::prepared(&self.client, &stmt, params).await
                })
                .await;
        }
        let typed: Vec<(&(dyn ToSql + Sync), Type)> =
            params.iter().copied().zip(tys.iter().cloned()).collect();
        O::typed(&self.client, sql, &typed).await
    }

    /// The parameter types of `sql` in unnamed-statement mode, learnt once
    /// per SQL text by preparing it inside a transaction (see
    /// [`ConnParts::with_transient_statement`]). A statement the server
    /// cannot prepare returns the server's error.
    async fn unnamed_types(
        &self,
        types: &Mutex<Lru<Arc<[Type]>>>,
        sql: &str,
        in_transaction: bool,
    ) -> Result<Arc<[Type]>, tokio_postgres::Error> {
        let known = types.lock().expect("type cache").get(sql);
        if let Some(tys) = known {
            return Ok(tys);
        }
        let tys: Arc<[Type]> = self
            .with_transient_statement(sql, in_transaction, |stmt| async move {
                Ok(stmt.params().into())
            })
            .await?;
        types.lock().expect("type cache").insert(sql, tys.clone());
        Ok(tys)
    }

    /// Prepares `sql` as a named statement, hands it to `use_it`, and
    /// closes it, all inside one transaction — the caller's, or one of its
    /// own (`BEGIN` … `COMMIT`) — so that through PgBouncer's transaction
    /// pooling the Parse and the Close reach the same server and no named
    /// statement outlives it there. The Close is queued when `use_it`'s
    /// future ends (it owns the statement), before the COMMIT.
    ///
    /// Why a named statement at all: tokio-postgres (0.7.18) describes a
    /// statement's parameters only through `Client::prepare`, which always
    /// names it (`s<N>`); its unnamed path (`query_typed`) needs the types
    /// up front; and the parameter-count error can only come from a
    /// `Statement` (`Statement::unnamed` and `Error::parameters` are
    /// private to the driver). COPY (`Client::copy_in` / `copy_out`) is
    /// prepared the same way by the driver, inside the caller's transaction.
    async fn with_transient_statement<T, F, Fut>(
        &self,
        sql: &str,
        in_transaction: bool,
        use_it: F,
    ) -> Result<T, tokio_postgres::Error>
    where
        F: FnOnce(Statement) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        if !in_transaction {
            // Out of autocommit until COMMIT answers: a future dropped in
            // between leaves the connection to be discarded.
            let _ = self.state.apply(Event::Pin);
            let _ = self.state.apply(Event::BeginSent);
            self.client.batch_execute("BEGIN").await?;
        }
        let out = match self.client.prepare(sql).await {
            Ok(stmt) => use_it(stmt).await,
            Err(e) => Err(e),
        };
        if !in_transaction {
            let _ = self.state.apply(Event::Commit);
            self.client.batch_execute("COMMIT").await?;
            let _ = self.state.apply(Event::Ended);
        }
        out
    }

    /// Runs `sql` for a stream of rows ([`Client::query_raw`]): through the
    /// statement cache, or in unnamed-statement mode as one unnamed
    /// statement with its learnt parameter types, so that no named
    /// statement is left behind on any path (PgBouncer). `in_transaction`:
    /// the connection is inside the caller's transaction (its statements
    /// go there, none of their own).
    pub(crate) async fn query_raw<P, I>(
        &self,
        sql: &str,
        params: I,
        in_transaction: bool,
    ) -> Result<tokio_postgres::RowStream, tokio_postgres::Error>
    where
        P: tokio_postgres::types::BorrowToSql,
        I: IntoIterator<Item = P>,
        I::IntoIter: ExactSizeIterator,
    {
        let Some(types) = &self.types else {
            let stmt = self.statement(sql).await?;
            return self.client.query_raw(&stmt, params).await;
        };
        let params = params.into_iter();
        let tys = self.unnamed_types(types, sql, in_transaction).await?;
        if tys.len() != params.len() {
            // The driver's error, as in `run_unnamed`.
            return self
                .with_transient_statement(sql, in_transaction, |stmt| async move {
                    self.client.query_raw(&stmt, params).await
                })
                .await;
        }
        self.client
            .query_typed_raw(sql, params.zip(tys.iter().cloned()))
            .await
    }

    /// The prepared statement for `sql`: from the cache, or prepared and
    /// cached now (for the driver's own calls, such as streaming).
    pub(crate) async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        let cached = self.cache.lock().expect("statement cache").get(sql);
        match cached {
            Some(stmt) => Ok(stmt),
            None => self.prepare_cached(sql).await,
        }
    }

    /// Prepares `sql` and caches the statement (a cache miss).
    async fn prepare_cached(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        let stmt = self.client.prepare(sql).await?;
        self.cache
            .lock()
            .expect("statement cache")
            .insert(sql, stmt.clone());
        Ok(stmt)
    }

    /// Whether `sql` runs from the cache: its Bind/Execute then leave in the
    /// first poll of [`ConnParts::run`], so a request issued right after it
    /// is answered after it (pipelining).
    pub(crate) fn is_cached(&self, sql: &str) -> bool {
        self.types.is_none() && self.cache.lock().expect("statement cache").contains(sql)
    }

    /// For a writer's connection, the pool generation it was opened in.
    #[inline]
    pub(crate) fn generation(&self) -> Option<u64> {
        self.follower.as_ref().map(|f| f.generation)
    }

    /// Marks the connection broken after an error that leaves the protocol
    /// out of step (see [`leaves_connection_usable`]); on a writer, a
    /// refusal to write from a server that says it is read-only now
    /// discards the pool (see [`ConnParts::after_refusal`]). This is the
    /// synchronous path (streams, pinned connections, transaction
    /// control), with no round trip to wait for the server's report: the
    /// first refusal on a connection starts watching, so it may take a
    /// second one there to discard the pool.
    pub(crate) fn vet(&self, e: &tokio_postgres::Error) {
        if !leaves_connection_usable(e) {
            self.state.mark_broken();
        } else if is_read_only_refusal(e) {
            if let Some(follower) = &self.follower {
                self.server.watch();
                if self.demoted() {
                    follower.refused();
                }
            }
        }
    }

    /// Whether the server's reports say it stopped being the primary: it
    /// is a standby now, or it turned `default_transaction_read_only` on
    /// since the connection was made — unless the caller may have done
    /// that on this session (`SET SESSION CHARACTERISTICS AS TRANSACTION
    /// READ ONLY`, `SET default_transaction_read_only`, `set_config`: the
    /// session flag, always raised on a pinned connection), which must not
    /// discard every other user's connection. A value that was on from the
    /// start (`ALTER ROLE … SET`, `ALTER DATABASE … SET`, the engine's
    /// settings) is how the server is configured: a new pool would be
    /// refused the same way, so replacing it would only make it flap.
    fn demoted(&self) -> bool {
        self.server.is_standby()
            || (self.server.turned_read_only() && !self.state.session_changed())
    }

    /// A writer's statement was refused with 25006. That is the server
    /// no longer being the primary (promoted standby elsewhere, this one
    /// demoted or set `default_transaction_read_only`) only if the server
    /// says so; a `READ ONLY` transaction of the caller's gets 25006 too,
    /// from a server that is still the primary. The server reports the
    /// change just after the error, so one empty round trip (answered even
    /// in an aborted transaction) makes sure it has arrived. Then the first
    /// such refusal of the pool's current generation discards the pool;
    /// later ones, from connections of that same old generation, do
    /// nothing.
    async fn after_refusal(&self) {
        let Some(follower) = &self.follower else {
            return;
        };
        self.server.watch();
        // Answered by a poll that began after `watch`, and copied by the
        // time `settled` returns (a value from an earlier watch may be stale).
        let _ = self.client.simple_query("").await;
        self.server.settled();
        if self.demoted() {
            follower.refused();
        } else {
            // The caller's own refusal: stop paying for the reports on
            // every poll until the next one.
            self.server.watching.store(false, Ordering::Relaxed);
        }
    }

    /// Arms a cancel for the statement awaited while the guard lives: if
    /// the guard is dropped armed (the statement's future was dropped while
    /// the server may still run it), a cancel request is sent on a spawned
    /// task, so that the statement stops and whatever is queued behind it
    /// (a transaction's ROLLBACK, the server-side locks it holds) does not
    /// wait for it. Disarm it once the answer has come.
    ///
    /// Why the cancel can never hit another user's statement: a cancel
    /// request travels on a connection of its own and stops whatever the
    /// backend runs when it arrives, which may be later than the statement
    /// we meant — the driver reports it sent before the server has even
    /// read it, and a backend busy reading the next command defers it to
    /// that command. Nothing on the client side can tell when it has
    /// landed, so a connection that was sent a cancel is never reused: it is
    /// discarded when it comes back to the pool (the state machine's `Broken`),
    /// and the server ends the backend (rolling back what it had open).
    /// Until then it serves only its current holder: a later statement of
    /// the same transaction may fail with 57014. Callers arm it only on
    /// connections they hold alone (never on an autocommit connection
    /// shared by pipelining). A dropped statement is rare (a client gone
    /// away, a timeout): one reconnect is its price.
    pub(crate) fn cancel_if_dropped(&self) -> crate::guard::DropGuard<impl FnOnce() + '_> {
        crate::guard::DropGuard::new(move || self.send_cancel())
    }

    /// Cancels what the server runs for this connection now, and makes
    /// the connection broken (see [`ConnParts::cancel_if_dropped`]): for
    /// a connection held alone whose answer nobody will read.
    pub(crate) fn send_cancel(&self) {
        // Broken: a cancel is on its way already, or the connection is
        // unusable anyway. Otherwise it becomes so now (see above).
        if self.state.get() == super::state::ConnState::Broken {
            return;
        }
        self.state.mark_broken();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime to send it from; the connection is discarded
        };
        let token = self.canceller.token.clone();
        let connector = self.canceller.connector.clone();
        rt.spawn(async move {
            let _ = tokio::time::timeout(CANCEL_TIMEOUT, connector.cancel(&token)).await;
        });
    }

    /// Puts the session back as a new connection has it, keeping the
    /// statement cache valid (so no `DISCARD ALL`, which would drop the
    /// cached prepared statements): see [`RESET_SQL`]. Then the engine's
    /// `after_connect` hook runs again. Any failure marks the connection
    /// broken (the pool discards it); success clears the session flag.
    pub(crate) async fn reset(&self) {
        let reset = async {
            self.client.batch_execute(RESET_SQL).await?;
            match &self.after_connect {
                Some(hook) => hook(&self.client).await,
                None => Ok(()),
            }
        };
        // A server that does not answer must not keep the connection out forever.
        let ok = matches!(tokio::time::timeout(RESET_TIMEOUT, reset).await, Ok(Ok(())));
        if !ok || self.state.apply(Event::Reset).is_err() {
            self.state.mark_broken();
        }
    }

    fn forget(&self, sql: &str) {
        self.cache.lock().expect("statement cache").remove(sql);
    }

    /// Empties the statement cache: the server dropped (or may have
    /// dropped) every prepared statement of this connection. Dropping the
    /// `Statement`s sends Close for each, which the server accepts for a
    /// name it no longer has; new statements get new names.
    fn forget_all(&self) {
        let dropped = std::mem::replace(
            &mut *self.cache.lock().expect("statement cache"),
            Lru::new(self.cache_capacity),
        );
        drop(dropped);
    }

    /// Clears the statement cache after `sql` ran (whatever its outcome) if
    /// it may have dropped the server's prepared statements (`DEALLOCATE`,
    /// `DISCARD ALL`, see [`crate::sql::control::drops_prepared_statements`]):
    /// for a transaction or a pinned connection, where such statements are
    /// allowed. Anything the text check cannot see is caught by the 26000
    /// path of [`ConnParts::run`].
    pub(crate) fn after_session_statement(&self, sql: &str) {
        if crate::sql::control::drops_prepared_statements(sql) {
            self.forget_all();
        }
    }
}

/// Whether the connection can serve the next statement after `e`.
///
/// A server error (SQLSTATE) arrives in step with the protocol, and so do
/// the driver's own checks made before anything is sent (parameter count
/// and conversion) or on rows already received. Anything else — an
/// unexpected message, such as the CopyInResponse of a `COPY … FROM STDIN`
/// sent as a plain statement, after which the server waits for COPY data
/// that never comes — leaves the connection out of step, and a closed
/// connection is gone: either way it must never reach another user.
pub(crate) fn leaves_connection_usable(e: &tokio_postgres::Error) -> bool {
    if e.as_db_error().is_some() {
        return true;
    }
    if e.is_closed() {
        return false;
    }
    // The driver's error kinds are not public: these are the Display texts
    // of the kinds raised before sending or after a complete answer.
    let text = e.to_string();
    [
        "error serializing parameter",
        "error encoding message to server",
        "error deserializing column",
        "invalid column",
        "expected ",
        "query returned an unexpected number of",
    ]
    .iter()
    .any(|prefix| text.starts_with(prefix))
}

/// SQLSTATE 25006 (`read_only_sql_transaction`): the server refused a write.
pub(crate) fn is_read_only_refusal(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
}

/// A prepared statement the server does not have (26000): dropped by
/// `DEALLOCATE` or `DISCARD ALL` behind the cache's back.
fn is_missing_statement(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME)
}

fn is_stale_plan(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED
            && db.message().contains("cached plan")
    })
}

/// The session reset: what `DISCARD ALL` does, except `DEALLOCATE ALL`
/// and `DISCARD PLANS` — the statements prepared by the protocol (the
/// statement cache) stay; only those made by SQL `PREPARE` (`from_sql`)
/// are deallocated. `SET SESSION AUTHORIZATION DEFAULT` (allowed to any
/// user) comes first, undoing `SET ROLE` too, so the rest runs as the
/// connection's own user; settings go back to their connect-time values
/// (the startup options, so an engine's `setting()`s stay).
pub(crate) const RESET_SQL: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; CLOSE ALL; \
     UNLISTEN *; SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; \
     DO $pgassist_reset$ DECLARE n text; BEGIN \
     FOR n IN SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql LOOP \
     EXECUTE pg_catalog.format('DEALLOCATE %I', n); END LOOP; END $pgassist_reset$";

/// Longest wait for a session reset before the connection is discarded.
const RESET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// SQL texts whose parameter types are remembered in unnamed-statement mode.
const UNNAMED_TYPE_CACHE: usize = 256;

/// How connections are made: plain, or TLS through rustls.
#[derive(Clone)]
pub(crate) enum Connector {
    Plain(Arc<tokio_postgres::Config>),
    #[cfg(feature = "rustls")]
    Rustls(
        Arc<tokio_postgres::Config>,
        tokio_postgres_rustls::MakeRustlsConnect,
    ),
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres' Config Debug redacts the password.
        match self {
            Connector::Plain(pg) => pg.fmt(f),
            #[cfg(feature = "rustls")]
            Connector::Rustls(pg, _) => pg.fmt(f),
        }
    }
}

/// bb8 manager: connects with the engine's connector and wraps the client.
pub(crate) struct Manager {
    inner: Connector,
    statement_cache: usize,
    after_connect: Option<crate::config::AfterConnect>,
    counters: Arc<Counters>,
    next_id: AtomicU64,
    /// For a writer engine: the pool generation this manager connects for.
    follower: Option<super::Follower>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// The connector for an engine's settings: plain for `sslmode=disable`
    /// (or without the `rustls` feature), else rustls with the engine's
    /// verification mode. Built once per engine (roots are loaded here).
    pub(crate) fn new(engine: &str, config: &crate::EngineConfig) -> crate::Result<Connector> {
        let pg = Arc::new(config.connect_config());
        #[cfg(feature = "rustls")]
        if config.tls.mode != crate::config::tls::SslMode::Disable {
            let tls = crate::config::tls::connector(engine, &config.tls)?;
            return Ok(Connector::Rustls(pg, tls));
        }
        let _ = engine;
        Ok(Connector::Plain(pg))
    }

    /// Connects (to the first host of the list that accepts and matches
    /// `target_session_attrs`) and drives the connection on a task.
    async fn connect(&self) -> Result<(Client, Arc<ServerRole>), tokio_postgres::Error> {
        match self {
            Connector::Plain(pg) => {
                let (client, connection) = pg.connect(NoTls).await?;
                Ok((client, spawn_connection(connection)))
            }
            #[cfg(feature = "rustls")]
            Connector::Rustls(pg, tls) => {
                let (client, connection) = pg.connect(tls.clone()).await?;
                Ok((client, spawn_connection(connection)))
            }
        }
    }

    /// Sends a cancel request for whatever `token`'s backend runs now, with
    /// the engine's TLS settings.
    async fn cancel(&self, token: &CancelToken) -> Result<(), tokio_postgres::Error> {
        match self {
            Connector::Plain(_) => token.cancel_query(NoTls).await,
            #[cfg(feature = "rustls")]
            Connector::Rustls(_, tls) => token.cancel_query(tls.clone()).await,
        }
    }
}

impl Manager {
    pub(crate) fn new(
        connector: Connector,
        statement_cache: usize,
        after_connect: Option<crate::config::AfterConnect>,
        counters: Arc<Counters>,
        follower: Option<super::Follower>,
    ) -> Self {
        Manager {
            inner: connector,
            statement_cache,
            after_connect,
            counters,
            next_id: AtomicU64::new(1),
            follower,
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
        let (client, server) = self.inner.connect().await?;
        let backend_pid = backend_pid(&client).await?;
        if let Some(hook) = &self.after_connect {
            hook(&client).await?;
        }
        let canceller = Canceller {
            token: client.cancel_token(),
            connector: self.inner.clone(),
        };
        Ok(PgConn(Arc::new(ConnParts {
            canceller,
            client,
            backend_pid,
            state: Arc::new(StateCell::default()),
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            cache: Mutex::new(Lru::new(self.statement_cache)),
            cache_capacity: self.statement_cache,
            types: (self.statement_cache == 0).then(|| Mutex::new(Lru::new(UNNAMED_TYPE_CACHE))),
            replans: AtomicU64::new(0),
            after_connect: self.after_connect.clone(),
            server,
            follower: self.follower.clone(),
        })))
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), tokio_postgres::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        if conn.client.is_closed() {
            return true;
        }
        if !conn.state.is_idle() {
            self.counters
                .discarded_dirty
                .fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }
}
