//! The registry of named engines and its builder.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::engine::{Engine, EngineStats, Links, ReplicaOf};
use super::replica::{ReplicaGroup, ReplicaHealth};
use super::session::Session;
use super::sessions::Sessions;
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::tx::hooks::{Hooks, Outcome, TxEvent};
use crate::tx::options::TxOptions;
use crate::tx::tracker::Tracker;

/// The named engines of an application (writer, reader, logger, …), one of
/// them the default. Cheap to clone: share one across the whole app.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    engines: Vec<Engine>,
    default: usize,
    /// Keys of causal tokens, if configured.
    #[cfg(feature = "causal")]
    causal: Option<super::causal::CausalKeys>,
    tracker: Arc<Tracker>,
    /// Table name → engine index (z3c.zalchemy's assignTable).
    tables: HashMap<String, usize>,
    two_phase_prefix: String,
    /// Set by [`Registry::close`]: the lag sampler stops.
    closed: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for e in &self.inner.engines {
            m.entry(&e.name(), e.config());
        }
        m.finish()?;
        write!(f, " (default: {})", self.default_engine_name())
    }
}

impl Registry {
    /// Starts describing a registry.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// Builds a whole registry from the environment: one engine per
    /// `PGASSIST_<NAME>_URL` (see [`RegistryBuilder::from_env`]), each
    /// checked once as [`RegistryBuilder::build`] does.
    pub async fn from_env() -> Result<Registry> {
        RegistryBuilder::from_env()?.build().await
    }

    /// The engine called `name`, or [`Error::UnknownEngine`].
    pub fn engine(&self, name: &str) -> Result<&Engine> {
        self.inner
            .engines
            .iter()
            .find(|e| e.name() == name)
            .ok_or_else(|| Error::UnknownEngine {
                name: name.to_owned(),
                known: self.engine_names().collect::<Vec<_>>().join(", "),
            })
    }

    /// All engines, in the order they were added.
    pub fn engines(&self) -> impl Iterator<Item = &Engine> {
        self.inner.engines.iter()
    }

    /// The engine names, in the order they were added.
    pub fn engine_names(&self) -> impl Iterator<Item = &str> {
        self.inner.engines.iter().map(Engine::name)
    }

    /// The default engine's name.
    pub fn default_engine_name(&self) -> &str {
        self.inner.engines[self.inner.default].name()
    }

    /// The engine at `index` in registry order (an index from
    /// [`Registry::engine_index`] or an engine's own).
    pub(crate) fn engine_at(&self, index: usize) -> &Engine {
        &self.inner.engines[index]
    }

    /// The index of engine `name` in registry order.
    pub(crate) fn engine_index(&self, name: &str) -> Result<usize> {
        self.inner
            .engines
            .iter()
            .position(|e| e.name() == name)
            .ok_or_else(|| self.unknown(name))
    }

    pub(crate) fn default_index(&self) -> usize {
        self.inner.default
    }

    fn unknown(&self, name: &str) -> Error {
        Error::UnknownEngine {
            name: name.to_owned(),
            known: self.engine_names().collect::<Vec<_>>().join(", "),
        }
    }

    /// The index of the engine that owns `table`, or the default engine's.
    pub(crate) fn table_engine_index(&self, table: &str) -> usize {
        self.inner
            .tables
            .get(table)
            .copied()
            .unwrap_or(self.inner.default)
    }

    /// The engine that owns `table` (see [`RegistryBuilder::route_table`]),
    /// or the default engine for unmapped tables.
    pub fn engine_for_table(&self, table: &str) -> &Engine {
        &self.inner.engines[self.table_engine_index(table)]
    }

    /// The prefix of this registry's two-phase commit ids.
    pub fn two_phase_prefix(&self) -> &str {
        &self.inner.two_phase_prefix
    }

    /// A per-request container: sessions for any engine, created lazily.
    pub fn sessions(&self) -> Sessions {
        Sessions::new(self.clone(), None)
    }

