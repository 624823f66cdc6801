//! Read replicas: groups, health, lag, and read-your-writes by WAL position.
//!
//! An engine declared [`crate::EngineConfig::replica_of`] serves reads. All
//! the engines declared replicas of the same primary form that primary's
//! *replica group*: a read through any of them (and through
//! [`crate::Sessions::reader`]) goes to one of the group's members, chosen
//! per read:
//!
//! - only members that are **healthy** (a member that failed to connect is
//!   out until a background probe finds it back, with exponential backoff
//!   from 250 ms to 5 s: statements never retry it), **standbys** (a server
//!   that is not in recovery is no replica: its data and WAL positions say
//!   nothing about the primary) and **within their lag limits**
//!   ([`crate::EngineConfig::max_replica_lag`], `max_replica_lag_bytes`, as
//!   last sampled);
//! - for a read that must see this request's writes, only members whose last
//!   sampled replay position already covers them;
//! - among those, the **least busy** (fewest connections checked out of its
//!   pool now), ties broken **round-robin** from a position that advances on
//!   every read: sequential reads rotate over the group, and a member slowed
//!   down by long queries gets fewer new ones.
//!
//! Replay positions and lag come from a background task of the registry
//! (one small query per member and one on the primary every
//! `replica_lag_interval`), so choosing costs no round trip. Byte lag is
//! the primary's `pg_current_wal_lsn()` minus the member's
//! `pg_last_wal_replay_lsn()`, sampled in the same round; time lag is
//! measured on our own clock, from the round whose primary position the
//! member has not replayed yet (see [`ReplicaStats::lag`]). The same task
//! probes members found down, after their backoff. Only a read
//! that must see a write no member has replayed yet asks the healthy
//! members directly, until one has (up to the entry engine's
//! `replica_max_wait`); otherwise it reads on a read-only pool on the
//! primary. When no member can serve, reads go to the primary too (unless
//! `replica_fallback(false)`).
//!
//! A replica engine whose URL lists several hosts is one member **per
//! host** (`reader@host:port`, each a one-host copy of its configuration
//! with its own pool), so health and lag are per host; sessions still use
//! the engine's own name. A read that finds its member unreachable marks it
//! down and runs again on another member, then on the primary: an
//! autocommit statement on a standby or a read-only pool cannot have
//! written, and a failed BEGIN never reached the server. See
//! `docs/replicas.md`.
//!
//! Within a [`crate::Sessions`] scope, every commit (or autocommit
//! statement) on the primary records `pg_current_wal_insert_lsn()` read
//! right after it — the insert position, which covers the commit record even
//! with `synchronous_commit = off`, where the write position can trail it.

use futures::StreamExt;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio_postgres::SimpleQueryMessage;

use super::engine::{Engine, EngineInner};
use crate::error::{Error, Result};
use crate::sql::lsn::{first_lsn, parse_lsn};

/// First pause before a member found down is probed again.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between probes of a member that stays down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The longest one round of replay-position questions may take past the
/// read's own deadline (see [`Engine::choose_target`]'s poll).
const ASK_AT_MOST: Duration = Duration::from_millis(100);

/// Pause between replay-position checks while waiting for a replica.
const POLL: Duration = Duration::from_millis(5);
/// A sample that takes longer than this (at least) counts as a failure.
const MIN_SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);
/// "Unknown" in the atomics below.
const UNKNOWN: u64 = u64::MAX;

/// One sample of a member: in recovery, and its replay position.
const SAMPLE_SQL: &str =
    "SELECT pg_is_in_recovery()::text, coalesce(pg_last_wal_replay_lsn(), '0/0')::text";
/// The primary's position, in the same sampling round.
const PRIMARY_LSN_SQL: &str = "SELECT pg_current_wal_lsn()::text";
/// How far a replica has replayed (while a read waits for it).
const REPLAY_LSN_SQL: &str = "SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')::text";

/// The replicas of one primary. Holds its members weakly: the engines hold
/// the group, and the registry holds the engines.
#[derive(Debug, Default)]
pub(crate) struct ReplicaGroup {
    members: OnceLock<Vec<Weak<EngineInner>>>,
    /// Where the next round-robin tie-break starts.
    next: AtomicUsize,
}

