//! Transactions begun on a pinned connection, and streaming / COPY inside
//! transactions, observed from the server: a second plain connection sees
//! committed rows and nothing else, `pg_stat_activity` shows nothing left
//! idle in a transaction, and the pinned connection keeps its session.

mod common;

use std::time::Duration;

use common::{Db, Rng, advisory_locks, assert_pool_clean, commit_while_killed, within};
use futures::{FutureExt, SinkExt, StreamExt, TryStreamExt};
use pgassist::Error;

async fn names(db: &Db) -> Vec<String> {
    db.plain_names().await
}

/// The server's state of backend `pid`, from a second connection.
async fn backend_state(db: &Db, pid: i32) -> String {
    db.plain()
        .await
        .query_one(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0)
}

/// Commit, rollback and drop of a transaction on a pinned connection: the
/// rows are seen from a second connection after the commit only, the
/// connection is back in autocommit each time (idle on the server, its
/// next statement visible at once), and its session — a temporary table,
/// an advisory lock — survives every transaction.
#[tokio::test]
async fn a_transaction_on_a_pinned_connection_ends_in_autocommit_and_keeps_the_session() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let mut pinned = session.pin().await.unwrap();
    let pid = pinned.backend_pid();
    pinned
        .batch_execute("CREATE TEMP TABLE scratch (a int); SELECT pg_advisory_lock(7)")
        .await
        .unwrap();

    // Commit.
    let tx = pinned.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('committed')", &[])
        .await
        .unwrap();
    tx.execute("INSERT INTO scratch VALUES (1)", &[])
        .await
        .unwrap();
    assert_eq!(backend_state(&db, pid).await, "idle in transaction");
    assert!(names(&db).await.is_empty(), "uncommitted row visible");
    tx.commit().await.unwrap();
    assert_eq!(names(&db).await, ["committed"]);
    assert_eq!(backend_state(&db, pid).await, "idle");

    // Rollback, with a savepoint inside.
    let mut tx = pinned.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('rolled back')", &[])
        .await
        .unwrap();
    {
        let sp = tx.begin().await.unwrap();
        sp.execute("INSERT INTO scratch VALUES (2)", &[])
            .await
            .unwrap();
        sp.commit().await.unwrap();
    }
    tx.rollback().await.unwrap();
    assert_eq!(names(&db).await, ["committed"]);

    // Dropped unfinished: rolled back before the pinned connection's next
    // statement, which runs in autocommit (seen at once from outside).
    let tx = pinned.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('dropped')", &[])
        .await
        .unwrap();
    drop(tx);
    pinned
        .execute("INSERT INTO items(name) VALUES ('autocommit')", &[])
        .await
        .unwrap();
    assert_eq!(names(&db).await, ["autocommit", "committed"]);
    assert_eq!(backend_state(&db, pid).await, "idle");

    // A failed statement: commit says so, and the connection goes on.
    let tx = pinned.begin().await.unwrap();
    assert!(tx.execute("SELECT 1/0", &[]).await.is_err());
    assert!(matches!(
        tx.commit().await,
        Err(Error::TransactionAborted { .. })
    ));

    // The session survived all of it: same backend, temp table, lock.
    let row = pinned
        .query_one(
            "SELECT pg_backend_pid(), (SELECT count(*) FROM scratch)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid);
    assert_eq!(row.get::<_, i64>(1), 1);
    assert_eq!(advisory_locks(&db).await, 1);
    assert_eq!(registry.stats().open_transactions, 0);
    drop(pinned);
    // Released and reset as any pinned connection.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            advisory_locks(&db).await == 0
        })
        .await
    );
    let row = session
        .query_one("SELECT to_regclass('pg_temp.scratch') IS NULL", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_pool_clean(&db, &registry, 1).await;
}

/// How a future is cut off, if at all.
#[derive(Clone, Copy, Debug)]
enum Cut {
    Never,
    /// Polled once, then dropped.
    FirstPoll,
    /// Dropped when a timeout of this many microseconds fires.
    Micros(u64),
}

