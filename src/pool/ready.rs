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
//! checkout waits:
//! - only a clean connection (open, autocommit, nothing in flight) is
//!   parked; anything else goes back to bb8, whose `has_broken` discards it;
//! - a connection is parked only while no checkout waits (in bb8 or in the
//!   queue below), and a checkout waits only when the stack is empty;
//! - every [`FLUSH_EVERY`] the stack is handed back to bb8, so its idle
//!   timeout, max lifetime and reaper apply as before (late by at most that).
//!
//! Waiters are served in arrival order. bb8 0.9 has no hand-off: a
//! connection returned to it goes to whoever asks next, so under overload
//! the task that returned it takes it straight back and a waiter can be
//! passed over until it times out. So when the pool is saturated (every
//! connection bb8 may open is out here or promised to a checkout waiting
//! there), a checkout that finds the stack empty joins a FIFO queue here
//! instead of waiting in bb8, and a connection that comes back clean is
//! handed straight to the oldest waiter (HikariCP's hand-off, the FIFO of
//! deadpool's semaphore). When a connection goes back to bb8 instead (dirty,
//! closed, flushed), the oldest waiter is sent to bb8 for the room it made.
//! A waiter dropped after something was handed to it passes it on — the
//! connection to the next waiter (or the stack), the room in bb8 to the
//! next waiter — so nothing leaks and nobody is skipped. Nobody waits while
//! the stack has a connection, so the uncontended path is as before: one
//! pop, one push.
//!
//! With [`crate::EngineConfig::pipeline`], autocommit statements take a
//! [`Shared`] hold instead: the connection is *lent* (listed here with its
//! number of users) and, while the pool is saturated (every connection bb8
//! may open is out here or promised to a checkout waiting there), further
//! autocommit statements join it, up to the configured number in flight, or
//! wait in line for a place, first come first served (only the oldest is
//! woken when a place may be free, and it wakes the next once served); they
//! never queue in bb8 then. It comes back (parked, or
//! to bb8) when its last user is done. Nobody joins while a checkout waits
//! in bb8, so lent connections drain to it and transactions are not starved;
//! nor does anybody join a connection lent before the last flush, so every
//! connection still gets back to bb8.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bb8::{Pool, PooledConnection};
use tokio::sync::oneshot;

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
    /// Autocommit statements waiting for a share (pipelined mode), oldest
    /// first, each with its ticket and its wake-up (see [`ShareTurn`]).
    share_queue: VecDeque<(u64, Arc<tokio::sync::Notify>)>,
    /// Checkouts waiting for a connection to come back, oldest first, each
    /// with its ticket (see [`Queued`]).
    queue: VecDeque<(u64, oneshot::Sender<Handoff>)>,
    /// The next queued checkout's ticket.
    tickets: u64,
}

impl Ready {
    /// Every connection bb8 may open is out here or promised to a checkout
    /// waiting there: bb8 has nothing to give.
    fn saturated(&self, max_size: u32) -> bool {
        self.out as usize + self.waiting >= max_size as usize
    }
}

/// What a queued checkout is handed.
enum Handoff {
    /// A clean connection (still counted in `out`).
    Conn(Pooled),
    /// Room in bb8: get a connection there (already counted in `waiting`).
    Bb8,
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
                share_queue: VecDeque::new(),
                queue: VecDeque::new(),
                tickets: 0,
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

    /// A parked connection; or, when none is, how to wait for one: in the
    /// queue while the pool is saturated or others queue already (first
    /// come, first served), else in bb8 (counted as waiting there until the
    /// returned guard is dropped).
    pub(crate) fn take(self: &Arc<Self>) -> Result<Conn, Wait<'_>> {
        let mut ready = self.ready();
        if let Some(pooled) = ready.stack.pop() {
            return Ok(Conn {
                pooled: Some(pooled),
                slot: self.clone(),
            });
        }
        if !ready.retired && (!ready.queue.is_empty() || ready.saturated(self.max_size)) {
            let (tx, rx) = oneshot::channel();
            let ticket = ready.tickets;
            ready.tickets += 1;
            ready.queue.push_back((ticket, tx));
            return Err(Wait::Queued(Queued {
                slot: self,
                ticket,
                rx: Some(rx),
            }));
        }
        ready.waiting += 1;
        Err(Wait::Bb8(Waiting(self)))
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

