//! How to reach one database and how to pool its connections.
//!
//! `EngineConfig` wraps a `tokio_postgres::Config` plus the pool settings.
//! Its `Debug` and `Display` never show the password, and neither do the
//! errors made while parsing a URL.

pub(crate) mod tls;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// Default number of prepared statements cached per connection.
pub const DEFAULT_STATEMENT_CACHE: usize = 256;

/// How often replicas are sampled by default ([`EngineConfig::replica_lag_interval`]).
const DEFAULT_REPLICA_LAG_INTERVAL: Duration = Duration::from_millis(500);

/// How to reach one database, and how to pool its connections.
///
/// **Several hosts.** A URL may list several hosts, as libpq allows
/// (`postgres://app@db1:5432,db2:5432/shop` or
/// `host=db1,db2 port=5432,5432 dbname=shop`); each connection goes to the
/// first host, in order, that accepts it and matches `target_session_attrs`.
/// A *writer* engine (neither [`EngineConfig::read_only`] nor
/// [`EngineConfig::replica_of`]) with several hosts defaults to
/// `target_session_attrs=read-write`, so that it connects only to the
/// server that is the primary now: after a failover its new connections
/// find the promoted standby without a restart or `reinit`. Set
/// `target_session_attrs` in the URL (or with
/// [`EngineConfig::target_session_attrs`]) to choose otherwise. A writer
/// whose server stops being the primary while its connections stay open
/// (they get SQLSTATE 25006) discards its pooled connections once, and
/// dials anew. See `docs/failover.md`. A *replica* engine with several
/// hosts reads from all of them instead: the registry gives it one member
/// per host, with health and lag per host (see `docs/replicas.md`).
///
/// ```
/// use std::time::Duration;
/// let cfg = pgassist::EngineConfig::from_url("postgres://app:secret@db.internal:5432/shop")?
///     .max_size(16)
///     .connection_timeout(Duration::from_secs(2))
///     .read_only(true);
/// assert!(!format!("{cfg:?}").contains("secret"));
/// assert!(!cfg.to_string().contains("secret"));
/// # Ok::<(), pgassist::Error>(())
/// ```
#[derive(Clone)]
pub struct EngineConfig {
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) max_size: u32,
    pub(crate) min_idle: Option<u32>,
    pub(crate) connection_timeout: Duration,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) read_only: bool,
    pub(crate) statement_cache: usize,
    pub(crate) replica_of: Option<String>,
    pub(crate) replica_max_wait: Duration,
    pub(crate) replica_fallback: bool,
    pub(crate) max_replica_lag: Option<Duration>,
    pub(crate) max_replica_lag_bytes: Option<u64>,
    pub(crate) replica_lag_interval: Duration,
    pub(crate) tls: crate::config::tls::TlsSettings,
    pub(crate) pgbouncer: bool,
    pub(crate) pipeline: u32,
    /// Connect-time settings (`-c name=value` startup options).
    pub(crate) settings: Vec<(String, String)>,
    /// The URL or the caller chose `target_session_attrs` (see
    /// [`EngineConfig::target_session_attrs`]); otherwise a writer with
    /// several hosts gets `read-write`.
    pub(crate) session_attrs_chosen: bool,
    pub(crate) after_connect: Option<AfterConnect>,
}

/// The hook run on each new connection, and again after each session
/// reset (see [`EngineConfig::after_connect`]).
pub(crate) type AfterConnect = std::sync::Arc<
    dyn for<'c> Fn(
            &'c tokio_postgres::Client,
        )
            -> futures::future::BoxFuture<'c, std::result::Result<(), tokio_postgres::Error>>
        + Send
        + Sync,
>;

