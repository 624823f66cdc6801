//! Server-side faults (issue 3, items 4 and 5): backends killed with
//! `pg_terminate_backend`, the server restarted and stopped for seconds,
//! and the Jepsen-style bank test under all of that.
//!
//! This binary has a cluster of its own (`TestCluster::shared()` is per
//! process), and its tests take turns through `SERIAL`: a restart cuts
//! every connection of the cluster. Every await on pgassist is bounded
//! (`within`): no fault may make it hang.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Db, Rng, assert_pool_clean, commit_while_killed, env_u64, eventually, terminate_backends,
    within,
};
use pgassist::{Error, IsolationLevel, Registry, Session, TxOptions};
use pgassist_testing::TestCluster;

/// The tests of this binary run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Restart and stop need a cluster we started.
fn external() -> bool {
    let external = TestCluster::shared().is_external();
    if external {
        println!("skipped: needs a cluster of its own (DATABASE_URL is set)");
    }
    external
}

async fn cluster_op(
    what: &'static str,
    op: fn(&TestCluster) -> Result<(), pgassist_testing::HarnessError>,
) -> Duration {
    let started = Instant::now();
    let cluster = TestCluster::shared();
    within(
        Duration::from_secs(90),
        what,
        tokio::task::spawn_blocking(move || op(cluster)),
    )
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    started.elapsed()
}

/// A plain connection that may die with the server: reconnects on demand.
async fn plain_retrying(db: &Db) -> tokio_postgres::Client {
    for _ in 0..100 {
        if let Ok((client, conn)) = tokio_postgres::connect(&db.db.url, tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the server did not come back");
}

/// The errors a fault may cause: typed, never a panic or a hang.
fn assert_fault_error(what: &str, e: &Error) {
    let ok = match e {
        Error::Closed { .. } | Error::Connect { .. } | Error::PoolTimeout { .. } => true,
        Error::TransactionAborted { .. } | Error::CommitOutcomeUnknown { .. } => true,
        // The server's own word that it is terminating or starting up.
        Error::Db { .. } => e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("57P") || c.starts_with("08")
        }),
        _ => false,
    };
    assert!(ok, "{what}: not a fault error: {e:?}");
}

/// A transaction whose connection is gone cannot go on: its next statement
/// fails with a typed fault error (never a hang), and its commit with
/// `TransactionAborted`, which is returned.
async fn assert_transaction_lost(what: &str, tx: pgassist::Transaction<'static>) -> Error {
    let e = within(
        Duration::from_secs(5),
        what,
        tx.execute("INSERT INTO items(name) VALUES ('after the fault')", &[]),
    )
    .await
    .unwrap_err();
    assert_fault_error(what, &e);
    let e = within(Duration::from_secs(5), "commit", tx.commit())
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::TransactionAborted { .. }),
        "{what}: {e:?}"
    );
    e
}

