//! Per-pool counters, monotonic since the pool was built.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// Pools discarded because their server stopped being the primary.
    pub(crate) primary_switches: AtomicU64,
    /// How long checkouts that found no connection ready waited.
    pub(crate) waits: WaitHistogram,
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
    /// Checkouts waiting now (in the queue or in bb8).
    pub(crate) waiting: u32,
}

/// Buckets of [`WaitHistogram`]: bucket 0 holds waits under 1 µs, bucket
/// `i` those from 2^(i-1) to 2^i µs, the last everything longer.
const BUCKETS: usize = 32;

/// Checkout waits in power-of-two buckets of microseconds, plus the
/// longest: fixed size, lock-free, one clock read per side of a wait (and
/// nothing on a checkout that did not wait). Percentiles read from it are
/// the upper bound of their bucket (within a factor of two, never above
/// the longest wait).
#[derive(Debug, Default)]
pub(crate) struct WaitHistogram {
    buckets: [AtomicU64; BUCKETS],
    max_micros: AtomicU64,
}

impl WaitHistogram {
    /// Counts one wait.
    pub(crate) fn record(&self, waited: Duration) {
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let bucket = ((u64::BITS - micros.leading_zeros()) as usize).min(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    /// Waits counted, the given quantiles (0 to 1) and the longest wait.
    pub(crate) fn read<const N: usize>(
        &self,
        quantiles: [f64; N],
    ) -> (u64, [Duration; N], Duration) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let max = self.max_micros.load(Ordering::Relaxed);
        let total: u64 = counts.iter().sum();
        let at = |q: f64| {
            if total == 0 {
                return Duration::ZERO;
            }
            // The rank of the quantile, 1-based, rounded up.
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            for (i, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    let upper = if i == 0 { 1 } else { 1u64 << i };
                    return Duration::from_micros(upper.min(max));
                }
            }
            Duration::from_micros(max)
        };
        (total, quantiles.map(at), Duration::from_micros(max))
    }
}
