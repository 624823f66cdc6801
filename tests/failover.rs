//! Writers that follow the primary, on real servers: a primary with a
//! standby, a writer engine whose URL lists both hosts, writer tasks that
//! count what the server acknowledged, and the two ways a primary goes
//! away — it dies (`pg_ctl stop -m immediate`, then the standby is
//! promoted), or it stays up and turns read-only under the pool's open
//! connections after the standby was promoted. Plus host lists that hold a
//! host that does not exist or refuses, and one that holds no primary.
//!
//! Each test starts its own clusters (they are stopped, promoted and
//! diverge), so none uses the shared one.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgassist::{EngineConfig, Error, Registry};
use pgassist_testing::{ClusterOptions, TestCluster};

const TASKS: i32 = 8;
/// The generous bound on how long writes may take to resume.
const RESUME_BOUND: Duration = Duration::from_secs(30);

/// A plain connection outside pgassist, retried for a while: a standby's
/// copy of a new database appears only once it has been replayed.
async fn plain(url: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + RESUME_BOUND;
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                return client;
            }
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A registry with one writer engine on `url`.
async fn writer(url: &str, max_size: u32) -> Registry {
    let config = EngineConfig::from_url(url).unwrap().max_size(max_size);
    let config = config.connection_timeout(Duration::from_secs(5));
    Registry::builder()
        .engine("writer", config)
        .build()
        .await
        .unwrap()
}

/// What one writer task saw.
#[derive(Default, Debug)]
struct Seen {
    /// `n` of every insert the server acknowledged, with when.
    acked: Vec<(i32, Instant)>,
    /// `n` of transactions whose COMMIT got `CommitOutcomeUnknown`: the
    /// row may or may not be there.
    unknown: Vec<i32>,
    /// `n` of transactions that failed before COMMIT: never there.
    failed: Vec<i32>,
    /// Refusals with SQLSTATE 25006.
    read_only: usize,
    /// Other errors, by kind (the variant name).
    other: Vec<String>,
}

impl Seen {
    /// Counts an error that is not the outcome of a COMMIT.
    fn error(&mut self, e: Error) {
        assert!(!format!("{e} {e:?}").contains("hunter2"), "{e}");
        if let Error::ReadOnly { .. } = e {
            assert_eq!(e.code().map(|c| c.code()), Some("25006"));
            self.read_only += 1;
            return;
        }
        let kind = format!("{e:?}");
        let kind = kind.split([' ', '{', '(']).next().unwrap_or("");
        self.other.push(kind.to_owned());
    }
}

const INSERT: &str = "INSERT INTO acks(task, n) VALUES ($1, $2)";

/// Runs `TASKS` tasks inserting `(task, n)` rows through `registry`'s
/// writer until `stop` is set, and returns what each saw: even tasks in
/// autocommit, odd ones in explicit transactions (BEGIN, INSERT, COMMIT).
fn start_writers(
    registry: &Registry,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    (0..TASKS)
        .map(|task| {
            let session = registry.session("writer").unwrap();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let before = seen.other.len();
                    if task % 2 == 0 {
                        match session.execute(INSERT, &[&task, &n]).await {
                            Ok(1) => seen.acked.push((n, Instant::now())),
                            Ok(rows) => panic!("insert reported {rows} rows"),
                            Err(e) => seen.error(e),
                        }
                    } else {
                        let tx = match session.begin().await {
                            Ok(tx) => tx,
                            Err(e) => {
                                seen.error(e);
                                seen.failed.push(n);
                                continue;
                            }
                        };
                        if let Err(e) = tx.execute(INSERT, &[&task, &n]).await {
                            seen.error(e);
                            seen.failed.push(n);
                            drop(tx);
                        } else {
                            match tx.commit().await {
                                Ok(()) => seen.acked.push((n, Instant::now())),
                                Err(Error::CommitOutcomeUnknown { .. }) => seen.unknown.push(n),
                                Err(e) => {
                                    seen.error(e);
                                    seen.failed.push(n);
                                }
                            }
                        }
                    }
                    if seen.other.len() > before {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                seen
            })
        })
        .collect()
}

