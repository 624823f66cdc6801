//! The one error type of the crate.
//!
//! Every failure is classified so that callers can react to it: a pool that
//! timed out is not a lost connection, and a COMMIT whose answer never came is
//! neither a success nor a plain failure. Messages never contain a password:
//! configs are rendered redacted and server messages do not carry one.

use std::time::Duration;

use tokio_postgres::error::SqlState;

/// Everything that can go wrong in pgassist.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No engine of that name is configured in the registry.
    #[error("unknown engine `{name}` (configured: {known})")]
    UnknownEngine {
        /// The name that was asked for.
        name: String,
        /// The configured names, comma separated.
        known: String,
    },
    /// A URL, a setting or a registry description is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No connection became free within the engine's `connection_timeout`.
    #[error("engine `{engine}`: no connection available after {waited:?} (pool exhausted)")]
    PoolTimeout {
        /// The engine whose pool was exhausted.
        engine: String,
        /// How long the checkout waited.
        waited: Duration,
    },
    /// The server could not be reached or refused the connection.
    ///
    /// A refusal that trying again cannot cure (wrong password or user
    /// `28P01` / `28000`, unknown database `3D000`, no `CONNECT` privilege
    /// `42501`, TLS refused or not trusted, unknown host) is returned as soon
    /// as the server or the resolver answers; a transient one (connection
    /// refused, server starting up `57P03`, too many connections `53300`)
    /// is retried until the engine's `connection_timeout`.
    #[error("engine `{engine}`: cannot connect: {message}")]
    Connect {
        /// The engine that could not connect.
        engine: String,
        /// The last connection error reported by the driver.
        message: String,
        /// The server's SQLSTATE, when the server answered (see [`Error::code`]).
        code: Option<SqlState>,
    },
    /// The server answered with an error (it carries a SQLSTATE, see [`Error::code`]).
    #[error("engine `{engine}`: {}", describe(.source))]
    Db {
        /// The engine that ran the statement.
        engine: String,
        /// The driver's error, with the server's message and SQLSTATE.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The statement was rejected on the client side before the server saw it
    /// (wrong parameter count or type, …).
    #[error("engine `{engine}`: {}", describe(.source))]
    Query {
        /// The engine the statement was meant for.
        engine: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A write was attempted on a read-only engine or transaction (SQLSTATE 25006).
    #[error("engine `{engine}` is read-only: {}", describe(.source))]
    ReadOnly {
        /// The read-only engine.
        engine: String,
        /// The server's refusal.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The transaction cannot go on: an earlier statement failed (or one of its
    /// control statements was cut off), so the server will only roll it back.
    /// When returned by `commit()`, the transaction has been rolled back.
    #[error("engine `{engine}`: transaction aborted: {reason}; it can only be rolled back")]
    TransactionAborted {
        /// The engine of the transaction.
        engine: String,
        /// Why the transaction is aborted.
        reason: String,
    },
    /// The connection broke (or the server ended the session with a FATAL
    /// error) while COMMIT was in flight: the transaction may or may not have
    /// been committed. Never retried automatically.
    #[error(
        "engine `{engine}`: connection lost during COMMIT, the outcome is unknown: {}",
        describe(.source)
    )]
    CommitOutcomeUnknown {
        /// The engine of the transaction.
        engine: String,
        /// The I/O or protocol error that cut the COMMIT off.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The connection was lost, or the engine / registry was closed.
    #[error("engine `{engine}`: {reason}")]
    Closed {
        /// The engine whose connection or pool is closed.
        engine: String,
        /// What closed it.
        reason: String,
    },
    /// The API was used in a way that cannot work (for example a transaction
    /// control statement sent through an autocommit session).
    #[error("invalid use: {0}")]
    Usage(String),
    /// More rows matched than the call allows: a lookup that expects at most
    /// one row found several (see [`crate::Table::get_by_column_lower`]).
    #[error("table `{table}`: more than one row matches on `{column}`")]
    MultipleRows {
        /// The table that was searched, as given to [`crate::Table::new`].
        table: String,
        /// The column that was matched.
        column: String,
    },
    /// A column name that the caller's whitelist does not allow, for example
    /// an ORDER BY column taken from a request (see [`crate::Table::get_range`]).
    /// Nothing was sent to the server.
    #[error("column {column:?} is not allowed here (allowed: {allowed})")]
    ColumnNotAllowed {
        /// The refused column name, as given.
        column: String,
        /// The allowed names, comma separated.
        allowed: String,
    },
    /// [`crate::Table::find_or_create`]: twice in a row the INSERT found a
    /// conflicting row and the SELECT that followed no longer saw it (it was
    /// deleted in between). Nothing was created.
    #[error("table `{table}`: the row with this key was deleted between INSERT and SELECT, twice")]
    RowVanished {
        /// The table, as given to [`crate::Table::new`].
        table: String,
    },
    /// `query_one` (or `query_one_as`) found no row. A web handler maps it to
    /// 404 (see the axum integration).
    #[error("engine `{engine}`: query_one found no row")]
    NotFound {
        /// The engine that ran the statement.
        engine: String,
    },
    /// `query_one` or `query_opt` found more than one row: the query does
    /// not say what the caller thinks it says (a missing key condition).
    #[error("engine `{engine}`: expected at most one row, the query returned more")]
    TooManyRows {
        /// The engine that ran the statement.
        engine: String,
    },
    /// A column could not be decoded into the Rust type asked for: the
    /// column, the Rust type and the SQL type are named so the fix is
    /// visible from the message alone.
    #[error("{}", describe_decode(.column, .rust_type, .sql_type, .reason))]
    Decode {
        /// The column's name when known (`query_as` and friends know it),
        /// else `#<index>`.
        column: String,
        /// The Rust type asked for, when the driver says it (empty otherwise).
        rust_type: String,
        /// The column's SQL type (upper case, as sqlx prints it), when known.
        sql_type: String,
        /// What went wrong: the driver's words.
        reason: String,
    },
    /// A causal token could not be made or read (cargo feature `causal`;
    /// see `Sessions::causal_token`). Nothing of the token was applied.
    #[error("causal token: {0}")]
    CausalToken(CausalTokenError),
}

/// Why a causal token was refused, in [`Error::CausalToken`]. The token's
/// text is never quoted back: it came from a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CausalTokenError {
    /// The registry has no key to sign or check tokens with
    /// (`RegistryBuilder::causal_key`).
    #[error("the registry has no causal key (RegistryBuilder::causal_key)")]
    NoKey,
    /// Longer than any token this crate issues.
    #[error("longer than {max} bytes")]
    TooLong {
        /// The longest token accepted.
        max: usize,
    },
    /// Not in the token format (truncated, wrong characters, bad numbers).
    #[error("malformed ({0})")]
    Malformed(&'static str),
    /// A format version this build does not read.
    #[error("unknown format version")]
    UnknownVersion,
    /// The signature matches none of the registry's keys: forged, altered,
    /// or signed with a key that was since retired.
    #[error("signature does not match any key")]
    BadSignature,
}

/// `?` on the driver's own errors inside a function returning
/// [`pgassist::Error`](Error): `row.try_get::<_, i64>("id")?` compiles.
/// A decode error becomes [`Error::Decode`] (the column by index: a bare
/// error does not carry the row; [`crate::Queryable::query_as`] names it);
/// anything else is classified as a statement error would be, with the
/// engine unknown.
impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        Error::from_pg("?", e)
    }
}