    /// Hands a clean connection to the oldest queued checkout, or parks it
    /// when nobody waits; gives it to bb8 (after the lock is released) when
    /// a checkout waits there, it is not clean or the slot is retired. A
    /// connection whose session state changed is reset first, on a task of
    /// its own (it stays counted as out meanwhile, so checkouts wait for it);
    /// without a runtime to run the reset it goes to bb8, which discards it.
    fn settle(self: &Arc<Self>, mut ready: MutexGuard<'_, Ready>, mut pooled: Pooled) {
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
        if !ready.retired && is_clean(&pooled) {
            while let Some((_, tx)) = ready.queue.pop_front() {
                match tx.send(Handoff::Conn(pooled)) {
                    Ok(()) => return self.unlock(ready),
                    // That waiter is gone (it unqueues itself under this
                    // lock, so this does not happen): the next one.
                    Err(Handoff::Conn(back)) => pooled = back,
                    Err(Handoff::Bb8) => return self.unlock(ready),
                }
            }
            if ready.waiting == 0 {
                ready.stack.push(pooled);
                return self.unlock(ready);
            }
        }
        ready.out -= 1;
        self.dispatch(&mut ready);
        self.unlock(ready);
        drop(pooled); // to bb8, which hands it to a waiter or discards it (has_broken)
    }

    /// Sends the oldest queued checkouts to bb8 while it has room (a
    /// connection went back to it, a checkout stopped waiting there, or
    /// the slot was retired).
    fn dispatch(&self, ready: &mut Ready) {
        while !ready.queue.is_empty() && (ready.retired || !ready.saturated(self.max_size)) {
            let Some((_, tx)) = ready.queue.pop_front() else {
                return;
            };
            ready.waiting += 1;
            if tx.send(Handoff::Bb8).is_err() {
                ready.waiting -= 1;
            }
        }
    }

    /// Releases the lock after a change that may let a statement waiting
    /// for a share go on, and wakes the oldest one waiting: only it may
    /// take a share, and it wakes the next once it has (see [`ShareTurn`]).
    fn unlock(&self, ready: MutexGuard<'_, Ready>) {
        let front = ready.share_queue.front().map(|(_, wake)| wake.clone());
        drop(ready);
        if let Some(wake) = front {
            // Stored as a permit if it is not parked yet: no wake-up is lost.
            wake.notify_one();
        }
    }

    /// Pipelined mode: a parked connection, lent from now on; or, while the
    /// pool is saturated (every connection bb8 may open is out here) and
    /// nobody waits in bb8, a share of the least busy lent connection with
    /// fewer than `max_in_flight` users. While saturated with connections
    /// lent but none to join, the caller waits for a share: it gets a
    /// [`ShareTurn`] in `turn`, and only the oldest turn may take a share
    /// (first come, first served), so a statement that just arrived never
    /// takes the place of one that waits. Joins stop while a checkout
    /// waits in bb8, so lent connections drain to it. Otherwise it takes a
    /// connection of its own from bb8.
    pub(crate) fn take_shared<'a>(
        self: &'a Arc<Self>,
        max_in_flight: u32,
        turn: &mut Option<ShareTurn<'a>>,
    ) -> SharedTake {
        let mut ready = self.ready();
        let first = match turn {
            None => ready.share_queue.is_empty(),
            Some(t) => ready
                .share_queue
                .front()
                .is_some_and(|(f, _)| *f == t.ticket),
        };
        let taken = self.try_share(&mut ready, max_in_flight, first);
        if matches!(taken, SharedTake::Wait) {
            if turn.is_none() {
                let wake = Arc::new(tokio::sync::Notify::new());
                let ticket = ready.tickets;
                ready.tickets += 1;
                ready.share_queue.push_back((ticket, wake.clone()));
                *turn = Some(ShareTurn {
                    slot: self,
                    ticket,
                    wake,
                });
            }
            return taken;
        }
        // Served: out of the line, and the next in line looks whether
        // there is something for it too.
        if let Some(t) = turn.take() {
            ready.share_queue.retain(|(f, _)| *f != t.ticket);
            self.unlock(ready);
            drop(t); // no longer in line: its drop finds nothing to do
        }
        taken
    }

    /// What [`PoolSlot::take_shared`] can get now; a share only for the
    /// `first` in line.
    fn try_share(
        self: &Arc<Self>,
        ready: &mut Ready,
        max_in_flight: u32,
        first: bool,
    ) -> SharedTake {
        if first {
            if let Some(pooled) = ready.stack.pop() {
                return SharedTake::Got(self.lend(ready, pooled), false);
            }
        }
        // Saturated: every connection bb8 may open is out here or promised
        // to a checkout waiting there.
        if !ready.saturated(self.max_size) || ready.retired || ready.lent.is_empty() {
            return SharedTake::Bb8;
        }
        if first && ready.waiting == 0 && ready.queue.is_empty() {
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
        SharedTake::Wait
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
        self.dispatch(&mut ready);
        self.unlock(ready);
        drop(parked);
    }

    /// Stops parking and queueing (the engine replaced or closed this
    /// pool), hands back what is parked and sends queued checkouts to bb8.
    pub(crate) fn retire(&self) {
        self.ready().retired = true;
        self.flush();
    }

    /// Connections parked now (idle, from the pool's point of view).
    pub(crate) fn parked(&self) -> u32 {
        self.ready().stack.len() as u32
    }

    /// Checkouts waiting now: in the queue, in bb8, or for a share.
    pub(crate) fn waiters(&self) -> u32 {
        let ready = self.ready();
        (ready.queue.len() + ready.waiting + ready.share_queue.len()) as u32
    }

    /// Counts the caller as waiting in bb8.
    fn bb8_wait(&self) -> Waiting<'_> {
        self.ready().waiting += 1;
        Waiting(self)
    }
}

