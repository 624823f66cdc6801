//! Retry policy for the closure form of transactions.
//!
//! A serialization failure (40001) or deadlock (40P01) means the server rolled
//! the transaction back: running it again is safe. Attempts back off
//! exponentially with jitter so that conflicting workers spread out.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use futures::future::BoxFuture;

use std::future::Future;

use super::options::TxOptions;
use super::transaction::Transaction;
use crate::error::{Error, Result};

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

/// What begins the attempts of the closure form: a session (a new
/// connection each attempt) or a pinned connection (its own, lent).
pub(crate) trait Begin {
    /// Begins attempt number `attempt` (1 for the first).
    fn begin_attempt(
        &mut self,
        options: TxOptions,
        attempt: u32,
    ) -> impl Future<Output = Result<Transaction<'_>>> + Send;
}

/// The closure form of a transaction (`Session::transaction`,
/// `Pinned::transaction`): runs `f` in a transaction begun by `begin`,
/// commits on `Ok`, rolls back on `Err`, and runs it again after a jittered
/// backoff when an attempt failed with a serialization failure or a
/// deadlock and [`TxOptions::retries`] allows.
pub(crate) async fn transaction<B, T, E, F>(
    begin: &mut B,
    options: TxOptions,
    mut f: F,
) -> std::result::Result<T, E>
where
    B: Begin,
    F: for<'t> FnMut(&'t mut Transaction<'_>) -> BoxFuture<'t, std::result::Result<T, E>>,
    E: From<Error>,
{
    let mut attempt = 1;
    loop {
        let tx = begin.begin_attempt(options.clone(), attempt).await?;
        if let Some(done) = one_attempt(tx, &mut f, attempt <= options.retries).await {
            return done;
        }
        attempt += 1;
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// One attempt: `None` if it failed with a serialization failure or a
/// deadlock and `may_retry` allows another; otherwise the final result.
async fn one_attempt<T, E, F>(
    mut tx: Transaction<'_>,
    f: &mut F,
    may_retry: bool,
) -> Option<std::result::Result<T, E>>
where
    F: for<'t> FnMut(&'t mut Transaction<'_>) -> BoxFuture<'t, std::result::Result<T, E>>,
    E: From<Error>,
{
    match f(&mut tx).await {
        Ok(value) => match tx.commit().await {
            Ok(()) => Some(Ok(value)),
            Err(e) if e.is_retryable() && may_retry => None,
            Err(e) => Some(Err(e.into())),
        },
        Err(e) => {
            let retryable = tx.saw_retryable();
            let _ = tx.rollback().await;
            if retryable && may_retry {
                None
            } else {
                Some(Err(e))
            }
        }
    }
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
