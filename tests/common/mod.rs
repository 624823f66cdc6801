//! Shared test fixtures: a fresh database per test on the harness's cluster,
//! a plain second connection, and readers for the server's log and
//! `pg_stat_activity`.
#![allow(dead_code)]

use std::time::Duration;

use pgassist::{EngineConfig, Registry};
use pgassist_testing::{TestCluster, TestDatabase};

/// One test's database, with an `items` table.
pub struct Db {
    pub cluster: &'static TestCluster,
    pub db: TestDatabase,
    /// application_name of every pgassist connection of this test.
    pub app: String,
}

impl Db {
    pub async fn new() -> Db {
        let cluster = TestCluster::shared();
        let db = cluster
            .create_database()
            .await
            .expect("create test database");
        let app = format!("pgassist_{}", db.name);
        let this = Db { cluster, db, app };
        this.plain()
            .await
            .batch_execute("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL)")
            .await
            .unwrap();
        this
    }

    pub fn config(&self) -> EngineConfig {
        EngineConfig::from_url(&self.db.url)
            .unwrap()
            .application_name(&self.app)
    }

    /// A registry with one engine, "writer", on this database.
    pub async fn registry(&self, tune: impl FnOnce(EngineConfig) -> EngineConfig) -> Registry {
        Registry::builder()
            .engine("writer", tune(self.config()))
            .build()
            .await
            .unwrap()
    }

    /// writer (default), read-only reader and logger, all on this database.
    pub async fn three_engines(&self) -> Registry {
        self.three_engines_builder().build().await.unwrap()
    }

    /// What [`Db::three_engines`] builds, to tune first (say `.lazy()`).
    pub fn three_engines_builder(&self) -> pgassist::RegistryBuilder {
        Registry::builder()
            .engine("writer", self.config())
            .engine("reader", self.config().read_only(true))
            .engine("logger", self.config())
            .default_engine("writer")
    }

    /// A plain tokio-postgres connection, outside pgassist.
    pub async fn plain(&self) -> tokio_postgres::Client {
        plain_at(&self.db.url).await
    }

    pub async fn plain_count(&self, sql: &str) -> i64 {
        self.plain().await.query_one(sql, &[]).await.unwrap().get(0)
    }