/// The words of [`Error::Decode`], after sqlx's: "mismatched types; Rust
/// type `i32` is not compatible with SQL type INT8".
fn describe_decode(column: &str, rust_type: &str, sql_type: &str, reason: &str) -> String {
    if !rust_type.is_empty() {
        return format!(
            "column {column}: mismatched types; Rust type `{rust_type}` is not compatible \
             with SQL type {sql_type}"
        );
    }
    let typed = if sql_type.is_empty() {
        String::new()
    } else {
        format!(" (SQL type {sql_type})")
    };
    if reason.contains("NULL") {
        return format!("column {column}{typed} is NULL; decode it into an Option<_>");
    }
    format!("column {column}{typed}: {reason}")
}

/// Reads a driver decode error ("error deserializing column N", caused by
/// a `WrongType` or a `WasNull` or the type's own parse error): the column
/// index, the Rust type when the driver names it, and the cause in words.
fn decode_parts(e: &tokio_postgres::Error) -> Option<(usize, String, String, String)> {
    use std::error::Error as _;
    let index = e
        .to_string()
        .strip_prefix("error deserializing column ")?
        .trim()
        .parse()
        .ok()?;
    let reason = e.source().map(|c| c.to_string()).unwrap_or_default();
    // postgres-types' WrongType: "cannot convert between the Rust type `T`
    // and the Postgres type `t`".
    let wrong_type = e
        .source()
        .is_some_and(|c| c.is::<tokio_postgres::types::WrongType>());
    let quoted = |n| {
        let part = if wrong_type {
            reason.split('`').nth(n)
        } else {
            None
        };
        part.unwrap_or_default().to_owned()
    };
    Some((index, quoted(1), quoted(3).to_uppercase(), reason))
}

