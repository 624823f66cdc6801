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
//!
//! With [`crate::EngineConfig::pipeline`], autocommit statements take a
//! [`Shared`] hold instead: the connection is *lent* (listed here with its
//! number of users) and, while the pool is saturated (every connection bb8
//! may open is out here or promised to a checkout waiting there), further
//! autocommit statements join it, up to the configured number in flight, or
//! wait for a place; they never queue in bb8 then. It comes back (parked, or
//! to bb8) when its last user is done. Nobody joins while a checkout waits
//! in bb8, so lent connections drain to it and transactions are not starved;
//! nor does anybody join a connection lent before the last flush, so every
//! connection still gets back to bb8.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bb8::{Pool, PooledConnection};

use super::manager::{ConnParts, Manager, PgConn};

/// How often parked connections are handed back to bb8.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(1);

type Pooled = PooledConnection<'static, Manager>;

/// One bb8 pool and the connections parked in front of it. An engine's
/// `reinit` replaces the whole slot.
pub(crate) struct PoolSlot {
    pub(crate) pool: Pool<Manager>,
    max_size: u32,
    ready: Mutex<Ready>,
    /// Wakes autocommit statements waiting for a share (pipelined mode).
    share_free: tokio::sync::Notify,
}

struct Ready {
    /// Clean connections, most recently returned last.
    stack: Vec<Pooled>,
    /// Checkouts waiting in bb8 (they found the stack empty).
    waiting: usize,
    /// Replaced or closed: returns go straight to bb8.
    retired: bool,
    /// Connections lent to autocommit statements that may share them.
    lent: Vec<Lent>,
    /// Counts flushes: a connection lent before the last one takes no new users.
    epoch: u64,
    /// Connections out of bb8 in this slot's care: parked, lent or checked
    /// out. At `max_size`, bb8 has none left and cannot open another.
    out: u32,
    /// Autocommit statements waiting for a share (see [`ShareWait`]).
    share_waiters: usize,
}

struct Lent {
    pooled: Pooled,
    users: u32,
    epoch: u64,
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
            max_size,
            ready: Mutex::new(Ready {
                stack: Vec::with_capacity(max_size as usize),
                waiting: 0,
                retired: false,
                lent: Vec::new(),
                epoch: 0,
                out: 0,
                share_waiters: 0,
            }),
            share_free: tokio::sync::Notify::new(),
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
        self.ready().out += 1;
        Conn {
            pooled: Some(pooled),
            slot: self.clone(),
        }
    }

    fn give_back(self: &Arc<Self>, pooled: Pooled) {
        self.settle(self.ready(), pooled);
    }

    /// Parks a clean connection, or gives it to bb8 (after the lock is
    /// released) when a checkout waits there or the slot is retired. A
    /// connection whose session state changed is reset first, on a task of
    /// its own (it stays counted as out meanwhile, so a checkout waits for
    /// it in bb8); without a runtime to run the reset it goes to bb8, which
    /// discards it.
    fn settle(self: &Arc<Self>, mut ready: MutexGuard<'_, Ready>, pooled: Pooled) {
        if pooled.state.needs_reset() && !pooled.client.is_closed() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                self.unlock(ready);
                let slot = self.clone();
                rt.spawn(async move {
                    pooled.reset().await;
                    slot.give_back(pooled);
                });
                return;
            }
        }
        if ready.waiting == 0 && !ready.retired && is_clean(&pooled) {
            ready.stack.push(pooled);
            return self.unlock(ready);
        }
        ready.out -= 1;
        self.unlock(ready);
        drop(pooled); // to bb8, which hands it to a waiter or discards it (has_broken)
    }

    /// Releases the lock after a change that may let a statement waiting
    /// for a share go on, and wakes those waiting.
    fn unlock(&self, ready: MutexGuard<'_, Ready>) {
        let wake = ready.share_waiters > 0;
        drop(ready);
        if wake {
            self.share_free.notify_waiters();
        }
    }

    /// Pipelined mode: a parked connection, lent from now on; or, while the
    /// pool is saturated (every connection bb8 may open is out here) and
    /// nobody waits in bb8, a share of the least busy lent connection with
    /// fewer than `max_in_flight` users. While saturated with connections
    /// lent but none to join, the caller waits for a share ([`ShareWait`]):
    /// joins stop while a checkout waits in bb8, so lent connections drain
    /// to it. Otherwise it takes a connection of its own from bb8.
    pub(crate) fn take_shared(self: &Arc<Self>, max_in_flight: u32) -> SharedTake<'_> {
        let mut ready = self.ready();
        if let Some(pooled) = ready.stack.pop() {
            return SharedTake::Got(self.lend(&mut ready, pooled), false);
        }
        // Saturated: every connection bb8 may open is out here or promised
        // to a checkout waiting there.
        let saturated = ready.out as usize + ready.waiting >= self.max_size as usize;
        if !saturated || ready.retired || ready.lent.is_empty() {
            return SharedTake::Bb8;
        }
        if ready.waiting == 0 {
            let epoch = ready.epoch;
            let joinable = ready
                .lent
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    l.epoch == epoch && l.users < max_in_flight && !l.pooled.client.is_closed()
                })
                .min_by_key(|(_, l)| l.users)
                .map(|(i, _)| i);
            if let Some(i) = joinable {
                let lent = &mut ready.lent[i];
                lent.users += 1;
                let shared = Shared {
                    parts: lent.pooled.share(),
                    slot: self.clone(),
                };
                return SharedTake::Got(shared, true);
            }
        }
        ready.share_waiters += 1;
        SharedTake::Wait(ShareWait(self))
    }

    /// Registers interest in the next change that may free a share; to be
    /// enabled before [`PoolSlot::take_shared`] is asked again, so that no
    /// wake-up is lost in between.
    pub(crate) fn share_freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.share_free.notified()
    }

    fn lend(self: &Arc<Self>, ready: &mut Ready, pooled: Pooled) -> Shared {
        let parts = pooled.share();
        ready.lent.push(Lent {
            pooled,
            users: 1,
            epoch: ready.epoch,
        });
        Shared {
            parts,
            slot: self.clone(),
        }
    }

    /// Hands every parked connection back to bb8, and closes lent ones to
    /// new users.
    pub(crate) fn flush(&self) {
        let mut ready = self.ready();
        ready.epoch += 1;
        ready.out -= ready.stack.len() as u32;
        let parked = std::mem::take(&mut ready.stack);
        self.unlock(ready);
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
        let mut ready = self.0.ready();
        ready.waiting -= 1;
        // Joins may go on again.
        self.0.unlock(ready);
    }
}

