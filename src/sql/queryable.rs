//! `Queryable`: anything that runs statements, so application code can be
//! generic over an autocommit [`Session`] and a [`Transaction`].

use std::future::Future;

use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::error::Result;
#[cfg(feature = "derive")]
use postgres_from_row::FromRow;

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

    /// Runs a statement and decodes each row into `T` (a struct with
    /// `#[derive(pgassist::FromRow)]`). A column that does not fit its
    /// field is an [`Error::Decode`](crate::Error::Decode) naming the
    /// column, the Rust type and the SQL type.
    ///
    /// ```no_run
    /// use pgassist::postgres_from_row; // the derive's generated code names it
    ///
    /// #[derive(pgassist::FromRow)]
    /// struct User {
    ///     id: i64,
    ///     name: String,
    /// }
    ///
    /// async fn users(db: &impl pgassist::Queryable) -> pgassist::Result<Vec<User>> {
    ///     db.query_as("SELECT id, name FROM users ORDER BY id", &[]).await
    /// }
    /// ```
    #[cfg(feature = "derive")]
    #[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
    fn query_as<T: FromRow + Send>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<T>>> + Send {
        let rows = self.query(sql, params);
        async move { rows.await?.iter().map(decode_row).collect() }
    }

    /// [`Queryable::query_one`], decoded into `T`: no row is
    /// [`Error::NotFound`](crate::Error::NotFound).
    #[cfg(feature = "derive")]
    #[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
    fn query_one_as<T: FromRow + Send>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<T>> + Send {
        let row = self.query_one(sql, params);
        async move { decode_row(&row.await?) }
    }

    /// [`Queryable::query_opt`], decoded into `T`.
    #[cfg(feature = "derive")]
    #[cfg_attr(docsrs, doc(cfg(feature = "derive")))]
    fn query_opt_as<T: FromRow + Send>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<T>>> + Send {
        let row = self.query_opt(sql, params);
        async move { row.await?.as_ref().map(decode_row).transpose() }
    }
}

/// Decodes one row, naming the column in the error.
#[cfg(feature = "derive")]
fn decode_row<T: FromRow>(row: &Row) -> Result<T> {
    T::try_from_row(row).map_err(|e| crate::error::Error::decode_in(row, e))
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
