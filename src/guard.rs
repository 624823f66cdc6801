//! One reusable drop guard (deadpool's `DropGuard` with `disarm`): runs a
//! closure when dropped unless disarmed first.
//!
//! Async Rust may drop any future at any await point. Code that must react
//! to being cut off — a control statement whose answer never came, a
//! statement dropped mid-flight, a rollback task dropped with its runtime —
//! arms a guard before the await and disarms it after; the closure runs
//! exactly when the future was dropped in between.

/// Runs `F` on drop unless [`DropGuard::disarm`]ed.
#[must_use = "a guard dropped at once runs its closure at once"]
pub(crate) struct DropGuard<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> DropGuard<F> {
    /// Arms the guard.
    #[inline]
    pub(crate) fn new(on_drop: F) -> Self {
        DropGuard(Some(on_drop))
    }

    /// Drops the guard without running its closure.
    #[inline]
    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for DropGuard<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn runs_only_when_not_disarmed() {
        let ran = Cell::new(0);
        drop(DropGuard::new(|| ran.set(ran.get() + 1)));
        assert_eq!(ran.get(), 1);
        DropGuard::new(|| ran.set(ran.get() + 1)).disarm();
        assert_eq!(ran.get(), 1);
    }
}
