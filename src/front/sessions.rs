//! `Sessions`: the per-request container.
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

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use super::registry::Registry;
use super::session::Session;
use crate::error::{Error, Result};
use crate::pool::manager::ConnParts;
use crate::pool::state::Event;
use crate::tx::Observer;
use crate::tx::options::TxOptions;
use crate::tx::transaction::{Transaction, TxCore};

/// Where one engine stands within a request, as in sqlassist's debug panel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum EngineState {
    /// Configured, not touched by this request.
    Init,
    /// Used by this request.
    Start,
    /// Used, and the request has finished with it.
    End,
}

/// What a request did on one engine.
#[derive(Debug, Default)]
pub(crate) struct EngineUse {
    used: AtomicBool,
    /// WAL insert position after this request's last commit here (0: none).
    last_lsn: AtomicU64,
    /// Position of an earlier commit here, from a causal token (0: none).
    observed_lsn: AtomicU64,
    statements: AtomicU64,
    busy_nanos: AtomicU64,
    backend_pids: Mutex<Vec<i32>>,
    transactions: Mutex<Vec<Weak<TxCore>>>,
    /// Connections pinned from this engine's session in this request,
    /// revoked at its end (see [`ScopeRef::pinned`]).
    pinned: Mutex<Vec<Weak<PinnedLink>>>,
    /// Transaction-per-request mode: the request's transaction on this engine.
    request_tx: Mutex<Option<Arc<Transaction<'static>>>>,
    /// Serialises the creation of `request_tx`.
    creating: tokio::sync::Mutex<()>,
}

/// A request's hold on a connection pinned during it, to end a transaction
/// still open on it when the request ends. Owned by the `Pinned` alone (the
/// request keeps a `Weak`): once the pin is dropped, the connection may
/// serve another request, which the first one's end must not touch — a
/// `Weak` of the connection itself would live on in the pool. The `Pinned`
/// empties it before letting go of its connection, under the lock the
/// request's end holds while it revokes: no revocation lands on a
/// connection already handed on.
pub(crate) struct PinnedLink(Mutex<Option<Arc<ConnParts>>>);

impl fmt::Debug for PinnedLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedLink").finish_non_exhaustive()
    }
}

impl PinnedLink {
    /// The `Pinned` lets go of its connection.
    pub(crate) fn release(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Longest list of backend pids kept per engine and request.
const MAX_PIDS: usize = 32;

/// State shared by a container and the sessions it hands out.
#[derive(Debug)]
pub(crate) struct Scope {
    engines: Box<[EngineUse]>,
    info: RwLock<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    per_request_tx: Option<TxOptions>,
    ended: AtomicBool,
    /// Issue time of the oldest causal token observed (u64::MAX: none).
    #[cfg(feature = "causal")]
    observed_issued: AtomicU64,
}

/// A session's link to its container: the scope and the engine's index in it.
#[derive(Clone)]
pub(crate) struct ScopeRef {
    pub(crate) scope: Arc<Scope>,
    pub(crate) index: usize,
}

impl fmt::Debug for ScopeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopeRef")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl ScopeRef {
    fn usage(&self) -> &EngineUse {
        &self.scope.engines[self.index]
    }

    /// Marks the engine used; refuses work once the request has ended.
    pub(crate) fn touch(&self, engine: &str) -> Result<()> {
        if self.scope.ended.load(Ordering::Acquire) {
            return Err(Error::Closed {
                engine: engine.to_owned(),
                reason: "the request's Sessions container has ended".into(),
            });
        }
        self.usage().used.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The same scope, for engine `index` (a read routed to the primary).
    pub(crate) fn for_index(&self, index: usize) -> ScopeRef {
        ScopeRef {
            scope: self.scope.clone(),
            index,
        }
    }

    /// Records the WAL position of a commit on this engine.
    pub(crate) fn note_lsn(&self, lsn: u64) {
        self.usage().last_lsn.fetch_max(lsn, Ordering::AcqRel);
    }

    /// The WAL position a read must see on engine `index`'s replicas: this
    /// request's last commit there, or an earlier one it was told of.
    pub(crate) fn required_lsn(&self, index: usize) -> u64 {
        self.scope.required_lsn(index)
    }

    /// Records one statement: the backend that ran it and how long it took.
    pub(crate) fn record(&self, backend_pid: i32, took: Duration) {
        let usage = self.usage();
        usage.statements.fetch_add(1, Ordering::Relaxed);
        usage
            .busy_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        let mut pids = usage.backend_pids.lock().expect("pids");
        if !pids.contains(&backend_pid) && pids.len() < MAX_PIDS {
            pids.push(backend_pid);
        }
    }

    /// Ties a connection pinned from this session to the request: when the
    /// request ends, a transaction still open on it is ended (see
    /// [`Scope::revoke_pinned`]).
    /// The returned link is the `Pinned`'s to hold.
    pub(crate) fn pinned(&self, conn: Arc<ConnParts>) -> Arc<PinnedLink> {
        let link = Arc::new(PinnedLink(Mutex::new(Some(conn))));
        let mut list = self.usage().pinned.lock().expect("pinned");
        list.retain(|link| link.strong_count() > 0);
        list.push(Arc::downgrade(&link));
        link
    }

    /// What a transaction of this session reports to the container.
    pub(crate) fn reporter(&self, has_replicas: bool) -> Reporter {
        Reporter {
            scope: self.clone(),
            has_replicas,
        }
    }

    pub(crate) fn info<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.scope.info()
    }

    /// Transaction-per-request mode: the options of the request transaction.
    pub(crate) fn per_request_tx(&self) -> Option<&TxOptions> {
        self.scope.per_request_tx.as_ref()
    }

    /// The request's transaction on this engine, begun on first use.
    pub(crate) async fn request_tx(&self, session: &Session) -> Result<Arc<Transaction<'static>>> {
        let usage = self.usage();
        if let Some(tx) = usage.request_tx.lock().expect("request tx").clone() {
            return Ok(tx);
        }
        let _creating = usage.creating.lock().await;
        if let Some(tx) = usage.request_tx.lock().expect("request tx").clone() {
            return Ok(tx);
        }
        // `finish` may have run while we waited: begin nothing after it.
        self.touch(session.engine_name())?;
        let options = self.scope.per_request_tx.clone().unwrap_or_default();
        let tx = Arc::new(session.begin_outermost(options).await?);
        *usage.request_tx.lock().expect("request tx") = Some(tx.clone());
        Ok(tx)
    }
}