impl EngineConfig {
    /// Parses a `postgres://` URL or a `key=value` connection string.
    ///
    /// A malformed string gives [`Error::Config`]; the message never repeats
    /// the string itself, so a password in it cannot leak.
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        if url.is_empty() {
            return Err(Error::Config("the database URL is empty".into()));
        }
        check_at_signs(url)?;
        let (driver_url, tls) = crate::config::tls::split_tls_params(url).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!(
                "cannot parse the database URL: {}",
                redact(&m, url)
            )),
            other => other,
        })?;
        let pg = tokio_postgres::Config::from_str(&driver_url).map_err(|e| {
            Error::Config(format!(
                "cannot parse the database URL: {}",
                redact(&e.to_string(), url)
            ))
        })?;
        let mut cfg = Self::from_pg_config(pg);
        cfg.tls = tls;
        cfg.session_attrs_chosen = names_target_session_attrs(&driver_url);
        Ok(cfg)
    }

    /// Uses an already built `tokio_postgres::Config`. Its hosts may be
    /// several (`.host("db1").host("db2")`); a `target_session_attrs`
    /// other than `Any` counts as chosen (see [`EngineConfig`] for the
    /// default of a writer with several hosts).
    pub fn from_pg_config(pg: tokio_postgres::Config) -> Self {
        EngineConfig {
            max_size: 10,
            min_idle: None,
            connection_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            read_only: false,
            statement_cache: DEFAULT_STATEMENT_CACHE,
            replica_of: None,
            replica_max_wait: Duration::ZERO,
            replica_fallback: true,
            max_replica_lag: None,
            max_replica_lag_bytes: None,
            replica_lag_interval: DEFAULT_REPLICA_LAG_INTERVAL,
            tls: crate::config::tls::TlsSettings::default(),
            pgbouncer: false,
            pipeline: 1,
            settings: Vec::new(),
            session_attrs_chosen: pg.get_target_session_attrs()
                != tokio_postgres::config::TargetSessionAttrs::Any,
            pg,
            after_connect: None,
        }
    }

    /// A server setting (any GUC: `search_path`, `timezone`,
    /// `statement_timeout`, `work_mem`, …) for every connection of this
    /// engine, sent at connect time as a startup option (`-c name=value`).
    ///
    /// This is the place for session settings: a plain `SET` is refused in
    /// autocommit (it would reach the connection's next user; see
    /// `docs/session-state.md`), while a connect-time setting is what
    /// `RESET` goes back to, so it survives the pool's session resets. The
    /// name must be a plain (possibly dotted) identifier; the value is
    /// escaped as startup options need. PgBouncer drops startup options:
    /// set them on the role or database there.
    ///
    /// ```
    /// let cfg = pgassist::EngineConfig::from_url("postgres://app@db/app")?
    ///     .setting("search_path", "app, public")
    ///     .setting("statement_timeout", "5s");
    /// # Ok::<(), pgassist::Error>(())
    /// ```
    pub fn setting(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// An async hook run on each new connection before the pool hands it
    /// out (sqlx's `after_connect`, deadpool's `post_create`), and again
    /// after each session reset, so that what it sets up is there for every
    /// user. An error fails the connect (and a reset: the connection is then
    /// discarded). Prefer [`EngineConfig::setting`] for plain settings: it
    /// costs no round trip.
    ///
    /// ```
    /// let cfg = pgassist::EngineConfig::from_url("postgres://app@db/app")?.after_connect(|client| {
    ///     Box::pin(async move { client.batch_execute("SET application_name = 'worker'").await })
    /// });
    /// # Ok::<(), pgassist::Error>(())
    /// ```
    pub fn after_connect<F>(mut self, hook: F) -> Self
    where
        F: for<'c> Fn(
                &'c tokio_postgres::Client,
            ) -> futures::future::BoxFuture<
                'c,
                std::result::Result<(), tokio_postgres::Error>,
            > + Send
            + Sync
            + 'static,
    {
        self.after_connect = Some(std::sync::Arc::new(hook));
        self
    }

    /// Most connections the pool opens (default 10).
    pub fn max_size(mut self, n: u32) -> Self {
        self.max_size = n;
        self
    }

    /// Idle connections the pool keeps open (default: none kept open).
    pub fn min_idle(mut self, n: u32) -> Self {
        self.min_idle = Some(n);
        self
    }

    /// How long a checkout waits for a free connection before
    /// [`Error::PoolTimeout`] (default 30 s). Also bounds connecting.
    pub fn connection_timeout(mut self, d: Duration) -> Self {
        self.connection_timeout = d;
        self
    }

    /// Idle connections older than this are closed (default 10 min, `None` keeps them).
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Connections are replaced after this age (default 30 min, `None` keeps them).
    pub fn max_lifetime(mut self, d: Option<Duration>) -> Self {
        self.max_lifetime = d;
        self
    }

    /// Makes the server refuse every write on this engine's connections
    /// (`default_transaction_read_only=on`). Writes then fail with
    /// [`Error::ReadOnly`].
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// Which server of a host list a connection may go to (libpq's
    /// `target_session_attrs`): `Any`, `ReadWrite` (a primary that is not
    /// `default_transaction_read_only`) or `ReadOnly`. Overrides the default
    /// of a writer with several hosts (`ReadWrite`, see [`EngineConfig`]).
    pub fn target_session_attrs(
        mut self,
        attrs: tokio_postgres::config::TargetSessionAttrs,
    ) -> Self {
        self.pg.target_session_attrs(attrs);
        self.session_attrs_chosen = true;
        self
    }

    /// Whether the engine writes: neither declared read-only nor a replica.
    /// A writer follows the primary among its hosts (see [`EngineConfig`]).
    pub fn is_writer(&self) -> bool {
        !self.read_only && self.replica_of.is_none()
    }

    /// Whether the engine lists more than one host.
    pub(crate) fn has_several_hosts(&self) -> bool {
        self.pg.get_hosts().len().max(self.pg.get_hostaddrs().len()) > 1
    }

    /// The hosts a connection may try, in order, as `host:port` (no user,
    /// no password): for connect errors.
    pub(crate) fn host_list(&self) -> String {
        self.host_labels().join(", ")
    }

    /// Each host as `host:port` (a socket directory as `[/path]:port`).
    fn host_labels(&self) -> Vec<String> {
        use tokio_postgres::config::Host;
        let ports = self.pg.get_ports();
        let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        self.pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| match h {
                Host::Tcp(h) => format!("{h}:{}", port(i)),
                Host::Unix(p) => format!("[{}]:{}", p.display(), port(i)),
            })
            .collect()
    }

    /// One configuration per host of the list, each naming that host only
    /// (with its port and `hostaddr`), everything else copied; with its
    /// `host:port` label. A replica engine over several hosts reads from
    /// each through one of these (see `docs/replicas.md`), so that health
    /// and lag are per host.
    pub(crate) fn per_host(&self) -> Vec<(String, EngineConfig)> {
        use tokio_postgres::config::Host;
        let from = &self.pg;
        let ports = from.get_ports();
        let labels = self.host_labels();
        from.get_hosts()
            .iter()
            .zip(labels)
            .enumerate()
            .map(|(i, (host, label))| {
                let mut pg = tokio_postgres::Config::new();
                match host {
                    Host::Tcp(h) => pg.host(h),
                    #[cfg(unix)]
                    Host::Unix(p) => pg.host_path(p),
                };
                if let Some(addr) = from.get_hostaddrs().get(i) {
                    pg.hostaddr(*addr);
                }
                if let Some(port) = ports.get(i).or(ports.first()) {
                    pg.port(*port);
                }
                if let Some(user) = from.get_user() {
                    pg.user(user);
                }
                if let Some(password) = from.get_password() {
                    pg.password(password);
                }
                if let Some(dbname) = from.get_dbname() {
                    pg.dbname(dbname);
                }
                if let Some(options) = from.get_options() {
                    pg.options(options);
                }
                if let Some(app) = from.get_application_name() {
                    pg.application_name(app);
                }
                if let Some(t) = from.get_connect_timeout() {
                    pg.connect_timeout(*t);
                }
                if let Some(t) = from.get_tcp_user_timeout() {
                    pg.tcp_user_timeout(*t);
                }
                if let Some(t) = from.get_keepalives_interval() {
                    pg.keepalives_interval(t);
                }
                if let Some(n) = from.get_keepalives_retries() {
                    pg.keepalives_retries(n);
                }
                pg.ssl_mode(from.get_ssl_mode())
                    .ssl_negotiation(from.get_ssl_negotiation())
                    .keepalives(from.get_keepalives())
                    .keepalives_idle(from.get_keepalives_idle())
                    .target_session_attrs(from.get_target_session_attrs())
                    .channel_binding(from.get_channel_binding())
                    .load_balance_hosts(from.get_load_balance_hosts());
                let mut one = self.clone();
                one.pg = pg;
                (label, one)
            })
            .collect()
    }

    /// The `application_name` the server shows in `pg_stat_activity`.
    pub fn application_name(mut self, name: &str) -> Self {
        self.pg.application_name(name);
        self
    }

    /// Prepared statements cached per connection, by SQL text (default 256).
    /// `0` prepares every statement afresh and caches nothing.
    pub fn statement_cache(mut self, capacity: usize) -> Self {
        self.statement_cache = capacity;
        self
    }

    /// Declares this engine a read replica of engine `primary`: writes fail
    /// with [`Error::ReadOnly`], and within a [`crate::Sessions`] scope a
    /// read after a write on the primary goes to the replica only once it
    /// has replayed that write (see [`crate::Sessions::reader`]).
    pub fn replica_of(mut self, primary: &str) -> Self {
        self.replica_of = Some(primary.to_owned());
        self
    }

    /// How long a read waits for the replica to catch up with this
    /// request's last write before reading from the primary (default 0:
    /// read from the primary at once).
    pub fn replica_max_wait(mut self, d: Duration) -> Self {
        self.replica_max_wait = d;
        self
    }

    /// Whether reads fall back to the primary while the replica is
    /// unreachable (default true).
    pub fn replica_fallback(mut self, yes: bool) -> Self {
        self.replica_fallback = yes;
        self
    }

    /// A replica further behind its primary than this (in time, as last
    /// sampled in the background) gets no reads until it catches up
    /// (pgpool-II's `delay_threshold`). Unset (the default): no limit.
    /// Zero is refused when the registry is built: lag is sampled, so "no
    /// lag at all" would shut out every replica of a primary that writes.
    /// Applies to this replica, whichever replica engine of its group a
    /// read came through (docs/replicas.md).
    pub fn max_replica_lag(mut self, d: Duration) -> Self {
        self.max_replica_lag = Some(d);
        self
    }

    /// A replica further behind its primary than this many bytes of WAL
    /// (as last sampled) gets no reads until it catches up. Unset (the
    /// default): no limit; zero is refused, as for
    /// [`EngineConfig::max_replica_lag`].
    pub fn max_replica_lag_bytes(mut self, bytes: u64) -> Self {
        self.max_replica_lag_bytes = Some(bytes);
        self
    }

    /// How often the registry samples each replica's replay position and
    /// lag in the background (default 500 ms; the registry uses the
    /// shortest interval of its replicas). Statements never pay a round
    /// trip for it: routing reads the last sample.
    pub fn replica_lag_interval(mut self, d: Duration) -> Self {
        self.replica_lag_interval = d;
        self
    }

    /// How to secure connections (libpq's `sslmode`; also read from the
    /// URL's `sslmode=`). `require` and the `verify-*` modes need the
    /// `rustls` feature.
    pub fn sslmode(mut self, mode: crate::config::tls::SslMode) -> Self {
        self.tls.mode = mode;
        self
    }

    /// A PEM file of trusted roots for `verify-ca` / `verify-full` (also
    /// the URL's `sslrootcert=`); without it the system's roots are used.
    pub fn root_cert(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.tls.root_cert = Some(path.into());
        self
    }

    /// The engine connects through PgBouncer in transaction pooling mode:
    /// no named prepared statement is kept across statements (each runs as
    /// one unnamed Parse/Bind/Execute; `statement_cache(0)`), and a unit of
    /// work refuses two-phase commit through it with a clear error
    /// (PREPARE TRANSACTION cannot work there).
    pub fn pgbouncer(mut self, yes: bool) -> Self {
        self.pgbouncer = yes;
        if yes {
            self.statement_cache = 0;
        }
        self
    }

    /// Pipelining of autocommit statements while the pool is saturated
    /// (default 1: off).
    ///
    /// With `max_in_flight > 1`, once every connection is checked out and
    /// the pool is at `max_size`, an autocommit statement is sent on a
    /// connection that other autocommit statements are using — tokio-postgres
    /// pipelines requests in flight together on one connection — up to
    /// `max_in_flight` per connection, instead of waiting for a connection
    /// of its own. With all of them at that limit, it waits for a place (at
    /// most `connection_timeout`, then [`Error::PoolTimeout`]). Many short
    /// requests then share few connections; each statement is still one
    /// Parse/Bind/Execute/Sync of its own, so an error in one does not touch
    /// the others, and no connection is held between statements.
    ///
    /// Transactions and batches always get a connection of their own, and
    /// come first: while one waits, no statement joins a busy connection.
    /// The price: a statement pipelined behind a slow one waits for it, where
    /// it could have had the next free connection. Not available with
    /// `statement_cache(0)` / `pgbouncer(true)`.
    pub fn pipeline(mut self, max_in_flight: u32) -> Self {
        self.pipeline = max_in_flight;
        self
    }

    /// Whether the engine is declared to run through PgBouncer.
    pub fn is_pgbouncer(&self) -> bool {
        self.pgbouncer
    }

    /// The engine this one replicates, if any.
    pub fn replica_of_engine(&self) -> Option<&str> {
        self.replica_of.as_deref()
    }

    /// The underlying driver configuration (host, port, user, …).
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// Whether the engine refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Checks the settings that the pool would otherwise reject by panicking.
    /// Whether bb8 closes connections by age or idleness (its reaper runs).
    pub(crate) fn is_reaped(&self) -> bool {
        self.idle_timeout.is_some() || self.max_lifetime.is_some()
    }

    pub(crate) fn validate(&self, engine: &str) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("engine `{engine}`: {what}")));
        if self.max_size == 0 {
            return bad("max_size must be at least 1".into());
        }
        if let Some(min) = self.min_idle {
            if min > self.max_size {
                return bad(format!(
                    "min_idle ({min}) exceeds max_size ({})",
                    self.max_size
                ));
            }
        }
        if self.connection_timeout.is_zero() {
            return bad("connection_timeout must be longer than zero".into());
        }
        if self.idle_timeout.is_some_and(|d| d.is_zero()) {
            return bad("idle_timeout must be longer than zero (or None)".into());
        }
        if self.max_lifetime.is_some_and(|d| d.is_zero()) {
            return bad("max_lifetime must be longer than zero (or None)".into());
        }
        if self.pipeline == 0 {
            return bad("pipeline must be at least 1 (1: no pipelining)".into());
        }
        if self.pipeline > 1 && self.statement_cache == 0 {
            return bad(
                "pipeline needs named prepared statements: it cannot be combined with \
                 statement_cache(0) or pgbouncer(true)"
                    .into(),
            );
        }
        if self.pg.get_hosts().is_empty() {
            return bad("the URL names no host".into());
        }
        // libpq's rules for host lists, checked here rather than at the
        // first connection (where they would be a connect error per try).
        let hosts = self.pg.get_hosts();
        let (ports, addrs) = (self.pg.get_ports().len(), self.pg.get_hostaddrs().len());
        if ports > 1 && ports != hosts.len() {
            return bad(format!(
                "{ports} ports for {} hosts: give one port for all, or one per host",
                hosts.len()
            ));
        }
        if addrs > 0 && addrs != hosts.len() {
            return bad(format!(
                "{addrs} hostaddrs for {} hosts: give one per host",
                hosts.len()
            ));
        }
        let empty = |h: &tokio_postgres::config::Host| matches!(h, tokio_postgres::config::Host::Tcp(name) if name.trim().is_empty());
        if hosts.iter().any(empty) {
            return bad("the host list has an empty entry (`a,,b`)".into());
        }
        for (name, _) in &self.settings {
            let plain = !name.is_empty()
                && name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.');
            if !plain {
                return bad(format!(
                    "setting name {name:?}: only letters, digits, `_` and `.` are allowed"
                ));
            }
        }
        if self.pgbouncer && self.read_only {
            return bad(
                "read_only cannot be enforced through PgBouncer, which drops the `options` startup \
                 parameter: set default_transaction_read_only on the role or in PgBouncer's database entry"
                    .into(),
            );
        }
        #[cfg(not(feature = "rustls"))]
        if !matches!(
            self.tls.mode,
            crate::config::tls::SslMode::Disable | crate::config::tls::SslMode::Prefer
        ) {
            return bad(format!(
                "sslmode {:?} needs TLS: build pgassist with the `rustls` feature",
                self.tls.mode
            ));
        }
        Ok(())
    }

    /// The driver config with the engine's session settings applied.
    pub(crate) fn connect_config(&self) -> tokio_postgres::Config {
        let mut pg = self.pg.clone();
        pg.ssl_mode(self.tls.mode.driver_mode());
        let mut options = pg.get_options().unwrap_or_default().to_owned();
        let settings = self.settings.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        let read_only = self
            .read_only
            .then_some(("default_transaction_read_only", "on"));
        for (name, value) in settings.chain(read_only) {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str("-c ");
            options.push_str(name);
            options.push('=');
            // The server splits options at white space; a backslash escapes
            // the next character (libpq's rule).
            for c in value.chars() {
                if c.is_whitespace() || c == '\\' {
                    options.push('\\');
                }
                options.push(c);
            }
        }
        if !options.is_empty() {
            pg.options(options);
        }
        if self.is_writer() && self.has_several_hosts() && !self.session_attrs_chosen {
            pg.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        pg
    }
}