/// Checks each task's rows on the server that now holds them: every
/// acknowledged one is there, no transaction that failed before its
/// COMMIT left one, and nothing else is there but rows of a write whose
/// acknowledgement was cut off (an autocommit INSERT or a COMMIT in flight
/// when the connection died, both reported as errors). Returns the number
/// of acknowledged rows checked.
fn check_rows(seen: &[Seen], on_server: &[BTreeSet<i32>]) -> usize {
    let mut checked = 0;
    for (task, s) in seen.iter().enumerate() {
        for (n, _) in &s.acked {
            assert!(
                on_server[task].contains(n),
                "task {task}: acked row {n} lost"
            );
            checked += 1;
        }
        for n in &s.failed {
            assert!(
                !on_server[task].contains(n),
                "task {task}: row {n} of a transaction that failed before COMMIT is there"
            );
        }
    }
    checked
}

/// The acknowledged `n`s per task on the server at `url`.
async fn rows_on(url: &str) -> Vec<BTreeSet<i32>> {
    let client = plain(url).await;
    let mut per_task = vec![BTreeSet::new(); TASKS as usize];
    for row in client.query("SELECT task, n FROM acks", &[]).await.unwrap() {
        let task: i32 = row.get(0);
        per_task[task as usize].insert(row.get(1));
    }
    per_task
}

/// A primary with a synchronous standby, the `acks` table, and the URL of
/// a writer listing both (primary first) with a password the trust
/// authentication ignores, to check that no message shows it.
async fn pair(sync: bool) -> (TestCluster, TestCluster, String, String) {
    let primary = TestCluster::start(ClusterOptions::default()).unwrap();
    let standby = tokio::task::block_in_place(|| {
        if sync {
            primary.start_sync_standby("standby1")
        } else {
            primary.start_replica()
        }
    })
    .unwrap();
    let db = primary.create_database().await.unwrap();
    let db = db.name.clone();
    plain(&primary.url(&db))
        .await
        .batch_execute("CREATE TABLE acks (task int, n int, PRIMARY KEY (task, n))")
        .await
        .unwrap();
    // The standby has replayed the database and the table (replay may lag
    // behind even a synchronous standby's acknowledgement, which is flush).
    let deadline = Instant::now() + RESUME_BOUND;
    let on_standby = plain(&standby.url(&db)).await;
    while on_standby
        .query_one("SELECT to_regclass('acks') IS NULL", &[])
        .await
        .unwrap()
        .get::<_, bool>(0)
    {
        assert!(Instant::now() < deadline, "the standby never saw the table");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = format!(
        "postgres://postgres:hunter2@127.0.0.1:{},127.0.0.1:{}/{db}",
        primary.port(),
        standby.port()
    );
    (primary, standby, url, db)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + RESUME_BOUND;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The primary crashes and the synchronous standby is promoted: no
/// acknowledged write is lost, writes resume on the promoted server with
/// no `reinit`, and the time from promotion to the first write is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_follow_a_promoted_standby_after_a_crash() {
    let (primary, standby, url, db) = pair(true).await;
    let registry = writer(&url, 8).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&registry, &stop);
    tokio::time::sleep(Duration::from_millis(700)).await;

    tokio::task::block_in_place(|| primary.stop_immediate()).unwrap();
    // From here on no write can reach the old primary.
    let crashed = Instant::now();
    let promote_called = Instant::now();
    tokio::task::block_in_place(|| standby.promote()).unwrap();
    let promoted = Instant::now();
    // Writes resume: wait until the writer reaches the promoted server.
    let deadline = Instant::now() + RESUME_BOUND;
    loop {
        let s = registry.session("writer").unwrap();
        if s.query_one("SELECT 1", &[]).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection to the new primary"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for w in writers {
        seen.push(w.await.unwrap());
    }
    let first = seen
        .iter()
        .flat_map(|s| s.acked.iter().map(|(_, at)| *at))
        .filter(|at| *at > crashed)
        .min()
        .expect("a write acknowledged after the crash");

    // Every acknowledged row is on the promoted server.
    let on_new = rows_on(&standby.url(&db)).await;
    let acked_total = check_rows(&seen, &on_new);
    let unknown: usize = seen.iter().map(|s| s.unknown.len()).sum();
    for s in &seen {
        assert_eq!(s.read_only, 0, "a crash is no read-only refusal");
    }
    let after = seen
        .iter()
        .flat_map(|s| &s.acked)
        .filter(|(_, at)| *at > crashed)
        .count();
    assert!(after > 0);
    let errors: Vec<&String> = seen.iter().flat_map(|s| &s.other).collect();
    let stats = registry.stats();
    let w = stats.engine("writer").unwrap();
    // `promoted` is when the harness saw pg_is_in_recovery() false (it
    // polls every 10 ms), so a writer may beat it: then 0.
    println!(
        "failover: {acked_total} acknowledged writes checked on the promoted server \
         ({after} after the crash); first write {:?} after `pg_ctl promote` was called \
         ({:?} after promotion was seen, {:?} after the crash; promote took {:?}); \
         errors during the switch: {} {:?}, commits with unknown outcome: {unknown}; \
         connect_errors {}, discarded_closed {}, primary_switches {}",
        first.saturating_duration_since(promote_called),
        first.saturating_duration_since(promoted),
        first.saturating_duration_since(crashed),
        promoted.saturating_duration_since(promote_called),
        errors.len(),
        errors.iter().collect::<BTreeSet<_>>(),
        w.connect_errors,
        w.discarded_closed,
        w.primary_switches,
    );
    assert!(first.saturating_duration_since(promote_called) < RESUME_BOUND);
    // The dead primary's connections closed; nothing was refused as read-only.
    assert_eq!(w.primary_switches, 0);
    // Only typed, expected errors while the primary was gone (a
    // transaction whose connection died before COMMIT was sent is
    // `TransactionAborted`: rolled back, and `check_rows` saw no row).
    for e in errors {
        assert!(
            matches!(
                e.as_str(),
                "Closed" | "Connect" | "PoolTimeout" | "TransactionAborted"
            ),
            "unexpected error kind {e}"
        );
    }
}