impl Cut {
    fn random(rng: &mut Rng) -> Cut {
        match rng.below(10) {
            0..=4 => Cut::Never,
            5 => Cut::FirstPoll,
            _ => Cut::Micros(rng.below(3000)),
        }
    }
}

/// Runs `fut` unless `cut` drops it first; `None`: cut off.
async fn cut<F: std::future::Future>(how: Cut, fut: F) -> Option<F::Output> {
    match how {
        Cut::Never => Some(fut.await),
        Cut::FirstPoll => {
            let mut fut = std::pin::pin!(fut);
            (&mut fut).now_or_never()
        }
        Cut::Micros(us) => tokio::time::timeout(Duration::from_micros(us), fut)
            .await
            .ok(),
    }
}

/// Waits for the tasks of a randomized run, each returning its expected
/// outcomes and what it met that it should not have (which fails the test).
async fn gather<E>(tasks: Vec<tokio::task::JoinHandle<(Vec<E>, Vec<String>)>>) -> Vec<E> {
    let mut expect = Vec::new();
    for t in tasks {
        let (e, unexpected) = within(Duration::from_secs(120), "task", t).await.unwrap();
        assert!(unexpected.is_empty(), "{unexpected:#?}");
        expect.extend(e);
    }
    expect
}

/// Pins, begins, inserts and commits with each future dropped at a random
/// point, by 4 tasks over a pool of 2; after each transaction the pinned
/// connection runs an autocommit insert. Afterwards: every acknowledged
/// commit and autocommit insert is on the server, nothing of a transaction
/// that was not committed is, nothing is idle in a transaction, and every
/// pooled connection is clean (`assert_pool_clean`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_transactions_cut_at_random_leave_nothing_dirty() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(2)).await;
    let seed = Rng::seed("pinned cancellation");
    let iterations = common::env_u64("PGASSIST_PINNED_ITERS", 150);
    let mut tasks = Vec::new();
    for task in 0..4u64 {
        let session = registry.session("writer").unwrap();
        let mut rng = Rng::new(seed ^ task.wrapping_mul(0x9e37_79b9));
        tasks.push(tokio::spawn(async move {
            // (name, must be there, must not be there)
            let mut expect: Vec<(String, bool, bool)> = Vec::new();
            let mut unexpected = Vec::new();
            for i in 0..iterations {
                let Some(pinned) = cut(Cut::random(&mut rng), session.pin()).await else {
                    continue;
                };
                let mut pinned = pinned.unwrap();
                let name = format!("t{task}-{i}");
                let committed = {
                    let Some(tx) = cut(Cut::random(&mut rng), pinned.begin()).await else {
                        continue;
                    };
                    let tx = tx.unwrap();
                    let sql = "INSERT INTO items(name) VALUES ($1)";
                    let inserted = cut(Cut::random(&mut rng), tx.execute(sql, &[&name])).await;
                    match (inserted, rng.below(3)) {
                        (Some(Ok(_)), 0) => {
                            tx.rollback().await.unwrap();
                            Some(false)
                        }
                        (Some(Ok(_)), 1) => {
                            drop(tx);
                            Some(false)
                        }
                        (inserted, _) => match cut(Cut::random(&mut rng), tx.commit()).await {
                            // A cut insert may or may not have run
                            // before the commit.
                            Some(Ok(())) => matches!(inserted, Some(Ok(_))).then_some(true),
                            Some(Err(Error::TransactionAborted { .. })) => Some(false),
                            Some(Err(e)) => {
                                unexpected.push(format!("commit: {e:?}"));
                                None
                            }
                            // Cut while COMMIT may have gone out: either way.
                            None => None,
                        },
                    }
                };
                match committed {
                    Some(true) => expect.push((name.clone(), true, false)),
                    Some(false) => expect.push((name.clone(), false, true)),
                    None => {}
                }
                if rng.percent(30) {
                    // Dropped right after its transaction (a cancelled
                    // request), maybe before the drop-path ROLLBACK ran.
                    continue;
                }
                // Back in autocommit on the same connection, or refused
                // with a typed error if the end could not be confirmed.
                let auto = format!("{name}-auto");
                match pinned
                    .execute("INSERT INTO items(name) VALUES ($1)", &[&auto])
                    .await
                {
                    Ok(_) => expect.push((auto, true, false)),
                    Err(Error::Closed { .. }) => {}
                    Err(e) => unexpected.push(format!("autocommit after: {e:?}")),
                }
            }
            (expect, unexpected)
        }));
    }
    let expect = gather(tasks).await;
    db.wait_no_transactions().await;
    let present: std::collections::HashSet<String> = names(&db).await.into_iter().collect();
    for (name, must, must_not) in &expect {
        if *must {
            assert!(present.contains(name), "{name} acknowledged but missing");
        }
        if *must_not {
            assert!(!present.contains(name), "{name} rolled back but present");
        }
    }
    println!(
        "pinned cancellation: {} outcomes checked, {} rows, {} connections discarded",
        expect.len(),
        present.len(),
        registry.stats().engines[0].discarded_dirty
    );
    assert_pool_clean(&db, &registry, 2).await;
}

