//! A counting global allocator: every allocation of the bench process adds
//! its size to a counter, so a measurement window can report bytes and
//! allocations per operation.
//!
//! `GlobalAlloc` is an `unsafe trait`, so this needs `unsafe impl`. That is
//! allowed here: `#![forbid(unsafe_code)]` is set in `src/lib.rs` and covers
//! the pgassist library only; this example is a separate crate. The wrapper
//! adds nothing unsafe of its own: it forwards every call to `System`
//! unchanged and only bumps two relaxed atomic counters.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

static BYTES: AtomicU64 = AtomicU64::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);

/// Counts what it hands out; frees are not counted.
pub struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments, so
// the caller's guarantees are passed on unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A growing realloc counts as one allocation of the new size.
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        COUNT.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Bytes and allocations since the process started.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    pub bytes: u64,
    pub count: u64,
}

pub fn snapshot() -> Snapshot {
    Snapshot {
        bytes: BYTES.load(Ordering::Relaxed),
        count: COUNT.load(Ordering::Relaxed),
    }
}

impl Snapshot {
    /// (bytes, allocations) per operation between `self` and a later snapshot.
    pub fn per_op(self, later: Snapshot, ops: u64) -> (f64, f64) {
        let ops = ops.max(1) as f64;
        (
            (later.bytes - self.bytes) as f64 / ops,
            (later.count - self.count) as f64 / ops,
        )
    }
}
