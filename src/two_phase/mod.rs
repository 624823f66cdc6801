//! Atomic commit across engines (two-phase commit with a decision record)
//! and recovery after a crash. Built on top of the front layer.

pub(crate) mod recovery;
pub(crate) mod unit_of_work;
