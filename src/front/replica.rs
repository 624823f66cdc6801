//! Read replicas and read-your-writes by WAL position.
//!
//! An engine declared [`crate::EngineConfig::replica_of`] serves reads. Within
//! a [`crate::Sessions`] scope, every commit (or autocommit statement) on the
//! primary records `pg_current_wal_insert_lsn()` read right after it — the
//! insert position, which covers the commit record even with
//! `synchronous_commit = off`, where the write position can trail it. A read
//! on the replica then goes there only once its `pg_last_wal_replay_lsn()` has
//! reached that position (the last replay position seen is cached, so a
//! replica that is ahead costs no extra round trip); otherwise it waits up to
//! the engine's `replica_max_wait` and then reads from the primary.
//!
//! A replica that cannot be reached is skipped for a second at a time, with
//! one log line when it goes down and one when it is back; reads go to the
//! primary meanwhile (unless `replica_fallback(false)`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::engine::Engine;
use crate::error::{Error, Result};
use crate::sql::lsn::first_lsn;

/// How long a replica found down is skipped before it is tried again.
const RETRY_DOWN_AFTER: Duration = Duration::from_secs(1);
/// Pause between replay-position checks while waiting for a replica.
const POLL: Duration = Duration::from_millis(5);

/// Replica bookkeeping of one engine.
#[derive(Debug, Default)]
pub(crate) struct ReplicaState {
    /// Highest replay position seen on this replica.
    replayed: AtomicU64,
    /// Skip the replica until then.
    down_until: Mutex<Option<Instant>>,
    /// Whether "down" was logged and "back" not yet.
    down_logged: AtomicBool,
}

/// Where a read goes.
pub(crate) enum Target {
    Replica,
    Primary,
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
    pub(crate) async fn choose_target(&self, required: u64) -> Target {
        let Some(state) = self.replica_state() else {
            return Target::Replica;
        };
        let fallback = self.config().replica_fallback;
        if fallback
            && state
                .down_until
                .lock()
                .expect("replica")
                .is_some_and(|t| Instant::now() < t)
        {
            return Target::Primary;
        }
        if required == 0 || state.replayed.load(Ordering::Acquire) >= required {
            return Target::Replica;
        }
        let deadline = Instant::now() + self.config().replica_max_wait;
        loop {
            match self.replay_lsn().await {
                Ok(lsn) if lsn >= required => return Target::Replica,
                Ok(_) => {}
                Err(e) if e.is_connection_error() || matches!(e, Error::PoolTimeout { .. }) => {
                    self.replica_failed(&e);
                    return if fallback {
                        Target::Primary
                    } else {
                        Target::Replica
                    };
                }
                Err(_) => return Target::Primary,
            }
            if Instant::now() >= deadline {
                return Target::Primary;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Asks the replica how far it has replayed, and remembers it.
    async fn replay_lsn(&self) -> Result<u64> {
        let conn = self.checkout().await?;
        let messages = conn
            .client
            .simple_query("SELECT coalesce(pg_last_wal_replay_lsn(), '0/0')::text")
            .await
            .map_err(|e| Error::from_pg(self.name(), e))?;
        let lsn = first_lsn(&messages).unwrap_or(0);
        if let Some(state) = self.replica_state() {
            state.replayed.fetch_max(lsn, Ordering::AcqRel);
        }
        self.replica_ok();
        Ok(lsn)
    }

    /// Notes that the replica could not be reached: skip it for a while and
    /// say so once.
    pub(crate) fn replica_failed(&self, e: &Error) {
        let Some(state) = self.replica_state() else {
            return;
        };
        *state.down_until.lock().expect("replica") = Some(Instant::now() + RETRY_DOWN_AFTER);
        if !state.down_logged.swap(true, Ordering::AcqRel) {
            crate::telemetry::warn(&format!(
                "pgassist: replica engine `{}` is unreachable ({e}); reading from `{}` until it is back",
                self.name(),
                self.primary().map_or("its primary", |p| p.name()),
            ));
        }
    }

    /// Notes that the replica answered.
    pub(crate) fn replica_ok(&self) {
        let Some(state) = self.replica_state() else {
            return;
        };
        if state.down_logged.swap(false, Ordering::AcqRel) {
            *state.down_until.lock().expect("replica") = None;
            crate::telemetry::warn(&format!(
                "pgassist: replica engine `{}` is back",
                self.name()
            ));
        }
    }

    /// Whether a failed read on this replica should be retried on the primary.
    pub(crate) fn should_fall_back(&self, e: &Error) -> bool {
        let unreachable = e.is_connection_error() || matches!(e, Error::PoolTimeout { .. });
        if unreachable {
            self.replica_failed(e);
        }
        unreachable && self.config().replica_fallback
    }
}
