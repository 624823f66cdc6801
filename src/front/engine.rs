//! One named database: a bb8 pool of tokio-postgres connections, its config,
//! and its counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bb8::{Pool, RunError};

use crate::config::EngineConfig;
use crate::error::{Error, Result, describe};
use crate::pool::manager::{Connector, Manager};
use crate::pool::ready::PoolSlot;
use crate::pool::ready::SharedTake;
pub(crate) use crate::pool::ready::{Conn, Lease};
use crate::tx::hooks::Hooks;
use crate::tx::tracker::Tracker;

/// Per-engine counters (monotonic since the registry was built).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) checkouts: AtomicU64,
    pub(crate) checkout_timeouts: AtomicU64,
    pub(crate) connect_errors: AtomicU64,
    pub(crate) begun: AtomicU64,
    pub(crate) committed: AtomicU64,
    pub(crate) rolled_back: AtomicU64,
    pub(crate) commit_unknown: AtomicU64,
    pub(crate) discarded_dirty: AtomicU64,
    pub(crate) discarded_closed: AtomicU64,
    pub(crate) statements: AtomicU64,
    pub(crate) pipelined: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn inc(&self, f: impl Fn(&Counters) -> &AtomicU64) {
        bump(f(self));
    }
}

/// Remembers the last connection error, so that a checkout that timed out
/// while the server was unreachable reports [`Error::Connect`] with the
/// reason instead of a bare pool timeout.
#[derive(Debug, Clone, Default)]
struct LastConnectError(Arc<Mutex<Option<(Instant, String)>>>);

impl bb8::ErrorSink<tokio_postgres::Error> for LastConnectError {
    fn sink(&self, e: tokio_postgres::Error) {
        *self.0.lock().expect("connect error") = Some((Instant::now(), describe(&e)));
    }
    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<tokio_postgres::Error>> {
        Box::new(self.clone())
    }
}

/// One named bb8 pool plus its config and counters. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    pub(crate) inner: Arc<EngineInner>,
}

#[derive(Debug)]
pub(crate) struct EngineInner {
    pub(crate) name: Arc<str>,
    pub(crate) config: EngineConfig,
    /// The bb8 pool with its ready stack; `None` once closed.
    slot: RwLock<Option<Arc<PoolSlot>>>,
    pub(crate) counters: Arc<Counters>,
    last_error: LastConnectError,
    pub(crate) hooks: Arc<Hooks>,
    pub(crate) tracker: Arc<Tracker>,
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    pub(crate) telemetry: crate::telemetry::Fields,
    /// Position in the registry (the index of its slot in a `Sessions` scope).
    pub(crate) index: usize,
    /// Some engine is a replica of this one: record WAL positions after commits.
    pub(crate) has_replicas: std::sync::atomic::AtomicBool,
    pub(crate) replica: crate::front::replica::ReplicaState,
    pub(crate) two_phase: crate::two_phase::unit_of_work::TwoPhaseState,
    connector: Connector,
}

impl Engine {
    pub(crate) fn new(
        name: &str,
        index: usize,
        config: EngineConfig,
        hooks: Arc<Hooks>,
        tracker: Arc<Tracker>,
    ) -> Result<Engine> {
        config.validate(name)?;
        let counters = Arc::new(Counters::default());
        let last_error = LastConnectError::default();
        let connector = Connector::new(name, &config)?;
        let pool = build_pool(&config, &connector, &counters, &last_error);
        let config_pg = config.pg.clone();
        let slot = PoolSlot::new(pool, config.max_size, config.is_reaped());
        Ok(Engine {
            inner: Arc::new(EngineInner {
                name: name.into(),
                config,
                slot: RwLock::new(Some(slot)),
                counters,
                last_error,
                hooks,
                tracker,
                telemetry: crate::telemetry::Fields::new(&config_pg),
                index,
                has_replicas: Default::default(),
                replica: Default::default(),
                two_phase: Default::default(),
                connector,
            }),
        })
    }