/// Runs `SELECT 1` until it succeeds; every failure on the way must be a
/// typed fault error. Returns how long it took.
async fn time_to_heal(s: &Session) -> (Duration, Vec<String>) {
    let started = Instant::now();
    let mut errors = Vec::new();
    loop {
        match within(
            Duration::from_secs(10),
            "statement while healing",
            s.query("SELECT 1", &[]),
        )
        .await
        {
            Ok(_) => return (started.elapsed(), errors),
            Err(e) => {
                assert_fault_error("while healing", &e);
                errors.push(format!("{e}"));
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "never healed: {errors:#?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Opens `n` pooled connections at once.
/// A transaction that wrote a row named `name`, whose backend was then
/// terminated; returns it with that backend's pid.
/// A transaction that has inserted `name` into `items`, and the pid of
/// its backend.
async fn begin_with_insert(s: &Session, name: &str) -> (pgassist::Transaction<'static>, i32) {
    let tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ($1)", &[&name])
        .await
        .unwrap();
    let pid: i32 = tx
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    (tx, pid)
}

async fn begin_then_kill(
    s: &Session,
    plain: &tokio_postgres::Client,
    name: &str,
) -> (pgassist::Transaction<'static>, i32) {
    let (tx, pid) = begin_with_insert(s, name).await;
    plain
        .query("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    (tx, pid)
}

async fn warm(registry: &Registry, n: usize) {
    let mut all = Vec::new();
    for _ in 0..n {
        let s = registry.session("writer").unwrap();
        all.push(async move { s.query("SELECT pg_sleep(0.05)", &[]).await.unwrap() });
    }
    within(
        Duration::from_secs(10),
        "warm up",
        futures::future::join_all(all),
    )
    .await;
}

/// Backends killed with `pg_terminate_backend`: all idle pooled ones, one
/// in the middle of a transaction, one while COMMIT runs (a deferred
/// trigger makes it last). Typed errors, nothing committed that was not
/// acknowledged, and the pool heals by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backends_give_typed_errors_and_the_pool_heals() {
    let _serial = SERIAL.lock().await;
    let db = Db::new().await;
    let registry = db
        .registry(|c| c.max_size(4).connection_timeout(Duration::from_secs(2)))
        .await;
    let plain = db.plain().await;
    let s = registry.session("writer").unwrap();

    // All idle pooled connections killed.
    warm(&registry, 4).await;
    assert_eq!(db.backends().await.len(), 4);
    assert_eq!(terminate_backends(&plain, &db.app).await, 4);
    let (heal, errors) = time_to_heal(&s).await;
    println!(
        "killed 4 idle pooled backends: next statement ok after {heal:?}, errors on the way: {errors:?}"
    );
    assert!(heal < Duration::from_secs(2), "{heal:?}");
    for _ in 0..20 {
        within(
            Duration::from_secs(5),
            "statement",
            s.query("SELECT 1", &[]),
        )
        .await
        .expect("healed");
    }

    // One killed in the middle of a transaction.
    let t = registry.session("writer").unwrap();
    let (tx, pid) = begin_then_kill(&t, &plain, "doomed").await;
    eventually(Duration::from_secs(5), || {
        let plain = &plain;
        async move {
            plain
                .query("SELECT 1 FROM pg_stat_activity WHERE pid = $1", &[&pid])
                .await
                .unwrap()
                .is_empty()
        }
    })
    .await;
    let e = assert_transaction_lost("statement on a killed backend", tx).await;
    println!("killed mid-transaction: commit -> {e}");

    // One killed while idle in the transaction, then committed: COMMIT
    // cannot be sent, so the outcome is known: rolled back.
    let (tx, _) = begin_then_kill(&t, &plain, "idle when killed").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = within(Duration::from_secs(5), "commit", tx.commit())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::TransactionAborted { .. }), "{e:?}");

    // One killed while COMMIT runs a slow deferred trigger: the server
    // rolls back, and the client cannot know it: CommitOutcomeUnknown.
    plain
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON items \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow()",
        )
        .await
        .unwrap();
    let (tx, pid) = begin_with_insert(&t, "killed in commit").await;
    let r = commit_while_killed(&plain, pid, tx.commit()).await;
    assert!(
        matches!(r, Err(Error::CommitOutcomeUnknown { .. })),
        "{r:?}"
    );
    plain
        .batch_execute("DROP TRIGGER slow ON items")
        .await
        .unwrap();

    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
    assert_pool_clean(&db, &registry, 4).await;
    let (heal, _) = time_to_heal(&s).await;
    assert!(heal < Duration::from_secs(2));
    println!("stats after the kills: {:?}", registry.stats().engines[0]);
}

/// `pg_ctl restart -m fast` under a pool with idle connections and an open
/// transaction: typed errors, the transaction's work is gone, and the pool
/// heals by itself within a second or two of the server being back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_gives_typed_errors_and_the_pool_heals() {
    let _serial = SERIAL.lock().await;
    if external() {
        return;
    }
    let db = Db::new().await;
    let registry = db
        .registry(|c| c.max_size(4).connection_timeout(Duration::from_secs(2)))
        .await;
    let s = registry.session("writer").unwrap();
    warm(&registry, 4).await;
    let t = registry.session("writer").unwrap();
    let tx = t.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('before the restart')", &[])
        .await
        .unwrap();

    let took = cluster_op("restart", TestCluster::restart).await;
    let (heal, errors) = time_to_heal(&s).await;
    println!(
        "restart took {took:?}; the pool healed {heal:?} after the server was back; errors on the way: {errors:?}"
    );
    assert!(heal < Duration::from_secs(2), "{heal:?}");

    // The transaction that spanned the restart cannot commit.
    assert_transaction_lost("statement after the restart", tx).await;

    // A fresh transaction works, on the same registry.
    let tx = t.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('after the restart')", &[])
        .await
        .unwrap();
    within(Duration::from_secs(5), "commit", tx.commit())
        .await
        .unwrap();
    assert_eq!(db.plain_names().await, ["after the restart"]);
    assert_pool_clean(&db, &registry, 4).await;
}

