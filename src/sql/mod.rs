//! SQL text and values, usable from any layer: transaction-control
//! detection and batch splitting, the `Queryable` trait, and the `Table`
//! helpers with their dynamic `Value`.

pub(crate) mod control;
pub mod helpers;
pub(crate) mod queryable;