/// A transaction's reports to its request's container: statements for the
/// report, the commit's WAL position for read-your-writes.
pub(crate) struct Reporter {
    scope: ScopeRef,
    has_replicas: bool,
}

impl Observer for Reporter {
    fn statement_ran(&self, backend_pid: i32, took: Duration) {
        self.scope.record(backend_pid, took);
    }

    fn wants_commit_lsn(&self) -> bool {
        self.has_replicas
    }

    fn committed_at(&self, lsn: u64) {
        self.scope.note_lsn(lsn);
    }

    fn opened(&self, tx: &Arc<TxCore>) {
        let mut list = self
            .scope
            .usage()
            .transactions
            .lock()
            .expect("transactions");
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(tx));
    }
}

/// Ends a pinned connection's transaction at once: ROLLBACK, then the
/// backend ends its own session. In one message, so that a statement of
/// that transaction which passed its state check before the revocation —
/// and so may reach the wire after it — cannot run after the ROLLBACK in
/// autocommit: it runs inside the transaction (and is rolled back) or
/// finds the connection gone. `RESET ROLE` first: a pinned session may
/// have `SET ROLE` to a role that may not signal the login role's backend.
const END_REVOKED_SQL: &str =
    "ROLLBACK; RESET ROLE; SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid())";

impl Scope {
    /// The request ended: a transaction still open on a connection pinned
    /// during it (a `Pinned` that outlived the request, kept by a spawned
    /// task or a long-lived value) may not go on — its next statement or
    /// commit is refused — and is rolled back on the server at once, its
    /// connection closed (the `Pinned` then refuses everything, and its
    /// connection is discarded when it is dropped).
    fn revoke_pinned(&self) {
        for usage in self.engines.iter() {
            let links = std::mem::take(&mut *usage.pinned.lock().expect("pinned"));
            for link in links.iter().filter_map(Weak::upgrade) {
                let held = link.0.lock().unwrap_or_else(|e| e.into_inner());
                let Some(conn) = held.as_ref().cloned() else {
                    continue; // the Pinned let go of it
                };
                if conn.state.apply(Event::Revoke).is_err() {
                    continue; // no transaction open, or its end is on the wire
                }
                drop(held);
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    continue; // discarded when its Pinned is dropped
                };
                runtime.spawn(async move {
                    let _ = conn.client.batch_execute(END_REVOKED_SQL).await;
                });
            }
        }
    }

    fn required_lsn(&self, index: usize) -> u64 {
        let usage = &self.engines[index];
        let own = usage.last_lsn.load(Ordering::Acquire);
        own.max(usage.observed_lsn.load(Ordering::Acquire))
    }

    fn info<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let map = self.info.read().expect("info");
        map.get(&TypeId::of::<T>())
            .cloned()
            .and_then(|v| v.downcast::<T>().ok())
    }
}

