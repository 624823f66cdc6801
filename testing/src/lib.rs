//! Throwaway PostgreSQL servers for integration tests.
//!
//! This is the test harness of the `pgassist` crate, published on its own so
//! that any code that talks to PostgreSQL (it depends only on
//! `tokio-postgres`, not on pgassist) can test against a real server rather
//! than a mock:
//!
//! ```toml
//! [dev-dependencies]
//! pgassist-testing = "0.1"
//! ```
//!
//! ```no_run
//! use pgassist_testing::TestCluster;
//!
//! # async fn a_test() -> Result<(), Box<dyn std::error::Error>> {
//! // One server for all tests of this test binary, a database for this test.
//! let db = TestCluster::shared().create_database().await?;
//! let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await?;
//! tokio::spawn(connection);
//! client.batch_execute("CREATE TABLE t (id int)").await?;
//! # Ok(())
//! # }
//! ```
//!
//! [`TestCluster::start`] runs `initdb` into a fresh temporary directory and
//! starts a private server on a free loopback port; [`TestCluster::shared`]
//! gives all tests of one process a single such cluster (or the server named
//! by `DATABASE_URL`), and [`TestCluster::create_database`] hands each test a
//! database of its own in it, so tests can run in parallel. A cluster can
//! also get a streaming hot standby ([`TestCluster::start_replica`]),
//! PgBouncer in front ([`TestCluster::start_pgbouncer`]) and TLS
//! ([`ClusterOptions::tls`]).
//!
//! Durability is switched off for speed, and every statement is logged so a
//! test can check what reached the server ([`TestCluster::log_since`]).
//!
//! # What it needs
//!
//! Linux (it reads `/proc`) and the PostgreSQL server tools: `initdb`,
//! `pg_ctl` and `postgres` from the newest `/usr/lib/postgresql/<version>/bin`
//! (Debian, Ubuntu) or from `PATH`; `pg_basebackup` for replicas; `pgbouncer`
//! optionally. Nothing needs to be running beforehand.
//!
//! # Your own server: `DATABASE_URL`
//!
//! With `DATABASE_URL` set to a `postgres://` URL, [`TestCluster::shared`]
//! uses that server instead of starting one ([`TestCluster::existing`] does
//! the same for any URL). Each test's database, `t_<pid>_<n>_<random>`, is
//! created there (the role needs `CREATEDB`) and dropped again when its
//! [`TestDatabase`] is dropped, also when the test fails; only a process that
//! dies without unwinding (abort, `SIGKILL`) leaves its databases behind.
//! Passwords in these URLs never appear in the harness's errors, panics or
//! `Debug` output.
//!
//! # Cleanup of the servers it starts
//!
//! Cleanup does not rely on destructors, which do not run on abort, on
//! `SIGKILL` or for statics: every cluster gets a watchdog shell in its own
//! process group that blocks reading a pipe whose only write end lives in the
//! test process. However that process ends, the kernel closes the write end,
//! the watchdog's `read` returns, and it shuts the server down immediately and
//! deletes the temporary directory.
//!
//! `initdb`, `pg_ctl` and `postgres` refuse to run as root, so when the tests
//! run as root they are started as the `postgres` user (`CommandExt::uid`).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Longest wait for a server to start, stop or accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Free ports tried before a start gives up: another process may take the
/// port between our probe and the server's `bind`.
const PORT_ATTEMPTS: u32 = 5;
/// Settings of every cluster we start: fast rather than durable, room for
/// replication tests, and a log of every statement, in English.
const BASE_CONF: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "200"),
    ("max_prepared_transactions", "20"),
    ("wal_level", "replica"),
    ("max_wal_senders", "5"),
    ("log_statement", "all"),
    ("log_line_prefix", "%m [%p] db=%d app=%a "),
    ("log_min_messages", "warning"),
    ("lc_messages", "C"),
];
/// The watchdog (`$1` = temp root, `$2` = data dir). It ignores terminal
/// signals so that Ctrl-C reaches only the tests, then waits for end of file
/// on stdin. Then it finds the tools we started by their working directory,
/// which is in the temp root for all of them (`ours` prints their pids; a
/// zombie has none, so a dead postmaster awaiting a slow init counts as
/// gone). It sends the postmaster `SIGQUIT` (immediate shutdown, which also
/// ends its backends), kills whatever is left after 3 s (an `initdb` or
/// `pg_ctl` that was running, a stuck server), and deletes the directory only
/// when nothing can write into it any more.
const WATCHDOG: &str = r#"trap '' HUP INT
read -r _line
ours() {
  ls -l /proc/[0-9]*/cwd 2>/dev/null | sed -n 's|^.* /proc/\([0-9]*\)/cwd -> \(.*\)$|\1 \2|p' |
    while read -r pid dir; do
      case "$dir" in "$1" | "$1"/*)
        case "$(cat "/proc/$pid/comm" 2>/dev/null)" in initdb | pg_ctl | postgres | pgbouncer) echo "$pid" ;; esac
      esac
    done
}
i=0
while left=$(ours "$1") && [ -n "$left" ] && [ "$i" -lt 100 ]; do
  pm=$(head -n 1 "$2/postmaster.pid" 2>/dev/null)
  [ -n "$pm" ] && case " $(echo $left) " in *" $pm "*) kill -QUIT "$pm" ;; esac
  [ "$i" -ge 30 ] && kill -KILL $left 2>/dev/null
  sleep 0.1
  i=$((i + 1))
done
rm -rf "$1"
"#;

/// Process-wide counter that makes temp roots and database names unique.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Errors of the harness: a message saying what failed, with the end of the
/// server log when the server was involved.
#[derive(Debug)]
pub struct HarnessError(pub String);

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

/// Result of the harness's operations.
pub type HarnessResult<T> = Result<T, HarnessError>;

fn fail<T>(message: impl Into<String>) -> HarnessResult<T> {
    Err(HarnessError(message.into()))
}

/// Says what we were doing when an error happened, because a bare
/// "Permission denied" does not help.
trait Context<T> {
    fn ctx(self, what: impl fmt::Display) -> HarnessResult<T>;
}

/// The message carries the error's causes too: tokio-postgres says just
/// "db error" and keeps the server's message in the source.
impl<T, E: std::error::Error> Context<T> for Result<T, E> {
    fn ctx(self, what: impl fmt::Display) -> HarnessResult<T> {
        self.map_err(|e| {
            let mut message = format!("{what}: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                let text = c.to_string();
                if !message.ends_with(&text) {
                    message = format!("{message}: {text}");
                }
                cause = c.source();
            }
            HarnessError(message)
        })
    }
}

/// Settings for [`TestCluster::start`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Settings appended to `postgresql.conf` after the harness's own, so
    /// they override them. Values are quoted for you: write
    /// `("shared_buffers".into(), "16MB".into())`.
    pub extra_conf: Vec<(String, String)>,
    /// A server certificate and its private key (PEM) to serve TLS with
    /// (`ssl = on`); the harness writes them into the data directory with
    /// the permissions the server demands.
    pub tls: Option<(String, String)>,
}

/// A PostgreSQL server for tests: either a private cluster this process
/// started, or the existing server named by `DATABASE_URL` (see
/// [`TestCluster::shared`]).
///
/// Dropping a started cluster stops it and removes its files; the watchdog
/// does the same when the process ends without dropping it.
pub struct TestCluster {
    host: String,
    port: u16,
    /// `DATABASE_URL`, for an external server.
    external_url: Option<String>,
    /// Files and processes of a cluster we started; `None` when external.
    local: Option<Local>,
}

/// `Debug` without the password of an external server's URL.
impl fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCluster")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "external_url",
                &self.external_url.as_deref().map(redact_url),
            )
            .field("local", &self.local)
            .finish()
    }
}

/// A database created for one test by [`TestCluster::create_database`].
///
/// On a server the harness started, the database goes with the server. On
/// an external server (`DATABASE_URL`, [`TestCluster::existing`]) dropping
/// this handle drops the database (`DROP DATABASE … WITH (FORCE)`, after
/// rolling back transactions prepared in it), so a user's server does not
/// fill up with test databases. The drop blocks for a moment on a thread of
/// its own, which works inside and outside an async runtime; it cannot
/// fail the test, and says on stderr if it could not drop the database.
/// Not `Clone`, because there is one owner who decides when it goes; use
/// [`TestDatabase::keep`] for a database that must outlive the handle.
pub struct TestDatabase {
    /// The database name, `t_<pid>_<counter>_<random>`.
    pub name: String,
    /// Connection URL of the database as the superuser.
    pub url: String,
    /// The admin URL to drop the database through when this handle is
    /// dropped; `None` on a server we started, or after `keep`.
    drop_via: Option<String>,
}

impl TestDatabase {
    /// The URL with query parameters appended, e.g.
    /// `db.url_with("application_name=x&connect_timeout=5")`.
    pub fn url_with(&self, params: &str) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{separator}{params}", self.url)
    }

    /// Whether dropping this handle drops the database (it is on an
    /// external server and was not kept).
    pub fn drops_on_drop(&self) -> bool {
        self.drop_via.is_some()
    }

    /// Leaves the database in place when the handle goes and returns its
    /// URL: for a database that must outlive the handle, or to look at
    /// after a test. (A server the harness started still takes it along.)
    pub fn keep(mut self) -> String {
        self.drop_via = None;
        std::mem::take(&mut self.url)
    }
}

/// `Debug` without the password of the URL.
impl fmt::Debug for TestDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDatabase")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("drops_on_drop", &self.drops_on_drop())
            .finish()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(admin) = self.drop_via.take() else {
            return;
        };
        let (name, url) = (self.name.clone(), self.url.clone());
        let where_ = redact_url(&admin);
        let worker = thread::Builder::new()
            .name("pgassist-testing-dropdb".to_owned())
            .spawn(move || drop_database(&admin, &url, &name));
        let dropped = match worker {
            Ok(handle) => handle
                .join()
                .unwrap_or_else(|_| fail("dropping the database panicked")),
            Err(e) => fail(format!("starting a thread to drop the database: {e}")),
        };
        if let Err(e) = dropped {
            eprintln!(
                "pgassist-testing: could not drop test database {} via {where_}: {e}",
                self.name
            );
        }
    }
}

/// Drops database `name` through the admin URL, on a runtime of its own
/// (the caller may be inside a runtime, where `block_on` would panic).
/// Transactions prepared in the database would block the drop and can only
/// be rolled back from inside it (`url`); `WITH (FORCE)` (PostgreSQL 13+)
/// ends the sessions still connected, e.g. a pool the test did not close.
fn drop_database(admin: &str, url: &str, name: &str) -> HarnessResult<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ctx("building a runtime to drop the database")?;
    runtime.block_on(async {
        let work = async {
            let (client, connection) = connect(admin).await?;
            let gids = client
                .query(
                    "SELECT gid FROM pg_prepared_xacts WHERE database = $1",
                    &[&name],
                )
                .await;
            let dropped = match gids {
                Ok(rows) => {
                    let gids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    match rollback_prepared(url, &gids).await {
                        Ok(()) => force_drop(&client, name).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            drop(client);
            let _ = connection.await;
            dropped
        };
        tokio::time::timeout(READY_TIMEOUT, work)
            .await
            .ctx("timed out")?
            .ctx("dropping the database")
    })
}

/// Rolls back the prepared transactions `gids` from inside their database.
async fn rollback_prepared(url: &str, gids: &[String]) -> Result<(), tokio_postgres::Error> {
    if gids.is_empty() {
        return Ok(());
    }
    let (client, connection) = connect(url).await?;
    let mut rolled_back = Ok(());
    for gid in gids {
        let sql = format!("ROLLBACK PREPARED {}", quote_literal(gid));
        rolled_back = client.batch_execute(&sql).await;
        if rolled_back.is_err() {
            break;
        }
    }
    drop(client);
    let _ = connection.await;
    rolled_back
}

/// `DROP DATABASE … WITH (FORCE)`, or without `FORCE` on servers older
/// than 13, which do not know it.
async fn force_drop(client: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    let drop = format!("DROP DATABASE IF EXISTS {}", quote_ident(name));
    match client.batch_execute(&format!("{drop} WITH (FORCE)")).await {
        Err(e) if e.code() == Some(&SqlState::SYNTAX_ERROR) => client.batch_execute(&drop).await,
        done => done,
    }
}

/// Connects without TLS and drives the connection on a task; drop the
/// client, then await the task, to close the connection cleanly.
async fn connect(
    url: &str,
) -> Result<
    (
        Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    tokio_postgres::Error,
> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    Ok((client, tokio::spawn(connection)))
}

impl TestCluster {
    /// Creates and starts a new cluster, blocking until it accepts
    /// connections. Needs no async runtime, so it works from sync and async
    /// code alike.
    pub fn start(opts: ClusterOptions) -> HarnessResult<TestCluster> {
        Self::launch(|local| local.init_and_start(&opts))
    }

    /// A cluster in fresh directories, set up and started by `start` (which
    /// returns its port); on failure everything it left is stopped and removed.
    fn launch(start: impl FnOnce(&Local) -> HarnessResult<u16>) -> HarnessResult<TestCluster> {
        let local = Local::create()?;
        match start(&local) {
            Ok(port) => Ok(TestCluster {
                host: "127.0.0.1".to_owned(),
                port,
                external_url: None,
                local: Some(local),
            }),
            Err(e) => {
                local.shutdown();
                Err(e)
            }
        }
    }

    /// Starts a streaming hot standby of this cluster: a base backup taken
    /// with `pg_basebackup -R`, its own data directory, port, socket
    /// directory and log, and the same cleanup guarantees. Reads on it see
    /// the primary's commits once they are replayed
    /// (`pg_last_wal_replay_lsn()`); `SELECT pg_wal_replay_pause()` on the
    /// replica holds replay for read-your-writes tests.
    pub fn start_replica(&self) -> HarnessResult<TestCluster> {
        if self.local.is_none() {
            return fail("a replica needs a cluster started by the harness, not DATABASE_URL");
        }
        Self::launch(|local| local.init_replica(self.port, None))
    }

    /// Starts a *synchronous* streaming standby of this cluster, for
    /// failover tests where no acknowledged commit may be lost: the
    /// standby connects as `application_name = name` (in its
    /// `primary_conninfo`), and this cluster is then set (`ALTER SYSTEM`,
    /// reload) to `synchronous_standby_names = '"name"'` and
    /// `synchronous_commit = on`, so each commit is acknowledged only once
    /// the standby has flushed it. Returns once the primary lists the
    /// standby as `sync` in `pg_stat_replication`. `name` is letters,
    /// digits and `_`.
    pub fn start_sync_standby(&self, name: &str) -> HarnessResult<TestCluster> {
        if self.local.is_none() {
            return fail("a standby needs a cluster started by the harness, not DATABASE_URL");
        }
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return fail(format!("standby name {name:?}: letters, digits and _ only"));
        }
        let standby = Self::launch(|local| local.init_replica(self.port, Some(name)))?;
        // One statement each: ALTER SYSTEM cannot run in a transaction block,
        // which several statements in one simple query make.
        self.sql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '\"{name}\"'"
        ))?;
        self.sql("ALTER SYSTEM SET synchronous_commit = on")?;
        self.sql("SELECT pg_reload_conf()")?;
        let check = format!(
            "SELECT count(*) FROM pg_stat_replication \
             WHERE application_name = '{name}' AND sync_state = 'sync'"
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.sql(&check)? != "1" {
            if Instant::now() >= deadline {
                return fail(format!(
                    "standby {name} not synchronous after {READY_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(standby)
    }

    /// Promotes this standby to a primary (`pg_ctl promote`) and returns
    /// once `pg_is_in_recovery()` is false, i.e. it accepts writes.
    pub fn promote(&self) -> HarnessResult<()> {
        self.control("promote", &[])?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.sql("SELECT pg_is_in_recovery()")? != "f" {
            if Instant::now() >= deadline {
                return fail(format!("still in recovery {READY_TIMEOUT:?} after promote"));
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops the server the hard way (`pg_ctl stop -m immediate`: no
    /// checkpoint, connections cut), as a crash would; the files stay, so
    /// [`TestCluster::start_server`] can bring it back (with crash recovery).
    pub fn stop_immediate(&self) -> HarnessResult<()> {
        self.control("stop", &["-m", "immediate"])
    }

    /// Makes the server refuse writes without a restart, its open
    /// connections included (`ALTER SYSTEM SET default_transaction_read_only
    /// = on` and `pg_reload_conf()`): what a demoted primary looks like to a
    /// client that stayed connected. Each backend applies the reload before
    /// its next statement.
    pub fn make_read_only(&self) -> HarnessResult<()> {
        self.sql("ALTER SYSTEM SET default_transaction_read_only = on")?;
        self.sql("SELECT pg_reload_conf()").map(|_| ())
    }

    /// Runs `sql` (simple protocol; several statements run as one
    /// transaction, so `ALTER SYSTEM` must come alone) as the
    /// superuser on the `postgres` database, blocking, and returns the first
    /// column of the last row returned (empty if none). Works with or
    /// without an async runtime (it runs on a thread of its own).
    pub fn sql(&self, sql: &str) -> HarnessResult<String> {
        let url = self.admin_url();
        let sql = sql.to_owned();
        on_own_runtime("a statement", move || async move {
            let messages = tokio::time::timeout(READY_TIMEOUT, simple_query_once(&url, &sql))
                .await
                .ctx("running a statement")?
                .ctx(format!("running {sql:?}"))?;
            let last = messages.iter().rev().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).unwrap_or_default().to_owned())
                }
                _ => None,
            });
            Ok(last.unwrap_or_default())
        })
    }

    /// Starts PgBouncer (transaction pooling) in front of this cluster, if
    /// the `pgbouncer` binary is installed: `Ok(None)` when it is not. It
    /// runs as the `postgres` user when we are root (it refuses root), with
    /// its log and pid file in its own temp directory, and is stopped with
    /// the same watchdog guarantees as a cluster.
    pub fn start_pgbouncer(&self) -> HarnessResult<Option<PgBouncer>> {
        let Some(binary) = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
        else {
            return Ok(None);
        };
        let local = Local::create()?;
        let started = local.start_pgbouncer(binary, self.port);
        match started {
            Ok((port, child)) => Ok(Some(PgBouncer {
                port,
                local,
                child: Mutex::new(Some(child)),
            })),
            Err(e) => {
                local.shutdown();
                Err(e)
            }
        }
    }

    /// The cluster shared by all tests of this process, started on the first
    /// call; if `DATABASE_URL` is set, that server is used instead.
    ///
    /// # Panics
    /// If the cluster cannot be started (on every call, so each test that
    /// needs it fails with the reason, without trying again).
    pub fn shared() -> &'static TestCluster {
        static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();
        let shared = SHARED.get_or_init(|| {
            let cluster = match std::env::var("DATABASE_URL") {
                Ok(url) if !url.is_empty() => TestCluster::existing(url),
                _ => TestCluster::start(ClusterOptions::default()),
            };
            cluster.map_err(|e| e.0)
        });
        match shared {
            Ok(cluster) => cluster,
            Err(e) => panic!("pgassist-testing: no PostgreSQL server for the tests: {e}"),
        }
    }

    /// Wraps an existing server, as [`TestCluster::shared`] does with
    /// `DATABASE_URL`: nothing is started or stopped, and the databases
    /// [`TestCluster::create_database`] makes there are dropped again with
    /// their handles. The URL's role needs `CREATEDB`, and its database is
    /// replaced by `postgres` for administrative statements. It must be a
    /// `postgres://` URL so that [`TestCluster::url`] can swap its database
    /// name; a key/value string is refused without echoing it, since it may
    /// hold a password.
    pub fn existing(url: impl Into<String>) -> HarnessResult<TestCluster> {
        let url = url.into();
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return fail(
                "the server URL (DATABASE_URL) must start with postgres:// or postgresql:// \
                 (its value is not shown: it may hold a password)",
            );
        }
        let config: tokio_postgres::Config =
            url.parse().ctx(format!("parsing {}", redact_url(&url)))?;
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(dir)) => dir.to_string_lossy().into_owned(),
            None => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        Ok(TestCluster {
            host,
            port,
            external_url: Some(url),
            local: None,
        })
    }

    /// Whether this is the `DATABASE_URL` (or [`TestCluster::existing`])
    /// server rather than one we started.
    pub fn is_external(&self) -> bool {
        self.external_url.is_some()
    }

    /// Host name or address of the server.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// TCP port of the server.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser URL of database `dbname`; for an external server,
    /// `DATABASE_URL` with its database replaced.
    pub fn url(&self, dbname: &str) -> String {
        match &self.external_url {
            Some(url) => replace_dbname(url, dbname),
            None => format!("postgres://postgres@{}:{}/{dbname}", self.host, self.port),
        }
    }

    /// URL of the `postgres` database, for administrative statements.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// Creates an empty database for one test. Connects anew on each call,
    /// because a client is bound to the runtime that created it and every
    /// `#[tokio::test]` has its own runtime. The random part of the name
    /// avoids clashes with leftovers of an earlier run on an external server
    /// whose process had the same pid.
    pub async fn create_database(&self) -> HarnessResult<TestDatabase> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("t_{pid}_{n}_{:05x}", (now.subsec_nanos() >> 4) & 0xf_ffff);
        let admin = self.admin_url();
        let create = async {
            let (client, connection) = tokio_postgres::connect(&admin, NoTls).await?;
            let connection = tokio::spawn(connection);
            let created = client
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await;
            drop(client);
            let _ = connection.await;
            created
        };
        let what = format!("creating database {name} via {}", redact_url(&admin));
        tokio::time::timeout(READY_TIMEOUT, create)
            .await
            .ctx(&what)?
            .ctx(&what)?;
        Ok(TestDatabase {
            url: self.url(&name),
            name,
            drop_via: self.is_external().then_some(admin),
        })
    }

    /// The server log file; `None` for an external server.
    pub fn log_path(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.log.as_path())
    }

    /// Current size of the server log (0 for an external server): take it
    /// before an action and pass it to [`TestCluster::log_since`] to see only
    /// what the action logged.
    pub fn log_len(&self) -> u64 {
        self.local.as_ref().map_or(0, Local::log_len)
    }

    /// Log text written since `offset` (empty for an external server).
    /// Statements are logged before they run, so the text of a statement
    /// that has returned is already there.
    pub fn log_since(&self, offset: u64) -> String {
        self.local
            .as_ref()
            .map_or_else(String::new, |l| l.log_since(offset))
    }

    /// Restarts the server (`pg_ctl restart -m fast`) on the same port and
    /// waits until it accepts connections. Existing connections are cut, so
    /// tests that restart should use a cluster of their own.
    pub fn restart(&self) -> HarnessResult<()> {
        self.control("restart", &["-m", "fast"])
    }

    /// Stops the server (`pg_ctl stop -m fast`); the files stay, so
    /// [`TestCluster::start_server`] can bring it back.
    pub fn stop_server(&self) -> HarnessResult<()> {
        self.control("stop", &["-m", "fast"])
    }

    /// Starts a stopped server again on the same port and waits until it
    /// accepts connections.
    pub fn start_server(&self) -> HarnessResult<()> {
        self.control("start", &[])
    }

    /// Stops the server at once and removes all its files. Idempotent; does
    /// nothing for an external server.
    pub fn stop(&self) {
        if let Some(local) = &self.local {
            local.shutdown();
        }
    }

    /// The data directory; `None` for an external server.
    pub fn data_dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.data.as_path())
    }

    /// The Unix socket directory (outside the data directory); `None` for
    /// an external server.
    pub fn socket_dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.sock.as_path())
    }

    /// The PostgreSQL bin directory in use, for tools like `pg_basebackup`
    /// or `pgbench`; `None` for an external server.
    pub fn bin_dir(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.bin.as_path())
    }

    /// Runs `pg_ctl ACTION` and, unless stopping, waits for readiness. The
    /// lock makes concurrent calls take turns and refuses after `stop()`.
    fn control(&self, action: &str, args: &[&str]) -> HarnessResult<()> {
        let Some(local) = &self.local else {
            return fail(format!(
                "pg_ctl {action} is not available for the DATABASE_URL server"
            ));
        };
        let watchdog = local.lock();
        if watchdog.is_none() {
            return fail("the cluster was stopped");
        }
        local.pg_ctl(action, args)?;
        match action {
            "stop" => Ok(()),
            _ => local.wait_ready(self.port),
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// PgBouncer in transaction pooling mode in front of a [`TestCluster`].
#[derive(Debug)]
pub struct PgBouncer {
    port: u16,
    local: Local,
    child: Mutex<Option<Child>>,
}

impl PgBouncer {
    /// TCP port PgBouncer listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of database `dbname` through PgBouncer.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// PgBouncer's log file.
    pub fn log_path(&self) -> &Path {
        &self.local.log
    }

    /// Stops PgBouncer and removes its files (idempotent).
    pub fn stop(&self) {
        if let Some(mut child) = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.local.shutdown();
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A cluster this process created, under `root` = `/tmp/pgassist-<pid>-<n>`.
#[derive(Debug)]
struct Local {
    root: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    /// uid and gid to run the server tools as, when we are root.
    owner: Option<(u32, u32)>,
    /// `None` once stopped. Held during `pg_ctl` calls so that concurrent
    /// restarts, stops and starts take turns.
    watchdog: Mutex<Option<Watchdog>>,
}

/// The watchdog process and the write end of its pipe.
#[derive(Debug)]
struct Watchdog {
    child: Child,
    lifeline: ChildStdin,
}

impl Local {
    /// Creates the temp root and starts its watchdog before anything else, so
    /// that even a crash during `initdb` leaves nothing behind.
    fn create() -> HarnessResult<Local> {
        let bin = find_bin_dir()?;
        let owner = running_as_root().then(postgres_ids).transpose()?;
        // /tmp rather than $TMPDIR: the postgres user must reach it, and
        // socket paths are limited to about 100 bytes.
        let root = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let root = PathBuf::from(format!("/tmp/pgassist-{}-{n}", std::process::id()));
            match fs::create_dir(&root) {
                // Canonical, so the watchdog can compare it to /proc/PID/cwd.
                Ok(()) => break fs::canonicalize(&root).unwrap_or(root),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return fail(format!("creating {}: {e}", root.display())),
            }
        };
        let local = Local {
            data: root.join("data"),
            sock: root.join("sock"),
            log: root.join("postgres.log"),
            root,
            bin,
            owner,
            watchdog: Mutex::new(None),
        };
        if let Err(e) = local.prepare() {
            local.shutdown();
            return Err(e);
        }
        Ok(local)
    }

    /// Starts the watchdog, then creates the socket dir and the log file.
    /// The server appends to a log file that we create, so when we are root
    /// it must belong to the postgres user; it stays readable for everyone.
    fn prepare(&self) -> HarnessResult<()> {
        let mut child = Command::new("/bin/sh")
            .args(["-c", WATCHDOG, "pgassist-watchdog"])
            .arg(&self.root)
            .arg(&self.data)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ctx("starting the watchdog")?;
        let lifeline = child.stdin.take().expect("stdin is piped");
        *self.lock() = Some(Watchdog { child, lifeline });
        fs::create_dir(&self.sock).ctx("creating the socket directory")?;
        File::create(&self.log).ctx("creating the log file")?;
        let readable = fs::Permissions::from_mode(0o755);
        fs::set_permissions(&self.root, readable).ctx("chmod temp root")?;
        if let Some((uid, gid)) = self.owner {
            for path in [&self.root, &self.sock, &self.log] {
                chown(path, Some(uid), Some(gid)).ctx(format!("chown {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Runs `initdb`, writes the settings and starts the server, picking
    /// another port when the chosen one was taken meanwhile.
    fn init_and_start(&self, opts: &ClusterOptions) -> HarnessResult<u16> {
        let mut initdb = self.command("initdb");
        initdb.arg("-D").arg(&self.data).args([
            "--auth=trust",
            "--username=postgres",
            "--locale=C",
            "--encoding=UTF8",
            "--no-sync",
        ]);
        self.run(&mut initdb, Duration::from_secs(120))?;
        if let Some((cert, key)) = &opts.tls {
            self.install_tls(cert, key)?;
        }

        let sock = self.sock.to_string_lossy();
        let ours = BASE_CONF
            .iter()
            .copied()
            .chain([("unix_socket_directories", &*sock)]);
        let theirs = opts
            .extra_conf
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let mut conf = String::from("\n# pgassist-testing\n");
        for (key, value) in ours.chain(theirs) {
            conf.push_str(&format!("{key} = '{}'\n", value.replace('\'', "''")));
        }
        self.append_conf(&conf)?;
        self.start_on_free_port()
    }

    /// Makes this cluster a streaming hot standby of the server on
    /// `primary_port` (`pg_basebackup -R`: the standby signal file and
    /// `primary_conninfo` are written for us) and starts it; with a name,
    /// it connects to the primary as that `application_name` (for
    /// `synchronous_standby_names`).
    fn init_replica(&self, primary_port: u16, name: Option<&str>) -> HarnessResult<u16> {
        let mut backup = self.command("pg_basebackup");
        backup
            .arg("-D")
            .arg(&self.data)
            .args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(primary_port.to_string());
        self.run(&mut backup, Duration::from_secs(120))?;
        let sock = self.sock.to_string_lossy();
        self.append_conf(&format!(
            "\n# pgassist-testing replica\nunix_socket_directories = '{sock}'\nhot_standby = on\n"
        ))?;
        if let Some(name) = name {
            // postgresql.auto.conf is read last and its last line wins over
            // the one pg_basebackup -R wrote.
            let path = self.data.join("postgresql.auto.conf");
            let line = format!(
                "primary_conninfo = 'host=127.0.0.1 port={primary_port} user=postgres \
                 application_name={name}'\n"
            );
            let file = OpenOptions::new().append(true).open(&path);
            let written = file.and_then(|mut f| f.write_all(line.as_bytes()));
            written.ctx(format!("writing {}", path.display()))?;
        }
        self.start_on_free_port()
    }

    /// Starts the server on a free port, picking another one when the chosen
    /// port was taken between our probe and the server's `bind`.
    fn start_on_free_port(&self) -> HarnessResult<u16> {
        let mut attempts_left = PORT_ATTEMPTS;
        loop {
            let listener = std::net::TcpListener::bind("127.0.0.1:0");
            let port = listener
                .and_then(|l| l.local_addr())
                .ctx("finding a free port")?
                .port();
            // The last `port` line wins, so a retry just appends another.
            self.append_conf(&format!("port = {port}\n"))?;
            let offset = self.log_len();
            let started = self
                .pg_ctl("start", &[])
                .and_then(|()| self.wait_ready(port));
            attempts_left -= 1;
            let port_taken = || self.log_since(offset).contains("could not bind");
            if started.is_ok() || attempts_left == 0 || !port_taken() {
                return started.map(|()| port);
            }
        }
    }

    /// Writes the server certificate and key (the key readable by its
    /// owner only, as the server requires) and switches TLS on.
    fn install_tls(&self, cert: &str, key: &str) -> HarnessResult<()> {
        for (name, contents, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
            let path = self.data.join(name);
            fs::write(&path, contents).ctx(format!("writing {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).ctx("chmod")?;
            if let Some((uid, gid)) = self.owner {
                chown(&path, Some(uid), Some(gid)).ctx(format!("chown {}", path.display()))?;
            }
        }
        self.append_conf("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    }

    /// Writes a PgBouncer configuration for the server on `pg_port` and
    /// starts it on a free port (transaction pooling, trust auth on
    /// loopback), waiting until it answers.
    fn start_pgbouncer(&self, binary: &Path, pg_port: u16) -> HarnessResult<(u16, Child)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ctx("finding a free port")?
            .port();
        let root = self.root.display();
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={pg_port}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {root}/userlist.txt\n\
             pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = 10\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {root}/postgres.log\npidfile = {root}/pgbouncer.pid\n\
             admin_users = postgres\n"
        );
        let ini_path = self.root.join("pgbouncer.ini");
        fs::write(&ini_path, ini).ctx("writing pgbouncer.ini")?;
        fs::write(self.root.join("userlist.txt"), "\"postgres\" \"\"\n")
            .ctx("writing userlist.txt")?;
        if let Some((uid, gid)) = self.owner {
            for name in ["pgbouncer.ini", "userlist.txt"] {
                chown(self.root.join(name), Some(uid), Some(gid)).ctx("chown pgbouncer files")?;
            }
        }
        let mut cmd = Command::new(binary);
        cmd.arg(&ini_path)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().ctx("starting pgbouncer")?;
        match self.wait_ready(port) {
            Ok(()) => Ok((port, child)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    fn append_conf(&self, text: &str) -> HarnessResult<()> {
        let path = self.data.join("postgresql.conf");
        let file = OpenOptions::new().append(true).open(&path);
        let written = file.and_then(|mut f| f.write_all(text.as_bytes()));
        written.ctx(format!("writing {}", path.display()))
    }

    /// A command for one of the server tools: as the postgres user when we
    /// are root, in the C locale, from a directory that user can enter.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(&self.root)
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .env_remove("PGDATA");
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Runs `pg_ctl ACTION`, letting it wait 30 s; errors carry the log tail.
    fn pg_ctl(&self, action: &str, args: &[&str]) -> HarnessResult<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg(action)
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log);
        cmd.args(["-w", "-t", &READY_TIMEOUT.as_secs().to_string()])
            .args(args);
        let ran = self.run(&mut cmd, READY_TIMEOUT + Duration::from_secs(10));
        ran.map_err(|e| self.with_log_tail(e))
    }

    /// Runs a command to completion within `timeout`, killing it otherwise.
    /// Output goes to a file rather than a pipe, so nothing blocks on a full
    /// pipe while we poll. One file suffices: commands run one at a time
    /// (during `start`, or under the lock).
    fn run(&self, cmd: &mut Command, timeout: Duration) -> HarnessResult<()> {
        let what = format!("{:?}", cmd.get_program());
        let out_path = self.root.join("command.out");
        let out = File::create(&out_path).ctx("creating a command output file")?;
        let err = out.try_clone().ctx("duplicating a file handle")?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .ctx(&what)?;
        let status = wait_child(&mut child, timeout);
        let output = fs::read_to_string(&out_path).unwrap_or_default();
        let _ = fs::remove_file(&out_path);
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => fail(format!("{what} failed ({status}):\n{output}")),
            None => fail(format!(
                "{what} did not finish within {timeout:?}:\n{output}"
            )),
        }
    }

    /// Connects and runs `SELECT 1` until it works or 30 s have passed. Uses
    /// a current-thread runtime on its own thread, so it works both without
    /// a runtime and from inside one (where `block_on` would panic).
    fn wait_ready(&self, port: u16) -> HarnessResult<()> {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let ready = on_own_runtime("the readiness check", move || async move {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let attempt = simple_query_once(&url, "SELECT 1");
                let error = match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "connection attempt timed out".to_owned(),
                };
                if Instant::now() >= deadline {
                    return fail(format!("{url} not ready after {READY_TIMEOUT:?}: {error}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        ready.map_err(|e| self.with_log_tail(e))
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    fn log_since(&self, offset: u64) -> String {
        let read = File::open(&self.log).and_then(|mut file| {
            file.seek(SeekFrom::Start(offset))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(bytes)
        });
        String::from_utf8_lossy(&read.unwrap_or_default()).into_owned()
    }

    /// Adds the end of the server log, which says why a server failed.
    fn with_log_tail(&self, e: HarnessError) -> HarnessError {
        let log = self.log_since(self.log_len().saturating_sub(16 * 1024));
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        HarnessError(format!("{}\n--- end of server log ---\n{tail}", e.0))
    }

    fn lock(&self) -> MutexGuard<'_, Option<Watchdog>> {
        self.watchdog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the watchdog's pipe, which makes it stop the server and remove
    /// the files, and waits for it. Should the watchdog have died early, we
    /// stop the server ourselves rather than delete files under it.
    fn shutdown(&self) {
        if let Some(Watchdog {
            mut child,
            lifeline,
        }) = self.lock().take()
        {
            if !matches!(child.try_wait(), Ok(None)) {
                let _ = self.pg_ctl("stop", &["-m", "immediate"]);
            }
            drop(lifeline);
            wait_child(&mut child, Duration::from_secs(15));
        }
        // Normally gone already; not if the watchdog never started.
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// Runs the future `work` makes to completion on a current-thread runtime
/// on a thread of its own, so that it works both without a runtime and
/// from inside one (where `block_on` would panic).
fn on_own_runtime<T, F>(what: &str, work: impl FnOnce() -> F + Send + 'static) -> HarnessResult<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = HarnessResult<T>>,
{
    let context = format!("building a runtime for {what}");
    let run = move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ctx(context)?;
        runtime.block_on(work())
    };
    thread::spawn(run)
        .join()
        .unwrap_or_else(|_| fail(format!("{what} panicked")))
}

/// Connects to `url`, runs `sql` in the simple protocol and disconnects.
async fn simple_query_once(
    url: &str,
    sql: &str,
) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let connection = tokio::spawn(connection);
    let answered = client.simple_query(sql).await;
    drop(client);
    let _ = connection.await;
    answered
}

/// Waits for `child` at most `timeout`; kills it if it takes longer.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Ok(Some(status)) => return Some(status),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The bin dir of the newest `/usr/lib/postgresql/<version>` (Debian and
/// Ubuntu), else the first PATH entry with the server tools.
fn find_bin_dir() -> HarnessResult<PathBuf> {
    let has_tools = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|t| dir.join(t).is_file())
    };
    let versioned = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten();
    let newest = versioned
        .filter_map(|entry| {
            let name = entry.file_name();
            let parts = name.to_str()?.split('.').map(|part| part.parse().ok());
            let version = parts.collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_tools(bin))
        .max();
    if let Some((_, bin)) = newest {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    match std::env::split_paths(&path).find(|dir| has_tools(dir)) {
        Some(bin) => Ok(bin),
        None => fail("no initdb, pg_ctl and postgres in /usr/lib/postgresql/*/bin or on PATH"),
    }
}

