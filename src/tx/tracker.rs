//! The per-transaction connection map.
//!
//! When a transaction begins, the connection it takes out of autocommit is
//! recorded under the transaction's id (`after_begin`); when it ends, every
//! connection recorded under that id is restored to autocommit — or, if the
//! server's state could not be confirmed, left marked dirty so the pool
//! discards it — and the entry is removed (`after_end`). A nested begin finds
//! its connection already recorded and out of autocommit.
//!
//! The map is the single place where a transaction's connection goes back
//! to idle (the state machine's `Ended`), so "nothing leaves the map dirty"
//! holds by construction: a connection either goes back clean through here
//! or stays out of idle, and the pool closes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::pool::state::{ConnState, Event, StateCell};

/// The connection a transaction took out of autocommit.
#[derive(Debug)]
struct Tracked {
    engine: Arc<str>,
    conn_id: u64,
    state: Arc<StateCell>,
}

/// Which pooled connections each open transaction took out of autocommit.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    next_id: AtomicU64,
    /// One entry per open transaction: each transaction pins one connection
    /// (a unit of work enlists one transaction per engine).
    map: Mutex<HashMap<u64, Tracked>>,
}

impl Tracker {
    /// A new, process-unique transaction id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records that transaction `tx` took connection `conn_id` out of
    /// autocommit. The connection must come in clean.
    pub(crate) fn after_begin(
        &self,
        tx: u64,
        engine: &Arc<str>,
        conn_id: u64,
        state: &Arc<StateCell>,
    ) -> Result<()> {
        if let Err(refused) = state.apply(Event::Pin) {
            return Err(Error::Usage(format!(
                "engine `{engine}`: connection {conn_id}: {}",
                refused.reason()
            )));
        }
        let tracked = Tracked {
            engine: engine.clone(),
            conn_id,
            state: state.clone(),
        };
        self.map.lock().expect("tracker").insert(tx, tracked);
        Ok(())
    }

    /// True if transaction `tx` holds connection `conn_id` out of autocommit
    /// (what a nested begin expects to find).
    pub(crate) fn holds(&self, tx: u64, conn_id: u64) -> bool {
        self.map
            .lock()
            .expect("tracker")
            .get(&tx)
            .is_some_and(|t| t.conn_id == conn_id && t.state.get() != ConnState::Idle)
    }

    /// Ends transaction `tx`: its connection is restored to autocommit when
    /// `clean` (the server confirmed COMMIT or ROLLBACK), otherwise left
    /// dirty for the pool to discard. The entry is removed.
    pub(crate) fn after_end(&self, tx: u64, clean: bool) {
        let entry = self.map.lock().expect("tracker").remove(&tx);
        if let Some(t) = entry {
            let _ = t
                .state
                .apply(if clean { Event::Ended } else { Event::Lost });
        }
    }

    /// Connections of `engine` currently out of autocommit.
    pub(crate) fn in_transaction(&self, engine: &str) -> usize {
        self.map
            .lock()
            .expect("tracker")
            .values()
            .filter(|t| &*t.engine == engine)
            .count()
    }

    /// Open transactions across all engines.
    pub(crate) fn open_transactions(&self) -> usize {
        self.map.lock().expect("tracker").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_end_restores_and_removes() {
        let t = Tracker::default();
        let engine: Arc<str> = "writer".into();
        let state = Arc::new(StateCell::default());
        let tx = t.next_id();
        t.after_begin(tx, &engine, 7, &state).unwrap();
        assert_eq!(state.get(), ConnState::BeginPending);
        assert!(t.holds(tx, 7));
        assert_eq!(t.in_transaction("writer"), 1);
        // A second begin on a connection already out of autocommit is refused.
        assert!(t.after_begin(t.next_id(), &engine, 7, &state).is_err());
        t.after_end(tx, true);
        assert_eq!(state.get(), ConnState::Idle);
        // A savepoint of the ended transaction is refused by the machine.
        assert!(state.apply(Event::Statement).is_err());
        assert_eq!(t.in_transaction("writer"), 0);
        assert_eq!(t.open_transactions(), 0);
    }

    #[test]
    fn unconfirmed_end_leaves_connection_dirty() {
        let t = Tracker::default();
        let engine: Arc<str> = "writer".into();
        let state = Arc::new(StateCell::default());
        let tx = t.next_id();
        t.after_begin(tx, &engine, 1, &state).unwrap();
        state.apply(Event::BeginSent).unwrap();
        state.apply(Event::Failed).unwrap();
        t.after_end(tx, false);
        assert_eq!(state.get(), ConnState::InDoubt);
        assert_eq!(t.open_transactions(), 0);
    }
}
