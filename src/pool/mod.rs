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

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bb8::{Pool as Bb8Pool, RunError};

use crate::config::EngineConfig;
use crate::error::{Error, Result, describe};
use manager::{Connector, Manager};
pub(crate) use ready::{Conn, Lease};
use ready::{PoolSlot, SharedTake};
use stats::{Counters, Occupancy};

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
}

impl Pool {
    /// A pool for engine `name`; connections are opened on first use (or
    /// `min_idle` of them in the background).
    pub(crate) fn new(name: &str, config: EngineConfig) -> Result<Pool> {
        config.validate(name)?;
        let last_error = LastConnectError::default();
        let counters = Arc::new(Counters::default());
        let connector = Connector::new(name, &config)?;
        let pool = build_pool(&config, &connector, &counters, &last_error);
        let slot = PoolSlot::new(pool, config.max_size, config.is_reaped());
        Ok(Pool {
            inner: Arc::new(PoolInner {
                name: name.into(),
                telemetry: crate::telemetry::Fields::new(name, &config.pg),
                config,
                slot: RwLock::new(Some(slot)),
                counters,
                last_error,
                connector,
            }),
        })
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
    /// autocommit statements (see [`crate::pool::ready`]); else [`Pool::checkout`].
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

    /// A connection of its own for an autocommit statement that may change
    /// session state unseen (see `sql::control::SessionEffect::Maybe`):
    /// never shared, and flagged, so it is reset before its next user.
    pub(crate) async fn lease_flagged(&self) -> Result<Lease> {
        let conn = self.checkout().await?;
        let _ = conn.state.apply(state::Event::SessionChanged);
        Ok(Lease::Own(conn))
    }

    /// The slow path of [`Pool::checkout`]: waits on, counted from `started`.
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
) -> Bb8Pool<Manager> {
    let manager = Manager::new(
        connector.clone(),
        config.statement_cache,
        config.after_connect.clone(),
        counters.clone(),
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