/// The settings keys an engine understands, besides `url`.
pub const SETTING_KEYS: [&str; 16] = [
    "max_size",
    "min_idle",
    "connection_timeout",
    "idle_timeout",
    "max_lifetime",
    "read_only",
    "application_name",
    "statement_cache",
    "replica_of",
    "replica_max_wait",
    "replica_fallback",
    "max_replica_lag",
    "max_replica_lag_bytes",
    "replica_lag_interval",
    "pgbouncer",
    "pipeline",
];

impl EngineConfig {
    /// Builds an engine from key/value settings under `prefix`, like
    /// SQLAlchemy's `engine_from_config(settings, prefix="sqlalchemy_reader.")`:
    /// `{prefix}url` is required; `{prefix}max_size`, `min_idle`,
    /// `connection_timeout`, `idle_timeout`, `max_lifetime` (durations such as
    /// `500ms`, `2s`, `5m`, `1h`, or plain seconds; `none` for no limit),
    /// `read_only` (true/false/1/0/yes/no/on/off), `application_name`,
    /// `statement_cache` and `pipeline` are optional. An unknown key under
    /// the prefix is an error (a typo should not pass silently); errors name the key and never
    /// show the URL.
    ///
    /// ```
    /// let settings = [("db.reader.url", "postgres://app:pw@replica/app"), ("db.reader.max_size", "8"), ("db.reader.read_only", "true")];
    /// let cfg = pgassist::EngineConfig::from_settings(settings, "db.reader.")?;
    /// assert!(cfg.is_read_only());
    /// # Ok::<(), pgassist::Error>(())
    /// ```
    pub fn from_settings<K, V>(
        settings: impl IntoIterator<Item = (K, V)>,
        prefix: &str,
    ) -> Result<Self>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut url = None;
        let mut rest = Vec::new();
        for (k, v) in settings {
            let Some(key) = k.as_ref().strip_prefix(prefix) else {
                continue;
            };
            if key == "url" {
                url = Some(v.as_ref().to_owned());
            } else {
                rest.push((key.to_owned(), v.as_ref().to_owned()));
            }
        }
        let url = url.ok_or_else(|| Error::Config(format!("{prefix}url is missing")))?;
        let mut cfg = Self::from_url(&url).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{prefix}url: {m}")),
            other => other,
        })?;
        for (key, value) in rest {
            cfg = cfg
                .apply(&key, &value)
                .map_err(|m| Error::Config(format!("{prefix}{key}: {m}")))?;
        }
        Ok(cfg)
    }

    /// Builds engine `engine`'s config from environment variables:
    /// `PGASSIST_<ENGINE>_URL` (required) and `PGASSIST_<ENGINE>_<SETTING>`
    /// for the settings of [`EngineConfig::from_settings`], e.g.
    /// `PGASSIST_READER_MAX_SIZE=8`.
    pub fn from_env(engine: &str) -> Result<Self> {
        let prefix = format!("PGASSIST_{}_", engine.to_ascii_uppercase());
        let vars = std::env::vars().filter_map(|(k, v)| {
            let setting = k.strip_prefix(&prefix)?.to_ascii_lowercase();
            (setting == "url" || SETTING_KEYS.contains(&setting.as_str()))
                .then(|| (format!("{prefix}{setting}"), v))
        });
        Self::from_settings(vars, &prefix).map_err(|e| match e {
            // Name the variable as the user spelled it.
            Error::Config(m) => Error::Config(upper_key(&m, &prefix)),
            other => other,
        })
    }

    /// Applies one named setting (shared by settings maps, environment and serde).
    fn apply(self, key: &str, value: &str) -> std::result::Result<Self, String> {
        let v = value.trim();
        Ok(match key {
            "max_size" => self.max_size(parse_number(v)?),
            "min_idle" => self.min_idle(parse_number(v)?),
            "connection_timeout" => {
                self.connection_timeout(parse_duration(v)?.ok_or("cannot be `none`")?)
            }
            "idle_timeout" => self.idle_timeout(parse_duration(v)?),
            "max_lifetime" => self.max_lifetime(parse_duration(v)?),
            "read_only" => self.read_only(parse_bool(v)?),
            "application_name" => self.application_name(v),
            "statement_cache" => self.statement_cache(parse_number(v)?),
            "replica_of" => self.replica_of(v),
            "replica_max_wait" => self.replica_max_wait(parse_duration(v)?.unwrap_or_default()),
            "replica_fallback" => self.replica_fallback(parse_bool(v)?),
            "max_replica_lag" => Self {
                max_replica_lag: parse_duration(v)?,
                ..self
            },
            "max_replica_lag_bytes" => Self {
                max_replica_lag_bytes: match v {
                    _ if v.eq_ignore_ascii_case("none") => None,
                    _ => Some(parse_number(v)?),
                },
                ..self
            },
            "replica_lag_interval" => {
                self.replica_lag_interval(parse_duration(v)?.ok_or("cannot be `none`")?)
            }
            "pgbouncer" => self.pgbouncer(parse_bool(v)?),
            "pipeline" => self.pipeline(parse_number(v)?),
            _ => {
                return Err(format!(
                    "unknown setting (known: url, {})",
                    SETTING_KEYS.join(", ")
                ));
            }
        })
    }
}

