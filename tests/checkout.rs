//! The checkout fast path: clean connections parked in front of bb8 (the
//! ready stack) must never strand a checkout waiting in bb8, never hand out
//! a dirty connection, and must not keep bb8 from retiring old connections.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Db, Rng, assert_pool_clean, env_u64, within};
use pgassist::{Error, TxOptions};

/// Many more tasks than connections, each mixing autocommit statements,
/// transactions and futures dropped mid-flight, on a pool of two with a
/// short checkout timeout: a connection parked while a checkout waits in
/// bb8 would leave that checkout to time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_never_strand_a_waiting_checkout() {
    let db = Db::new().await;
    let registry = db
        .registry(|c| c.max_size(2).connection_timeout(Duration::from_secs(3)))
        .await;
    create_counter(&db).await;
    let seed = Rng::seed("parked_connections_never_strand_a_waiting_checkout");
    let iters = env_u64("PGASSIST_PARK_ITERS", 150);
    let committed = Arc::new(AtomicU64::new(0));
    let cut_off = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..24u64 {
        let session = registry.session("writer").unwrap();
        let (committed, cut_off) = (committed.clone(), cut_off.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ t);
            for _ in 0..iters {
                match rng.below(4) {
                    0 | 1 => {
                        let row = session.query_one("SELECT 1::int", &[]).await?;
                        assert_eq!(row.get::<_, i32>(0), 1);
                    }
                    2 => {
                        let tx = session.begin().await?;
                        tx.execute("UPDATE counter SET n = n + 1", &[]).await?;
                        tx.commit().await?;
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        // Cut off somewhere: waiting in bb8, mid-statement,
                        // or inside a transaction that never commits.
                        let work = async {
                            let tx = session.begin().await?;
                            tx.execute("UPDATE counter SET n = n + 1000000", &[])
                                .await?;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok::<_, Error>(())
                        };
                        let limit = Duration::from_micros(rng.below(3000));
                        if tokio::time::timeout(limit, work).await.is_err() {
                            cut_off.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok::<_, Error>(())
        }));
    }
    let n = join_workers(tasks, "every statement gets a connection in time", &db).await;
    let committed = committed.load(Ordering::Relaxed);
    println!(
        "committed {committed}, cut off {}",
        cut_off.load(Ordering::Relaxed)
    );
    // Nothing that was cut off (or rolled back on drop) left a trace.
    assert_eq!(n, committed);
    let stats = registry.stats();
    let writer = stats.engine("writer").unwrap();
    assert_eq!(writer.in_use, 0, "{writer:?}");
    assert_eq!(writer.idle, writer.connections, "{writer:?}");
    assert_eq!(writer.checkout_timeouts, 0, "{writer:?}");
    assert_pool_clean(&db, &registry, 2).await;
}

/// A connection kept busy never rests in bb8's idle list, yet bb8 must
/// still retire it at its max lifetime: parked connections are handed back
/// to bb8 every second, where the lifetime is checked. Observed from the
/// server: the backend serving the statements changes, and the old one is
/// gone.
#[tokio::test]
async fn a_busy_connection_is_still_retired_at_its_max_lifetime() {
    let db = Db::new().await;
    let registry = db
        .registry(|c| c.max_size(1).max_lifetime(Some(Duration::from_secs(1))))
        .await;
    let session = registry.session("writer").unwrap();
    let mut pids = BTreeSet::new();
    let first: i32 = session
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    pids.insert(first);
    for _ in 0..200 {
        let pid: i32 = session
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        pids.insert(pid);
        if pids.len() > 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        pids.len() > 1,
        "one backend served 5 s of statements with max_lifetime 1 s"
    );
    let gone = common::eventually(Duration::from_secs(5), || async {
        !db.backends().await.iter().any(|(pid, _)| *pid == first)
    })
    .await;
    assert!(gone, "backend {first} outlived its connection's lifetime");
}

