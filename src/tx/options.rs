//! How a transaction begins: isolation, access mode, deferrable, retries,
//! durable.

use std::borrow::Cow;

/// Transaction isolation levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsolationLevel {
    /// READ UNCOMMITTED (PostgreSQL treats it as READ COMMITTED).
    ReadUncommitted,
    /// READ COMMITTED, PostgreSQL's default.
    ReadCommitted,
    /// REPEATABLE READ.
    RepeatableRead,
    /// SERIALIZABLE.
    Serializable,
}

impl IsolationLevel {
    fn sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadUncommitted => "READ UNCOMMITTED",
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

/// How to begin a transaction, all sent in one BEGIN statement.
///
/// ```
/// use pgassist::{IsolationLevel, TxOptions};
/// let opts = TxOptions::new().isolation(IsolationLevel::Serializable).read_only(true).deferrable(true).retries(5);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxOptions {
    isolation: Option<IsolationLevel>,
    read_only: Option<bool>,
    deferrable: Option<bool>,
    pub(crate) retries: u32,
    pub(crate) durable: bool,
}

impl TxOptions {
    /// The server's defaults, no retries.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets the isolation level.
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }
    /// READ ONLY (`true`) or READ WRITE (`false`).
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = Some(yes);
        self
    }
    /// DEFERRABLE (meaningful for SERIALIZABLE READ ONLY).
    pub fn deferrable(mut self, yes: bool) -> Self {
        self.deferrable = Some(yes);
        self
    }
    /// For [`crate::Session::transaction`]: how many times to run the closure
    /// again after a serialization failure or deadlock (default 0).
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }

    /// Requires an outermost transaction (Django's `atomic(durable=True)`):
    /// beginning it where it would become a savepoint — inside a
    /// transaction-per-request scope — fails with [`Error::Usage`](crate::Error::Usage), so a
    /// caller that needs its work committed when it returns can rely on it.
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// The BEGIN statement for these options.
    pub(crate) fn begin_sql(&self) -> Cow<'static, str> {
        if self.isolation.is_none() && self.read_only.is_none() && self.deferrable.is_none() {
            return Cow::Borrowed("BEGIN");
        }
        let mut sql = String::from("BEGIN");
        if let Some(level) = self.isolation {
            sql.push_str(" ISOLATION LEVEL ");
            sql.push_str(level.sql());
        }
        match self.read_only {
            Some(true) => sql.push_str(" READ ONLY"),
            Some(false) => sql.push_str(" READ WRITE"),
            None => {}
        }
        match self.deferrable {
            Some(true) => sql.push_str(" DEFERRABLE"),
            Some(false) => sql.push_str(" NOT DEFERRABLE"),
            None => {}
        }
        Cow::Owned(sql)
    }
}