    /// The engine's name in the registry.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The current pool and ready stack, or `None` once the engine is closed.
    fn slot(&self) -> Option<Arc<PoolSlot>> {
        self.inner.slot.read().expect("engine pool").clone()
    }

    /// Checks out a connection: the most recently returned clean one if any
    /// is parked (see [`crate::pool::ready`]), else one from bb8. A connection
    /// found closed (its server went away while it sat idle) is discarded
    /// and replaced transparently.
    pub(crate) async fn checkout(&self) -> Result<Conn> {
        let slot = self.slot().ok_or_else(|| self.closed_error())?;
        let conn = match slot.take() {
            Ok(conn) => conn,
            Err(waiting) => {
                // bb8 usually hands out a connection within its first wait
                // (no clock read, no loop).
                let pooled = match slot.pool.get_owned().await {
                    Ok(pooled) => pooled,
                    // bb8 gave up after its wait of min(connection_timeout, slice).
                    Err(RunError::TimedOut) => {
                        let waited = self.inner.config.connection_timeout.min(CONNECT_SLICE);
                        let started = Instant::now()
                            .checked_sub(waited)
                            .unwrap_or_else(Instant::now);
                        drop(waiting);
                        return Box::pin(self.checkout_within(slot.clone(), started)).await;
                    }
                    Err(e) => return Err(self.checkout_error(e, Instant::now())),
                };
                drop(waiting);
                slot.wrap(pooled)
            }
        };
        self.inner.counters.inc(|c| &c.checkouts);
        if !conn.client.is_closed() {
            return Ok(conn);
        }
        // Rare (boxed, to keep the common future small): idle connections
        // that died with a server restart. Try past them all.
        Box::pin(self.replace_closed(conn, slot, Instant::now())).await
    }