    /// A per-request container in transaction-per-request mode (Django's
    /// ATOMIC_REQUESTS, pyramid_tm): every engine the request touches runs
    /// in one transaction with `options`, begun on first use; a `begin()`
    /// inside it is a savepoint. [`Sessions::finish`] commits or rolls back;
    /// dropping the container rolls back.
    pub fn sessions_in_transaction(&self, options: TxOptions) -> Sessions {
        Sessions::new(self.clone(), Some(options))
    }

    /// An autocommit session on engine `name` (nothing is checked out yet).
    pub fn session(&self, name: &str) -> Result<Session> {
        self.engine(name).map(|e| Session::new(e.clone()))
    }

    /// An autocommit session on the default engine.
    pub fn default_session(&self) -> Session {
        Session::new(self.inner.engines[self.inner.default].clone())
    }

    /// Counters of every engine.
    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            engines: self
                .inner
                .engines
                .iter()
                .flat_map(Engine::stats_with_hosts)
                .collect(),
            open_transactions: self.inner.tracker.open_transactions(),
        }
    }

    /// Disposes of engine `name`'s pool and starts a new one — after a fork,
    /// a failover or a credential change. Idle connections close at once;
    /// connections in use finish their work and close when returned.
    pub async fn reinit(&self, name: &str) -> Result<()> {
        let engine = self.engine(name)?;
        engine.reinit();
        for member in engine.hosts() {
            member.reinit();
        }
        // Replicas' read-only pools on this engine follow it.
        for replica in self.engines() {
            if let Some(fallback) = replica.primary() {
                if replica.primary_index() == engine.inner.index || replica.name() == name {
                    fallback.reinit();
                }
            }
        }
        Ok(())
    }

    /// Whether each engine can be reached now, and how long one round trip
    /// takes, for readiness probes: one checkout and one empty statement per
    /// engine, all engines at once. An engine that cannot be reached is
    /// reported with its error (after at most its `connection_timeout`
    /// when the server does not answer; at once when it refuses us, see
    /// [`Error::Connect`]). A replica's read-only pool on its primary is not
    /// probed: the primary's own entry covers that server.
    ///
    /// With the `serde` feature the report serialises (for a `/ready`
    /// endpoint); round trips are in milliseconds there.
    pub async fn health(&self) -> Health {
        let probes = self.inner.engines.iter().map(|engine| async move {
            let result = engine.pool().ping().await;
            EngineHealth::new(engine.name(), result)
        });
        let engines = futures::future::join_all(probes).await;
        let replicas = self
            .engines()
            .flat_map(|engine| {
                engine.replica_members().into_iter().filter_map(|member| {
                    Some(ReplicaHealth {
                        name: member.name().to_owned(),
                        engine: engine.name().to_owned(),
                        state: member.replica_stats()?,
                    })
                })
            })
            .collect();
        Health { engines, replicas }
    }

    /// Closes every engine: later checkouts fail with [`Error::Closed`];
    /// connections in use close when returned.
    pub async fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        for e in &self.inner.engines {
            e.close();
            for member in e.hosts() {
                member.close();
            }
            if let Some(fallback) = e.primary() {
                fallback.close();
            }
        }
    }

    /// The causal-token keys, if configured (see `front::causal`).
    #[cfg(feature = "causal")]
    pub(crate) fn causal_keys(&self) -> Option<&super::causal::CausalKeys> {
        self.inner.causal.as_ref()
    }
}

/// Counters of every engine, from [`Registry::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RegistryStats {
    /// One entry per engine, in registry order.
    pub engines: Vec<EngineStats>,
    /// Entries in the per-transaction connection map (open transactions).
    pub open_transactions: usize,
}

impl RegistryStats {
    /// The stats of engine `name`.
    pub fn engine(&self, name: &str) -> Option<&EngineStats> {
        self.engines.iter().find(|e| e.name == name)
    }
}

/// Reachability of every engine, from [`Registry::health`].
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct Health {
    /// One entry per engine, in registry order.
    pub engines: Vec<EngineHealth>,
    /// Every member of every replica group, as last sampled (healthy,
    /// standby, lag): one per replica engine, or one per host of a replica
    /// engine over several (`reader@r2:5432`), in registry order. A member
    /// found down is `healthy: false` here while its engine may still be
    /// reachable through its other hosts.
    pub replicas: Vec<ReplicaHealth>,
}