/// What [`PoolSlot::take_shared`] found.
pub(crate) enum SharedTake<'a> {
    /// A hold on a connection; `true` if others were using it.
    Got(Shared, bool),
    /// Saturated, but no share now: wait for one.
    Wait(ShareWait<'a>),
    /// Not saturated (or nothing lent): take a connection from bb8.
    Bb8,
}

/// An autocommit statement counted as waiting for a share; uncounted when
/// dropped.
pub(crate) struct ShareWait<'a>(&'a PoolSlot);

impl Drop for ShareWait<'_> {
    fn drop(&mut self) {
        self.0.ready().share_waiters -= 1;
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

impl Conn {
    /// Lends this connection out for sharing (pipelined mode).
    pub(crate) fn into_shared(mut self) -> Shared {
        let pooled = self.pooled.take().expect("a checked-out connection");
        let slot = self.slot.clone();
        let mut ready = slot.ready();
        slot.lend(&mut ready, pooled)
    }
}

/// A clean connection: open, in autocommit, nothing cut off.
fn is_clean(pooled: &Pooled) -> bool {
    !pooled.client.is_closed() && pooled.state.is_idle()
}

/// An autocommit statement's hold on a lent connection, which other
/// autocommit statements may share (pipelined mode). The last one to drop
/// its hold returns the connection.
pub(crate) struct Shared {
    parts: Arc<ConnParts>,
    slot: Arc<PoolSlot>,
}

impl std::ops::Deref for Shared {
    type Target = ConnParts;
    fn deref(&self) -> &ConnParts {
        &self.parts
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let mut ready = self.slot.ready();
        let found = ready
            .lent
            .iter()
            .position(|l| std::ptr::eq::<ConnParts>(&**l.pooled, &*self.parts));
        let Some(i) = found else { return };
        ready.lent[i].users -= 1;
        if ready.lent[i].users == 0 {
            let pooled = ready.lent.swap_remove(i).pooled;
            self.slot.settle(ready, pooled);
        } else {
            self.slot.unlock(ready);
        }
    }
}

/// A connection checked out for one autocommit statement: a connection of
/// its own, or (pipelined mode) a share of one.
pub(crate) enum Lease {
    /// Exclusive use.
    Own(Conn),
    /// Shared with other autocommit statements.
    Shared(Shared),
}

impl std::ops::Deref for Lease {
    type Target = ConnParts;
    fn deref(&self) -> &ConnParts {
        match self {
            Lease::Own(conn) => conn,
            Lease::Shared(shared) => shared,
        }
    }
}
