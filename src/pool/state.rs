//! The one state machine of a pooled connection and the transaction it
//! carries.
//!
//! Every connection has exactly one [`ConnState`], kept in its
//! [`StateCell`]. The cell is written only through [`StateCell::apply`],
//! which runs the pure transition function [`next`]; nothing else in the
//! crate stores a state. The pool reads the same cell: only
//! [`ConnState::Idle`] is parked for the next user or handed back to bb8 as
//! healthy, anything else is discarded (closing a connection makes the
//! server roll back whatever it had open).
//!
//! Why the machine lives in the pool layer: bb8's `has_broken` and the ready
//! stack must read it, and the pool may not import the transaction layer.
//! The transaction layer drives it (and builds the SQL for each step, see
//! `tx::sql`); the pool only asks "is it idle?" and marks a connection
//! broken when the protocol goes out of step.
//!
//! ```text
//!            Pin              BeginSent             Commit
//!   Idle ──────────▶ BeginPending ─────────▶ Open ──────────▶ Committing
//!    ▲                   │  Failed            │ ▲ Restored        │
//!    │                   └──────────▶ Aborted ┘ │                 │ Rollback
//!    │ Ended                              │     │                 ▼
//!    └──────── (from any transaction state, once the server answered)
//!                                         └── Rollback ──▶ RollingBack
//!   Lost (cut off, connection gone): any transaction state ─▶ InDoubt
//!   InDoubt ── Rollback ──▶ RollingBack (a ROLLBACK answered settles it)
//!   Desync (protocol out of step):   any state ─────────────▶ Broken
//!   Revoke (its request ended): BeginPending | Open | Aborted ─▶ Broken
//! ```
//!
//! A second, independent dimension: **session state changed**. A statement
//! that may have changed what the session carries beyond its transaction
//! (a plain `SET`, a temporary table, `LISTEN`, a session advisory lock, a
//! pinned connection, …; see `sql::control`) raises the cell's
//! [`Event::SessionChanged`] flag, whatever the transaction state. The flag
//! survives every transaction event, so a `SET` inside a transaction is
//! still flagged after its COMMIT. A flagged connection is not idle: when
//! it comes back, the pool runs its reset (see `manager::ConnParts::reset`)
//! and [`Event::Reset`] clears the flag — only in `Idle`, so a reset never
//! runs inside a transaction — or, if the reset fails, it is discarded.
//!
//! ```text
//!   (any state but Broken, flag) ── SessionChanged ──▶ (same state, flagged)
//!   (Idle, flagged) ── Reset (answered) ──▶ (Idle, clean): fit for the pool
//! ```

use std::sync::atomic::{AtomicU8, Ordering};

/// Where a pooled connection stands, as pgassist knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum ConnState {
    /// Autocommit, nothing open, nothing in flight: the only state fit for
    /// the pool.
    Idle = 0,
    /// Pinned by a transaction; BEGIN goes out with its first statement.
    BeginPending = 1,
    /// Inside a transaction block (BEGIN sent).
    Open = 2,
    /// A statement failed inside the transaction: only a rollback (of the
    /// transaction, or to a savepoint) can follow.
    Aborted = 3,
    /// COMMIT (or PREPARE TRANSACTION) is on the wire.
    Committing = 4,
    /// ROLLBACK is on the wire.
    RollingBack = 5,
    /// The server's transaction state is unknown: a control statement's
    /// future was dropped mid-flight, or the connection failed during one.
    InDoubt = 6,
    /// Unusable: the protocol is out of step (a COPY pgassist did not
    /// start, an unexpected message) or the connection is gone.
    Broken = 7,
}

