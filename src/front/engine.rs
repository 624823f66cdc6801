//! One named database: its pool, what its transactions share, and its
//! links to other engines (replica → primary), all fixed when the registry
//! is built.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::config::EngineConfig;
use crate::error::Result;
use crate::pool::{Conn, Lease, Pool};
use crate::tx::Env;
use crate::tx::hooks::Hooks;
use crate::tx::tracker::Tracker;

use super::replica::{ReplicaGroup, ReplicaState, ReplicaStats};

/// One named bb8 pool plus its config and counters. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    pub(crate) inner: Arc<EngineInner>,
}

#[derive(Debug)]
pub(crate) struct EngineInner {
    /// The pool, the listeners and the connection map.
    pub(crate) env: Arc<Env>,
    /// Position in the registry (the index of its slot in a `Sessions` scope).
    pub(crate) index: usize,
    /// Some engine is a replica of this one: record WAL positions after commits.
    pub(crate) has_replicas: bool,
    /// For a replica: its primary and a read-only pool there.
    pub(crate) replica: Option<ReplicaLink>,
    /// What two-phase commit learnt about this engine's server.
    pub(crate) two_phase: TwoPhaseFacts,
}

/// A replica's link to its primary, resolved when the registry is built.
#[derive(Debug)]
pub(crate) struct ReplicaLink {
    /// A read-only pool on the primary, for reads the replica cannot serve yet.
    pub(crate) fallback: Engine,
    /// The primary's index in the registry (whose commits reads must see).
    pub(crate) primary_index: usize,
    /// The primary's name (for stats).
    pub(crate) primary_name: String,
    /// All the replicas of that primary, this one included: reads through
    /// any of them are balanced over them.
    pub(crate) group: Arc<ReplicaGroup>,
    /// How far the replica has replayed, its lag, and whether it is down.
    pub(crate) state: ReplicaState,
    /// For a replica engine over several hosts: one member per host (the
    /// group's members in its stead; see `docs/replicas.md`). Empty when
    /// the engine is a member itself.
    pub(crate) hosts: Vec<Engine>,
}

/// What a replica engine is linked to (see [`ReplicaLink`]).
#[derive(Debug)]
pub(crate) struct ReplicaOf {
    pub(crate) primary_index: usize,
    pub(crate) primary_name: String,
    pub(crate) fallback: Engine,
    pub(crate) group: Arc<ReplicaGroup>,
    /// Its per-host members, if it lists several hosts.
    pub(crate) hosts: Vec<Engine>,
}

/// Facts about the server cached for two-phase commit.
#[derive(Debug)]
pub(crate) struct TwoPhaseFacts {
    /// `max_prepared_transactions`, or `u64::MAX` while unknown.
    pub(crate) max_prepared: AtomicU64,
    /// The decision table is known to exist.
    pub(crate) decision_table: AtomicBool,
}

impl Default for TwoPhaseFacts {
    fn default() -> Self {
        TwoPhaseFacts {
            max_prepared: AtomicU64::new(u64::MAX),
            decision_table: AtomicBool::new(false),
        }
    }
}

/// How an engine relates to the others of its registry.
#[derive(Debug, Default)]
pub(crate) struct Links {
    /// Position in the registry.
    pub(crate) index: usize,
    /// Some engine is a replica of this one.
    pub(crate) has_replicas: bool,
    /// This engine is a replica: its primary, the read-only pool there, and
    /// its group.
    pub(crate) replica_of: Option<ReplicaOf>,
}

impl Engine {
    pub(crate) fn new(
        name: &str,
        config: EngineConfig,
        hooks: Arc<Hooks>,
        tracker: Arc<Tracker>,
        links: Links,
    ) -> Result<Engine> {
        let pool = Pool::new(name, config)?;
        Ok(Engine {
            inner: Arc::new(EngineInner {
                env: Arc::new(Env {
                    pool,
                    hooks,
                    tracker,
                }),
                index: links.index,
                has_replicas: links.has_replicas,
                replica: links.replica_of.map(|of| ReplicaLink {
                    fallback: of.fallback,
                    primary_index: of.primary_index,
                    primary_name: of.primary_name,
                    group: of.group,
                    state: ReplicaState::default(),
                    hosts: of.hosts,
                }),
                two_phase: TwoPhaseFacts::default(),
            }),
        })
    }

    /// The engine's name in the registry.
    pub fn name(&self) -> &str {
        self.pool().name()
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        self.pool().config()
    }

