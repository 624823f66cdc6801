//! How to reach one database and how to pool its connections.
//!
//! `EngineConfig` wraps a `tokio_postgres::Config` plus the pool settings.
//! Its `Debug` and `Display` never show the password, and neither do the
//! errors made while parsing a URL.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// Default number of prepared statements cached per connection.
pub const DEFAULT_STATEMENT_CACHE: usize = 256;

/// How to reach one database, and how to pool its connections.
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
}

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
        let pg = tokio_postgres::Config::from_str(url).map_err(|e| {
            Error::Config(format!(
                "cannot parse the database URL: {}",
                redact(&e.to_string(), url)
            ))
        })?;
        Ok(Self::from_pg_config(pg))
    }

    /// Uses an already built `tokio_postgres::Config`.
    pub fn from_pg_config(pg: tokio_postgres::Config) -> Self {
        EngineConfig {
            pg,
            max_size: 10,
            min_idle: None,
            connection_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            read_only: false,
            statement_cache: DEFAULT_STATEMENT_CACHE,
        }
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

    /// The underlying driver configuration (host, port, user, …).
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// Whether the engine refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Checks the settings that the pool would otherwise reject by panicking.
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
        if self.pg.get_hosts().is_empty() {
            return bad("the URL names no host".into());
        }
        Ok(())
    }

    /// The driver config with the engine's session settings applied.
    pub(crate) fn connect_config(&self) -> tokio_postgres::Config {
        let mut pg = self.pg.clone();
        if self.read_only {
            let mut options = pg.get_options().unwrap_or_default().to_owned();
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str("-c default_transaction_read_only=on");
            pg.options(options);
        }
        pg
    }
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
            .finish()
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
    fn read_only_sets_server_option() {
        let cfg = EngineConfig::from_url("postgres://localhost/app?options=-c%20work_mem%3D4MB")
            .unwrap()
            .read_only(true);
        let opts = cfg.connect_config().get_options().unwrap().to_owned();
        assert!(opts.contains("work_mem") && opts.contains("default_transaction_read_only=on"));
    }
}
