//! The pool layer: one named bb8 pool of tokio-postgres connections.
//!
//! Everything that makes a checkout fast lives here — the ready stack in
//! front of bb8 and pipelined sharing ([`ready`]), the statement cache
//! ([`cache`]) — together with the pooled connection and the bb8 manager
//! that vets it ([`manager`]), the connection's state machine ([`state`])
//! and the counters ([`stats`]). This layer imports nothing from the layers
//! above it (`tx`, `front`).

pub(crate) mod cache;
pub(crate) mod manager;
pub(crate) mod ready;
pub(crate) mod state;
pub(crate) mod stats;
pub(crate) mod stream;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use bb8::{Pool as Bb8Pool, RunError};
use tokio_postgres::config::TargetSessionAttrs;

use crate::config::EngineConfig;
use crate::error::{ConnectFailure, Error, Result};
use manager::{Connector, Manager};
pub(crate) use ready::{Conn, Lease};
use ready::{PoolSlot, SharedTake, Wait};
use stats::{Counters, Occupancy};

/// Remembers the last connection error, so that a checkout that timed out
/// while the server was unreachable reports [`Error::Connect`] with the
/// reason instead of a bare pool timeout; and wakes the checkouts waiting
/// for a connection when the error is permanent (see
/// [`crate::error::is_permanent_connect_error`]), so that a wrong password
/// is reported as soon as the server answers instead of after
/// `connection_timeout` of retries.
#[derive(Debug, Clone, Default)]
struct LastConnectError(Arc<ConnectErrors>);

#[derive(Debug, Default)]
struct ConnectErrors {
    last: Mutex<Option<(Instant, ConnectFailure)>>,
    /// Notified (all waiters) on each permanent failure.
    permanent: tokio::sync::Notify,
    /// The engine's hosts, when it lists several (see
    /// [`ConnectFailure::among_hosts`]).
    hosts: Option<String>,
}

impl LastConnectError {
    fn new(config: &EngineConfig) -> LastConnectError {
        LastConnectError(Arc::new(ConnectErrors {
            hosts: config.has_several_hosts().then(|| {
                let attrs = config.connect_config().get_target_session_attrs();
                let wanted = match attrs {
                    TargetSessionAttrs::ReadWrite => "; a read-write server wanted",
                    TargetSessionAttrs::ReadOnly => "; a read-only server wanted",
                    _ => "",
                };
                format!(
                    "{}{wanted}; the error is the last host's",
                    config.host_list()
                )
            }),
            ..ConnectErrors::default()
        }))
    }

    /// A failed connection attempt, as reported to the caller.
    fn failure(&self, e: &tokio_postgres::Error) -> ConnectFailure {
        let failure = ConnectFailure::new(e);
        match &self.0.hosts {
            Some(hosts) => failure.among_hosts(hosts),
            None => failure,
        }
    }

    fn last(&self) -> Option<(Instant, ConnectFailure)> {
        self.0.last.lock().expect("connect error").clone()
    }
}

impl bb8::ErrorSink<tokio_postgres::Error> for LastConnectError {
    fn sink(&self, e: tokio_postgres::Error) {
        let failure = self.failure(&e);
        let permanent = failure.permanent;
        *self.0.last.lock().expect("connect error") = Some((Instant::now(), failure));
        if permanent {
            self.0.permanent.notify_waiters();
        }
    }
    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<tokio_postgres::Error>> {
        Box::new(self.clone())
    }
}

/// One named pool: bb8 with the ready stack in front of it, the engine's
/// settings and counters. Cheap to clone (one `Arc`).
#[derive(Clone, Debug)]
pub(crate) struct Pool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    name: Arc<str>,
    config: EngineConfig,
    /// The bb8 pool with its ready stack; `None` once closed.
    slot: RwLock<Option<Arc<PoolSlot>>>,
    counters: Arc<Counters>,
    last_error: LastConnectError,
    connector: Connector,
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    telemetry: crate::telemetry::Fields,
    /// Bumped each time the bb8 pool is replaced; written under the `slot`
    /// lock. Connections carry the generation they were opened in (see
    /// [`Follower`]).
    generation: AtomicU64,
}

/// A writer's connection's link back to its pool: the pool generation it
/// was opened in. When its server stops being the primary under it (a
/// 25006 refusal from a server that says it is read-only now), the first
/// such refusal of the current generation replaces the pool — every
/// connection of the engine is discarded at once, and new ones dial the
/// host list anew, finding the new primary — while refusals from
/// connections of an older generation change nothing. Only writer engines
/// have one: a read-only engine's 25006 is its own doing.
#[derive(Clone, Debug)]
pub(crate) struct Follower {
    pool: Weak<PoolInner>,
    pub(crate) generation: u64,
}

