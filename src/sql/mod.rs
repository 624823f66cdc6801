//! SQL text and values, usable from any layer: transaction-control
//! detection and batch splitting, WAL positions, the `Queryable` trait, and
//! the `Table` helpers with their dynamic `Value`.

pub(crate) mod control;
pub(crate) mod gid;
pub(crate) mod helpers;
pub(crate) mod lsn;
pub(crate) mod queryable;

pub(crate) use lsn::first_lsn;