/// `PGASSIST_WRITER_max_size: …` → `PGASSIST_WRITER_MAX_SIZE: …`.
fn upper_key(message: &str, prefix: &str) -> String {
    match message.strip_prefix(prefix).and_then(|m| m.split_once(':')) {
        Some((key, rest)) => format!("{prefix}{}:{rest}", key.to_ascii_uppercase()),
        None => message.to_owned(),
    }
}

fn parse_number<T: FromStr>(v: &str) -> std::result::Result<T, String> {
    v.parse()
        .map_err(|_| format!("expected a whole number, got `{v}`"))
}

fn parse_bool(v: &str) -> std::result::Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got `{v}`")),
    }
}

/// `500ms`, `2s`, `1.5s`, `5m`, `1h`, plain seconds, or `none`.
pub(crate) fn parse_duration(v: &str) -> std::result::Result<Option<Duration>, String> {
    let bad = || format!("expected a duration such as 500ms, 2s, 5m or `none`, got `{v}`");
    if v.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs)
        .map(Some)
        .map_err(|_| bad())
}

/// Refuses a `postgres://` URL whose `@` could be read two ways.
/// tokio-postgres takes everything up to the first `@` anywhere in the URL
/// as `user:password`: an unencoded `@` in a password (`ann:p@ss@db`) makes
/// the rest of the password part of the host, and an `@` in the path or
/// query of a URL without user info (`db/app?password=a@b`) makes the host,
/// path and part of the query the user name. Either way a piece of the
/// password would then show up in `Display`, `Debug` and connection errors.
fn check_at_signs(url: &str) -> Result<()> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(());
    };
    if scheme != "postgres" && scheme != "postgresql" {
        return Ok(());
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let in_authority = rest[..end].matches('@').count();
    if in_authority > 1 || (in_authority == 0 && rest[end..].contains('@')) {
        return Err(Error::Config(
            "ambiguous '@' in the database URL: percent-encode '@', '/' and '?' in the user \
             name and password (%40, %2F, %3F) and '@' in the path and query"
                .into(),
        ));
    }
    Ok(())
}