    /// A connection for one autocommit statement: with
    /// [`EngineConfig::pipeline`] above 1, possibly shared with other
    /// autocommit statements (see [`crate::pool::ready`]); else [`Engine::checkout`].
    pub(crate) async fn lease(&self) -> Result<Lease> {
        let max_in_flight = self.inner.config.pipeline;
        if max_in_flight <= 1 {
            return self.checkout().await.map(Lease::Own);
        }
        let slot = self.slot().ok_or_else(|| self.closed_error())?;
        let mut started = None;
        loop {
            let freed = slot.share_freed();
            let mut freed = std::pin::pin!(freed);
            if started.is_some() {
                // Registered before looking again: no wake-up is lost.
                freed.as_mut().enable();
            }
            match slot.take_shared(max_in_flight) {
                SharedTake::Got(shared, joined) if !shared.client.is_closed() => {
                    self.inner.counters.inc(|c| &c.checkouts);
                    if joined {
                        self.inner.counters.inc(|c| &c.pipelined);
                    }
                    return Ok(Lease::Shared(shared));
                }
                // Closed (the pool discards it when the last user is done)
                // or not saturated: a connection of its own, with the
                // waiting, timeouts and replacement of closed ones that
                // come with that.
                SharedTake::Got(closed, _) => {
                    drop(closed);
                    break;
                }
                SharedTake::Bb8 => break,
                SharedTake::Wait(waiting) => {
                    let Some(since) = started else {
                        // Look once more, registered for a wake-up.
                        started = Some(Instant::now());
                        continue;
                    };
                    let limit = self.inner.config.connection_timeout;
                    let deadline = tokio::time::Instant::from_std(since + limit);
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(self.checkout_error(RunError::TimedOut, since));
                    }
                    drop(waiting);
                }
            }
        }
        let conn = self.checkout().await?;
        Ok(Lease::Shared(conn.into_shared()))
    }

    /// The slow path of [`Engine::checkout`]: waits on, counted from `started`.
    async fn checkout_within(&self, slot: Arc<PoolSlot>, started: Instant) -> Result<Conn> {
        let conn = self.get(&slot, started).await?;
        self.inner.counters.inc(|c| &c.checkouts);
        if !conn.client.is_closed() {
            return Ok(conn);
        }
        self.replace_closed(conn, slot, started).await
    }

    async fn replace_closed(
        &self,
        mut conn: Conn,
        slot: Arc<PoolSlot>,
        started: Instant,
    ) -> Result<Conn> {
        for _ in 0..=self.inner.config.max_size {
            self.inner.counters.inc(|c| &c.discarded_closed);
            drop(conn); // has_broken sees it closed: bb8 drops it and opens a new one
            conn = self.get(&slot, started).await?;
            self.inner.counters.inc(|c| &c.checkouts);
            if !conn.client.is_closed() {
                return Ok(conn);
            }
        }
        Err(Error::Closed {
            engine: self.name().to_owned(),
            reason: "connection closed: every pooled connection was found closed".into(),
        })
    }

    /// One connection, parked or from bb8, within the engine's
    /// `connection_timeout` counted from `started`. bb8 waits at most
    /// [`CONNECT_SLICE`] at a time (see [`build_pool`]); a wait that ends
    /// empty starts again, which makes bb8 try to connect afresh instead of
    /// sleeping in its retry backoff.
    async fn get(&self, slot: &Arc<PoolSlot>, started: Instant) -> Result<Conn> {
        let limit = self.inner.config.connection_timeout;
        loop {
            let waiting = match slot.take() {
                Ok(conn) => return Ok(conn),
                Err(waiting) => waiting,
            };
            let remaining = limit.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(self.checkout_error(RunError::TimedOut, started));
            }
            // bb8 bounds each wait by min(limit, slice) itself.
            let got = if remaining > CONNECT_SLICE {
                slot.pool.get_owned().await
            } else {
                tokio::time::timeout(remaining, slot.pool.get_owned())
                    .await
                    .unwrap_or(Err(RunError::TimedOut))
            };
            drop(waiting);
            match got {
                Ok(pooled) => return Ok(slot.wrap(pooled)),
                Err(RunError::TimedOut) => continue,
                Err(e) => return Err(self.checkout_error(e, started)),
            }
        }
    }

    fn checkout_error(&self, e: RunError<tokio_postgres::Error>, started: Instant) -> Error {
        let engine = self.name().to_owned();
        match e {
            RunError::User(e) => {
                self.inner.counters.inc(|c| &c.connect_errors);
                Error::Connect {
                    engine,
                    message: describe(&e),
                }
            }
            RunError::TimedOut => {
                self.inner.counters.inc(|c| &c.checkout_timeouts);
                let waited = started.elapsed();
                let recent = self
                    .inner
                    .last_error
                    .0
                    .lock()
                    .expect("connect error")
                    .clone();
                match recent {
                    Some((at, message)) if at.elapsed() <= waited + Duration::from_millis(100) => {
                        self.inner.counters.inc(|c| &c.connect_errors);
                        Error::Connect { engine, message }
                    }
                    _ => Error::PoolTimeout { engine, waited },
                }
            }
        }
    }

    fn closed_error(&self) -> Error {
        Error::Closed {
            engine: self.name().to_owned(),
            reason: "the engine is closed (Registry::close)".into(),
        }
    }

    /// Replaces the pool with a new one; the old pool's connections close as
    /// they are returned. Sessions already holding a connection finish on it.
    pub(crate) fn reinit(&self) {
        let inner = &self.inner;
        let fresh = build_pool(
            &inner.config,
            &inner.connector,
            &inner.counters,
            &inner.last_error,
        );
        let fresh = PoolSlot::new(fresh, inner.config.max_size, inner.config.is_reaped());
        let old = inner.slot.write().expect("engine pool").replace(fresh);
        if let Some(old) = old {
            old.retire();
        }
    }

    /// Refuses new checkouts and drops the pool (idle connections close now,
    /// checked-out ones when returned).
    pub(crate) fn close(&self) {
        let old = self.inner.slot.write().expect("engine pool").take();
        if let Some(old) = old {
            old.retire();
        }
    }

    /// A snapshot of the engine's pool and transaction counters.
    pub fn stats(&self) -> EngineStats {
        let (connections, idle, waits) = match self.slot() {
            Some(slot) => {
                // Parked connections are checked out as far as bb8 knows.
                let parked = slot.parked();
                let s = slot.pool.state();
                (
                    s.connections,
                    s.idle_connections + parked,
                    s.statistics.get_waited,
                )
            }
            None => (0, 0, 0),
        };
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            name: self.name().to_owned(),
            max_size: self.inner.config.max_size,
            connections,
            idle,
            in_use: connections.saturating_sub(idle),
            checkouts: get(&c.checkouts),
            checkout_waits: waits,
            checkout_timeouts: get(&c.checkout_timeouts),
            connect_errors: get(&c.connect_errors),
            statements: get(&c.statements),
            pipelined: get(&c.pipelined),
            begun: get(&c.begun),
            committed: get(&c.committed),
            rolled_back: get(&c.rolled_back),
            commit_unknown: get(&c.commit_unknown),
            in_transaction: self.inner.tracker.in_transaction(self.name()),
            discarded_dirty: get(&c.discarded_dirty),
            discarded_closed: get(&c.discarded_closed),
        }
    }
}