/// The server down for 3 s: statements, transactions and the closure
/// form fail fast with `Connect` (bounded by connection_timeout), nothing
/// hangs, and the pool heals by itself once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_for_seconds_gives_connect_errors_and_the_pool_heals() {
    let _serial = SERIAL.lock().await;
    if external() {
        return;
    }
    let db = Db::new().await;
    let timeout = Duration::from_millis(500);
    let registry = db
        .registry(|c| c.max_size(4).connection_timeout(timeout))
        .await;
    let s = registry.session("writer").unwrap();
    let t = registry.session("writer").unwrap();
    warm(&registry, 4).await;
    // A second registry whose checkouts wait longer than the outage.
    let patient = db
        .registry(|c| c.max_size(2).connection_timeout(Duration::from_secs(20)))
        .await;
    warm(&patient, 2).await;

    cluster_op("stop", TestCluster::stop_server).await;
    let down = Instant::now();
    let mut pending = Vec::new();
    for _ in 0..4 {
        let s = patient.session("writer").unwrap();
        pending.push(tokio::spawn(async move {
            let r = s.query("SELECT 1", &[]).await;
            (r.map(|_| ()), Instant::now())
        }));
    }
    let (mut errors, mut slowest) = (BTreeMap::<String, u32>::new(), Duration::ZERO);
    while down.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        let e = within(
            Duration::from_secs(5),
            "statement",
            s.query("SELECT 1", &[]),
        )
        .await
        .unwrap_err();
        assert_fault_error("statement while down", &e);
        let begin = within(Duration::from_secs(5), "begin", t.begin()).await;
        let e2 = begin.map(|_| ()).unwrap_err();
        assert_fault_error("begin while down", &e2);
        let closure: Result<(), Error> = within(
            Duration::from_secs(5),
            "closure transaction",
            t.transaction(TxOptions::new().retries(3), |tx| {
                Box::pin(async move {
                    tx.execute("INSERT INTO items(name) VALUES ('never')", &[])
                        .await?;
                    Ok(())
                })
            }),
        )
        .await;
        let e3 = closure.unwrap_err();
        assert_fault_error("closure while down", &e3);
        slowest = slowest.max(started.elapsed() / 3);
        for e in [e, e2, e3] {
            let kind = format!("{e:?}");
            *errors
                .entry(kind.split([' ', '{', '(']).next().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert!(
        slowest < timeout + Duration::from_millis(1500),
        "a call took {slowest:?} with the server down"
    );
    assert!(errors.contains_key("Connect"), "{errors:?}");
    cluster_op("start", TestCluster::start_server).await;
    let back = Instant::now();
    let (heal, _) = time_to_heal(&s).await;
    // The statements that waited through the outage complete once it is back.
    let mut pending_heal = Duration::ZERO;
    for p in pending {
        let (r, at) = within(
            Duration::from_secs(25),
            "a statement waiting through the outage",
            p,
        )
        .await
        .unwrap();
        r.expect("a statement that waited through the outage");
        pending_heal = pending_heal.max(at.saturating_duration_since(back));
    }
    assert!(pending_heal < Duration::from_secs(2), "{pending_heal:?}");
    println!(
        "server down {:?}: errors {errors:?}, slowest call {slowest:?}; healed {heal:?} after it was back; \
         statements waiting through the outage done {pending_heal:?} after it was back",
        down.elapsed()
    );
    assert!(heal < Duration::from_secs(2), "{heal:?}");
    let tx = t.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('back')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.plain_names().await, ["back"]);
    assert!(registry.stats().engines[0].connect_errors > 0);
    assert_pool_clean(&db, &registry, 4).await;
}

// ---------------------------------------------------------------------------
// 5. The bank test
// ---------------------------------------------------------------------------

const ACCOUNTS: i32 = 10;
const START_BALANCE: i64 = 1000;
const TELLERS: u64 = 16;

/// How one transfer ended, as its caller saw it.
#[derive(Debug)]
enum Seen {
    Ok,
    Unknown,
    Failed(String),
}