/// Whether a URL (`postgres://…?target_session_attrs=…`) or a key=value
/// string (`… target_session_attrs=…`) sets `target_session_attrs`.
fn names_target_session_attrs(url: &str) -> bool {
    const KEY: &str = "target_session_attrs";
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        return query
            .split('&')
            .any(|pair| pair.split('=').next().is_some_and(|k| k.trim() == KEY));
    }
    // key=value: a key starts a word (values with spaces are quoted; a
    // quoted value that contains the key is a rare false positive, which
    // only keeps the driver's default).
    url.split_whitespace()
        .any(|word| word.split('=').next().is_some_and(|k| k == KEY))
}

/// Replaces every occurrence of the URL's password in `text` by `***`.
fn redact(text: &str, url: &str) -> String {
    match url_password(url) {
        Some(pw) if !pw.is_empty() => text.replace(pw, "***"),
        _ => text.to_owned(),
    }
}

/// The password part of a `scheme://user:password@host` URL, if any.
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let userinfo = &rest[..rest.rfind('@')?];
    userinfo.split_once(':').map(|(_, pw)| pw)
}

impl fmt::Display for EngineConfig {
    /// A URL with the password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use tokio_postgres::config::Host;
        write!(f, "postgres://")?;
        if let Some(user) = self.pg.get_user() {
            write!(f, "{user}")?;
            if self.pg.get_password().is_some() {
                write!(f, ":***")?;
            }
            write!(f, "@")?;
        }
        for (i, host) in self.pg.get_hosts().iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            match host {
                Host::Tcp(h) => write!(f, "{h}")?,
                Host::Unix(p) => write!(f, "[{}]", p.display())?,
            }
            if let Some(port) = self.pg.get_ports().get(i).or(self.pg.get_ports().first()) {
                write!(f, ":{port}")?;
            }
        }
        write!(f, "/{}", self.pg.get_dbname().unwrap_or(""))
    }
}