    pub async fn plain_names(&self) -> Vec<String> {
        let rows = self
            .plain()
            .await
            .query("SELECT name FROM items ORDER BY name", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Whether the server log can be read (not with an external `DATABASE_URL`).
    pub fn has_log(&self) -> bool {
        self.cluster.log_path().is_some()
    }

    pub fn log_offset(&self) -> u64 {
        self.cluster.log_len()
    }

    /// Statements the server logged for this test's database since `from`.
    pub fn statements_since(&self, from: u64) -> Vec<String> {
        let tag = format!("db={} ", self.db.name);
        self.cluster
            .log_since(from)
            .lines()
            .filter(|l| l.contains(&tag) && (l.contains("statement: ") || l.contains("execute ")))
            .map(str::to_owned)
            .collect()
    }

    /// (pid, state) of this test's pgassist backends.
    pub async fn backends(&self) -> Vec<(i32, String)> {
        let rows = self
            .plain()
            .await
            .query(
                "SELECT pid, coalesce(state, '') FROM pg_stat_activity WHERE application_name = $1",
                &[&self.app],
            )
            .await
            .unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }

    /// Waits (bounded) until no backend of ours is idle in transaction.
    pub async fn wait_no_transactions(&self) {
        for _ in 0..200 {
            if in_transaction_backends(self).await == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "backends left in a transaction: {:?}",
            self.backends().await
        );
    }
}

/// Advisory locks held by anyone on this test's database, seen from a
/// second plain connection.
pub async fn advisory_locks(db: &Db) -> i64 {
    db.plain_count(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND d.datname = current_database()",
    )
    .await
}

/// Backends of ours that the server shows inside a transaction.
pub async fn in_transaction_backends(db: &Db) -> usize {
    db.backends()
        .await
        .iter()
        .filter(|(_, s)| s.starts_with("idle in transaction"))
        .count()
}

pub mod proxy;
pub mod users_api;

/// A plain tokio-postgres connection to `url`, outside pgassist.
pub async fn plain_at(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Awaits `fut`, failing the test if it takes longer than `limit`: nothing
/// in these tests may hang.
pub async fn within<F: std::future::Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {limit:?} (hang)"),
    }
}

/// Polls `cond` every 10 ms until it holds; false if `limit` passed first.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A small deterministic PRNG (splitmix64), so a failing run can be
/// repeated from its printed seed (`PGASSIST_SEED`).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A seed from `PGASSIST_SEED` or the clock, printed for reproduction.
    pub fn seed(test: &str) -> u64 {
        let seed = std::env::var("PGASSIST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        println!("{test}: PGASSIST_SEED={seed}");
        seed
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// Environment override for a test's size, e.g. `PGASSIST_CANCEL_ITERS`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Terminates backends of ours (by application_name) with
/// `pg_terminate_backend`; returns how many were signalled.
pub async fn terminate_backends(client: &tokio_postgres::Client, app: &str) -> u64 {
    let rows = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64
}

/// The strongest check that a pool holds nothing dirty: checks out every
/// connection the pool can hold at once (`max_size` concurrent VACUUMs that
/// queue behind a lock we hold, so each needs a connection of its own) and
/// has each run VACUUM, which fails inside a transaction block. Also waits
/// until the server shows no backend of ours in a transaction and the
/// connection map is empty. The VACUUMs run on an empty table of their own,
/// so that none has work to do (truncating a churned table makes each wait
/// for the others' lock requests).
pub async fn assert_pool_clean(db: &Db, registry: &Registry, max_size: usize) {
    let table = "pgassist_probe";
    db.wait_no_transactions().await;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            registry.stats().open_transactions == 0
        })
        .await,
        "transactions left open in the connection map: {:?}",
        registry.stats()
    );
    let locker = db.plain().await;
    locker
        .batch_execute(&format!("CREATE TABLE IF NOT EXISTS {table} ()"))
        .await
        .unwrap();
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {table} IN SHARE UPDATE EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
    let mut vacuums = Vec::new();
    for _ in 0..max_size {
        let s = registry.session("writer").unwrap();
        let sql = format!("VACUUM {table}");
        vacuums.push(tokio::spawn(async move { s.batch_execute(&sql).await }));
    }
    // Wait until all of them queue on the lock (one connection each), or
    // one of them ended early (an error: it ran inside a transaction).
    let (app, watcher) = (&db.app, &db.plain().await);
    let running = &vacuums;
    let queued = eventually(Duration::from_secs(5), || async move {
        if running.iter().any(|v| v.is_finished()) {
            return true;
        }
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                 AND wait_event_type = 'Lock' AND query LIKE 'VACUUM%'",
                &[app],
            )
            .await
            .unwrap()
            .get(0);
        waiting as usize == max_size
    })
    .await;
    if !queued {
        println!(
            "not all VACUUMs queued: {:#?}\n{:#?}",
            activity(watcher).await,
            registry.stats()
        );
    }
    locker.batch_execute("COMMIT").await.unwrap();
    for v in vacuums {
        let done = tokio::time::timeout(Duration::from_secs(10), v).await;
        let Ok(done) = done else {
            panic!(
                "VACUUM through the pool hangs: {:#?}\n{:#?}",
                activity(watcher).await,
                registry.stats()
            );
        };
        done.unwrap()
            .expect("a pooled connection ran its next statement inside a transaction");
    }
}