impl Error {
    /// A decode error with the column named from the row it came from
    /// (the driver's error only knows the column index).
    #[cfg(feature = "derive")]
    pub(crate) fn decode_in(row: &tokio_postgres::Row, e: tokio_postgres::Error) -> Error {
        match decode_parts(&e) {
            Some((index, rust_type, sql_type, reason)) => {
                let column = row.columns().get(index);
                Error::Decode {
                    column: column.map_or(format!("#{index}"), |c| format!("`{}`", c.name())),
                    rust_type,
                    sql_type: column.map_or(sql_type, |c| c.type_().name().to_uppercase()),
                    reason,
                }
            }
            // "invalid column `x`": the struct names a column the query
            // did not return.
            None => match e.to_string().strip_prefix("invalid column ") {
                Some(name) => Error::Decode {
                    column: name.to_owned(),
                    rust_type: String::new(),
                    sql_type: String::new(),
                    reason: format!(
                        "the query returned no such column (it returned: {})",
                        row.columns()
                            .iter()
                            .map(|c| c.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
                None => Error::from(e),
            },
        }
    }
}

impl Error {
    /// Classifies a driver error raised while running a statement on `engine`.
    pub(crate) fn from_pg(engine: &str, source: tokio_postgres::Error) -> Error {
        let engine = engine.to_owned();
        if let Some((index, rust_type, sql_type, reason)) = decode_parts(&source) {
            return Error::Decode {
                column: format!("#{index}"),
                rust_type,
                sql_type,
                reason,
            };
        }
        // Raised by the driver's query_opt only (pgassist's query_one runs
        // through it): a second row arrived.
        if source.to_string() == "query returned an unexpected number of rows" {
            return Error::TooManyRows { engine };
        }
        if let Some(db) = source.as_db_error() {
            if *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION {
                return Error::ReadOnly { engine, source };
            }
            return Error::Db { engine, source };
        }
        if is_connection_loss(&source) {
            let cause = describe(&source);
            let reason = if cause.starts_with("connection closed") {
                cause
            } else {
                format!("connection lost: {cause}")
            };
            return Error::Closed { engine, reason };
        }
        Error::Query { engine, source }
    }

    /// The SQLSTATE of a server error, if this error carries one.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Error::Db { source, .. } | Error::ReadOnly { source, .. } => source.code(),
            Error::Connect { code, .. } => code.as_ref(),
            _ => None,
        }
    }

    /// True for a serialization failure (40001) or a deadlock (40P01) whose
    /// transaction is known to have been rolled back: running it again is safe.
    /// A [`Error::CommitOutcomeUnknown`] is never retryable.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Db { .. })
            && matches!(
                self.code(),
                Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
            )
    }

    /// True when the connection itself was lost (or never made).
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            Error::Closed { .. } | Error::Connect { .. } | Error::CommitOutcomeUnknown { .. }
        )
    }
}

/// The row `query_one` asked for: the one `query_opt` found, or
/// [`Error::NotFound`] (more than one row is already `TooManyRows`). One
/// definition for sessions, transactions and pinned connections.
pub(crate) fn exactly_one(
    engine: &str,
    row: Option<tokio_postgres::Row>,
) -> Result<tokio_postgres::Row> {
    row.ok_or_else(|| Error::NotFound {
        engine: engine.to_owned(),
    })
}

/// `query_one` as a future: the statement's future `rows`, its missing row
/// made [`Error::NotFound`] by [`exactly_one`].
///
/// Why a hand-written future and not `async move { exactly_one(.., rows.await?) }`:
/// a future captured by an async block is moved again when it is awaited,
/// and the statement's future is large — that copy was ~500 instructions
/// of every `query_one` (callgrind, W1). Here it is pinned in place.
pub(crate) fn one_row<'a, F>(engine: &'a str, rows: F) -> OneRow<'a, F>
where
    F: std::future::Future<Output = Result<Option<tokio_postgres::Row>>>,
{
    OneRow { rows, engine }
}

/// The future of [`one_row`].
#[pin_project::pin_project]
pub(crate) struct OneRow<'a, F> {
    #[pin]
    rows: F,
    engine: &'a str,
}

impl<F> std::future::Future for OneRow<'_, F>
where
    F: std::future::Future<Output = Result<Option<tokio_postgres::Row>>>,
{
    type Output = Result<tokio_postgres::Row>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        this.rows
            .poll(cx)
            .map(|rows| exactly_one(this.engine, rows?))
    }
}

/// The driver's error in words, with what it wraps: the server's severity,
/// SQLSTATE, message, detail and hint, or the chain of causes
/// (tokio-postgres' own Display says only "db error" or "error connecting
/// to server").
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str("; DETAIL: ");
            s.push_str(detail);
        }
        if let Some(hint) = db.hint() {
            s.push_str("; HINT: ");
            s.push_str(hint);
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cause = c.source();
    }
    s
}