/// Whether the effective uid is 0: `/proc/self` belongs to the effective
/// user, which spares us `libc` and `unsafe`.
fn running_as_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// uid and gid of the `postgres` user, from `/etc/passwd`.
fn postgres_ids() -> HarnessResult<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ctx("reading /etc/passwd")?;
    let ids = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != "postgres" {
            return None;
        }
        Some((fields.nth(1)?.parse().ok()?, fields.next()?.parse().ok()?))
    });
    match ids {
        Some(ids) => Ok(ids),
        None => fail("running as root, but there is no `postgres` user to run the server as"),
    }
}

/// Where the host part of a `postgres://` URL starts: after the scheme
/// and, like tokio-postgres reads it, after everything up to the first `@`
/// (so a password holding `/` or `?` is not taken for the path).
fn host_start(url: &str) -> usize {
    let authority = url.find("://").map_or(0, |i| i + 3);
    url[authority..]
        .find('@')
        .map_or(authority, |i| authority + i + 1)
}

/// `url` with its database (path) replaced by `dbname`, keeping the query.
fn replace_dbname(url: &str, dbname: &str) -> String {
    let host = host_start(url);
    let path = url[host..].find(['/', '?']).map_or(url.len(), |i| i + host);
    let query = url[path..].find('?').map_or("", |i| &url[path + i..]);
    format!("{}/{dbname}{query}", &url[..path])
}