/// A stream inside a transaction sees the transaction's own rows; dropped
/// half-way, the transaction goes on and commits.
#[tokio::test]
async fn a_stream_in_a_transaction_dropped_half_way_leaves_it_usable() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let mut tx = session.begin().await.unwrap();
    tx.execute(
        "INSERT INTO items(name) SELECT 'n' || g FROM generate_series(1, 5000) g",
        &[],
    )
    .await
    .unwrap();
    let mut rows = tx
        .query_raw(
            "SELECT name FROM items ORDER BY id",
            std::iter::empty::<i32>(),
        )
        .await
        .unwrap();
    for _ in 0..100 {
        rows.next().await.unwrap().unwrap();
    }
    drop(rows);
    let all: Vec<String> = tx
        .query_raw(
            "SELECT name FROM items WHERE id > $1 ORDER BY id",
            [4990_i32],
        )
        .await
        .unwrap()
        .map_ok(|r| r.get(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 10);
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
    tx.commit().await.unwrap();
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 5000);

    // An error met while streaming aborts the transaction, with the typed
    // error from then on.
    let mut tx = session.begin().await.unwrap();
    // The error may come with the first rows or later.
    let failed = match tx
        .query_raw(
            "SELECT 10 / (100 - g) FROM generate_series(1, 200) g",
            std::iter::empty::<i32>(),
        )
        .await
    {
        Err(_) => true,
        Ok(s) => s.try_collect::<Vec<_>>().await.is_err(),
    };
    assert!(failed);
    assert!(matches!(
        tx.execute("SELECT 1", &[]).await,
        Err(Error::TransactionAborted { .. })
    ));
    drop(tx);
    assert_pool_clean(&db, &registry, 1).await;
}

/// COPY in and out inside a transaction: rows copied in are seen by
/// nobody else until the commit, and by nobody after a rollback; COPY out
/// sees the transaction's own rows.
#[tokio::test]
async fn copy_in_a_transaction_commits_or_rolls_back_with_it() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let data = |from: usize, n: usize| {
        bytes::Bytes::from(
            (from..from + n)
                .map(|i| format!("row {i}\n"))
                .collect::<String>(),
        )
    };
    for commit in [true, false] {
        let mut tx = session.begin().await.unwrap();
        let mut sink = tx.copy_in("COPY items (name) FROM STDIN").await.unwrap();
        sink.send(data(0, 600)).await.unwrap();
        sink.send(data(600, 400)).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 1000);
        let out: Vec<bytes::Bytes> = tx
            .copy_out("COPY (SELECT name FROM items ORDER BY id) TO STDOUT")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out.concat(), data(0, 1000).to_vec());
        assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
        if commit {
            tx.commit().await.unwrap();
            assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 1000);
            db.plain()
                .await
                .batch_execute("TRUNCATE items")
                .await
                .unwrap();
        } else {
            tx.rollback().await.unwrap();
            assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
        }
    }
    // On a pinned connection's transaction too.
    let mut pinned = session.pin().await.unwrap();
    let mut tx = pinned.begin().await.unwrap();
    let mut sink = tx.copy_in("COPY items (name) FROM STDIN").await.unwrap();
    sink.send(data(0, 10)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10);
    tx.commit().await.unwrap();
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 10);
    drop(pinned);
    assert_pool_clean(&db, &registry, 1).await;
}