impl Follower {
    /// This connection's server refused a write because it is no longer
    /// the primary.
    pub(crate) fn refused(&self) {
        if let Some(inner) = self.pool.upgrade() {
            if inner.replace_pool(Some(self.generation)) {
                inner.counters.inc(|c| &c.primary_switches);
            }
        }
    }
}

impl PoolInner {
    /// Builds a new bb8 pool of the next generation and retires the old one
    /// (its connections close as they are returned). With
    /// `only_generation`, only if the current pool is of that generation
    /// and open; returns whether it replaced it.
    fn replace_pool(self: &Arc<Self>, only_generation: Option<u64>) -> bool {
        let mut slot = self.slot.write().expect("engine pool");
        let current = self.generation.load(Ordering::Relaxed);
        if let Some(g) = only_generation {
            if g != current || slot.is_none() {
                return false;
            }
        }
        let next = current + 1;
        self.generation.store(next, Ordering::Relaxed);
        let follower = Follower {
            pool: Arc::downgrade(self),
            generation: next,
        };
        let fresh = build_pool(
            &self.config,
            &self.connector,
            &self.counters,
            &self.last_error,
            self.config.is_writer().then_some(follower),
        );
        let fresh = PoolSlot::new(fresh, self.config.max_size, self.config.is_reaped());
        let old = slot.replace(fresh);
        // Retired after the lock is released: retiring hands every parked
        // connection back to bb8, and checkouts read the slot meanwhile.
        drop(slot);
        if let Some(old) = old {
            old.retire();
        }
        true
    }
}

impl Pool {
    /// A pool for engine `name`; connections are opened on first use (or
    /// `min_idle` of them in the background).
    pub(crate) fn new(name: &str, config: EngineConfig) -> Result<Pool> {
        config.validate(name)?;
        let last_error = LastConnectError::new(&config);
        let counters = Arc::new(Counters::default());
        let connector = Connector::new(name, &config)?;
        let inner = Arc::new_cyclic(|me| {
            let follower = Follower {
                pool: me.clone(),
                generation: 0,
            };
            let follower = config.is_writer().then_some(follower);
            let pool = build_pool(&config, &connector, &counters, &last_error, follower);
            let slot = PoolSlot::new(pool, config.max_size, config.is_reaped());
            PoolInner {
                name: name.into(),
                telemetry: crate::telemetry::Fields::new(name, &config.pg),
                config,
                slot: RwLock::new(Some(slot)),
                counters,
                last_error,
                connector,
                generation: AtomicU64::new(0),
            }
        });
        Ok(Pool { inner })
    }

    /// The engine's name.
    pub(crate) fn name(&self) -> &str {
        &self.inner.name
    }

    /// The engine's name, shared.
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// The engine's configuration.
    pub(crate) fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The pool's counters.
    #[inline]
    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// What every tracing span of this pool repeats.
    pub(crate) fn telemetry(&self) -> &crate::telemetry::Fields {
        &self.inner.telemetry
    }

    /// The current pool and ready stack, or `None` once the pool is closed.
    fn slot(&self) -> Option<Arc<PoolSlot>> {
        self.inner.slot.read().expect("engine pool").clone()
    }

    /// Checks out a connection: the most recently returned clean one if any
    /// is parked (see [`crate::pool::ready`]), else the next one returned or
    /// opened, in arrival order. A connection found closed (its server went
    /// away while it sat idle) is discarded and replaced transparently.
    pub(crate) async fn checkout(&self) -> Result<Conn> {
        let slot = self.slot().ok_or_else(|| self.closed_error())?;
        let conn = match slot.take() {
            Ok(conn) => conn,
            // Boxed, to keep the common future small.
            Err(wait) => Box::pin(self.waited(&slot, wait)).await?,
        };
        self.inner.counters.inc(|c| &c.checkouts);
        if !conn.client.is_closed() && !self.is_stale(&conn) {
            return Ok(conn);
        }
        if self.is_stale(&conn) {
            // Rare: a checkout that began in a pool discarded meanwhile
            // (its server stopped being the primary) got one of its
            // connections. Start again in the current pool.
            drop(conn);
            return Box::pin(self.checkout()).await;
        }
        // Rare (boxed, to keep the common future small): idle connections
        // that died with a server restart. Try past them all.
        Box::pin(self.replace_closed(conn, slot, Instant::now())).await
    }

