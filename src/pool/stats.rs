//! Per-pool counters, monotonic since the pool was built.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one engine's pool and of the transactions on it.
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

impl Counters {
    /// Adds one to the counter `f` picks.
    #[inline]
    pub(crate) fn inc(&self, f: impl Fn(&Counters) -> &AtomicU64) {
        f(self).fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the counter `f` picks.
    pub(crate) fn get(&self, f: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        f(self).load(Ordering::Relaxed)
    }
}

/// What bb8 and the ready stack hold right now.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Occupancy {
    /// Connections open (idle + in use).
    pub(crate) connections: u32,
    /// Idle connections (in bb8 or parked in the ready stack).
    pub(crate) idle: u32,
    /// Checkouts that had to wait in bb8 (current pool).
    pub(crate) waits: u64,
}