impl Health {
    /// True when every engine answered.
    pub fn all_reachable(&self) -> bool {
        self.engines.iter().all(|e| e.reachable)
    }

    /// The entry of engine `name`.
    pub fn engine(&self, name: &str) -> Option<&EngineHealth> {
        self.engines.iter().find(|e| e.name == name)
    }

    /// The entry of replica member `name` (an engine's name, or
    /// `engine@host:port`).
    pub fn replica(&self, name: &str) -> Option<&ReplicaHealth> {
        self.replicas.iter().find(|e| e.name == name)
    }
}

/// One engine's entry in [`Health`].
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct EngineHealth {
    /// Engine name.
    pub name: String,
    /// A connection was obtained and answered.
    pub reachable: bool,
    /// How long the empty statement took on the server's connection (not
    /// counting the checkout); `None` when unreachable.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "round_trip_ms", serialize_with = "millis")
    )]
    pub round_trip: Option<std::time::Duration>,
    /// Why the engine is unreachable (the error's message; never a password).
    pub error: Option<String>,
    /// The server's SQLSTATE when it refused the connection (`28P01`, …).
    pub code: Option<String>,
}

impl EngineHealth {
    fn new(name: &str, result: Result<std::time::Duration>) -> EngineHealth {
        match result {
            Ok(rtt) => EngineHealth {
                name: name.to_owned(),
                reachable: true,
                round_trip: Some(rtt),
                error: None,
                code: None,
            },
            Err(e) => EngineHealth {
                name: name.to_owned(),
                reachable: false,
                round_trip: None,
                code: e.code().map(|c| c.code().to_owned()),
                error: Some(e.to_string()),
            },
        }
    }
}

#[cfg(feature = "serde")]
fn millis<S: serde::Serializer>(
    d: &Option<std::time::Duration>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}

/// Describes a [`Registry`]; see [`Registry::builder`].
#[derive(Default)]
pub struct RegistryBuilder {
    engines: Vec<(String, EngineConfig)>,
    default: Option<String>,
    hooks: Hooks,
    #[cfg(feature = "causal")]
    causal: super::causal::CausalConfig,
    tables: Vec<(String, String)>,
    two_phase_prefix: Option<String>,
    /// Skip the start-up check (see [`RegistryBuilder::lazy`]).
    lazy: bool,
}

impl fmt::Debug for RegistryBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryBuilder")
            .field("engines", &self.engines)
            .field("default", &self.default)
            .field("hooks", &self.hooks)
            .finish()
    }
}