/// The parked connections count as idle in the engine's stats, and a
/// transaction's connection comes back through the same path: after work
/// on both, nothing is in use and the server shows no transaction open.
#[tokio::test]
async fn parked_connections_are_idle_in_stats_and_on_the_server() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(3)).await;
    let session = registry.session("writer").unwrap();
    let txs = futures::future::join_all((0..3).map(|_| session.begin_with(TxOptions::new())))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    for tx in &txs {
        tx.execute("INSERT INTO items(name) VALUES ('x')", &[])
            .await
            .unwrap();
    }
    let writer = registry.stats().engine("writer").unwrap().clone();
    assert_eq!((writer.in_use, writer.idle), (3, 0), "{writer:?}");
    for tx in txs {
        tx.commit().await.unwrap();
    }
    let writer = registry.stats().engine("writer").unwrap().clone();
    assert_eq!((writer.in_use, writer.idle), (0, 3), "{writer:?}");
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 3);
    for (pid, state) in db.backends().await {
        assert_eq!(state, "idle", "backend {pid}");
    }
}

/// Pipelined mode: with the only connection busy on a slow autocommit
/// statement, another autocommit statement is sent on it too (it would
/// otherwise time out waiting for a connection of its own), while a
/// transaction, which never shares, still waits and times out, and so does
/// a statement beyond the `pipeline(2)` limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_pool_pipelines_autocommit_statements_but_never_transactions() {
    let db = Db::new().await;
    let registry = db
        .registry(|c| {
            c.max_size(1)
                .pipeline(2)
                .connection_timeout(Duration::from_millis(150))
        })
        .await;
    let session = registry.session("writer").unwrap();
    // Open the one connection first, so that the pool is saturated below.
    session.query_one("SELECT 1", &[]).await.unwrap();
    let slow = {
        let s = session.clone();
        tokio::spawn(async move { s.execute("SELECT pg_sleep(1.5)", &[]).await })
    };
    let app = db.app.clone();
    let plain = db.plain().await;
    let sleeping = common::eventually(Duration::from_secs(5), || async {
        let n: i64 = plain
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND query LIKE 'SELECT pg_sleep%'",
                &[&app],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await;
    assert!(sleeping, "the slow statement never started");
    // A transaction needs a connection of its own: none comes in 150 ms.
    let e = session.begin().await.unwrap_err();
    assert!(matches!(e, Error::PoolTimeout { .. }), "{e:?}");
    // An autocommit statement rides along on the busy connection…
    let riding = {
        let s = session.clone();
        tokio::spawn(async move { s.query_one("SELECT 2::int", &[]).await })
    };
    let joined = common::eventually(Duration::from_secs(5), || async {
        registry.stats().engine("writer").unwrap().pipelined == 1
    })
    .await;
    assert!(joined, "the statement did not join the busy connection");
    // …but no more than `pipeline(2)` are in flight on one connection: a
    // third waits for a share, and times out like any checkout.
    let e = session.query_one("SELECT 3", &[]).await.unwrap_err();
    assert!(matches!(e, Error::PoolTimeout { .. }), "{e:?}");
    let row = within(Duration::from_secs(5), "pipelined statement", riding)
        .await
        .unwrap()
        .expect("pipelined behind the slow statement, not timed out");
    assert_eq!(row.get::<_, i32>(0), 2);
    slow.await.unwrap().unwrap();
    // One backend served both.
    assert_eq!(db.backends().await.len(), 1);
    let writer = registry.stats().engine("writer").unwrap().clone();
    assert_eq!((writer.in_use, writer.connections), (0, 1), "{writer:?}");
    assert_eq!(writer.pipelined, 1, "{writer:?}");
    assert_pool_clean(&db, &registry, 1).await;
}

/// Pipelined mode under load, with statements that fail and statements
/// cut off mid-flight: every answer goes to the statement that asked (the
/// value sent comes back), an error touches only its own statement, the
/// transactions in between commit exactly, and the pool ends clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_statements_get_their_own_answers_and_errors() {
    let db = Db::new().await;
    let registry = db
        .registry(|c| {
            c.max_size(2)
                .pipeline(16)
                .connection_timeout(Duration::from_secs(5))
        })
        .await;
    create_counter(&db).await;
    let seed = Rng::seed("pipelined_statements_get_their_own_answers_and_errors");
    let iters = env_u64("PGASSIST_PIPELINE_ITERS", 200);
    let committed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let session = registry.session("writer").unwrap();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed ^ (t << 32));
            for i in 0..iters {
                let value = (t * 1_000_000 + i) as i64;
                // Mostly autocommit: a transaction waiting for a connection
                // of its own stops statements from joining busy ones.
                match rng.below(40) {
                    0..=3 => {
                        let e = session
                            .query_one("SELECT 1 / ($1::bigint - $1::bigint)", &[&value])
                            .await
                            .unwrap_err();
                        assert!(matches!(e, Error::Db { .. }), "{e:?}");
                    }
                    4 => {
                        let tx = session.begin().await?;
                        tx.execute("UPDATE counter SET n = n + 1", &[]).await?;
                        tx.commit().await?;
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    5..=8 => {
                        let cut = Duration::from_micros(rng.below(400));
                        let _ = tokio::time::timeout(
                            cut,
                            session.query_one("SELECT $1::bigint", &[&value]),
                        )
                        .await;
                    }
                    _ => {
                        // A little server time, so connections are busy when
                        // statements arrive and they share.
                        let row = session
                            .query_one("SELECT $1::bigint FROM pg_sleep(0.0005)", &[&value])
                            .await?;
                        assert_eq!(row.get::<_, i64>(0), value, "an answer went astray");
                    }
                }
            }
            Ok::<_, Error>(())
        }));
    }
    let n = join_workers(tasks, "no statement fails but the ones meant to", &db).await;
    assert_eq!(n, committed.load(Ordering::Relaxed));
    assert!(db.backends().await.len() <= 2);
    let writer = registry.stats().engine("writer").unwrap().clone();
    assert_eq!(writer.in_use, 0, "{writer:?}");
    assert!(writer.pipelined > 0, "nothing was pipelined: {writer:?}");
    println!(
        "{} of {} statements pipelined",
        writer.pipelined, writer.statements
    );
    assert_pool_clean(&db, &registry, 2).await;
}