/// Jepsen-style bank: 10 accounts, 16 tasks transferring random amounts
/// under SERIALIZABLE with retries, each transfer writing a ledger row in
/// the same transaction, while a fault task terminates a random backend of
/// ours every 100 ms and the server restarts once mid-run. At the end the
/// balances sum exactly to the start and match the ledger, every transfer
/// acknowledged Ok is in the ledger, and no transfer that failed with
/// anything but CommitOutcomeUnknown is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_transfers_survive_killed_backends_and_a_restart() {
    let _serial = SERIAL.lock().await;
    if external() {
        return;
    }
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute(&format!(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL); \
             INSERT INTO accounts SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) g; \
             CREATE TABLE ledger (transfer_id bigint PRIMARY KEY, src int NOT NULL, \
                                  dst int NOT NULL, amount bigint NOT NULL)"
        ))
        .await
        .unwrap();
    let registry = db
        .registry(|c| c.max_size(8).connection_timeout(Duration::from_secs(2)))
        .await;
    let run_for = Duration::from_secs(env_u64("PGASSIST_BANK_SECS", 10));
    let seed = Rng::seed("bank");
    let started = Instant::now();
    let deadline = started + run_for;
    let retried = Arc::new(AtomicU64::new(0));
    let restarted_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first_ok_after_restart: Arc<Mutex<Option<Instant>>> = Arc::default();

    let mut tellers = Vec::new();
    for t in 0..TELLERS {
        let s = registry.session("writer").unwrap();
        let mut rng = Rng::new(seed.wrapping_add(t * 7919));
        let retried = retried.clone();
        let (restarted_at, first_ok) = (restarted_at.clone(), first_ok_after_restart.clone());
        tellers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0_i64;
            while Instant::now() < deadline {
                n += 1;
                let transfer_id = t as i64 * 1_000_000 + n;
                let src = 1 + rng.below(ACCOUNTS as u64) as i32;
                let dst = 1 + (src as u64 + rng.below(ACCOUNTS as u64 - 1)) as i32 % ACCOUNTS;
                let amount = 1 + rng.below(100) as i64;
                let attempts = Arc::new(AtomicU32::new(0));
                let counted = attempts.clone();
                let r = within(
                    Duration::from_secs(60),
                    "a transfer",
                    s.transaction(
                        TxOptions::new()
                            .isolation(IsolationLevel::Serializable)
                            .retries(5),
                        move |tx| {
                            let attempts = counted.clone();
                            Box::pin(async move {
                                attempts.fetch_max(tx.attempt(), Ordering::Relaxed);
                                tx.execute(
                                    "UPDATE accounts SET balance = balance - $2 WHERE id = $1",
                                    &[&src, &amount],
                                )
                                .await?;
                                tx.execute(
                                    "UPDATE accounts SET balance = balance + $2 WHERE id = $1",
                                    &[&dst, &amount],
                                )
                                .await?;
                                tx.execute(
                                    "INSERT INTO ledger VALUES ($1, $2, $3, $4)",
                                    &[&transfer_id, &src, &dst, &amount],
                                )
                                .await?;
                                Ok::<_, Error>(())
                            })
                        },
                    ),
                )
                .await;
                retried.fetch_add(
                    (attempts.load(Ordering::Relaxed) > 1) as u64,
                    Ordering::Relaxed,
                );
                let outcome = match r {
                    Ok(()) => {
                        if let Some(at) = *restarted_at.lock().unwrap() {
                            first_ok
                                .lock()
                                .unwrap()
                                .get_or_insert(Instant::now().max(at));
                        }
                        Seen::Ok
                    }
                    Err(Error::CommitOutcomeUnknown { .. }) => Seen::Unknown,
                    Err(e) => {
                        assert_fault_error_or_retryable(&e);
                        Seen::Failed(kind(&e))
                    }
                };
                seen.push((transfer_id, outcome));
            }
            seen
        }));
    }

    // Faults: a random backend of ours terminated every 100 ms, and one
    // restart half way through.
    let killer = {
        let (db_url, app) = (db.db.url.clone(), db.app.clone());
        let mut rng = Rng::new(seed ^ 0xdead);
        tokio::spawn(async move {
            let mut kills = 0_u64;
            let mut client: Option<tokio_postgres::Client> = None;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = match tokio_postgres::connect(&db_url, tokio_postgres::NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            Some(c)
                        }
                        Err(_) => None,
                    };
                }
                let Some(c) = &client else { continue };
                let pids = c
                    .query(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                        &[&app],
                    )
                    .await;
                let Ok(pids) = pids else { continue };
                if pids.is_empty() {
                    continue;
                }
                let pid: i32 = pids[rng.below(pids.len() as u64) as usize].get(0);
                if let Ok(r) = c
                    .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                {
                    kills += r.get::<_, bool>(0) as u64;
                }
            }
            kills
        })
    };
    let restarter = {
        let restarted_at = restarted_at.clone();
        tokio::spawn(async move {
            tokio::time::sleep(run_for / 2).await;
            let took = cluster_op("restart", TestCluster::restart).await;
            *restarted_at.lock().unwrap() = Some(Instant::now());
            took
        })
    };

    let mut seen = Vec::new();
    for t in tellers {
        seen.extend(
            within(Duration::from_secs(120), "tellers", t)
                .await
                .unwrap(),
        );
    }
    let kills = killer.await.unwrap();
    let restart_took = restarter.await.unwrap();
    let heal = first_ok_after_restart
        .lock()
        .unwrap()
        .zip(*restarted_at.lock().unwrap())
        .map(|(ok, at)| ok - at);

    // The server's truth.
    let plain = plain_retrying(&db).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            registry.stats().open_transactions == 0
        })
        .await
    );
    db.wait_no_transactions().await;
    let balances: Vec<(i32, i64)> = plain
        .query("SELECT id, balance FROM accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ledger: Vec<(i64, i32, i32, i64)> = plain
        .query("SELECT transfer_id, src, dst, amount FROM ledger", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let total: i64 = balances.iter().map(|(_, b)| b).sum();
    assert_eq!(
        total,
        ACCOUNTS as i64 * START_BALANCE,
        "money was created or lost"
    );
    // Each balance is the start plus what the ledger says moved.
    let mut expected: HashMap<i32, i64> = (1..=ACCOUNTS).map(|a| (a, START_BALANCE)).collect();
    for &(_, src, dst, amount) in &ledger {
        *expected.get_mut(&src).unwrap() -= amount;
        *expected.get_mut(&dst).unwrap() += amount;
    }
    for (id, balance) in &balances {
        assert_eq!(
            expected[id], *balance,
            "account {id} disagrees with the ledger"
        );
    }
    let in_ledger: HashSet<i64> = ledger.iter().map(|l| l.0).collect();
    let (mut ok, mut unknown, mut unknown_committed) = (0, 0, 0);
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    for (id, outcome) in &seen {
        match outcome {
            Seen::Ok => {
                ok += 1;
                assert!(
                    in_ledger.contains(id),
                    "transfer {id} acknowledged but not in the ledger"
                );
            }
            Seen::Unknown => {
                unknown += 1;
                unknown_committed += in_ledger.contains(id) as u64;
            }
            Seen::Failed(kind) => {
                *failed.entry(kind.clone()).or_default() += 1;
                assert!(
                    !in_ledger.contains(id),
                    "transfer {id} failed ({kind}) but is in the ledger"
                );
            }
        }
    }
    assert!(
        in_ledger.len() as u64 <= ok + unknown_committed,
        "the ledger has transfers nobody was told about"
    );
    let failed_total: u64 = failed.values().sum();
    println!(
        "bank: {} transfers in {:.1?} by {TELLERS} tellers: {ok} ok, {failed_total} failed {failed:?}, \
         {unknown} unknown ({unknown_committed} of them committed), {} retried; \
         {kills} backends killed, 1 restart ({restart_took:.1?}), first Ok transfer {:.1?} after it; \
         balances sum to {total}",
        seen.len(),
        started.elapsed(),
        retried.load(Ordering::Relaxed),
        heal.unwrap_or_default(),
    );
    assert!(kills > 10, "the fault task did not bite: {kills} kills");
    assert!(ok > 100, "too few transfers went through: {ok}");
    assert!(heal.is_some_and(|h| h < Duration::from_secs(2)), "{heal:?}");
    assert_pool_clean(&db, &registry, 8).await;
}

fn kind(e: &Error) -> String {
    let kind = format!("{e:?}");
    let name = kind.split([' ', '{', '(']).next().unwrap().to_owned();
    match e.code() {
        Some(code) => format!("{name} {}", code.code()),
        None => name,
    }
}

/// A transfer may fail with a fault error, or with a serialization failure
/// or deadlock once its retries ran out.
fn assert_fault_error_or_retryable(e: &Error) {
    if !e.is_retryable() {
        assert_fault_error("transfer", e);
    }
}