impl RegistryBuilder {
    /// Builds a whole registry from the environment: one engine per
    /// `PGASSIST_<NAME>_URL` (named `<name>` in lower case, configured by
    /// [`EngineConfig::from_env`]); the default engine is
    /// `PGASSIST_DEFAULT_ENGINE`, else `writer` if configured, else the first
    /// name in alphabetical order.
    /// Call `.lazy()` on it to start without connecting.
    pub fn from_env() -> Result<RegistryBuilder> {
        let mut names: Vec<String> = std::env::vars()
            .filter_map(|(k, _)| {
                let name = k.strip_prefix("PGASSIST_")?.strip_suffix("_URL")?;
                (!name.is_empty()).then(|| name.to_ascii_lowercase())
            })
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(Error::Config(
                "no PGASSIST_<ENGINE>_URL variable is set".into(),
            ));
        }
        let mut builder = Registry::builder();
        for name in &names {
            builder = builder.engine(name.clone(), EngineConfig::from_env(name)?);
        }
        let default = match std::env::var("PGASSIST_DEFAULT_ENGINE") {
            Ok(d) => d.to_ascii_lowercase(),
            Err(_) if names.iter().any(|n| n == "writer") => "writer".into(),
            Err(_) => names[0].clone(),
        };
        Ok(builder.default_engine(default))
    }

    /// Adds an engine under any name.
    pub fn engine(mut self, name: impl Into<String>, config: EngineConfig) -> Self {
        self.engines.push((name.into(), config));
        self
    }

    /// Which engine [`Registry::default_session`] uses (default: the first added).
    pub fn default_engine(mut self, name: impl Into<String>) -> Self {
        self.default = Some(name.into());
        self
    }

    /// Assigns `table` to engine `engine` (z3c.zalchemy's `assignTable`):
    /// [`crate::Sessions::for_table`] and [`crate::UnitOfWork::for_table`] then use
    /// that engine for it. Unmapped tables use the default engine.
    pub fn route_table(mut self, table: impl Into<String>, engine: impl Into<String>) -> Self {
        self.tables.push((table.into(), engine.into()));
        self
    }

    /// The prefix of two-phase commit ids (default `pgassist`), so that
    /// [`Registry::recover`] touches only this application's prepared
    /// transactions. Letters, digits, `_` and `-` only.
    pub fn two_phase_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.two_phase_prefix = Some(prefix.into());
        self
    }

    /// Called when an outermost transaction begins (on any engine).
    pub fn on_begin(mut self, f: impl Fn(&TxEvent) + Send + Sync + 'static) -> Self {
        self.hooks.on_begin.push(Arc::new(f));
        self
    }

    /// Called once when an outermost transaction ends, with its outcome.
    pub fn on_end(mut self, f: impl Fn(&TxEvent, Outcome) + Send + Sync + 'static) -> Self {
        self.hooks.on_end.push(Arc::new(f));
        self
    }

    /// Lazy start: [`RegistryBuilder::build`] only validates the
    /// description and creates the pools, without connecting. Connections
    /// are then opened on first use (or `min_idle` of them in the
    /// background), so an unreachable server or a wrong password shows up
    /// as [`Error::Connect`] on the first statement — for an application
    /// that must start while its database is still down (sqlx's
    /// `connect_lazy`). Use [`Registry::health`] for a readiness probe.
    pub fn lazy(mut self) -> Self {
        self.lazy = true;
        self
    }

    /// Validates the description, creates the pools and checks that every
    /// engine can be reached: one connection per engine (all at once),
    /// which then stays in its pool for the first statement. A server that
    /// refuses us (wrong password, unknown database, TLS refused, unknown
    /// host) fails the build at once with [`Error::Connect`] and its
    /// SQLSTATE; one that is down or starting up is waited for, up to the
    /// engine's `connection_timeout`. A replica's read-only pool on its
    /// primary is not checked (its primary's check covers the server).
    /// A replica engine over several hosts is checked host by host: a host
    /// that refuses us fails the build as above, a host that cannot be
    /// reached is marked down (no reads there until the sampler finds it
    /// back) and the build goes on, unless no host of the engine answers.
    /// [`RegistryBuilder::lazy`] skips the check.
    pub async fn build(self) -> Result<Registry> {
        let lazy = self.lazy;
        let registry = self.build_lazily()?;
        if !lazy {
            let checks = registry.engines().map(Engine::check);
            for checked in futures::future::join_all(checks).await {
                checked?;
            }
        }
        Ok(registry)
    }

    fn build_lazily(self) -> Result<Registry> {
        if self.engines.is_empty() {
            return Err(Error::Config("a registry needs at least one engine".into()));
        }
        let hooks = Arc::new(self.hooks);
        let tracker = Arc::new(Tracker::default());
        let configs = self.engines;
        for (i, (name, _)) in configs.iter().enumerate() {
            if name.is_empty() {
                return Err(Error::Config("an engine name cannot be empty".into()));
            }
            if configs[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::Config(format!(
                    "engine `{name}` is configured twice"
                )));
            }
        }
        // The links between engines are resolved first, so that every
        // engine is built complete and never changes afterwards.
        let mut primary_of: Vec<Option<usize>> = vec![None; configs.len()];
        for (i, (name, config)) in configs.iter().enumerate() {
            let Some(primary_name) = config.replica_of.as_deref() else {
                continue;
            };
            let primary = configs
                .iter()
                .position(|(n, _)| n == primary_name)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "engine `{name}` is a replica of unknown engine `{primary_name}`"
                    ))
                })?;
            if configs[primary].1.replica_of.is_some() || primary == i {
                return Err(Error::Config(format!(
                    "engine `{name}`: replica_of must name a primary, not `{primary_name}`"
                )));
            }
            primary_of[i] = Some(primary);
            let zero_lag = config.max_replica_lag.is_some_and(|d| d.is_zero())
                || config.max_replica_lag_bytes == Some(0);
            if zero_lag {
                return Err(Error::Config(format!(
                    "engine `{name}`: a zero max_replica_lag would keep every read off a replica \
                     of a primary that writes (lag is sampled); leave it unset for no limit"
                )));
            }
            if config.replica_lag_interval.is_zero() {
                return Err(Error::Config(format!(
                    "engine `{name}`: replica_lag_interval must be above zero"
                )));
            }
        }
        // One group per primary with replicas, shared by its replicas.
        let groups: Vec<Option<Arc<ReplicaGroup>>> = (0..configs.len())
            .map(|i| primary_of.contains(&Some(i)).then(Arc::default))
            .collect();
        let mut engines: Vec<Engine> = Vec::with_capacity(configs.len());
        for (index, (name, config)) in configs.iter().enumerate() {
            let replica_of = match primary_of[index] {
                None => None,
                Some(primary) => {
                    // Reads that must go to the primary use a read-only pool of
                    // their own there: a replica's session stays read-only
                    // wherever it reads.
                    let (primary_name, primary_config) = &configs[primary];
                    let mut fallback = primary_config
                        .clone()
                        .read_only(true)
                        .max_size(config.max_size);
                    fallback.min_idle = None;
                    if let Some(app) = config.pg.get_application_name() {
                        fallback = fallback.application_name(app);
                    }
                    let fallback = Engine::new(
                        &format!("{name} (on {primary_name})"),
                        fallback,
                        hooks.clone(),
                        tracker.clone(),
                        Links {
                            index,
                            ..Links::default()
                        },
                    )?;
                    let group = groups[primary].clone().expect("a primary with replicas");
                    let link = |fallback: Engine, hosts: Vec<Engine>| ReplicaOf {
                        primary_index: primary,
                        primary_name: primary_name.clone(),
                        fallback,
                        group: group.clone(),
                        hosts,
                    };
                    // A replica over several hosts reads from each through
                    // a member of its own (health and lag per host).
                    let mut hosts = Vec::new();
                    if config.has_several_hosts() {
                        for (label, one) in config.per_host() {
                            let member = host_member_name(name, &label, &configs)?;
                            if hosts.iter().any(|h: &Engine| h.name() == member) {
                                return Err(Error::Config(format!(
                                    "engine `{name}` lists host {label} twice"
                                )));
                            }
                            hosts.push(Engine::new(
                                &member,
                                one,
                                hooks.clone(),
                                tracker.clone(),
                                Links {
                                    index,
                                    has_replicas: false,
                                    replica_of: Some(link(fallback.clone(), Vec::new())),
                                },
                            )?);
                        }
                    }
                    Some(link(fallback, hosts))
                }
            };
            let mut config = config.clone();
            if replica_of.as_ref().is_some_and(|of| !of.hosts.is_empty()) {
                // Its members keep connections warm on each host; its own
                // pool (pinned connections, LISTEN) opens them on demand.
                config.min_idle = None;
            }
            let links = Links {
                index,
                has_replicas: primary_of.contains(&Some(index)),
                replica_of,
            };
            engines.push(Engine::new(
                name,
                config,
                hooks.clone(),
                tracker.clone(),
                links,
            )?);
        }
        let default = match &self.default {
            None => 0,
            Some(name) => engines
                .iter()
                .position(|e| e.name() == name)
                .ok_or_else(|| Error::UnknownEngine {
                    name: name.clone(),
                    known: engines
                        .iter()
                        .map(Engine::name)
                        .collect::<Vec<_>>()
                        .join(", "),
                })?,
        };
        let mut tables = HashMap::new();
        for (table, engine) in self.tables {
            let index = engines
                .iter()
                .position(|e| e.name() == engine)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "table `{table}` is routed to unknown engine `{engine}`"
                    ))
                })?;
            if tables
                .insert(table.clone(), index)
                .is_some_and(|old| old != index)
            {
                return Err(Error::Config(format!(
                    "table `{table}` is routed to two engines"
                )));
            }
        }
        for (primary, group) in groups.iter().enumerate() {
            if let Some(group) = group {
                group.set_members(
                    engines
                        .iter()
                        .zip(&primary_of)
                        .filter(|(_, of)| **of == Some(primary))
                        .flat_map(|(e, _)| e.replica_members())
                        .map(|m| Arc::downgrade(&m.inner))
                        .collect(),
                );
            }
        }
        let two_phase_prefix = self.two_phase_prefix.unwrap_or_else(|| "pgassist".into());
        let prefix_ok = !two_phase_prefix.is_empty()
            && two_phase_prefix.len() <= 64
            && two_phase_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !prefix_ok {
            return Err(Error::Config(format!(
                "two_phase_prefix `{two_phase_prefix}`: use 1 to 64 letters, digits, `_` or `-`"
            )));
        }
        // Any two engines may meet in a unit of work: their longest id must
        // fit PostgreSQL's limit, or the first PREPARE TRANSACTION would fail.
        crate::sql::gid::check_fits(&two_phase_prefix, engines.iter().map(Engine::name))?;
        let registry = Registry {
            inner: Arc::new(RegistryInner {
                engines,
                default,
                #[cfg(feature = "causal")]
                causal: self.causal.build()?,
                tracker,
                tables,
                two_phase_prefix,
                closed: Default::default(),
            }),
        };
        registry.spawn_lag_sampler();
        Ok(registry)
    }

    /// The causal-token settings being described (see `front::causal`).
    #[cfg(feature = "causal")]
    pub(crate) fn causal_config(&mut self) -> &mut super::causal::CausalConfig {
        &mut self.causal
    }
}