/// The per-request container. See [how transactions work](crate#how-transactions-work) and [the per-request container](crate#the-per-request-container).
///
/// ```no_run
/// # async fn handler(registry: pgassist::Registry) -> Result<(), pgassist::Error> {
/// #[derive(Debug)]
/// struct RequestId(u64);
/// let mut db = registry.sessions();               // nothing checked out yet
/// db.info_mut().insert(RequestId(42));
/// db.reader()?.query("SELECT 1", &[]).await?;
/// let tx = db.writer()?.begin().await?;
/// tx.execute("INSERT INTO audit(msg) VALUES ('hi')", &[]).await?;
/// tx.commit().await?;
/// println!("{:#?}", db.report());
/// # Ok(()) }
/// ```
pub struct Sessions {
    registry: Registry,
    scope: Arc<Scope>,
    slots: Box<[OnceLock<Session>]>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("report", &self.report())
            .finish()
    }
}

impl Sessions {
    pub(crate) fn new(registry: Registry, per_request_tx: Option<TxOptions>) -> Sessions {
        let n = registry.engines().count();
        Sessions {
            scope: Arc::new(Scope {
                engines: (0..n).map(|_| EngineUse::default()).collect(),
                info: RwLock::default(),
                per_request_tx,
                ended: AtomicBool::new(false),
                #[cfg(feature = "causal")]
                observed_issued: AtomicU64::new(u64::MAX),
            }),
            slots: (0..n).map(|_| OnceLock::new()).collect(),
            registry,
        }
    }

    /// The registry this container draws from.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The session of engine `name`, created on first use.
    pub fn get(&self, name: &str) -> Result<&Session> {
        let index = self.registry.engine_index(name)?;
        Ok(self.slot(index))
    }

    fn slot(&self, index: usize) -> &Session {
        self.slots[index].get_or_init(|| {
            let engine = self.registry.engine_at(index).clone();
            Session::scoped(
                engine,
                ScopeRef {
                    scope: self.scope.clone(),
                    index,
                },
            )
        })
    }

    /// The session for reads: the `reader` engine if configured, else the
    /// first engine declared a replica ([`crate::EngineConfig::replica_of`]).
    /// On a replica, each read goes to one of the replicas of the same
    /// primary, balanced over those that are healthy and within their lag
    /// limits (docs/replicas.md); a read after this request's writes goes
    /// to one that has replayed them, waits for one, or goes to the primary.
    ///
    /// With neither, this is an error ([`Error::UnknownEngine`] naming
    /// `reader`), as for [`Sessions::logger`]: falling back to the writable
    /// default engine would lose read-only enforcement without a word when
    /// a name is mistyped in configuration. To read from the default
    /// engine, ask for it ([`Sessions::get`], [`Sessions::any`]), or
    /// configure a `reader` engine on the same database with
    /// `read_only(true)`.
    ///
    /// [`Error::UnknownEngine`]: crate::Error::UnknownEngine
    pub fn reader(&self) -> Result<&Session> {
        let replica = self
            .registry
            .engines()
            .position(|e| e.config().replica_of_engine().is_some());
        match (self.registry.engine_index("reader"), replica) {
            (Err(_), Some(index)) => Ok(self.slot(index)),
            (index, _) => Ok(self.slot(index?)),
        }
    }

    /// The session of the engine that owns `table` (see
    /// [`crate::RegistryBuilder::route_table`]), the default engine's for
    /// unmapped tables.
    pub fn for_table(&self, table: &str) -> &Session {
        self.slot(self.registry.table_engine_index(table))
    }

    /// The container's link for sessions of engine `index`.
    pub(crate) fn scope_ref(&self, index: usize) -> ScopeRef {
        ScopeRef {
            scope: self.scope.clone(),
            index,
        }
    }