    /// A connection for one autocommit statement: with
    /// [`EngineConfig::pipeline`] above 1, possibly shared with other
    /// autocommit statements (see [`crate::pool::ready`]); else [`Pool::checkout`].
    pub(crate) async fn lease(&self) -> Result<Lease> {
        let max_in_flight = self.inner.config.pipeline;
        if max_in_flight <= 1 {
            return self.checkout().await.map(Lease::Own);
        }
        let slot = self.slot().ok_or_else(|| self.closed_error())?;
        let mut started: Option<Instant> = None;
        // Its place in line once it had to wait (first come, first served).
        let mut turn = None;
        loop {
            match slot.take_shared(max_in_flight, &mut turn) {
                SharedTake::Got(shared, joined) if !shared.client.is_closed() => {
                    self.inner.counters.inc(|c| &c.checkouts);
                    if joined {
                        self.inner.counters.inc(|c| &c.pipelined);
                    }
                    if let Some(since) = started {
                        self.record_wait(since.elapsed());
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
                SharedTake::Wait => {
                    let since = *started.get_or_insert_with(Instant::now);
                    let Some(waiting) = turn.as_ref() else { break };
                    let limit = self.inner.config.connection_timeout;
                    let deadline = tokio::time::Instant::from_std(since + limit);
                    if tokio::time::timeout_at(deadline, waiting.woken())
                        .await
                        .is_err()
                    {
                        return Err(self.checkout_error(RunError::TimedOut, since));
                    }
                }
            }
        }
        let conn = self.checkout().await?;
        Ok(Lease::Shared(conn.into_shared()))
    }

    /// Whether `conn` belongs to a pool generation discarded since (see
    /// [`Follower`]); only a writer's connections can be.
    #[inline]
    fn is_stale(&self, conn: &Conn) -> bool {
        conn.generation()
            .is_some_and(|g| g != self.inner.generation.load(Ordering::Relaxed))
    }

    /// A connection of its own for an autocommit statement that may change
    /// session state unseen (see `sql::control::SessionEffect::Maybe`):
    /// never shared, and flagged, so it is reset before its next user.
    pub(crate) async fn lease_flagged(&self) -> Result<Lease> {
        let conn = self.checkout().await?;
        let _ = conn.state.apply(state::Event::SessionChanged);
        Ok(Lease::Own(conn))
    }

    /// The slow path of [`Pool::checkout`]: waits its turn, and counts the
    /// wait in the stats (and a tracing event).
    async fn waited(&self, slot: &Arc<PoolSlot>, wait: Wait<'_>) -> Result<Conn> {
        let started = Instant::now();
        let conn = self.get(slot, started, Some(wait)).await?;
        self.record_wait(started.elapsed());
        Ok(conn)
    }

    fn record_wait(&self, waited: Duration) {
        self.inner.counters.waits.record(waited);
        crate::telemetry::checkout_waited(&self.inner.telemetry, waited);
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
            conn = self.get(&slot, started, None).await?;
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

    /// One connection — parked, handed over in the queue or from bb8 —
    /// within the engine's `connection_timeout` counted from `started`,
    /// starting with `first` if the caller already waits. bb8 waits at most
    /// [`CONNECT_SLICE`] at a time (see [`build_pool`]); a wait that ends
    /// empty starts again, which makes bb8 try to connect afresh instead of
    /// sleeping in its retry backoff.
    async fn get(
        &self,
        slot: &Arc<PoolSlot>,
        started: Instant,
        mut first: Option<Wait<'_>>,
    ) -> Result<Conn> {
        let limit = self.inner.config.connection_timeout;
        loop {
            let wait = match first.take() {
                Some(wait) => wait,
                None => match slot.take() {
                    Ok(conn) => return Ok(conn),
                    Err(wait) => wait,
                },
            };
            let remaining = limit.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(self.checkout_error(RunError::TimedOut, started));
            }
            let waiting = match wait {
                Wait::Bb8(waiting) => waiting,
                // Dropped at the deadline, a queued wait passes on anything
                // handed to it meanwhile.
                Wait::Queued(queued) => {
                    match tokio::time::timeout(remaining, queued.turn()).await {
                        Ok(Ok(conn)) => return Ok(conn),
                        Ok(Err(waiting)) => waiting,
                        Err(_) => return Err(self.checkout_error(RunError::TimedOut, started)),
                    }
                }
            };
            let remaining = limit.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(self.checkout_error(RunError::TimedOut, started));
            }
            // bb8 bounds each wait by min(limit, slice) itself.
            let got = if remaining > CONNECT_SLICE {
                self.wait_in_bb8(slot).await
            } else {
                tokio::time::timeout(remaining, self.wait_in_bb8(slot))
                    .await
                    .unwrap_or(Err(None))
            };
            // Counted out before it stops waiting: in between, the pool
            // would look unsaturated and a queued checkout would be sent to
            // bb8 for a connection that is not there (and wait its slice).
            let got = got.map(|pooled| slot.wrap(pooled));
            drop(waiting);
            match got {
                Ok(conn) => return Ok(conn),
                Err(None) => continue,
                Err(Some(e)) => return Err(e),
            }
        }
    }

    /// One wait in bb8 (bounded by bb8 to [`CONNECT_SLICE`]): the
    /// connection, `Err(None)` when the wait ended empty, or the error of a
    /// permanent connect failure reported while waiting. Only failures
    /// reported after the wait began count: a checkout made after the
    /// password was fixed is not failed by an old error.
    async fn wait_in_bb8(
        &self,
        slot: &PoolSlot,
    ) -> Result<bb8::PooledConnection<'static, Manager>, Option<Error>> {
        let failed = self.inner.last_error.0.permanent.notified();
        let mut failed = std::pin::pin!(failed);
        failed.as_mut().enable();
        tokio::select! {
            biased;
            got = slot.pool.get_owned() => match got {
                Ok(pooled) => Ok(pooled),
                Err(RunError::TimedOut) => Err(None),
                Err(e) => Err(Some(self.checkout_error(e, Instant::now()))),
            },
            () = failed => {
                let failure = self.inner.last_error.last().map(|(_, f)| f);
                self.inner.counters.inc(|c| &c.connect_errors);
                Err(Some(match failure {
                    Some(f) => f.to_error(self.name()),
                    None => self.checkout_error(RunError::TimedOut, Instant::now()),
                }))
            }
        }
    }