/// Every backend of the server but ours, for diagnostics.
pub async fn activity(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT format('%s pid=%s app=%s state=%s wait=%s/%s xact=%s query=%s', \
             datname, pid, application_name, state, wait_event_type, wait_event, \
             xact_start, left(query, 80)) \
             FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// What the server saw when a client disconnected mid-request.
pub struct Disconnect {
    /// When the client's request was dropped.
    pub gave_up: std::time::Instant,
    /// The counter after a plain `+10` that had queued on the request's row lock.
    pub counter: i32,
    /// From `gave_up` until that row lock was released.
    pub lock_released: Duration,
    /// From `gave_up` until no backend of ours was idle in transaction.
    pub clean: Duration,
}

/// A handler's writes in the request's transactions: an `items` row
/// `{name}-writer` through the writer and `{name}-logger` through the logger.
pub async fn insert_on_writer_and_logger(db: &pgassist::Sessions, name: &str) {
    for engine in ["writer", "logger"] {
        db.get(engine)
            .unwrap()
            .execute(
                "INSERT INTO items(name) VALUES ($1)",
                &[&format!("{name}-{engine}")],
            )
            .await
            .unwrap();
    }
}

/// The handler side of [`disconnect_mid_request`]: a handler that updates
/// `counters` row 1 in the request's transaction, says so, then "works" for
/// 30 s, longer than any client waits. Cheap to clone into a route.
#[derive(Clone)]
pub struct SlowHandler {
    updated: std::sync::Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
    done: tokio::sync::mpsc::UnboundedSender<bool>,
}

/// The test's side of a [`SlowHandler`]: how the handler ended.
pub struct SlowHandlerProbe {
    done: tokio::sync::mpsc::UnboundedReceiver<bool>,
}

impl SlowHandler {
    /// Creates the `counters` table (row 1 at 0) and the handler with its
    /// probes: the receiver fires once the first request's UPDATE has run
    /// (pg_stat_activity alone cannot tell: the backend shows "idle in
    /// transaction" between the lazy BEGIN and the UPDATE).
    pub async fn setup(
        db: &Db,
    ) -> (
        SlowHandler,
        tokio::sync::oneshot::Receiver<()>,
        SlowHandlerProbe,
    ) {
        db.plain()
            .await
            .batch_execute(
                "CREATE TABLE counters (id int PRIMARY KEY, n int NOT NULL); \
                 INSERT INTO counters VALUES (1, 0)",
            )
            .await
            .unwrap();
        let (updated_tx, updated) = tokio::sync::oneshot::channel();
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        let handler = SlowHandler {
            updated: std::sync::Arc::new(std::sync::Mutex::new(Some(updated_tx))),
            done: done_tx,
        };
        (handler, updated, SlowHandlerProbe { done })
    }

    /// The handler's body; the probe learns whether it ran to its end or
    /// was dropped on the way.
    pub async fn run(&self, db: &pgassist::Sessions) {
        struct Completion(Option<tokio::sync::mpsc::UnboundedSender<bool>>);
        impl Drop for Completion {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(false);
                }
            }
        }
        let mut completion = Completion(Some(self.done.clone()));
        db.writer()
            .unwrap()
            .execute("UPDATE counters SET n = n + 1 WHERE id = 1", &[])
            .await
            .unwrap();
        if let Some(tx) = self.updated.lock().unwrap().take() {
            let _ = tx.send(());
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        let _ = completion.0.take().unwrap().send(true);
    }
}

impl SlowHandlerProbe {
    /// Whether the handler ran to its end (false: its future was dropped).
    pub async fn completed(&mut self) -> bool {
        within(Duration::from_secs(5), "handler outcome", self.done.recv())
            .await
            .expect("the handler reports its outcome")
    }
}