    /// Causal tokens: the positions to carry (engine index, WAL position),
    /// whether this request wrote any itself, and the issue time of the
    /// oldest token observed.
    #[cfg(feature = "causal")]
    pub(crate) fn causal_positions(&self) -> (Vec<(usize, u64)>, bool, Option<u64>) {
        let positions = (0..self.scope.engines.len())
            .map(|index| (index, self.scope.required_lsn(index)))
            .filter(|&(_, lsn)| lsn > 0)
            .collect();
        let wrote = self.wrote();
        let issued = self.scope.observed_issued.load(Ordering::Acquire);
        (positions, wrote, (issued != u64::MAX).then_some(issued))
    }

    /// Whether this request committed on a primary with replicas (so
    /// that it has a commit position to hand on).
    #[cfg(feature = "causal")]
    pub(crate) fn wrote(&self) -> bool {
        self.scope
            .engines
            .iter()
            .any(|u| u.last_lsn.load(Ordering::Acquire) > 0)
    }

    /// Raises engine `index`'s required position to a commit known from a
    /// causal token issued at `issued`.
    #[cfg(feature = "causal")]
    pub(crate) fn observe_lsn(&self, index: usize, lsn: u64, issued: u64) {
        self.scope.engines[index]
            .observed_lsn
            .fetch_max(lsn, Ordering::AcqRel);
        self.scope
            .observed_issued
            .fetch_min(issued, Ordering::AcqRel);
    }

    /// The `writer` engine's session.
    pub fn writer(&self) -> Result<&Session> {
        self.get("writer")
    }

    /// The `logger` engine's session.
    pub fn logger(&self) -> Result<&Session> {
        self.get("logger")
    }

    /// A session this request already used, if any (the first in registry
    /// order), else the default engine's.
    ///
    /// A `Result` like its siblings (`db.any()?`), though it cannot fail:
    /// a registry always has a default engine.
    pub fn any(&self) -> Result<&Session> {
        let used = self
            .scope
            .engines
            .iter()
            .position(|u| u.used.load(Ordering::Relaxed));
        Ok(self.slot(used.unwrap_or_else(|| self.registry.default_index())))
    }

    /// A value stashed for this request, visible to every session handed out.
    pub fn info<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.scope.info()
    }

    /// The request's info stash, to insert values into.
    pub fn info_mut(&mut self) -> InfoMut<'_> {
        InfoMut { scope: &self.scope }
    }

    /// What the request used so far.
    pub fn report(&self) -> SessionsReport {
        let ended = self.scope.ended.load(Ordering::Acquire);
        let default = self.registry.default_engine_name();
        let engines = self
            .registry
            .engines()
            .zip(self.scope.engines.iter())
            .map(|(engine, usage)| {
                let stats = engine.stats();
                let used = usage.used.load(Ordering::Relaxed);
                let transactions = usage
                    .transactions
                    .lock()
                    .expect("transactions")
                    .iter()
                    .filter_map(Weak::upgrade)
                    .filter(|core| core.is_open())
                    .map(|core| OpenTransaction {
                        id: core.id(),
                        depth: core.depth_now(),
                        begun: core.is_begun(),
                    })
                    .collect();
                EngineReport {
                    name: engine.name().to_owned(),
                    is_default: engine.name() == default,
                    read_only: engine.config().is_read_only(),
                    pool_size: stats.max_size,
                    pool_idle: stats.idle,
                    pool_in_use: stats.in_use,
                    state: match (used, ended) {
                        (false, _) => EngineState::Init,
                        (true, false) => EngineState::Start,
                        (true, true) => EngineState::End,
                    },
                    statements: usage.statements.load(Ordering::Relaxed),
                    time_ms: usage.busy_nanos.load(Ordering::Relaxed) as f64 / 1e6,
                    backend_pids: usage.backend_pids.lock().expect("pids").clone(),
                    open_transactions: transactions,
                }
            })
            .collect();
        SessionsReport { engines }
    }

    /// Ends the request, committing its request transactions:
    /// [`Sessions::finish`] with `true`.
    pub async fn commit(&self) -> Result<SessionsReport> {
        self.finish(true).await
    }

    /// Ends the request, rolling back its request transactions:
    /// [`Sessions::finish`] with `false`.
    pub async fn rollback(&self) -> Result<SessionsReport> {
        self.finish(false).await
    }

    /// Ends the request — the form for middleware, where commit or rollback
    /// is decided at run time ([`Sessions::commit`] and
    /// [`Sessions::rollback`] read better where it is known): in
    /// transaction-per-request mode commits (`commit` true) or rolls back each engine's request transaction; marks every
    /// used engine END; refuses later statements from sessions handed out.
    /// Returns the final report, or the first commit error (the remaining
    /// transactions are then rolled back).
    ///
    /// Takes `&self` so that a container shared by a web framework's request
    /// (an `Arc`, cloned into the handler) can be finished by the middleware
    /// even when a clone outlived the handler: the request ends all the same,
    /// and that clone's statements get [`Error::Closed`]. Later statements are
    /// refused from the moment `finish` is called, and a request transaction
    /// being begun concurrently is waited for and ended with the others.
    ///
    /// Connections pinned during the request ([`Session::pin`]) belong to
    /// it too: from here on they refuse statements with [`Error::Closed`]
    /// (their session state is kept until the [`crate::Pinned`] is
    /// dropped, then reset as always), and a transaction still open on one
    /// is rolled back at once and its connection closed (its next
    /// statement or commit is refused; see docs/session-state.md).
    pub async fn finish(&self, commit: bool) -> Result<SessionsReport> {
        self.scope.ended.store(true, Ordering::Release);
        // Not an error of the request's own: the revoked transaction's
        // owner hears of it at its next step.
        self.scope.revoke_pinned();
        let mut first_error = None;
        for usage in self.scope.engines.iter() {
            // A statement that passed its check before `ended` was set may be
            // beginning this engine's request transaction: let it finish.
            let _creating = usage.creating.lock().await;
            let taken = usage.request_tx.lock().expect("request tx").take();
            let Some(tx) = taken else { continue };
            let tx = match Arc::try_unwrap(tx) {
                Ok(tx) => tx,
                Err(shared) => {
                    // Still in use somewhere (a spawned task kept a session):
                    // it rolls back when the last user lets go.
                    drop(shared);
                    first_error.get_or_insert(Error::Usage(
                        "the request transaction was still in use at the end of the request; it was rolled back".into(),
                    ));
                    continue;
                }
            };
            let result = if commit && first_error.is_none() {
                tx.commit().await
            } else {
                tx.rollback().await
            };
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.report()),
        }
    }
}

