//! `Queryable`: anything that runs statements, so application code can be
//! generic over an autocommit [`Session`] and a [`Transaction`].

use std::future::Future;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::error::Result;

/// Runs statements: implemented by [`Session`](crate::Session) (autocommit)
/// and [`Transaction`](crate::Transaction) (inside the transaction or
/// savepoint).
///
/// ```no_run
/// async fn count(db: &impl pgassist::Queryable) -> Result<i64, pgassist::Error> {
///     Ok(db.query_one("SELECT count(*) FROM users", &[]).await?.get(0))
/// }
/// ```
pub trait Queryable: Sync {
    /// Runs a statement and returns its rows.
    fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send;
    /// Runs a statement that must return exactly one row.
    fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row>> + Send;
    /// Runs a statement that returns at most one row.
    fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>>> + Send;
    /// Runs a statement and returns the number of rows it affected.
    fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64>> + Send;
    /// Runs statements without parameters (simple protocol).
    fn batch_execute(&self, sql: &str) -> impl Future<Output = Result<()>> + Send;
}

/// Implements [`Queryable`] for a type with inherent methods of the same
/// names (each type invokes it next to its own definition).
macro_rules! delegate_queryable {
    ($ty:ty) => {
        impl $crate::Queryable for $ty {
            fn query(
                &self,
                sql: &str,
                params: &[&(dyn $crate::ToSql + Sync)],
            ) -> impl std::future::Future<Output = $crate::Result<Vec<$crate::Row>>> + Send {
                <$ty>::query(self, sql, params)
            }
            fn query_one(
                &self,
                sql: &str,
                params: &[&(dyn $crate::ToSql + Sync)],
            ) -> impl std::future::Future<Output = $crate::Result<$crate::Row>> + Send {
                <$ty>::query_one(self, sql, params)
            }
            fn query_opt(
                &self,
                sql: &str,
                params: &[&(dyn $crate::ToSql + Sync)],
            ) -> impl std::future::Future<Output = $crate::Result<Option<$crate::Row>>> + Send {
                <$ty>::query_opt(self, sql, params)
            }
            fn execute(
                &self,
                sql: &str,
                params: &[&(dyn $crate::ToSql + Sync)],
            ) -> impl std::future::Future<Output = $crate::Result<u64>> + Send {
                <$ty>::execute(self, sql, params)
            }
            fn batch_execute(
                &self,
                sql: &str,
            ) -> impl std::future::Future<Output = $crate::Result<()>> + Send {
                <$ty>::batch_execute(self, sql)
            }
        }
    };
}

pub(crate) use delegate_queryable;

/// References run statements too, so `&Session` from a
/// [`crate::Sessions`] container passes where `&impl Queryable` is expected.
impl<Q: Queryable> Queryable for &Q {
    fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send {
        (**self).query(sql, params)
    }
    fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row>> + Send {
        (**self).query_one(sql, params)
    }
    fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>>> + Send {
        (**self).query_opt(sql, params)
    }
    fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64>> + Send {
        (**self).execute(sql, params)
    }
    fn batch_execute(&self, sql: &str) -> impl Future<Output = Result<()>> + Send {
        (**self).batch_execute(sql)
    }
}