/// What happened to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A transaction takes the connection out of autocommit.
    Pin,
    /// BEGIN is sent (with the transaction's first statement).
    BeginSent,
    /// A statement is about to be sent inside the transaction (a check:
    /// the state does not change).
    Statement,
    /// The server answered a statement of the transaction with an error.
    Failed,
    /// ROLLBACK TO SAVEPOINT was answered: the transaction can go on.
    Restored,
    /// COMMIT / PREPARE TRANSACTION is sent.
    Commit,
    /// ROLLBACK is sent.
    Rollback,
    /// The server confirmed the end of the transaction (COMMIT, ROLLBACK or
    /// PREPARE TRANSACTION answered): back to autocommit.
    Ended,
    /// A control statement was cut off, or the connection failed during
    /// one: nobody knows what the server did.
    Lost,
    /// The protocol went out of step, or the connection closed.
    Desync,
    /// A statement may have changed session state (settings, temporary
    /// objects, listens, session locks, cursors held open): raises the
    /// session flag, the transaction state stays as it is.
    SessionChanged,
    /// The session reset was answered: clears the session flag. Only in
    /// `Idle` (a reset never runs inside a transaction).
    Reset,
    /// The request that owns a pinned connection ended while a transaction
    /// was open on it (see `front::sessions`): the transaction may not go
    /// on, and its owner ends the server session. Refused once COMMIT or
    /// ROLLBACK is on the wire, so a commit in flight keeps its outcome.
    Revoke,
}

/// Why a transition was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A transaction needs a connection in autocommit.
    NotIdle,
    /// The transaction has ended (committed, rolled back, prepared): its
    /// savepoints cannot run anything any more.
    Ended,
    /// A statement failed earlier: only a rollback can follow.
    Aborted,
    /// COMMIT or ROLLBACK is in flight.
    Ending,
    /// The server's state is unknown.
    InDoubt,
    /// The connection is unusable.
    Broken,
}

impl Refusal {
    /// Why, in words for an error message.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::NotIdle => "the connection is already in a transaction",
            Refusal::Ended => "the transaction has already ended",
            Refusal::Aborted => "an earlier statement failed",
            Refusal::Ending => "the transaction is being committed or rolled back",
            Refusal::InDoubt => {
                "a transaction control statement was cut off or the connection failed"
            }
            Refusal::Broken => "the connection is broken",
        }
    }
}

/// The transition function: the state after `event` in `state`, or why
/// `event` cannot happen there. Pure, so every transition is unit-tested;
/// inlined, so each call site with a known event compiles to a few
/// comparisons.
#[inline(always)]
pub(crate) fn next(state: ConnState, event: Event) -> Result<ConnState, Refusal> {
    use ConnState::*;
    use Event::*;
    // What a state refuses statements with.
    let refusal = |s: ConnState| match s {
        Idle => Refusal::Ended,
        Aborted => Refusal::Aborted,
        Committing | RollingBack => Refusal::Ending,
        InDoubt => Refusal::InDoubt,
        Broken => Refusal::Broken,
        // Only reached for events these states refuse for being too early.
        BeginPending | Open => Refusal::Ended,
    };
    match (state, event) {
        (_, Desync) => Ok(Broken),
        (Broken, _) => Err(Refusal::Broken),
        (Idle, Pin) => Ok(BeginPending),
        (_, Pin) => Err(Refusal::NotIdle),
        (BeginPending, BeginSent) | (Open, BeginSent) => Ok(Open),
        (BeginPending | Open, Statement) => Ok(state),
        (s, BeginSent | Statement) => Err(refusal(s)),
        (BeginPending | Open | Aborted, Failed) => Ok(Aborted),
        (s, Failed) => Err(refusal(s)),
        (Open | Aborted, Restored) => Ok(Open),
        (s, Restored) => Err(refusal(s)),
        (Open, Commit) => Ok(Committing),
        (BeginPending, Commit) => Err(Refusal::Ended),
        (s, Commit) => Err(refusal(s)),
        // A ROLLBACK pipelined behind whatever was cut off is answered after
        // it: once answered, the connection is in autocommit for sure.
        (BeginPending | Open | Aborted | Committing | InDoubt, Rollback) => Ok(RollingBack),
        (s, Rollback) => Err(refusal(s)),
        (BeginPending | Open | Aborted | Committing | RollingBack, Ended) => Ok(Idle),
        (s, Ended) => Err(refusal(s)),
        (Idle, Lost) => Ok(Broken),
        (InDoubt, Lost) => Ok(InDoubt),
        (_, Lost) => Ok(InDoubt),
        // The flag is the cell's (see `step`); the transaction state stays.
        (s, SessionChanged) => Ok(s),
        (Idle, Reset) => Ok(Idle),
        (_, Reset) => Err(Refusal::NotIdle),
        (BeginPending | Open | Aborted, Revoke) => Ok(Broken),
        (s, Revoke) => Err(refusal(s)),
    }
}

