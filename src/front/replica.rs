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

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::front::engine::Engine;

/// How long a replica found down is skipped before it is tried again.
const RETRY_DOWN_AFTER: Duration = Duration::from_secs(1);
/// Pause between replay-position checks while waiting for a replica.
const POLL: Duration = Duration::from_millis(5);

/// Replica bookkeeping of one engine.
#[derive(Debug, Default)]
pub(crate) struct ReplicaState {
    /// A read-only pool on the primary, for reads the replica cannot serve
    /// yet (set when the registry is built).
    pub(crate) primary: OnceLock<Engine>,
    /// The primary's index in the registry (whose commits reads must see).
    pub(crate) primary_index: OnceLock<usize>,
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

/// `16/B374D848` → a comparable number.
pub(crate) fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The first column of the first row of a simple query, as an LSN.
pub(crate) fn lsn_of(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<u64> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).and_then(parse_lsn),
        _ => None,
    })
}

/// The WAL insert position of the primary, read on `client` right after a commit.
pub(crate) const INSERT_LSN_SQL: &str = "SELECT pg_current_wal_insert_lsn()::text";

impl Engine {
    /// For a replica engine: the read-only pool on its primary.
    pub(crate) fn primary(&self) -> Option<&Engine> {
        self.inner.replica.primary.get()
    }

    /// For a replica engine: the primary's index in the registry.
    pub(crate) fn primary_index(&self) -> usize {
        self.inner
            .replica
            .primary_index
            .get()
            .copied()
            .unwrap_or(self.inner.index)
    }

    /// Decides where a read that must see `required` (0: anything) goes.
    pub(crate) async fn choose_target(&self, required: u64) -> Target {
        let state = &self.inner.replica;
        let fallback = self.inner.config.replica_fallback;
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
        let deadline = Instant::now() + self.inner.config.replica_max_wait;
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
        let lsn = lsn_of(&messages).unwrap_or(0);
        self.inner.replica.replayed.fetch_max(lsn, Ordering::AcqRel);
        self.replica_ok();
        Ok(lsn)
    }

    /// Notes that the replica could not be reached: skip it for a while and
    /// say so once.
    pub(crate) fn replica_failed(&self, e: &Error) {
        let state = &self.inner.replica;
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
        let state = &self.inner.replica;
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
        unreachable && self.inner.config.replica_fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_compare_as_numbers() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert!(parse_lsn("1/FF").unwrap() > parse_lsn("0/FFFFFFFF").unwrap());
        assert_eq!(parse_lsn("nonsense"), None);
    }
}
