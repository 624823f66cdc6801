//! Retry policy for the closure form of transactions.
//!
//! A serialization failure (40001) or deadlock (40P01) means the server rolled
//! the transaction back: running it again is safe. Attempts back off
//! exponentially with jitter so that conflicting workers spread out.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// First backoff step.
const BASE: Duration = Duration::from_millis(2);
/// Longest single backoff.
const CAP: Duration = Duration::from_millis(500);

/// How long to wait before attempt `next_attempt` (2, 3, …): a random time
/// between half and all of `BASE * 2^(next_attempt - 2)`, capped.
pub(crate) fn backoff(next_attempt: u32) -> Duration {
    let exp = next_attempt.saturating_sub(2).min(16);
    let full = BASE.saturating_mul(1 << exp).min(CAP);
    let half = full / 2;
    half + half.mul_f64(unit_random())
}

/// A random number in [0, 1) from std's randomly seeded hasher (no extra dependency).
fn unit_random() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        for attempt in 2..40 {
            let d = backoff(attempt);
            let exp = (attempt - 2).min(16);
            let full = BASE.saturating_mul(1 << exp).min(CAP);
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
        }
        assert!(backoff(40) <= CAP);
    }
}
