//! Connections ready for the next statement: a small LIFO stack in front of
//! bb8, and the checked-out connection type that returns to it.
//!
//! Why: an autocommit session checks a connection out for every statement.
//! bb8's checkout is built for the general case — a clock read and a timer
//! for its timeout, its statistics, its lock, a second lock and a clock read
//! on return — and that cost was most of what pgassist added to a point
//! select over hand-written tokio-postgres. A connection that comes back
//! clean is parked here instead and taken by the next checkout under one
//! uncontended lock. bb8 still makes, vets, waits for, reaps and counts
//! every connection.
//!
//! The rules, all under one lock, so no connection sits here while a
//! checkout waits in bb8:
//! - only a clean connection (open, autocommit, nothing in flight) is
//!   parked; anything else goes back to bb8, whose `has_broken` discards it;
//! - a connection is parked only while no checkout waits in bb8, and a
//!   checkout waits in bb8 only when the stack is empty: while someone
//!   waits, returns go to bb8, which wakes the waiter;
//! - every [`FLUSH_EVERY`] the stack is handed back to bb8, so its idle
//!   timeout, max lifetime and reaper apply as before (late by at most that).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bb8::{Pool, PooledConnection};

use crate::manager::{ConnState, Manager, PgConn};

/// How often parked connections are handed back to bb8.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(1);

type Pooled = PooledConnection<'static, Manager>;

/// One bb8 pool and the connections parked in front of it. An engine's
/// `reinit` replaces the whole slot.
pub(crate) struct PoolSlot {
    pub(crate) pool: Pool<Manager>,
    ready: Mutex<Ready>,
}

struct Ready {
    /// Clean connections, most recently returned last.
    stack: Vec<Pooled>,
    /// Checkouts waiting in bb8 (they found the stack empty).
    waiting: usize,
    /// Replaced or closed: returns go straight to bb8.
    retired: bool,
}

impl std::fmt::Debug for PoolSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolSlot")
            .field("pool", &self.pool)
            .field("parked", &self.parked())
            .finish()
    }
}

impl PoolSlot {
    /// Wraps `pool`. With `reaped` (the pool has an idle timeout or a max
    /// lifetime), starts the task that flushes parked connections back to
    /// it (it ends with the slot).
    pub(crate) fn new(pool: Pool<Manager>, max_size: u32, reaped: bool) -> Arc<PoolSlot> {
        let slot = Arc::new(PoolSlot {
            pool,
            ready: Mutex::new(Ready {
                stack: Vec::with_capacity(max_size as usize),
                waiting: 0,
                retired: false,
            }),
        });
        // Without an idle timeout or a max lifetime there is nothing for bb8
        // to enforce, and no timer is needed (each pending timer costs the
        // runtime a clock read whenever it parks).
        if reaped {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(flush_periodically(Arc::downgrade(&slot)));
            }
        }
        slot
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, Ready> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A parked connection, or `None` — and then the caller is counted as
    /// waiting in bb8 until the returned guard is dropped.
    pub(crate) fn take(self: &Arc<Self>) -> Result<Conn, Waiting<'_>> {
        let mut ready = self.ready();
        match ready.stack.pop() {
            Some(pooled) => Ok(Conn {
                pooled: Some(pooled),
                slot: self.clone(),
            }),
            None => {
                ready.waiting += 1;
                Err(Waiting(self))
            }
        }
    }

    /// Wraps a connection bb8 handed out, so that it comes back here.
    pub(crate) fn wrap(self: &Arc<Self>, pooled: Pooled) -> Conn {
        Conn {
            pooled: Some(pooled),
            slot: self.clone(),
        }
    }

    fn give_back(&self, pooled: Pooled) {
        if pooled.client.is_closed() || pooled.state.get() != ConnState::Idle {
            return drop(pooled); // bb8's has_broken discards it
        }
        let mut ready = self.ready();
        if ready.waiting == 0 && !ready.retired {
            ready.stack.push(pooled);
            return;
        }
        drop(ready);
        drop(pooled); // to bb8, which hands it to a waiter
    }

    /// Hands every parked connection back to bb8.
    pub(crate) fn flush(&self) {
        let parked = std::mem::take(&mut self.ready().stack);
        drop(parked);
    }

    /// Stops parking (the engine replaced or closed this pool) and hands
    /// back what is parked.
    pub(crate) fn retire(&self) {
        self.ready().retired = true;
        self.flush();
    }

    /// Connections parked now (idle, from the pool's point of view).
    pub(crate) fn parked(&self) -> u32 {
        self.ready().stack.len() as u32
    }
}

/// A checkout counted as waiting in bb8; uncounted when dropped (also when
/// the checkout future is dropped mid-wait).
pub(crate) struct Waiting<'a>(&'a PoolSlot);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.ready().waiting -= 1;
    }
}

async fn flush_periodically(slot: Weak<PoolSlot>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        match slot.upgrade() {
            Some(slot) => slot.flush(),
            None => return,
        }
    }
}

/// A connection checked out of an engine. Dropped, it is parked for the
/// next checkout if it is clean, or given to bb8 otherwise.
pub(crate) struct Conn {
    /// `Some` until dropped.
    pooled: Option<Pooled>,
    slot: Arc<PoolSlot>,
}

impl std::ops::Deref for Conn {
    type Target = PgConn;
    fn deref(&self) -> &PgConn {
        self.pooled.as_ref().expect("a checked-out connection")
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            self.slot.give_back(pooled);
        }
    }
}