/// A COPY sink dropped without `finish()` aborts the COPY and the
/// transaction: the next statement and the commit return
/// `TransactionAborted`, nothing is written, and the connection comes back
/// clean. Bad data does the same.
#[tokio::test]
async fn a_copy_sink_dropped_unfinished_aborts_the_transaction() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let mut tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('before')", &[])
        .await
        .unwrap();
    let mut sink = tx.copy_in("COPY items (name) FROM STDIN").await.unwrap();
    sink.send(bytes::Bytes::from_static(b"half\n"))
        .await
        .unwrap();
    drop(sink);
    assert!(matches!(
        tx.execute("SELECT 1", &[]).await,
        Err(Error::TransactionAborted { .. })
    ));
    assert!(matches!(
        tx.commit().await,
        Err(Error::TransactionAborted { .. })
    ));
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);

    // Bad data: the COPY fails, and so does the transaction.
    let mut tx = session.begin().await.unwrap();
    let finished = {
        let mut sink = tx
            .copy_in("COPY items (id, name) FROM STDIN")
            .await
            .unwrap();
        let sent = sink
            .send(bytes::Bytes::from_static(b"not a number\tx\n"))
            .await;
        if sent.is_ok() {
            sink.finish().await.map(drop)
        } else {
            sent
        }
    };
    assert!(matches!(finished, Err(Error::Db { .. })), "{finished:?}");
    assert!(matches!(
        tx.query("SELECT 1", &[]).await,
        Err(Error::TransactionAborted { .. })
    ));
    drop(tx);
    let row = session.query_one("SELECT 6 * 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
    assert_pool_clean(&db, &registry, 1).await;
}

/// The closure form on a pinned connection: a serialization failure in the
/// first attempt is rolled back and retried; the second commits, once; the
/// session (a temporary table) survives both attempts.
#[tokio::test]
async fn the_closure_form_on_a_pinned_connection_retries_and_keeps_the_session() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let mut pinned = session.pin().await.unwrap();
    pinned
        .batch_execute("CREATE TEMP TABLE attempts (n int)")
        .await
        .unwrap();
    let attempts = pinned
        .transaction(pgassist::TxOptions::new().retries(2), |tx| {
            Box::pin(async move {
                let attempt = tx.attempt() as i32;
                tx.execute("INSERT INTO attempts VALUES ($1)", &[&attempt])
                    .await?;
                tx.execute("INSERT INTO items(name) VALUES ('once')", &[])
                    .await?;
                if attempt == 1 {
                    tx.batch_execute(
                        "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                    )
                    .await?;
                }
                Ok::<_, Error>(attempt)
            })
        })
        .await
        .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(names(&db).await, ["once"]);
    // The first attempt's insert was rolled back, the table itself kept.
    let row = pinned
        .query_one("SELECT array_agg(n)::text FROM attempts", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "{2}");
    // An error without retries: rolled back, returned, connection usable.
    let err = pinned
        .transaction(pgassist::TxOptions::new(), |tx| {
            Box::pin(async move {
                tx.execute("INSERT INTO items(name) VALUES ('never')", &[])
                    .await?;
                Err::<(), _>(Error::Usage("changed my mind".into()))
            })
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Usage(_)));
    assert_eq!(names(&db).await, ["once"]);
    drop(pinned);
    assert_pool_clean(&db, &registry, 1).await;
}