impl Registry {
    /// Starts the background task that samples every replica's replay
    /// position, lag and health every `replica_lag_interval` (the shortest
    /// of the registry's replicas). It holds the registry only weakly and
    /// ends once the last clone of the registry is dropped (or the registry
    /// is closed). No task without replicas, nor outside a tokio runtime.
    fn spawn_lag_sampler(&self) {
        let interval = self
            .engines()
            .filter(|e| e.primary().is_some())
            .map(|e| e.config().replica_lag_interval)
            .min();
        let (Some(interval), Ok(runtime)) = (interval, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let registry = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(inner) = registry.upgrade() else {
                    return;
                };
                if inner.closed.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                let replicas: Vec<Engine> = inner
                    .engines
                    .iter()
                    .flat_map(Engine::replica_members)
                    .collect();
                // Only the round's own clones keep pools alive while it runs.
                drop(inner);
                sample_round(&replicas, interval).await;
            }
        });
    }
}

/// One sampling round: per primary, its WAL position first, then all its
/// replicas at once.
async fn sample_round(replicas: &[Engine], timeout: Duration) {
    let mut primaries: Vec<usize> = replicas.iter().map(Engine::primary_index).collect();
    primaries.sort_unstable();
    primaries.dedup();
    let groups = primaries.into_iter().map(|primary| async move {
        let members: Vec<&Engine> = replicas
            .iter()
            .filter(|r| r.primary_index() == primary)
            .collect();
        let primary_lsn = members[0].sample_primary(timeout).await;
        futures::future::join_all(members.iter().map(|m| m.sample(primary_lsn, timeout))).await;
    });
    futures::future::join_all(groups).await;
}

/// The name of the member reading from host `label` (`host:port`) of
/// replica engine `engine`: `engine@host:port`. Refused if an engine of the
/// registry already has that name (names may contain `@` and `:`).
fn host_member_name(
    engine: &str,
    label: &str,
    configs: &[(String, EngineConfig)],
) -> Result<String> {
    let member = format!("{engine}@{label}");
    if configs.iter().any(|(n, _)| *n == member) {
        return Err(Error::Config(format!(
            "engine `{member}`: the name of host {label} of replica engine `{engine}` \
             (rename one of them)"
        )));
    }
    Ok(member)
}
