//! Begin / end listeners, fired once per outermost transaction.
//!
//! Listeners run synchronously on the task that begins or ends the
//! transaction, so keep them short (log, count, stash an id); a panic in a
//! listener is caught and does not disturb the transaction.

use std::fmt;
use std::sync::Arc;

use crate::tx::options::TxOptions;

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// COMMIT succeeded.
    Committed,
    /// Rolled back: by `rollback()`, by drop, or because COMMIT failed.
    RolledBack,
    /// The connection broke during COMMIT, or the commit future was dropped
    /// while COMMIT was in flight; the server may or may not have committed.
    Unknown,
    /// PREPARE TRANSACTION succeeded: the first phase of a two-phase commit
    /// (the unit of work commits or rolls back the prepared transaction).
    Prepared,
}

/// What a listener learns about a transaction.
#[derive(Clone, Debug)]
pub struct TxEvent {
    pub(crate) engine: Arc<str>,
    pub(crate) id: u64,
    pub(crate) options: TxOptions,
}

impl TxEvent {
    /// The engine the transaction runs on.
    pub fn engine(&self) -> &str {
        &self.engine
    }
    /// A process-wide unique transaction number (also the key in the
    /// per-transaction connection map).
    pub fn transaction_id(&self) -> u64 {
        self.id
    }
    /// The options the transaction was begun with.
    pub fn options(&self) -> &TxOptions {
        &self.options
    }
}

type BeginFn = dyn Fn(&TxEvent) + Send + Sync;
type EndFn = dyn Fn(&TxEvent, Outcome) + Send + Sync;

/// The registry's listeners.
#[derive(Default, Clone)]
pub(crate) struct Hooks {
    pub(crate) on_begin: Vec<Arc<BeginFn>>,
    pub(crate) on_end: Vec<Arc<EndFn>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("on_begin", &self.on_begin.len())
            .field("on_end", &self.on_end.len())
            .finish()
    }
}

impl Hooks {
    pub(crate) fn begin(&self, ev: &TxEvent) {
        for f in &self.on_begin {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(ev)));
        }
    }

    pub(crate) fn end(&self, ev: &TxEvent, outcome: Outcome) {
        for f in &self.on_end {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(ev, outcome)));
        }
    }
}

/// A callback registered on a transaction.
pub(crate) enum Callback {
    /// Runs after the outermost COMMIT succeeded.
    Commit(Box<dyn FnOnce() + Send>),
    /// Awaited after the outermost COMMIT succeeded.
    CommitAsync(Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>),
    /// Runs when the work it was registered with is rolled back.
    Rollback(Box<dyn FnOnce() + Send>),
}

/// Runs the commit callbacks of `list`, in registration order, awaiting the
/// async ones; panics are contained and logged, never turned into a failed
/// commit (the data is committed by then).
pub(crate) async fn run_after_commit(list: Vec<Callback>) {
    use futures::FutureExt;
    for callback in list {
        let outcome = match callback {
            Callback::Commit(f) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)),
            Callback::CommitAsync(f) => {
                std::panic::AssertUnwindSafe(async move { f().await })
                    .catch_unwind()
                    .await
            }
            Callback::Rollback(_) => Ok(()),
        };
        if outcome.is_err() {
            crate::telemetry::warn(
                "pgassist: an on_commit callback panicked (the transaction is committed)",
            );
        }
    }
}

/// Runs the rollback callbacks of `list`, in registration order; commit
/// callbacks are dropped.
pub(crate) fn run_after_rollback(list: Vec<Callback>) {
    for callback in list {
        if let Callback::Rollback(f) = callback {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                crate::telemetry::warn("pgassist: an on_rollback callback panicked");
            }
        }
    }
}