#[tokio::test]
async fn pipelining_refuses_settings_it_cannot_honour() {
    let db = Db::new().await;
    for (what, config) in [
        ("pipeline 0", db.config().pipeline(0)),
        (
            "pipeline with pgbouncer",
            db.config().pipeline(4).pgbouncer(true),
        ),
        (
            "pipeline without a statement cache",
            db.config().statement_cache(0).pipeline(4),
        ),
    ] {
        let e = pgassist::Registry::builder()
            .engine("writer", config)
            .build()
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains("pipeline")),
            "{what}: {e:?}"
        );
    }
}

/// A one-row table `counter`, for transactions to increment.
async fn create_counter(db: &Db) {
    db.plain()
        .await
        .batch_execute("CREATE TABLE counter (n int NOT NULL); INSERT INTO counter VALUES (0)")
        .await
        .unwrap();
}

/// Waits for every worker (none may fail or hang), then reads `counter`.
async fn join_workers(
    tasks: Vec<tokio::task::JoinHandle<Result<(), Error>>>,
    what: &str,
    db: &Db,
) -> u64 {
    for task in tasks {
        within(Duration::from_secs(120), "worker", task)
            .await
            .unwrap()
            .expect(what);
    }
    let n: i32 = db
        .plain()
        .await
        .query_one("SELECT n FROM counter", &[])
        .await
        .unwrap()
        .get(0);
    n as u64
}