/// `url` fit to print: the password of the user part and of a `password=`
/// query parameter replaced by `***`. Anything that is not a `postgres://`
/// URL is not shown at all.
fn redact_url(url: &str) -> String {
    let Some(scheme) = ["postgres://", "postgresql://"]
        .into_iter()
        .find(|s| url.starts_with(s))
    else {
        return "<not a postgres:// URL>".to_owned();
    };
    let host = host_start(url);
    let user_part = &url[scheme.len()..host];
    let user = match user_part.find(':') {
        Some(colon) => format!("{}:***@", &user_part[..colon]),
        None => user_part.to_owned(),
    };
    let rest = &url[host..];
    let rest = match rest.find('?') {
        None => rest.to_owned(),
        Some(q) => {
            let params: Vec<String> = rest[q + 1..]
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, _)) if percent_decode(key).eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            format!("{}?{}", &rest[..q], params.join("&"))
        }
    };
    format!("{scheme}{user}{rest}")
}

/// Percent-decoding, enough to recognise a parameter name.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.map(|h| u8::from_str_radix(h, 16)) {
            Some(Ok(byte)) if bytes[i] == b'%' => {
                out.push(byte);
                i += 3;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An SQL identifier in double quotes.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An SQL string literal that means the same whatever
/// `standard_conforming_strings` says: `E'…'` with `\` and `'` escaped.
fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-Pw";

    #[test]
    fn redacting_hides_the_password_of_the_user_part_and_of_the_query() {
        let cases = [
            (
                "postgres://alice:s3cr3t-Pw@db.example:5433/app?sslmode=require",
                "postgres://alice:***@db.example:5433/app?sslmode=require",
            ),
            // A password with / ? and : in it: tokio-postgres takes
            // everything up to the first @ as the user part.
            (
                "postgresql://bob:s3cr3t-Pw/x?y:z@h/db",
                "postgresql://bob:***@h/db",
            ),
            (
                "postgres://h/db?user=u&password=s3cr3t-Pw&application_name=a",
                "postgres://h/db?user=u&password=***&application_name=a",
            ),
            (
                "postgres://u@h?pass%77ord=s3cr3t-Pw",
                "postgres://u@h?pass%77ord=***",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "host=h password=s3cr3t-Pw dbname=x",
                "<not a postgres:// URL>",
            ),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn replacing_the_database_leaves_a_password_with_a_slash_alone() {
        assert_eq!(
            replace_dbname("postgres://u:pa/ss@h:5/old?sslmode=disable", "new"),
            "postgres://u:pa/ss@h:5/new?sslmode=disable"
        );
        assert_eq!(replace_dbname("postgres://h", "new"), "postgres://h/new");
        assert_eq!(
            replace_dbname("postgres://h?x=1", "new"),
            "postgres://h/new?x=1"
        );
    }

    #[test]
    fn a_url_with_a_password_does_not_show_it_in_debug_output() {
        let url = format!("postgres://alice:{SECRET}@127.0.0.1:1/app");
        let cluster = TestCluster::existing(&url).unwrap();
        assert!(cluster.is_external());
        let shown = format!("{cluster:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("alice:***@127.0.0.1:1"), "{shown}");

        let db = TestDatabase {
            name: "t_1".into(),
            url: cluster.url("t_1"),
            drop_via: None,
        };
        assert!(
            db.url.contains(SECRET),
            "the URL itself keeps it, to connect"
        );
        let shown = format!("{db:?}");
        assert!(!shown.contains(SECRET), "{shown}");
    }

    #[test]
    fn a_server_string_that_is_not_a_url_is_refused_without_echoing_it() {
        let e = TestCluster::existing(format!("host=h password={SECRET}")).unwrap_err();
        assert!(!e.to_string().contains(SECRET), "{e}");
        assert!(!format!("{e:?}").contains(SECRET), "{e:?}");
        let e = TestCluster::existing(format!("postgres://u:{SECRET}@h/db?port=x")).unwrap_err();
        assert!(
            e.to_string().contains("parsing postgres://u:***@h/db"),
            "{e}"
        );
        assert!(!e.to_string().contains(SECRET), "{e}");
    }

    /// A CREATE DATABASE that fails (nothing listens on port 1) used to
    /// print the URL with its password.
    #[tokio::test]
    async fn a_failed_create_database_does_not_print_the_password() {
        let cluster =
            TestCluster::existing(format!("postgres://alice:{SECRET}@127.0.0.1:1/app")).unwrap();
        let e = cluster.create_database().await.unwrap_err();
        let shown = format!("{e} / {e:?}");
        assert!(shown.contains("creating database t_"), "{shown}");
        assert!(shown.contains("alice:***@127.0.0.1:1/postgres"), "{shown}");
        assert!(!shown.contains(SECRET), "{shown}");
    }

    #[test]
    fn literals_and_identifiers_are_quoted() {
        assert_eq!(quote_literal(r"a'b\c"), r"E'a''b\\c'");
        assert_eq!(quote_ident(r#"x"y"#), r#""x""y""#);
    }
}