/// COPY and streams inside transactions, every future cut at random: a
/// COPY's data (sometimes with a bad row mid-way, then committed anyway),
/// its `finish()`, a stream read half-way, the commit. Afterwards each
/// batch is on the server whole or not at all — whole exactly when its
/// commit was acknowledged, never when a bad row or a cut aborted it —
/// nothing is idle in a transaction, and every pooled connection is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_streams_in_transactions_cut_at_random_are_all_or_nothing() {
    const ROWS: usize = 20;
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(2)).await;
    let seed = Rng::seed("copy cancellation");
    let iterations = common::env_u64("PGASSIST_COPY_ITERS", 60);
    let mut tasks = Vec::new();
    for task in 0..3u64 {
        let session = registry.session("writer").unwrap();
        let mut rng = Rng::new(seed ^ task.wrapping_mul(0x2545_f491));
        tasks.push(tokio::spawn(async move {
            // (batch, must be whole, must be absent)
            let mut expect: Vec<(String, bool, bool)> = Vec::new();
            let mut unexpected = Vec::new();
            for i in 0..iterations {
                let batch = format!("c{task}-{i}");
                let bad_at = rng.percent(25).then(|| rng.below(ROWS as u64) as usize);
                let mut data = String::new();
                for r in 0..ROWS {
                    if Some(r) == bad_at {
                        data.push_str("not a number\tbad\n");
                    } else {
                        data.push_str(&format!(
                            "{}\t{batch}\n",
                            1_000_000 * (task + 1) as usize + i as usize * ROWS + r
                        ));
                    }
                }
                let mut pinned = None;
                if rng.percent(50) {
                    match cut(Cut::random(&mut rng), session.pin()).await {
                        Some(Ok(p)) => pinned = Some(p),
                        Some(Err(e)) => {
                            unexpected.push(format!("pin: {e:?}"));
                            continue;
                        }
                        None => continue,
                    }
                }
                let tx = match pinned.as_mut() {
                    Some(p) => cut(Cut::random(&mut rng), p.begin()).await,
                    None => cut(Cut::random(&mut rng), session.begin()).await,
                };
                let Some(tx) = tx else { continue };
                let mut tx = match tx {
                    Ok(tx) => tx,
                    Err(e) => {
                        unexpected.push(format!("begin: {e:?}"));
                        continue;
                    }
                };
                // COPY in: sent and finished, each step maybe cut.
                let copied = cut(Cut::random(&mut rng), async {
                    let mut sink = tx.copy_in("COPY items (id, name) FROM STDIN").await?;
                    for chunk in data.as_bytes().chunks(97) {
                        sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
                    }
                    sink.finish().await
                })
                .await;
                // A stream over the transaction's own rows, maybe dropped.
                if rng.percent(50) {
                    let read = cut(Cut::random(&mut rng), async {
                        let mut rows = tx
                            .query_raw("SELECT id FROM items WHERE name = $1", [&batch])
                            .await?;
                        let mut n = 0;
                        while let Some(row) = rows.try_next().await? {
                            let _: i32 = row.get(0);
                            n += 1;
                            if n == 5 {
                                break; // dropped half-way
                            }
                        }
                        Ok::<_, Error>(n)
                    })
                    .await;
                    if let Some(Err(e)) = &read {
                        if !matches!(e, Error::TransactionAborted { .. } | Error::Closed { .. }) {
                            unexpected.push(format!("stream: {e:?}"));
                        }
                    }
                }
                let outcome = cut(Cut::random(&mut rng), tx.commit()).await;
                match (outcome, &copied, bad_at) {
                    (Some(Ok(())), Some(Ok(n)), None) => {
                        assert_eq!(*n, ROWS as u64);
                        expect.push((batch, true, false));
                    }
                    // The COPY cut off before it reached the server (while
                    // the driver prepared it): the transaction had nothing
                    // to abort. Whole or nothing.
                    (Some(Ok(())), None, _) => expect.push((batch, false, false)),
                    (Some(Ok(())), copied, bad) => {
                        unexpected.push(format!(
                            "commit acknowledged after {copied:?}, bad row {bad:?}"
                        ));
                    }
                    (Some(Err(Error::TransactionAborted { .. })), _, _) => {
                        expect.push((batch, false, true));
                    }
                    (Some(Err(e)), _, _) => unexpected.push(format!("commit: {e:?}")),
                    // Cut while COMMIT may have gone out: whole or nothing.
                    (None, _, Some(_)) => expect.push((batch, false, true)),
                    (None, _, None) => expect.push((batch, false, false)),
                }
            }
            (expect, unexpected)
        }));
    }
    let expect = gather(tasks).await;
    db.wait_no_transactions().await;
    let plain = db.plain().await;
    for (batch, whole, absent) in &expect {
        let n: i64 = plain
            .query_one("SELECT count(*) FROM items WHERE name = $1", &[batch])
            .await
            .unwrap()
            .get(0);
        assert!(
            n == 0 || n == ROWS as i64,
            "{batch}: {n} rows, not all or nothing"
        );
        if *whole {
            assert_eq!(n, ROWS as i64, "{batch} acknowledged but missing");
        }
        if *absent {
            assert_eq!(n, 0, "{batch} aborted but present");
        }
    }
    println!(
        "copy cancellation: {} outcomes checked, {} connections discarded",
        expect.len(),
        registry.stats().engines[0].discarded_dirty
    );
    assert_pool_clean(&db, &registry, 2).await;
}