/// A checkout counted as waiting in bb8; uncounted when dropped (also when
/// the checkout future is dropped mid-wait).
pub(crate) struct Waiting<'a>(&'a PoolSlot);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut ready = self.0.ready();
        ready.waiting -= 1;
        // Its room in bb8 goes to the oldest queued checkout, if any.
        self.0.dispatch(&mut ready);
        // Joins may go on again.
        self.0.unlock(ready);
    }
}

/// How a checkout that found no parked connection waits.
pub(crate) enum Wait<'a> {
    /// In bb8 (the pool has room).
    Bb8(Waiting<'a>),
    /// In the queue, for a connection handed over on return.
    Queued(Queued<'a>),
}

/// A checkout in the queue. Dropped before it was handed anything, it
/// leaves the queue; dropped after, it passes on what it was handed.
pub(crate) struct Queued<'a> {
    slot: &'a Arc<PoolSlot>,
    ticket: u64,
    /// `None` once what was handed over has been taken.
    rx: Option<oneshot::Receiver<Handoff>>,
}

impl<'a> Queued<'a> {
    /// Waits for its turn: a connection, or a guard counted as waiting in
    /// bb8 when the turn is room there.
    pub(crate) async fn turn(mut self) -> Result<Conn, Waiting<'a>> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(self.slot.bb8_wait());
        };
        let handed = rx.await;
        // Taken in the same poll: a drop from here on has nothing to pass on.
        self.rx = None;
        match handed {
            Ok(Handoff::Conn(pooled)) => Ok(Conn {
                pooled: Some(pooled),
                slot: self.slot.clone(),
            }),
            Ok(Handoff::Bb8) => Err(Waiting(self.slot)),
            // Not expected (senders are dropped only after sending): wait in bb8.
            Err(_) => Err(self.slot.bb8_wait()),
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        let mut ready = self.slot.ready();
        // Hand-offs happen under this lock: either it is still queued, or
        // what it was handed is in `rx`.
        if let Some(i) = ready.queue.iter().position(|(t, _)| *t == self.ticket) {
            ready.queue.remove(i);
            // An empty queue lets statements join lent connections again:
            // wake the first waiting for a share.
            self.slot.unlock(ready);
            return;
        }
        match rx.try_recv() {
            Ok(Handoff::Conn(pooled)) => self.slot.settle(ready, pooled),
            Ok(Handoff::Bb8) => {
                ready.waiting -= 1;
                self.slot.dispatch(&mut ready);
                self.slot.unlock(ready);
            }
            Err(_) => {}
        }
    }
}

/// What [`PoolSlot::take_shared`] found.
pub(crate) enum SharedTake {
    /// A hold on a connection; `true` if others were using it.
    Got(Shared, bool),
    /// Saturated, but no share now (or others are first in line): wait on
    /// the [`ShareTurn`] for a wake-up, then ask again.
    Wait,
    /// Not saturated (or nothing lent): take a connection from bb8.
    Bb8,
}

/// An autocommit statement's place in the line for a share (pipelined
/// mode). Only the oldest is woken when a share may have come free; once
/// served it wakes the next. Dropped (served, timed out or its future
/// dropped), it leaves the line, passing its wake-up on if it was first.
pub(crate) struct ShareTurn<'a> {
    slot: &'a PoolSlot,
    ticket: u64,
    wake: Arc<tokio::sync::Notify>,
}

impl ShareTurn<'_> {
    /// Waits until it may be first in line (a permit stored before this
    /// is awaited counts).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }
}

impl Drop for ShareTurn<'_> {
    fn drop(&mut self) {
        let mut ready = self.slot.ready();
        let Some(i) = ready
            .share_queue
            .iter()
            .position(|(t, _)| *t == self.ticket)
        else {
            return;
        };
        ready.share_queue.remove(i);
        if i == 0 {
            // It may have been woken for a share it will not take now.
            self.slot.unlock(ready);
        }
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

/// A clean connection: open, in autocommit, nothing cut off, never sent a
/// cancel request.
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

impl Lease {
    /// [`ConnParts::run`], with a cancel request sent should the future be
    /// dropped while the server runs the statement — only on a connection
    /// of its own: on a shared one the request could stop another
    /// session's statement (see [`ConnParts::cancel_if_dropped`]).
    pub(crate) async fn run<O: super::manager::Op>(
        &self,
        sql: &str,
        params: super::manager::Params<'_>,
        may_replan: bool,
    ) -> Result<O::Out, tokio_postgres::Error> {
        let Lease::Own(conn) = self else {
            return (**self).run::<O>(sql, params, may_replan).await;
        };
        let cancel = conn.cancel_if_dropped();
        let out = conn.run::<O>(sql, params, may_replan).await;
        cancel.disarm();
        out
    }
}