/// The cell's bit for "session state changed, needs a reset".
const SESSION_CHANGED: u8 = 0x80;

/// One step of the whole cell: the transaction state by [`next`], and the
/// session flag raised by [`Event::SessionChanged`], cleared by
/// [`Event::Reset`], kept by every other event. Pure.
pub(crate) fn step(cell: u8, event: Event) -> Result<u8, Refusal> {
    let state = next(ConnState::from_u8(cell & !SESSION_CHANGED), event)?;
    let flag = match event {
        Event::SessionChanged => SESSION_CHANGED,
        Event::Reset => 0,
        _ => cell & SESSION_CHANGED,
    };
    Ok(state as u8 | flag)
}

impl ConnState {
    #[inline(always)]
    fn from_u8(v: u8) -> ConnState {
        match v {
            0 => ConnState::Idle,
            1 => ConnState::BeginPending,
            2 => ConnState::Open,
            3 => ConnState::Aborted,
            4 => ConnState::Committing,
            5 => ConnState::RollingBack,
            6 => ConnState::InDoubt,
            _ => ConnState::Broken,
        }
    }
}

/// A connection's state, shared by the connection, its transaction and
/// the per-transaction connection map. Written only by [`StateCell::apply`].
#[derive(Debug, Default)]
pub(crate) struct StateCell(AtomicU8);

impl StateCell {
    /// The current transaction state (the session flag aside).
    #[inline]
    pub(crate) fn get(&self) -> ConnState {
        ConnState::from_u8(self.0.load(Ordering::Acquire) & !SESSION_CHANGED)
    }

    /// Whether the connection is fit for the next user: idle, and no
    /// session state changed.
    #[inline]
    pub(crate) fn is_idle(&self) -> bool {
        self.0.load(Ordering::Acquire) == ConnState::Idle as u8
    }

    /// Whether the connection is idle but needs its session reset before
    /// the next user.
    #[inline]
    pub(crate) fn needs_reset(&self) -> bool {
        self.0.load(Ordering::Acquire) == ConnState::Idle as u8 | SESSION_CHANGED
    }

    /// Whether the caller changed (or may have changed) the session since
    /// its last reset, whatever the transaction state.
    #[inline]
    pub(crate) fn session_changed(&self) -> bool {
        self.0.load(Ordering::Acquire) & SESSION_CHANGED != 0
    }

    /// Applies `event` atomically (statements pipelined on one transaction
    /// may race): returns the state it was applied in, or the refusal.
    #[inline(always)]
    pub(crate) fn apply(&self, event: Event) -> Result<ConnState, Refusal> {
        let mut current = self.0.load(Ordering::Acquire);
        loop {
            let from = ConnState::from_u8(current & !SESSION_CHANGED);
            let to = step(current, event)?;
            if to == current {
                return Ok(from);
            }
            match self
                .0
                .compare_exchange_weak(current, to, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(from),
                Err(seen) => current = seen,
            }
        }
    }

    /// Marks the connection unusable (protocol out of step, or closed).
    pub(crate) fn mark_broken(&self) {
        let _ = self.apply(Event::Desync);
    }
}

#[cfg(test)]
mod tests {
    use super::ConnState::*;
    use super::Event::*;
    use super::*;

    const STATES: [ConnState; 8] = [
        Idle,
        BeginPending,
        Open,
        Aborted,
        Committing,
        RollingBack,
        InDoubt,
        Broken,
    ];
    #[rustfmt::skip]
    const EVENTS: [Event; 13] = [
        Pin, BeginSent, Statement, Failed, Restored, Commit, Rollback, Ended, Lost, Desync,
        SessionChanged, Reset, Revoke,
    ];