/// The server side of a client that disconnects mid-request. The handler
/// has updated `counters` row 1 inside the request's transaction and sent
/// `updated`; this checks the request holds its transaction, queues a plain
/// `+10` on that row lock, drops the client's request, and measures (within
/// `limit`) when the lock is released and nothing of ours is left idle in
/// transaction.
pub async fn disconnect_mid_request<T: std::fmt::Debug + Send + 'static>(
    db: &Db,
    request: tokio::task::JoinHandle<T>,
    updated: tokio::sync::oneshot::Receiver<()>,
    limit: Duration,
) -> Disconnect {
    use std::time::Instant;
    tokio::time::timeout(Duration::from_secs(10), updated)
        .await
        .expect("the handler never updated")
        .unwrap();
    assert_eq!(
        in_transaction_backends(db).await,
        1,
        "the request holds its transaction"
    );
    // A second connection queues on the row lock the request holds.
    let plain = db.plain().await;
    let waiter = tokio::spawn(async move {
        plain
            .query_one(
                "UPDATE counters SET n = n + 10 WHERE id = 1 RETURNING n",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i32>(0)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the row is locked by the request");

    // The client gives up: its request future is dropped, closing the socket.
    let gave_up = Instant::now();
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    let counter = tokio::time::timeout(limit, waiter)
        .await
        .expect("the row lock was released")
        .unwrap();
    let lock_released = gave_up.elapsed();
    while in_transaction_backends(db).await > 0 {
        assert!(gave_up.elapsed() < limit, "{:?}", db.backends().await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Disconnect {
        gave_up,
        counter,
        lock_released,
        clean: gave_up.elapsed(),
    }
}

/// A hot standby of the shared cluster that has replayed this test's
/// database (its `items` table), with that database's URL on it; `None`
/// when the tests run against DATABASE_URL, next to which no standby can
/// be started.
pub async fn replica_with_test_db(db: &Db) -> Option<(TestCluster, String)> {
    if db.cluster.is_external() {
        eprintln!("DATABASE_URL is set: no replica can be started next to it; skipping");
        return None;
    }
    let replica = db.cluster.start_replica().expect("start a hot standby");
    let url = replica.url(&db.db.name);
    let replayed = eventually(Duration::from_secs(20), || async {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                c.query_one("SELECT count(*) FROM items", &[]).await.is_ok()
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(replayed, "the replica never had the test database");
    Some((replica, url))
}

/// A registry of `writer` (this test's database, configured as `writer`
/// says) and `replica` (a hot standby of it, `replica_of("writer")`), with
/// the standby and its URL on the test database; `None` as for
/// [`replica_with_test_db`].
pub async fn writer_and_replica(
    db: &Db,
    writer: EngineConfig,
) -> Option<(Registry, TestCluster, String)> {
    let (replica, replica_url) = replica_with_test_db(db).await?;
    let registry = Registry::builder()
        .engine("writer", writer)
        .engine(
            "replica",
            EngineConfig::from_url(&replica_url)
                .unwrap()
                .application_name(&db.app)
                .replica_of("writer")
                .connection_timeout(Duration::from_millis(500)),
        )
        .build()
        .await
        .unwrap();
    Some((registry, replica, replica_url))
}

/// Where a read was served: (by a standby?, rows in items).
pub async fn served_by(s: &pgassist::Session) -> (bool, i64) {
    let row = s
        .query_one(
            "SELECT pg_is_in_recovery(), (SELECT count(*) FROM items)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Pauses the standby at `url`'s replay, so that it cannot have any write
/// made after this; returns the connection to resume it with.
pub async fn pause_replay(url: &str) -> tokio_postgres::Client {
    let control = plain_at(url).await;
    control
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    control
}

/// A config whose `connection_timeout` (30 s) is far above any fail-fast
/// bound, so a retried failure cannot pass for a fast one.
pub fn slow_to_give_up(url: &str) -> EngineConfig {
    EngineConfig::from_url(url)
        .unwrap()
        .connection_timeout(Duration::from_secs(30))
}

/// Builds a registry on `url`, lazily or checked, and times the first
/// failure: the build's own, or the first statement's.
pub async fn first_failure(url: &str, lazy: bool) -> (pgassist::Error, Duration) {
    let started = std::time::Instant::now();
    let builder = Registry::builder().engine("db", slow_to_give_up(url));
    let builder = if lazy { builder.lazy() } else { builder };
    let err = match builder.build().await {
        Err(e) => e,
        Ok(registry) => {
            assert!(lazy, "a checked build must fail");
            registry
                .session("db")
                .unwrap()
                .query("SELECT 1", &[])
                .await
                .unwrap_err()
        }
    };
    (err, started.elapsed())
}

/// Runs `commit` while a second connection terminates backend `pid` once
/// the server shows it running the COMMIT (held up by a slow deferred
/// trigger), and returns the commit's result.
pub async fn commit_while_killed<F>(
    plain: &tokio_postgres::Client,
    pid: i32,
    commit: F,
) -> pgassist::Result<()>
where
    F: std::future::Future<Output = pgassist::Result<()>>,
{
    let killer = async {
        // Killed once the server runs the COMMIT (its deferred trigger),
        // not after a fixed delay a loaded machine could outrun.
        let committing = eventually(Duration::from_secs(5), || async {
            plain
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity \
                     WHERE pid = $1 AND state = 'active' AND query ILIKE '%COMMIT%'",
                    &[&pid],
                )
                .await
                .unwrap()
                .is_some()
        })
        .await;
        assert!(committing, "the COMMIT never reached the server");
        plain
            .query("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
    };
    let (r, ()) = within(Duration::from_secs(10), "commit", async {
        tokio::join!(commit, killer)
    })
    .await;
    r
}