    /// The engine's pool.
    #[inline]
    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.env.pool
    }

    /// What the engine's transactions run on.
    pub(crate) fn env(&self) -> &Arc<Env> {
        &self.inner.env
    }

    /// A connection of its own (see [`Pool::checkout`]).
    pub(crate) async fn checkout(&self) -> Result<Conn> {
        self.pool().checkout().await
    }

    /// A connection for one autocommit statement (see [`Pool::lease`]).
    pub(crate) async fn lease(&self) -> Result<Lease> {
        self.pool().lease().await
    }

    /// Replaces the pool with a new one (see [`crate::Registry::reinit`]).
    pub(crate) fn reinit(&self) {
        self.pool().reinit();
    }

    /// Refuses new checkouts and drops the pool.
    pub(crate) fn close(&self) {
        self.pool().close();
    }

    /// For a replica engine over several hosts: its per-host members.
    pub(crate) fn hosts(&self) -> &[Engine] {
        self.inner
            .replica
            .as_ref()
            .map_or(&[], |link| link.hosts.as_slice())
    }

    /// Its stats, then those of its per-host members (if any).
    pub(crate) fn stats_with_hosts(&self) -> Vec<EngineStats> {
        std::iter::once(self)
            .chain(self.hosts())
            .map(Engine::stats)
            .collect()
    }

    /// A snapshot of the engine's pool and transaction counters.
    pub fn stats(&self) -> EngineStats {
        let pool = self.pool();
        let now = pool.occupancy();
        let c = pool.counters();
        let (waited, [p50, p99, p999], max) = c.waits.read([0.5, 0.99, 0.999]);
        EngineStats {
            name: self.name().to_owned(),
            max_size: self.config().max_size,
            connections: now.connections,
            idle: now.idle,
            in_use: now.connections.saturating_sub(now.idle),
            checkouts: c.get(|c| &c.checkouts),
            checkout_waits: now.waits,
            waiting: now.waiting,
            checkout_timeouts: c.get(|c| &c.checkout_timeouts),
            connect_errors: c.get(|c| &c.connect_errors),
            statements: c.get(|c| &c.statements),
            pipelined: c.get(|c| &c.pipelined),
            begun: c.get(|c| &c.begun),
            committed: c.get(|c| &c.committed),
            rolled_back: c.get(|c| &c.rolled_back),
            commit_unknown: c.get(|c| &c.commit_unknown),
            in_transaction: self.inner.env.tracker.in_transaction(self.name()),
            discarded_dirty: c.get(|c| &c.discarded_dirty),
            discarded_closed: c.get(|c| &c.discarded_closed),
            primary_switches: c.get(|c| &c.primary_switches),
            checkout_wait: CheckoutWaits {
                count: waited,
                p50,
                p99,
                p999,
                max,
            },
            replica: self.replica_stats(),
        }
    }
}

/// How long checkouts that found no connection ready waited for one, since
/// the registry was built (a part of [`EngineStats`]). Percentiles come
/// from power-of-two buckets of microseconds: each is the upper bound of
/// its bucket, so within a factor of two above the true value (and never
/// above `max`). Checkouts that gave up are not in here; they are
/// [`EngineStats::checkout_timeouts`].
///
/// Once the pool is saturated, waiting checkouts are served in arrival
/// order (a returned connection goes to the oldest), so with N connections
/// and M tasks in a closed loop `max` stays near M/N statement times.
/// Pipelined autocommit statements waiting for a share
/// ([`crate::EngineConfig::pipeline`]) are served in arrival order among
/// themselves too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct CheckoutWaits {
    /// Checkouts that waited.
    pub count: u64,
    /// Median wait.
    pub p50: std::time::Duration,
    /// 99th percentile.
    pub p99: std::time::Duration,
    /// 99.9th percentile.
    pub p999: std::time::Duration,
    /// Longest wait.
    pub max: std::time::Duration,
}

/// Counters of one engine, from [`crate::Registry::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
    /// Checkouts waiting for a connection now (current pool), served in
    /// arrival order.
    pub waiting: u32,
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
    /// Times a writer discarded all its connections because their server
    /// stopped being the primary while they stayed open (a write refused
    /// with SQLSTATE 25006 by a server that now reports itself read-only;
    /// see `docs/failover.md`). One per switch, not one per refusal.
    pub primary_switches: u64,
    /// The distribution of checkout waits.
    pub checkout_wait: CheckoutWaits,
    /// For a replica engine: its health, lag and reads (docs/replicas.md).
    pub replica: Option<ReplicaStats>,
}