/// Longest single wait bb8 is given for a connection. bb8 retries a failed
/// connect with a backoff that grows up to half its connection timeout, and
/// a waiter is not woken when the server comes back: with the engine's
/// timeout there (30 s by default), checkouts that waited through an outage
/// could go on waiting for up to 15 s after the server was back. Waiting in
/// slices (see [`Engine::get`]) keeps that under half a slice.
const CONNECT_SLICE: Duration = Duration::from_secs(1);

fn build_pool(
    config: &EngineConfig,
    connector: &Connector,
    counters: &Arc<Counters>,
    sink: &LastConnectError,
) -> Pool<Manager> {
    let manager = Manager::new(connector.clone(), config.statement_cache, counters.clone());
    Pool::builder()
        .max_size(config.max_size)
        .min_idle(config.min_idle)
        .connection_timeout(config.connection_timeout.min(CONNECT_SLICE))
        .idle_timeout(config.idle_timeout)
        .max_lifetime(config.max_lifetime)
        // A round trip per checkout is what we avoid: broken or dirty
        // connections are caught by `has_broken` when they come back.
        .test_on_check_out(false)
        .error_sink(Box::new(sink.clone()))
        .build_unchecked(manager)
}

/// Counters of one engine, from [`crate::Registry::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineStats {
    /// Engine name.
    pub name: String,
    /// Configured pool size.
    pub max_size: u32,
    /// Connections open now (idle + in use), in the current pool.
    pub connections: u32,
    /// Idle connections in the pool.
    pub idle: u32,
    /// Connections checked out now.
    pub in_use: u32,
    /// Checkouts since the registry was built.
    pub checkouts: u64,
    /// Checkouts that had to wait for a connection (current pool).
    pub checkout_waits: u64,
    /// Checkouts that gave up after `connection_timeout`.
    pub checkout_timeouts: u64,
    /// Checkouts that failed because the server could not be reached.
    pub connect_errors: u64,
    /// Statements run (autocommit and in transactions).
    pub statements: u64,
    /// Autocommit statements sent on a connection other statements were
    /// using ([`EngineConfig::pipeline`]).
    pub pipelined: u64,
    /// Outermost transactions begun.
    pub begun: u64,
    /// Transactions committed.
    pub committed: u64,
    /// Transactions rolled back (explicitly, by drop, or by a failed commit).
    pub rolled_back: u64,
    /// Commits whose outcome is unknown (connection lost or session ended
    /// during COMMIT, or the commit future dropped while COMMIT was in flight).
    pub commit_unknown: u64,
    /// Connections out of autocommit now (entries in the per-transaction connection map).
    pub in_transaction: usize,
    /// Connections discarded because they came back not clean.
    pub discarded_dirty: u64,
    /// Connections discarded at checkout because they were found closed.
    pub discarded_closed: u64,
}