/// True when the driver reports that the connection is gone, as opposed to a
/// statement that failed on a healthy connection. An I/O error of kind
/// `InvalidInput` is the driver refusing to encode a message (a NUL byte in
/// the SQL, a message too large): nothing was sent and the connection is fine.
pub(crate) fn is_connection_loss(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    e.is_closed()
        || e.source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| io.kind() != std::io::ErrorKind::InvalidInput)
}

/// True when the server ended the session with this error (severity FATAL
/// or PANIC): it closes the connection right after sending it. During
/// COMMIT such an error does not prove a rollback: a backend terminated
/// after writing the commit record (at the interrupt check of a LOG line,
/// for example) sends `CommandComplete` for COMMIT and then
/// `FATAL 57P01`, and a PANIC after the commit record does the same.
pub(crate) fn ends_session(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::Severity;
    e.as_db_error().is_some_and(|db| {
        matches!(
            db.parsed_severity(),
            Some(Severity::Fatal | Severity::Panic)
        )
    })
}

/// A failed connection attempt, as the pool remembers it.
#[derive(Clone, Debug)]
pub(crate) struct ConnectFailure {
    /// The driver's error in words (see [`describe`]).
    pub(crate) message: String,
    /// The server's SQLSTATE, if the server answered.
    pub(crate) code: Option<SqlState>,
    /// Trying again cannot succeed (see [`is_permanent_connect_error`]).
    pub(crate) permanent: bool,
    /// The (last) host name does not exist.
    unknown_host: bool,
}

impl ConnectFailure {
    pub(crate) fn new(e: &tokio_postgres::Error) -> ConnectFailure {
        ConnectFailure {
            message: describe(e),
            code: e.code().cloned(),
            permanent: is_permanent_connect_error(e),
            unknown_host: is_unknown_host(e),
        }
    }

    /// The failure of an engine that lists several hosts (`hosts`, from
    /// [`crate::EngineConfig::host_list`], without password). The driver
    /// tries them in order and reports only the last one's error, so the
    /// message names them all; and an unknown host name is then not
    /// permanent, since another host of the list may serve (a standby that
    /// is promoted, a host that is back in DNS).
    pub(crate) fn among_hosts(mut self, hosts: &str) -> ConnectFailure {
        self.message = format!("{} (hosts tried, in order: {hosts})", self.message);
        if self.unknown_host {
            self.permanent = false;
        }
        self
    }

    /// The failure as the error of a checkout on `engine`.
    pub(crate) fn to_error(&self, engine: &str) -> Error {
        Error::Connect {
            engine: engine.to_owned(),
            message: self.message.clone(),
            code: self.code.clone(),
        }
    }
}

/// Whether a connection attempt failed for a reason that trying again
/// cannot cure, so that a checkout returns it at once instead of waiting out
/// `connection_timeout` while the pool retries.
///
/// Permanent: the server refused who we are or where we want to go
/// (SQLSTATE class 28 — wrong password, unknown role, pg_hba rejection —,
/// `3D000` unknown database, `42501` no `CONNECT` privilege), the TLS
/// handshake failed (the server does not offer TLS, or its certificate is
/// not trusted), the host name does not exist, or the settings are
/// invalid. Transient, and retried: anything else, in particular a refused
/// or reset connection (server down or restarting), `57P03` (starting up
/// or shutting down), `53300` (too many connections), a connect timeout,
/// and a DNS lookup that could not be completed ("temporary failure").
pub(crate) fn is_permanent_connect_error(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        return code.code().starts_with("28")
            || *code == SqlState::INVALID_CATALOG_NAME
            || *code == SqlState::INSUFFICIENT_PRIVILEGE;
    }
    // The driver's error kinds are not public: these are the Display texts
    // of its TLS, configuration and authentication kinds.
    let text = e.to_string();
    if text.starts_with("error performing TLS handshake") {
        // A handshake cut off by the network is not a refusal.
        return !e
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::TimedOut
                )
            });
    }
    if text.starts_with("invalid configuration") || text.starts_with("authentication error") {
        return true;
    }
    is_unknown_host(e)
}

/// An unknown host: getaddrinfo's EAI_NONAME ("Name or service not
/// known") or EAI_NODATA, but not EAI_AGAIN ("Temporary failure in name
/// resolution"), which a DNS server that is down or slow also gives.
fn is_unknown_host(e: &tokio_postgres::Error) -> bool {
    let lookup = describe(e);
    lookup.contains("failed to lookup address information") && !lookup.contains("Temporary failure")
}

/// Result with pgassist's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