impl ReplicaGroup {
    /// Fixes the members, once, when the registry is built.
    pub(crate) fn set_members(&self, members: Vec<Weak<EngineInner>>) {
        let _ = self.members.set(members);
    }

    fn members(&self) -> Vec<Engine> {
        self.members
            .get()
            .map(|m| {
                m.iter()
                    .filter_map(Weak::upgrade)
                    .map(|inner| Engine { inner })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Whether a member is down, and when to probe it next.
#[derive(Debug, Clone, Copy)]
struct Down {
    probe_at: Instant,
    backoff: Duration,
}

/// Replica bookkeeping of one engine (one member of its group).
#[derive(Debug)]
pub(crate) struct ReplicaState {
    /// Highest replay position seen on this replica.
    replayed: AtomicU64,
    /// Bytes of WAL behind the primary at the last sample, or `UNKNOWN`.
    lag_bytes: AtomicU64,
    /// Time behind at the last sample (µs), or `UNKNOWN`.
    lag_micros: AtomicU64,
    /// 0: not sampled yet, 1: a standby, 2: not in recovery.
    standby: AtomicU8,
    /// Reads this member served (or is serving).
    reads: AtomicU64,
    down: Mutex<Option<Down>>,
    /// The oldest primary position sampled that the replica has not
    /// replayed yet, and when it was sampled.
    pending: Mutex<Option<(u64, Instant)>>,
}

impl Default for ReplicaState {
    fn default() -> Self {
        ReplicaState {
            replayed: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(UNKNOWN),
            lag_micros: AtomicU64::new(UNKNOWN),
            standby: AtomicU8::new(0),
            reads: AtomicU64::new(0),
            down: Mutex::new(None),
            pending: Mutex::new(None),
        }
    }
}

/// Where a read goes.
pub(crate) enum Target {
    /// This member of the group (maybe the engine the read came through).
    Replica(Engine),
    /// The read-only pool on the primary.
    Primary,
}

/// A replica engine's place in its group, from [`crate::Registry::stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ReplicaStats {
    /// The primary engine it replicates.
    pub primary: String,
    /// Not found down (or found back since).
    pub healthy: bool,
    /// In recovery at the last sample (`None`: not sampled yet). A server
    /// that is not gets no reads.
    pub standby: Option<bool>,
    /// Highest replay position seen (`16/B374D848` as a number).
    pub replayed_lsn: u64,
    /// Bytes of WAL behind the primary at the last sample.
    pub lag_bytes: Option<u64>,
    /// Time behind the primary at the last sample, on pgassist's clock:
    /// since the sampling round whose primary position it has not replayed
    /// yet (so zero once it has replayed all the primary had written, and
    /// up to one `replica_lag_interval` short).
    pub lag: Option<Duration>,
    /// Within its lag limits and healthy: gets reads now.
    pub serving: bool,
    /// Reads routed to it, through any engine of its group.
    pub reads: u64,
    /// For a replica engine over several hosts: the names of its per-host
    /// members (`reader@r2:5432`), each with its own entry in the stats and
    /// in [`crate::Health::replicas`]. The engine's own fields are then the
    /// best of its members': healthy, a standby and serving if one is, the
    /// highest replay position, the smallest lag, and reads summed. Empty
    /// for a replica on one host.
    pub hosts: Vec<String>,
}

/// One member of a replica group in [`crate::Health::replicas`]: a replica
/// engine on one host, or one host of a replica engine over several.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ReplicaHealth {
    /// The member's name: the engine's, or `engine@host:port` for one host
    /// of an engine over several.
    pub name: String,
    /// The engine sessions use (the name given to the registry).
    pub engine: String,
    /// Its state as last sampled (no round trip is made for it).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub state: ReplicaStats,
}

impl Engine {
    /// For a replica engine: the read-only pool on its primary.
    pub(crate) fn primary(&self) -> Option<&Engine> {
        self.inner.replica.as_ref().map(|link| &link.fallback)
    }

    /// For a replica engine: the primary's index in the registry.
    pub(crate) fn primary_index(&self) -> usize {
        self.inner
            .replica
            .as_ref()
            .map_or(self.inner.index, |link| link.primary_index)
    }

    fn replica_state(&self) -> Option<&ReplicaState> {
        self.inner.replica.as_ref().map(|link| &link.state)
    }

    /// Decides where a read that must see `required` (0: anything) goes.
    /// Costs no round trip unless the read must see a write no usable
    /// member has replayed yet (as far as the last sample knows).
    pub(crate) async fn choose_target(&self, required: u64) -> Target {
        let Some(link) = &self.inner.replica else {
            return Target::Replica(self.clone());
        };
        let members = link.group.members();
        let usable: Vec<&Engine> = members.iter().filter(|m| m.usable()).collect();
        let covering: Vec<&Engine> = usable
            .iter()
            .copied()
            .filter(|m| m.replayed() >= required)
            .collect();
        if !covering.is_empty() {
            // Round-robin over the members that can serve (not over all of
            // them: a member left out must not double its neighbour's share),
            // the least busy first.
            let start = link.group.next.fetch_add(1, Ordering::Relaxed);
            let rotated = (0..covering.len()).map(|k| covering[(start + k) % covering.len()]);
            if let Some(member) = rotated.min_by_key(|m| m.busy()) {
                return member.serving();
            }
        }
        if usable.is_empty() {
            return if self.config().replica_fallback {
                Target::Primary
            } else {
                self.serving()
            };
        }
        // Nobody has replayed this request's write yet, as far as the last
        // sample knows: ask them, until one has or the wait is over.
        let deadline = Instant::now() + self.config().replica_max_wait;
        loop {
            // A member found unreachable meanwhile is asked no more. The
            // first member that has caught up wins, and a round waits for
            // no straggler past the deadline (or ASK_AT_MOST, so that even
            // `replica_max_wait(0)` asks once): a saturated or hung member
            // must not hold the read when another, or the primary, can
            // answer now. Polls still out are dropped; their answers are
            // discarded by the driver.
            let mut polls: futures::stream::FuturesUnordered<_> = usable
                .iter()
                .filter(|m| m.healthy())
                .map(|m| async move { (m, m.replay_lsn().await) })
                .collect();
            let round = async {
                while let Some((member, polled)) = polls.next().await {
                    match polled {
                        Ok(lsn) if lsn >= required => return Some(*member),
                        Ok(_) => {}
                        Err(e) if unreachable(&e) => member.replica_failed(&e),
                        Err(_) => {}
                    }
                }
                None
            };
            let until = deadline.max(Instant::now() + ASK_AT_MOST);
            if let Ok(Some(member)) =
                tokio::time::timeout_at(tokio::time::Instant::from_std(until), round).await
            {
                return member.serving();
            }
            if Instant::now() >= deadline {
                return Target::Primary;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Counts a read routed here.
    fn serving(&self) -> Target {
        if let Some(state) = self.replica_state() {
            state.reads.fetch_add(1, Ordering::Relaxed);
        }
        Target::Replica(self.clone())
    }

    fn replayed(&self) -> u64 {
        self.replica_state()
            .map_or(0, |s| s.replayed.load(Ordering::Acquire))
    }

    /// Connections of this member checked out now.
    fn busy(&self) -> u32 {
        let now = self.pool().occupancy();
        now.connections.saturating_sub(now.idle) + now.waiting
    }

    /// Every connection of the pool is checked out (or checkouts queue).
    fn saturated(&self) -> bool {
        let now = self.pool().occupancy();
        now.idle == 0 && (now.connections >= self.config().max_size || now.waiting > 0)
    }

    fn healthy(&self) -> bool {
        self.replica_state()
            .is_some_and(|s| s.down.lock().expect("replica").is_none())
    }

    /// Healthy, a standby (or not sampled yet), and within its lag limits.
    fn usable(&self) -> bool {
        let Some(state) = self.replica_state() else {
            return false;
        };
        let config = self.config();
        let known = |v: u64| (v != UNKNOWN).then_some(v);
        let lag_ok = config.max_replica_lag.is_none_or(|max| {
            known(state.lag_micros.load(Ordering::Acquire))
                .is_none_or(|us| Duration::from_micros(us) <= max)
        }) && config.max_replica_lag_bytes.is_none_or(|max| {
            known(state.lag_bytes.load(Ordering::Acquire)).is_none_or(|b| b <= max)
        });
        lag_ok && state.standby.load(Ordering::Acquire) != 2 && self.healthy()
    }

    /// Asks the replica how far it has replayed, and remembers it.
    async fn replay_lsn(&self) -> Result<u64> {
        let messages = self.simple(REPLAY_LSN_SQL).await?;
        let lsn = first_lsn(&messages).unwrap_or(0);
        if let Some(state) = self.replica_state() {
            state.replayed.fetch_max(lsn, Ordering::AcqRel);
        }
        Ok(lsn)
    }

    async fn simple(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>> {
        let conn = self.checkout().await?;
        conn.client
            .simple_query(sql)
            .await
            .map_err(|e| Error::from_pg(self.name(), e))
    }

    /// Notes that the replica could not be reached: no reads until a probe
    /// finds it back; said once.
    pub(crate) fn replica_failed(&self, e: &Error) {
        let Some(state) = self.replica_state() else {
            return;
        };
        let mut down = state.down.lock().expect("replica");
        if down.is_some() {
            return;
        }
        *down = Some(Down {
            probe_at: Instant::now() + FIRST_BACKOFF,
            backoff: FIRST_BACKOFF,
        });
        drop(down);
        crate::telemetry::warn(&format!(
            "pgassist: replica engine `{}` is unreachable ({e}); no reads there until it answers again",
            self.name(),
        ));
    }

    /// A probe of a member found down failed again: wait longer.
    fn probe_failed(&self) {
        if let Some(state) = self.replica_state() {
            if let Some(down) = state.down.lock().expect("replica").as_mut() {
                down.backoff = (down.backoff * 2).min(MAX_BACKOFF);
                down.probe_at = Instant::now() + down.backoff;
            }
        }
    }

    /// Notes that the replica answered.
    fn replica_ok(&self) {
        let Some(state) = self.replica_state() else {
            return;
        };
        if state.down.lock().expect("replica").take().is_some() {
            crate::telemetry::warn(&format!(
                "pgassist: replica engine `{}` is back",
                self.name()
            ));
        }
    }

    /// Whether a read that failed on this member with `e` may run again
    /// elsewhere: the server could not be reached (it is then marked
    /// down, so the next choice skips it).
    pub(crate) fn read_failed(&self, e: &Error) -> bool {
        let unreachable = unreachable(e);
        if unreachable {
            self.replica_failed(e);
        }
        unreachable
    }

    /// One sample of this member (one simple query), unless it is down and
    /// not due for a probe yet. `primary_lsn`: the primary's position
    /// sampled just before, if it answered.
    pub(crate) async fn sample(&self, primary_lsn: Option<u64>, timeout: Duration) {
        let Some(state) = self.replica_state() else {
            return;
        };
        let due = state
            .down
            .lock()
            .expect("replica")
            .is_none_or(|d| Instant::now() >= d.probe_at);
        // A pool with every connection busy says nothing about the server
        // (reads are running there) and would make the sample wait for one:
        // skip the round rather than mistake a busy replica for a dead one.
        // Its last lag stands until a connection is free at a round.
        if !due || (self.healthy() && self.saturated()) {
            return;
        }
        let timeout = timeout.max(MIN_SAMPLE_TIMEOUT);
        let answer = tokio::time::timeout(timeout, self.simple(SAMPLE_SQL)).await;
        let waited_too_long = matches!(answer, Err(_) | Ok(Err(Error::PoolTimeout { .. })));
        if waited_too_long && self.saturated() {
            // It waited behind reads that hold every connection: busy, not
            // dead (reads there fail on their own if it is).
            return;
        }
        let answer = answer.unwrap_or_else(|_| {
            Err(Error::Connect {
                engine: self.name().to_owned(),
                message: format!("no answer to the lag sample within {timeout:?}"),
                code: None,
            })
        });
        let messages = match answer {
            Ok(messages) => messages,
            Err(e) if unreachable(&e) => {
                if self.healthy() {
                    self.replica_failed(&e);
                } else {
                    self.probe_failed();
                }
                return;
            }
            Err(_) => return,
        };
        self.replica_ok();
        let Some(row) = messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        }) else {
            return;
        };
        let in_recovery = row.get(0) == Some("true");
        let was = state
            .standby
            .swap(if in_recovery { 1 } else { 2 }, Ordering::AcqRel);
        if !in_recovery && was != 2 {
            crate::telemetry::warn(&format!(
                "pgassist: replica engine `{}` is not a standby (not in recovery); no reads there while it is not",
                self.name()
            ));
        }
        let replayed = row.get(1).and_then(parse_lsn).unwrap_or(0);
        state.replayed.fetch_max(replayed, Ordering::AcqRel);
        let Some(primary_lsn) = primary_lsn else {
            // The primary did not answer: the last lag stands.
            return;
        };
        state
            .lag_bytes
            .store(primary_lsn.saturating_sub(replayed), Ordering::Release);
        // Time lag on our own clock: since the sampling round whose primary
        // position the replica has not replayed yet. Not the replica's
        // `now() - pg_last_xact_replay_timestamp()`, which grows while the
        // primary is idle, is NULL until a first transaction is replayed
        // after a restart (however far behind), and mixes two servers'
        // clocks.
        let now = Instant::now();
        let mut pending = state.pending.lock().expect("replica");
        let behind = time_lag(&mut pending, replayed, primary_lsn, now);
        state.lag_micros.store(
            u64::try_from(behind.as_micros()).unwrap_or(UNKNOWN - 1),
            Ordering::Release,
        );
    }

    /// The primary's current WAL position, for one sampling round (on the
    /// read-only pool there).
    pub(crate) async fn sample_primary(&self, timeout: Duration) -> Option<u64> {
        let fallback = self.primary()?;
        let answer = tokio::time::timeout(
            timeout.max(MIN_SAMPLE_TIMEOUT),
            fallback.simple(PRIMARY_LSN_SQL),
        )
        .await;
        first_lsn(&answer.ok()?.ok()?)
    }

    /// The start-up check of [`crate::RegistryBuilder::build`]: one
    /// connection. For a replica over several hosts, one per host: a host
    /// that refused us (a SQLSTATE: wrong password, unknown database) fails
    /// it, one that cannot be reached is marked down, and it fails only if
    /// no host answered.
    pub(crate) async fn check(&self) -> Result<()> {
        let hosts = self.hosts();
        if hosts.is_empty() {
            return self.pool().ping().await.map(drop);
        }
        let pings = hosts
            .iter()
            .map(|m| async move { (m, m.pool().ping().await) });
        let mut first_error = None;
        let mut answered = false;
        for (member, pinged) in futures::future::join_all(pings).await {
            match pinged {
                Ok(_) => answered = true,
                Err(e) if e.code().is_none() && unreachable(&e) => {
                    member.replica_failed(&e);
                    first_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        match first_error {
            Some(e) if !answered => Err(e),
            _ => Ok(()),
        }
    }

    /// The members of the group this engine stands for: its per-host
    /// members if it lists several hosts, else itself (nothing if it is no
    /// replica).
    pub(crate) fn replica_members(&self) -> Vec<Engine> {
        match &self.inner.replica {
            None => Vec::new(),
            Some(link) if link.hosts.is_empty() => vec![self.clone()],
            Some(link) => link.hosts.clone(),
        }
    }

    /// This replica's place in its group now (for an engine over several
    /// hosts, the best of its members').
    pub(crate) fn replica_stats(&self) -> Option<ReplicaStats> {
        let link = self.inner.replica.as_ref()?;
        if !link.hosts.is_empty() {
            let members: Vec<ReplicaStats> = link
                .hosts
                .iter()
                .filter_map(Engine::replica_stats)
                .collect();
            let any = |f: fn(&ReplicaStats) -> bool| members.iter().any(f);
            return Some(ReplicaStats {
                primary: link.primary_name.clone(),
                healthy: any(|m| m.healthy),
                standby: members
                    .iter()
                    .filter_map(|m| m.standby)
                    .reduce(|a, b| a || b),
                replayed_lsn: members.iter().map(|m| m.replayed_lsn).max().unwrap_or(0),
                lag_bytes: members.iter().filter_map(|m| m.lag_bytes).min(),
                lag: members.iter().filter_map(|m| m.lag).min(),
                serving: any(|m| m.serving),
                reads: members.iter().map(|m| m.reads).sum(),
                hosts: link.hosts.iter().map(|m| m.name().to_owned()).collect(),
            });
        }
        let state = &link.state;
        let known = |v: u64| (v != UNKNOWN).then_some(v);
        Some(ReplicaStats {
            primary: link.primary_name.clone(),
            healthy: self.healthy(),
            standby: match state.standby.load(Ordering::Acquire) {
                0 => None,
                s => Some(s == 1),
            },
            replayed_lsn: state.replayed.load(Ordering::Acquire),
            lag_bytes: known(state.lag_bytes.load(Ordering::Acquire)),
            lag: known(state.lag_micros.load(Ordering::Acquire)).map(Duration::from_micros),
            serving: self.usable(),
            reads: state.reads.load(Ordering::Relaxed),
            hosts: Vec::new(),
        })
    }
}

/// A replica's time lag at `now`, given the oldest primary position
/// sampled that it had not replayed (`pending`, updated here), its replay
/// position and the primary's position sampled in this round.
fn time_lag(
    pending: &mut Option<(u64, Instant)>,
    replayed: u64,
    primary_lsn: u64,
    now: Instant,
) -> Duration {
    if pending.is_some_and(|(lsn, _)| replayed >= lsn) {
        *pending = None;
    }
    if pending.is_none() && replayed < primary_lsn {
        *pending = Some((primary_lsn, now));
    }
    pending.map_or(Duration::ZERO, |(_, since)| now - since)
}

/// Whether an error says the server could not be reached (rather than
/// that the statement failed there).
fn unreachable(e: &Error) -> bool {
    e.is_connection_error() || matches!(e, Error::PoolTimeout { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_lag_is_measured_from_the_first_unreplayed_round() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut pending = None;
        // Caught up, however idle the primary: no lag.
        assert_eq!(time_lag(&mut pending, 100, 100, at(0)), Duration::ZERO);
        assert_eq!(time_lag(&mut pending, 100, 100, at(60_000)), Duration::ZERO);
        // Behind this round's position: not late yet (it was just written).
        assert_eq!(time_lag(&mut pending, 100, 200, at(1000)), Duration::ZERO);
        // Still short of it (replay paused) while the primary moves on: the
        // lag counts from the round it first missed.
        assert_eq!(
            time_lag(&mut pending, 150, 300, at(1500)),
            Duration::from_millis(500)
        );
        assert_eq!(
            time_lag(&mut pending, 150, 400, at(3000)),
            Duration::from_millis(2000)
        );
        // Past that position but short of the newest: a fresh start.
        assert_eq!(time_lag(&mut pending, 250, 400, at(3100)), Duration::ZERO);
        assert_eq!(
            time_lag(&mut pending, 250, 500, at(3200)),
            Duration::from_millis(100)
        );
        // All replayed: no lag, nothing pending.
        assert_eq!(time_lag(&mut pending, 500, 500, at(3300)), Duration::ZERO);
        assert_eq!(pending, None);
    }

    #[test]
    fn unreachable_is_about_the_server_not_the_statement() {
        let down = Error::Connect {
            engine: "r".into(),
            message: "refused".into(),
            code: None,
        };
        assert!(unreachable(&down));
        assert!(!unreachable(&Error::Config("x".into())));
    }
}
