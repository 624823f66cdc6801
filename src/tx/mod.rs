//! The transaction layer: the transaction guard and what it runs on —
//! options, listeners and callbacks, the per-transaction connection map,
//! the SQL of each step, retry. It drives the connection state machine of
//! the pool layer (`pool::state`) and imports nothing from the layers above
//! it: what the front layer must learn (a statement ran, a commit's WAL
//! position) it reports through [`Observer`], which the front implements.

pub(crate) mod hooks;
pub(crate) mod options;
pub(crate) mod retry;
pub(crate) mod sql;
pub(crate) mod tracker;
pub(crate) mod transaction;

use std::sync::Arc;
use std::time::Duration;

use crate::pool::Pool;
use hooks::Hooks;
use tracker::Tracker;

/// What the transactions of one engine share: its pool, the registry's
/// listeners and the per-transaction connection map. Built once per
/// engine; a transaction holds one `Arc` of it.
#[derive(Debug)]
pub(crate) struct Env {
    pub(crate) pool: Pool,
    pub(crate) hooks: Arc<Hooks>,
    pub(crate) tracker: Arc<Tracker>,
}

/// Who wants to hear about a transaction's work: the per-request container
/// (reports, read-your-writes). Defined here, implemented above.
pub(crate) trait Observer: Send + Sync {
    /// A statement ran on server process `backend_pid` and took `took`.
    fn statement_ran(&self, backend_pid: i32, took: Duration);
    /// Whether a commit should read the WAL insert position in its round
    /// trip (the engine has replicas that reads must see it on).
    fn wants_commit_lsn(&self) -> bool;
    /// The transaction committed; its commit record is at or before `lsn`.
    fn committed_at(&self, lsn: u64);
    /// A transaction began (listed in reports while open).
    fn opened(&self, tx: &Arc<transaction::TxCore>);
}