impl fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EngineConfig")
            .field("url", &self.to_string())
            .field("application_name", &self.pg.get_application_name())
            .field("max_size", &self.max_size)
            .field("min_idle", &self.min_idle)
            .field("connection_timeout", &self.connection_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("read_only", &self.read_only)
            .field("statement_cache", &self.statement_cache)
            .field("replica_of", &self.replica_of)
            .field("max_replica_lag", &self.max_replica_lag)
            .field("max_replica_lag_bytes", &self.max_replica_lag_bytes)
            .field("sslmode", &self.tls)
            .field("pgbouncer", &self.pgbouncer)
            .field("pipeline", &self.pipeline)
            .field("settings", &self.settings)
            .field("after_connect", &self.after_connect.is_some())
            .finish()
    }
}

/// `EngineConfig` from any serde format (feature `serde`): a map with `url`
/// and the keys of [`EngineConfig::from_settings`]; numbers, booleans and
/// strings are all accepted as values.
///
/// ```
/// # #[cfg(feature = "serde")] {
/// let cfg: pgassist::EngineConfig =
///     serde_json::from_str(r#"{"url": "postgres://app@db/app", "max_size": 8, "read_only": true, "connection_timeout": "2s"}"#).unwrap();
/// assert!(cfg.is_read_only());
/// # }
/// ```
#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for EngineConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Bool(bool),
            Int(u64),
            Float(f64),
            Text(String),
        }
        let map = std::collections::BTreeMap::<String, Scalar>::deserialize(d)?;
        let settings = map.into_iter().map(|(k, v)| {
            let v = match v {
                Scalar::Bool(b) => b.to_string(),
                Scalar::Int(i) => i.to_string(),
                Scalar::Float(f) => f.to_string(),
                Scalar::Text(s) => s,
            };
            (k, v)
        });
        EngineConfig::from_settings(settings, "").map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_never_shown() {
        let cfg = EngineConfig::from_url("postgres://ann:hunter2@localhost:5433/app").unwrap();
        for s in [format!("{cfg:?}"), cfg.to_string(), format!("{cfg:#?}")] {
            assert!(!s.contains("hunter2"), "{s}");
        }
        assert_eq!(cfg.to_string(), "postgres://ann:***@localhost:5433/app");
    }

    #[test]
    fn bad_urls_give_config_errors_without_password() {
        for url in [
            "",
            "   ",
            "postgres://ann:hunter2@localhost:notaport/app",
            "postgres://ann:hunter2@/app?sslmode=bogus",
            "mysql://ann:hunter2@localhost/app",
            "host=localhost password=hunter2 port=x",
            "postgres://ann:hun@ter2@localhost/app",
            "postgres://localhost/app?password=hun@ter2",
            "postgres://ann:hun/ter@2@localhost/app",
        ] {
            let err = EngineConfig::from_url(url).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
            assert!(
                !format!("{err} {err:?}").contains("hunter2"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn one_at_sign_in_the_authority_or_encoded_ones_are_fine() {
        for url in [
            "postgres://ann:hun%40ter2@localhost/app",
            "postgres://ann@localhost/app?application_name=me@home",
            "postgres://localhost/app?password=hun%40ter2",
            "postgresql://ann:pw@[::1]:5432/app",
            "host=localhost password=hun@ter2",
        ] {
            let cfg = EngineConfig::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(!cfg.to_string().contains("ter2"), "{url}: {cfg}");
        }
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let base = EngineConfig::from_url("postgres://localhost/app").unwrap();
        assert!(base.clone().max_size(0).validate("w").is_err());
        assert!(base.clone().max_size(2).min_idle(3).validate("w").is_err());
        assert!(
            base.clone()
                .connection_timeout(Duration::ZERO)
                .validate("w")
                .is_err()
        );
        assert!(
            base.clone()
                .idle_timeout(Some(Duration::ZERO))
                .validate("w")
                .is_err()
        );
        assert!(base.validate("w").is_ok());
    }

    #[test]
    fn settings_map_with_prefix() {
        let settings = vec![
            ("app.reader.url", "postgres://u:topsecret@h/db"),
            ("app.reader.max_size", "7"),
            ("app.reader.connection_timeout", "250ms"),
            ("app.reader.idle_timeout", "none"),
            ("app.reader.read_only", "yes"),
            ("app.writer.url", "postgres://other/db"),
        ];
        let cfg = EngineConfig::from_settings(settings.clone(), "app.reader.").unwrap();
        assert_eq!(cfg.max_size, 7);
        assert_eq!(cfg.connection_timeout, Duration::from_millis(250));
        assert_eq!(cfg.idle_timeout, None);
        assert!(cfg.read_only);

        let mut bad = settings.clone();
        bad.push(("app.reader.max_sise", "3"));
        let err = EngineConfig::from_settings(bad, "app.reader.")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app.reader.max_sise") && err.contains("unknown setting"),
            "{err}"
        );
        let mut bad = settings.clone();
        bad.push(("app.reader.max_size", "lots"));
        let err = EngineConfig::from_settings(bad, "app.reader.")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("app.reader.max_size") && !err.contains("topsecret"),
            "{err}"
        );
        let err = EngineConfig::from_settings(settings, "app.logger.")
            .unwrap_err()
            .to_string();
        assert!(err.contains("app.logger.url is missing"), "{err}");
        let err = EngineConfig::from_settings([("x.url", "postgres://u:topsecret@h:bad/db")], "x.")
            .unwrap_err();
        assert!(
            !err.to_string().contains("topsecret") && err.to_string().contains("x.url"),
            "{err}"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("2s").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_duration("1.5").unwrap(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_duration("5m").unwrap(),
            Some(Duration::from_secs(300))
        );
        assert_eq!(parse_duration("None").unwrap(), None);
        for bad in ["", "s", "2 weeks", "-1s", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn writer_with_several_hosts_targets_read_write() {
        use tokio_postgres::config::TargetSessionAttrs::{Any, ReadOnly, ReadWrite};
        let attrs = |cfg: EngineConfig| cfg.connect_config().get_target_session_attrs();
        let url = |u: &str| EngineConfig::from_url(u).unwrap();
        assert_eq!(attrs(url("postgres://a:1,b:2/app")), ReadWrite);
        assert_eq!(attrs(url("host=a,b port=1,2 dbname=app")), ReadWrite);
        // One host, a reader, a replica, or a choice in the URL: unchanged.
        assert_eq!(attrs(url("postgres://a:1/app")), Any);
        assert_eq!(attrs(url("postgres://a:1,b:2/app").read_only(true)), Any);
        assert_eq!(attrs(url("postgres://a:1,b:2/app").replica_of("w")), Any);
        let chosen = "postgres://a:1,b:2/app?target_session_attrs=any";
        assert_eq!(attrs(url(chosen)), Any);
        assert_eq!(attrs(url("host=a,b target_session_attrs=any")), Any);
        let builder = url("postgres://a:1,b:2/app").target_session_attrs(ReadOnly);
        assert_eq!(attrs(builder), ReadOnly);
        let mut pg = tokio_postgres::Config::new();
        pg.host("a").host("b");
        assert_eq!(attrs(EngineConfig::from_pg_config(pg)), ReadWrite);
        let hosts = url("postgres://u:hunter2@a:1,b:2/app").host_list();
        assert_eq!(hosts, "a:1, b:2");
    }

    #[test]
    fn host_lists_that_libpq_refuses_are_refused_at_build() {
        let check = |u: &str| {
            EngineConfig::from_url(u)
                .and_then(|c| c.validate("w"))
                .map_err(|e| e.to_string())
        };
        assert!(check("postgres://u:pw@a,b/db").is_ok());
        assert!(check("host=a,b port=1,2 user=u").is_ok());
        assert!(check("host=a,b port=1 user=u").is_ok());
        let three_ports = check("host=a,b port=1,2,3 user=u password=hunter2").unwrap_err();
        assert!(three_ports.contains("3 ports for 2 hosts"), "{three_ports}");
        assert!(!three_ports.contains("hunter2"), "{three_ports}");
        let addrs = check("host=a,b hostaddr=10.0.0.1 user=u").unwrap_err();
        assert!(addrs.contains("1 hostaddrs for 2 hosts"), "{addrs}");
        for empty in ["host=a,,b user=u", "postgres://u@a,,b/db"] {
            match check(empty) {
                Err(e) => assert!(e.contains("empty entry") || e.contains("host"), "{e}"),
                Ok(()) => panic!("accepted {empty}"),
            }
        }
    }

    #[test]
    fn per_host_copies_everything_but_the_other_hosts() {
        let url = |u: &str| EngineConfig::from_url(u).unwrap();
        let common = "user=u password=hunter2 dbname=app application_name=x \
                      connect_timeout=3 keepalives_idle=40 sslmode=disable \
                      target_session_attrs=read-only options='-c work_mem=4MB'";
        let list = url(&format!(
            "host=a,b,/run/pg hostaddr=10.0.0.1,10.0.0.2,10.0.0.3 port=1,2,3 {common}"
        ))
        .replica_of("w")
        .max_size(3);
        let split = list.per_host();
        let labels: Vec<&str> = split.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["a:1", "b:2", "[/run/pg]:3"]);
        let alone = url(&format!("host=b hostaddr=10.0.0.2 port=2 {common}"));
        assert!(split[1].1.pg == alone.pg, "{:?}", split[1].1.pg);
        assert_eq!(split[1].1.max_size, 3);
        assert_eq!(split[1].1.replica_of.as_deref(), Some("w"));
        // One port for all hosts, and no port at all.
        let labels =
            |u: &str| -> Vec<String> { url(u).per_host().into_iter().map(|(l, _)| l).collect() };
        assert_eq!(labels("postgres://a,b:7/app"), ["a:5432", "b:7"]);
        assert_eq!(labels("host=a,b port=9"), ["a:9", "b:9"]);
    }

    #[test]
    fn read_only_sets_server_option() {
        let cfg = EngineConfig::from_url("postgres://localhost/app?options=-c%20work_mem%3D4MB")
            .unwrap()
            .read_only(true);
        let opts = cfg.connect_config().get_options().unwrap().to_owned();
        assert!(opts.contains("work_mem") && opts.contains("default_transaction_read_only=on"));
    }
}