    fn checkout_error(&self, e: RunError<tokio_postgres::Error>, started: Instant) -> Error {
        let engine = self.name().to_owned();
        match e {
            RunError::User(e) => {
                self.inner.counters.inc(|c| &c.connect_errors);
                self.inner.last_error.failure(&e).to_error(&engine)
            }
            RunError::TimedOut => {
                self.inner.counters.inc(|c| &c.checkout_timeouts);
                let waited = started.elapsed();
                match self.inner.last_error.last() {
                    Some((at, failure)) if at.elapsed() <= waited + Duration::from_millis(100) => {
                        self.inner.counters.inc(|c| &c.connect_errors);
                        failure.to_error(&engine)
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

    /// Checks out a connection (opening one if none is parked or idle) and
    /// times one empty round trip on it; the connection then goes back to
    /// the pool. Used by [`crate::Registry::health`] and by the registry's
    /// start-up check.
    pub(crate) async fn ping(&self) -> Result<Duration> {
        let conn = self.checkout().await?;
        let sent = Instant::now();
        // An empty query: the server answers EmptyQueryResponse, nothing runs
        // and no state changes, so a ping dropped midway leaves the
        // connection clean (the driver discards the late answer).
        conn.client
            .simple_query("")
            .await
            .map_err(|e| Error::from_pg(self.name(), e))?;
        Ok(sent.elapsed())
    }

    /// Replaces the pool with a new one; the old pool's connections close as
    /// they are returned. Sessions already holding a connection finish on it.
    pub(crate) fn reinit(&self) {
        self.inner.replace_pool(None);
    }

    /// Refuses new checkouts and drops the pool (idle connections close now,
    /// checked-out ones when returned).
    pub(crate) fn close(&self) {
        let old = self.inner.slot.write().expect("engine pool").take();
        if let Some(old) = old {
            old.retire();
        }
    }

    /// What bb8 and the ready stack hold now.
    pub(crate) fn occupancy(&self) -> Occupancy {
        match self.slot() {
            Some(slot) => {
                // Parked connections are checked out as far as bb8 knows.
                let parked = slot.parked();
                let s = slot.pool.state();
                Occupancy {
                    connections: s.connections,
                    idle: s.idle_connections + parked,
                    waits: s.statistics.get_waited,
                    waiting: slot.waiters(),
                }
            }
            None => Occupancy::default(),
        }
    }
}

/// Longest single wait bb8 is given for a connection. bb8 retries a failed
/// connect with a backoff that grows up to half its connection timeout, and
/// a waiter is not woken when the server comes back: with the engine's
/// timeout there (30 s by default), checkouts that waited through an outage
/// could go on waiting for up to 15 s after the server was back. Waiting in
/// slices (see [`Pool::get`]) keeps that under half a slice.
const CONNECT_SLICE: Duration = Duration::from_secs(1);

fn build_pool(
    config: &EngineConfig,
    connector: &Connector,
    counters: &Arc<Counters>,
    sink: &LastConnectError,
    follower: Option<Follower>,
) -> Bb8Pool<Manager> {
    let manager = Manager::new(
        connector.clone(),
        config.statement_cache,
        config.after_connect.clone(),
        counters.clone(),
        follower,
    );
    Bb8Pool::builder()
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