/// The standby is promoted, then the old primary turns read-only while the
/// pool's connections to it stay open: at most one 25006 per pooled
/// connection, one pool switch, then writes land on the promoted server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_turned_read_only_under_live_connections_is_left() {
    const POOL: u32 = 4;
    let (old, new, url, db) = pair(false).await;
    let registry = writer(&url, POOL).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(&registry, &stop);
    let stats = || registry.stats().engine("writer").unwrap().clone();
    until("the pool to fill", || stats().connections == POOL).await;
    let old_client = plain(&old.url(&db)).await;
    let pids_before: BTreeSet<i32> = old_client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&db],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids_before.len(), POOL as usize);

    tokio::task::block_in_place(|| new.promote()).unwrap();
    let switched_at = Instant::now();
    tokio::task::block_in_place(|| old.make_read_only()).unwrap();
    let read_only_at = Instant::now();
    // Writes reach the promoted server.
    let new_client = plain(&new.url(&db)).await;
    let deadline = Instant::now() + RESUME_BOUND;
    let since = Instant::now();
    let count = "SELECT count(*) FROM acks";
    let base: i64 = new_client.query_one(count, &[]).await.unwrap().get(0);
    loop {
        let now: i64 = new_client.query_one(count, &[]).await.unwrap().get(0);
        if now > base + 100 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write reached the new primary"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let landed = since.elapsed();
    let landed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for w in writers {
        seen.push(w.await.unwrap());
    }
    let refusals: usize = seen.iter().map(|s| s.read_only).sum();
    let errors: Vec<&String> = seen.iter().flat_map(|s| &s.other).collect();
    let w = stats();
    println!(
        "demoted primary: {refusals} refusals (25006) for a pool of {POOL}, \
         primary_switches {}, other errors {:?}; 100 writes on the promoted server \
         {landed:?} after the old one turned read-only ({:?} after promotion)",
        w.primary_switches,
        errors,
        switched_at.elapsed(),
    );
    assert!(
        refusals <= POOL as usize,
        "{refusals} refusals for {POOL} connections"
    );
    assert_eq!(w.primary_switches, 1, "one switch, not one per refusal");
    assert!(errors.is_empty(), "{errors:?}");
    // The old primary's backends of the pool are gone (the pool dropped
    // them); every acknowledged write after the switch is on the new one.
    // (The servers diverged at the promotion: a row is on one or the other.)
    let on_new = rows_on(&new.url(&db)).await;
    let on_old = rows_on(&old.url(&db)).await;
    let both: Vec<BTreeSet<i32>> = on_new.iter().zip(&on_old).map(|(a, b)| a | b).collect();
    let checked = check_rows(&seen, &both);
    let on_new_after = seen
        .iter()
        .enumerate()
        .flat_map(|(task, s)| s.acked.iter().map(move |(n, at)| (task, n, at)))
        .filter(|(_, _, at)| **at > landed_at)
        .inspect(|(task, n, _)| assert!(on_new[*task].contains(n), "task {task}: {n}"))
        .count();
    // The first acknowledged write that only the new primary has.
    let first_on_new = seen
        .iter()
        .enumerate()
        .flat_map(|(task, s)| s.acked.iter().map(move |(n, at)| (task, n, at)))
        .filter(|(task, n, _)| on_new[*task].contains(n) && !on_old[*task].contains(n))
        .map(|(_, _, at)| *at)
        .min()
        .expect("a write on the new primary");
    println!(
        "{checked} acknowledged writes checked, {on_new_after} on the new primary; \
         first write there {:?} after the old primary turned read-only",
        first_on_new.saturating_duration_since(read_only_at)
    );
    assert!(on_new_after > 0);
    let left: i64 = old_client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
            &[&pids_before.iter().copied().collect::<Vec<_>>()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the old primary's pooled connections were closed");
}

/// Host lists an attacker (or a bad DNS day) could hand the writer: a host
/// that does not exist and a port nobody listens on, before the primary,
/// still give a working writer; a list with no primary gives a typed
/// `Connect` error within `connection_timeout` (no hang) that names the
/// hosts tried and never the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_lists_with_dead_hosts_and_without_a_primary() {
    let (primary, standby, _url, db) = pair(false).await;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!(
        "postgres://postgres:hunter2@no-such-host.invalid:5432,127.0.0.1:{closed_port},\
         127.0.0.1:{}/{db}",
        primary.port()
    );
    let registry = Registry::builder()
        .engine(
            "writer",
            EngineConfig::from_url(&url)
                .unwrap()
                .connection_timeout(Duration::from_secs(3)),
        )
        .build()
        .await
        .unwrap();
    let s = registry.session("writer").unwrap();
    s.execute("INSERT INTO acks VALUES (0, 1)", &[])
        .await
        .unwrap();
    let recovery: bool = s
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!recovery);

    // No primary: the standby (read-only), a refused port, an unknown host.
    let url = format!(
        "postgres://postgres:hunter2@127.0.0.1:{},127.0.0.1:{closed_port},\
         no-such-host.invalid:5432/{db}",
        standby.port()
    );
    let timeout = Duration::from_secs(2);
    let registry = Registry::builder()
        .engine(
            "writer",
            EngineConfig::from_url(&url)
                .unwrap()
                .connection_timeout(timeout),
        )
        .lazy()
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let err = registry
        .session("writer")
        .unwrap()
        .execute("INSERT INTO acks VALUES (0, 2)", &[])
        .await
        .unwrap_err();
    let took = started.elapsed();
    let text = format!("{err} {err:?}");
    println!("no primary: {took:?}: {err}");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", standby.port())) && text.contains("no-such-host"),
        "{text}"
    );
    // Retried (transient) up to the timeout, not failed at once on the
    // unknown last host, and no hang beyond it.
    assert!(took >= timeout - Duration::from_millis(100), "{took:?}");
    assert!(took < timeout + Duration::from_secs(5), "{took:?}");

    // A READ ONLY transaction of the caller's on a healthy primary gets
    // 25006 too: that is no switch.
    let registry = Registry::builder()
        .engine(
            "writer",
            EngineConfig::from_url(&format!(
                "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}",
                primary.port(),
                standby.port()
            ))
            .unwrap(),
        )
        .build()
        .await
        .unwrap();
    let writer = registry.session("writer").unwrap();
    let tx = writer
        .begin_with(pgassist::TxOptions::new().read_only(true))
        .await
        .unwrap();
    let err = tx
        .execute("INSERT INTO acks VALUES (0, 3)", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
    drop(tx);
    writer
        .execute("INSERT INTO acks VALUES (0, 4)", &[])
        .await
        .unwrap();
    let stats = registry.stats();
    assert_eq!(stats.engine("writer").unwrap().primary_switches, 0);

    // An engine declared read-only gets 25006 by design: no switch either.
    let registry = Registry::builder()
        .engine(
            "reader",
            EngineConfig::from_url(&primary.url(&db))
                .unwrap()
                .read_only(true),
        )
        .build()
        .await
        .unwrap();
    let err = registry
        .session("reader")
        .unwrap()
        .execute("INSERT INTO acks VALUES (0, 5)", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
    assert_eq!(
        registry.stats().engine("reader").unwrap().primary_switches,
        0
    );
}