    /// Every (state, event) pair, written out: the whole machine in one table.
    #[test]
    fn every_transition() {
        use Refusal as R;
        let expected: [(ConnState, [Result<ConnState, Refusal>; 13]); 8] = [
            //          Pin           BeginSent       Statement       Failed          Restored        Commit          Rollback          Ended           Lost          Desync     SessionChanged   Reset        Revoke
            (
                Idle,
                [
                    Ok(BeginPending),
                    Err(R::Ended),
                    Err(R::Ended),
                    Err(R::Ended),
                    Err(R::Ended),
                    Err(R::Ended),
                    Err(R::Ended),
                    Err(R::Ended),
                    Ok(Broken),
                    Ok(Broken),
                    Ok(Idle),
                    Ok(Idle),
                    Err(R::Ended),
                ],
            ),
            (
                BeginPending,
                [
                    Err(R::NotIdle),
                    Ok(Open),
                    Ok(BeginPending),
                    Ok(Aborted),
                    Err(R::Ended),
                    Err(R::Ended),
                    Ok(RollingBack),
                    Ok(Idle),
                    Ok(InDoubt),
                    Ok(Broken),
                    Ok(BeginPending),
                    Err(R::NotIdle),
                    Ok(Broken),
                ],
            ),
            (
                Open,
                [
                    Err(R::NotIdle),
                    Ok(Open),
                    Ok(Open),
                    Ok(Aborted),
                    Ok(Open),
                    Ok(Committing),
                    Ok(RollingBack),
                    Ok(Idle),
                    Ok(InDoubt),
                    Ok(Broken),
                    Ok(Open),
                    Err(R::NotIdle),
                    Ok(Broken),
                ],
            ),
            (
                Aborted,
                [
                    Err(R::NotIdle),
                    Err(R::Aborted),
                    Err(R::Aborted),
                    Ok(Aborted),
                    Ok(Open),
                    Err(R::Aborted),
                    Ok(RollingBack),
                    Ok(Idle),
                    Ok(InDoubt),
                    Ok(Broken),
                    Ok(Aborted),
                    Err(R::NotIdle),
                    Ok(Broken),
                ],
            ),
            (
                Committing,
                [
                    Err(R::NotIdle),
                    Err(R::Ending),
                    Err(R::Ending),
                    Err(R::Ending),
                    Err(R::Ending),
                    Err(R::Ending),
                    Ok(RollingBack),
                    Ok(Idle),
                    Ok(InDoubt),
                    Ok(Broken),
                    Ok(Committing),
                    Err(R::NotIdle),
                    Err(R::Ending),
                ],
            ),
            (
                RollingBack,
                [
                    Err(R::NotIdle),
                    Err(R::Ending),
                    Err(R::Ending),
                    Err(R::Ending),
                    Err(R::Ending),
                    Err(R::Ending),
                    Err(R::Ending),
                    Ok(Idle),
                    Ok(InDoubt),
                    Ok(Broken),
                    Ok(RollingBack),
                    Err(R::NotIdle),
                    Err(R::Ending),
                ],
            ),
            (
                InDoubt,
                [
                    Err(R::NotIdle),
                    Err(R::InDoubt),
                    Err(R::InDoubt),
                    Err(R::InDoubt),
                    Err(R::InDoubt),
                    Err(R::InDoubt),
                    Ok(RollingBack),
                    Err(R::InDoubt),
                    Ok(InDoubt),
                    Ok(Broken),
                    Ok(InDoubt),
                    Err(R::NotIdle),
                    Err(R::InDoubt),
                ],
            ),
            (
                Broken,
                [
                    Err(R::Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                    Ok(Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                    Err(R::Broken),
                ],
            ),
        ];
        for (state, row) in expected {
            for (event, want) in EVENTS.iter().zip(row) {
                assert_eq!(next(state, *event), want, "{state:?} + {event:?}");
            }
        }
    }

    /// Only a confirmed end leads back to Idle: a state in doubt needs a
    /// ROLLBACK answered first, and a broken connection never comes back.
    #[test]
    fn nothing_unconfirmed_reaches_idle() {
        for state in [InDoubt, Broken] {
            for event in EVENTS {
                assert_ne!(next(state, event), Ok(Idle), "{state:?} + {event:?}");
            }
        }
        assert_eq!(next(InDoubt, Rollback), Ok(RollingBack));
        assert_eq!(next(Broken, Rollback), Err(Refusal::Broken));
        for state in STATES {
            assert_ne!(next(state, Lost), Ok(Idle));
            assert_eq!(next(state, Desync), Ok(Broken));
        }
    }

    /// The session flag: raised in any state but Broken, kept by every
    /// transaction event (a SET inside a transaction outlives its COMMIT),
    /// cleared only by a reset in Idle; a flagged connection is never idle.
    #[test]
    fn the_session_flag_outlives_transactions_until_a_reset() {
        for state in STATES {
            for flagged in [false, true] {
                let cell = state as u8 | if flagged { SESSION_CHANGED } else { 0 };
                for event in EVENTS {
                    let want_state = next(state, event);
                    let got = step(cell, event);
                    assert_eq!(
                        got.map(|c| ConnState::from_u8(c & !SESSION_CHANGED)),
                        want_state,
                        "{state:?} flagged={flagged} + {event:?}"
                    );
                    let Ok(c) = got else { continue };
                    let want_flag = match event {
                        SessionChanged => true,
                        Reset => false,
                        _ => flagged,
                    };
                    assert_eq!(c & SESSION_CHANGED != 0, want_flag, "{state:?} + {event:?}");
                }
            }
        }
        let cell = StateCell::default();
        assert_eq!(cell.apply(Pin), Ok(Idle));
        assert_eq!(cell.apply(SessionChanged), Ok(BeginPending));
        assert_eq!(cell.apply(BeginSent), Ok(BeginPending));
        assert_eq!(cell.apply(Reset), Err(Refusal::NotIdle));
        assert_eq!(cell.apply(Commit), Ok(Open));
        assert_eq!(cell.apply(Ended), Ok(Committing));
        assert_eq!(cell.get(), Idle);
        assert!(!cell.is_idle() && cell.needs_reset());
        assert_eq!(cell.apply(Reset), Ok(Idle));
        assert!(cell.is_idle() && !cell.needs_reset());
        cell.mark_broken();
        assert_eq!(cell.apply(SessionChanged), Err(Refusal::Broken));
        assert!(!cell.needs_reset());
    }

    #[test]
    fn the_cell_applies_transitions_and_reports_the_state_before() {
        let cell = StateCell::default();
        assert!(cell.is_idle());
        assert_eq!(cell.apply(Pin), Ok(Idle));
        assert_eq!(cell.apply(Pin), Err(Refusal::NotIdle));
        // Two statements race to send BEGIN: only the first sees BeginPending.
        assert_eq!(cell.apply(BeginSent), Ok(BeginPending));
        assert_eq!(cell.apply(BeginSent), Ok(Open));
        assert_eq!(cell.apply(Failed), Ok(Open));
        assert_eq!(cell.apply(Statement), Err(Refusal::Aborted));
        assert_eq!(cell.apply(Restored), Ok(Aborted));
        assert_eq!(cell.apply(Commit), Ok(Open));
        assert_eq!(cell.apply(Ended), Ok(Committing));
        assert!(cell.is_idle());
        // A savepoint of an ended transaction cannot run anything.
        assert_eq!(cell.apply(Statement), Err(Refusal::Ended));
        cell.mark_broken();
        assert_eq!(cell.get(), Broken);
        assert!(!cell.is_idle());
        for v in 0..=u8::MAX {
            // Any stored byte reads as some state (the cell never panics).
            let _ = ConnState::from_u8(v);
        }
    }
}