impl Drop for Sessions {
    /// Rolls back the request transactions at once (their ROLLBACK is sent
    /// on a spawned task), and transactions still open on connections
    /// pinned during the request (see [`Sessions::finish`]), and refuses
    /// further work from leaked sessions and pinned connections.
    fn drop(&mut self) {
        self.scope.ended.store(true, Ordering::Release);
        self.scope.revoke_pinned();
        for usage in self.scope.engines.iter() {
            drop(usage.request_tx.lock().expect("request tx").take());
        }
    }
}

/// Inserts values into a request's info stash; see [`Sessions::info_mut`].
#[derive(Debug)]
pub struct InfoMut<'a> {
    scope: &'a Scope,
}

impl InfoMut<'_> {
    /// Stashes `value`, replacing an earlier value of the same type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.scope
            .info
            .write()
            .expect("info")
            .insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// Removes the value of type `T`, if any.
    pub fn remove<T: Any + Send + Sync>(&mut self) {
        self.scope
            .info
            .write()
            .expect("info")
            .remove(&TypeId::of::<T>());
    }
}

/// What a request used, from [`Sessions::report`]: sqlassist's debug panel.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct SessionsReport {
    /// Every configured engine, in registry order.
    pub engines: Vec<EngineReport>,
}

/// One engine in a [`SessionsReport`].
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct EngineReport {
    /// Engine name.
    pub name: String,
    /// Whether it is the registry's default engine.
    pub is_default: bool,
    /// Whether the engine refuses writes.
    pub read_only: bool,
    /// Configured pool size.
    pub pool_size: u32,
    /// Idle connections in the pool now.
    pub pool_idle: u32,
    /// Connections checked out now (by any request).
    pub pool_in_use: u32,
    /// INIT, START or END for this request.
    pub state: EngineState,
    /// Statements this request ran on the engine.
    pub statements: u64,
    /// Time this request spent in those statements, in milliseconds.
    pub time_ms: f64,
    /// Server process ids that served this request (at most 32).
    pub backend_pids: Vec<i32>,
    /// Transactions of this request still open, with their savepoint depth.
    pub open_transactions: Vec<OpenTransaction>,
}

/// An open transaction in an [`EngineReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct OpenTransaction {
    /// Transaction id (the key of the per-transaction connection map).
    pub id: u64,
    /// Savepoints open inside it.
    pub depth: u32,
    /// Whether BEGIN has gone out yet.
    pub begun: bool,
}