/// The first statement of a transaction goes out pipelined behind its
/// BEGIN, before a cancel can be armed; cut off there, it may still fail
/// on the server and abort the transaction unseen. The next statement is
/// then refused by the server (25P02): that is `TransactionAborted`, as
/// for any other aborted transaction, not a bare server error; the commit
/// rolls back, and nothing is visible. On a session's and on a pinned
/// connection's transaction.
#[tokio::test]
async fn a_statement_after_a_cut_first_statement_that_failed_is_transaction_aborted() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(2)).await;
    let session = registry.session("writer").unwrap();
    let mut pinned = session.pin().await.unwrap();
    for on_pinned in [false, true] {
        let tx = if on_pinned {
            pinned.begin().await.unwrap()
        } else {
            session.begin().await.unwrap()
        };
        let failing = "INSERT INTO items(name) SELECT 'cut' FROM pg_sleep(0.3) WHERE 1 / (random() * 0)::int = 1";
        let cut = tokio::time::timeout(Duration::from_millis(100), tx.execute(failing, &[])).await;
        assert!(cut.is_err(), "the statement was to be cut off: {cut:?}");
        // Past the server's error.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let next = tx
            .execute("INSERT INTO items(name) VALUES ('after')", &[])
            .await;
        assert!(
            matches!(next, Err(Error::TransactionAborted { .. })),
            "on_pinned {on_pinned}: {next:?}"
        );
        let committed = tx.commit().await;
        assert!(
            matches!(committed, Err(Error::TransactionAborted { .. })),
            "{committed:?}"
        );
        assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
    }
    drop(pinned);
    assert_pool_clean(&db, &registry, 2).await;
}

/// A pinned connection's transaction whose server session is killed while
/// COMMIT runs (a slow deferred trigger): `CommitOutcomeUnknown`, never a
/// retry; the pinned connection then reports `Closed` (it does not go on
/// in autocommit on a new connection), and is not handed to anyone else.
#[tokio::test]
async fn a_pinned_commit_killed_mid_commit_is_outcome_unknown() {
    let db = Db::new().await;
    let plain = db.plain().await;
    plain
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(0.5); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON items \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow()",
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c.max_size(2)).await;
    let session = registry.session("writer").unwrap();
    let mut pinned = session.pin().await.unwrap();
    let pid = pinned.backend_pid();
    let tx = pinned.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('killed in commit')", &[])
        .await
        .unwrap();
    let r = commit_while_killed(&plain, pid, tx.commit()).await;
    assert!(
        matches!(r, Err(Error::CommitOutcomeUnknown { .. })),
        "{r:?}"
    );
    let after = pinned.execute("SELECT 1", &[]).await;
    assert!(matches!(after, Err(Error::Closed { .. })), "{after:?}");
    drop(pinned);
    plain
        .batch_execute("DROP TRIGGER slow ON items")
        .await
        .unwrap();
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
    // The next users get live connections (the dead one was discarded).
    for _ in 0..4 {
        session.query_one("SELECT 1", &[]).await.unwrap();
    }
    assert_pool_clean(&db, &registry, 2).await;
}
