//! A real streaming hot standby next to the primary: routing, read-your-writes
//! by WAL position (proved with replay paused), and fallback while the
//! replica is down. One test: the scenarios share one replica and pause its
//! replay, so they run in order.

mod common;

use std::time::{Duration, Instant};

use common::Db;
use pgassist::Error;

use common::served_by as probe;

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_routing_read_your_writes_and_fallback() {
    let db = Db::new().await;
    // One writer connection: a repeated statement is sure to be cached on it.
    let Some((registry, replica, replica_url)) =
        common::writer_and_replica(&db, db.config().max_size(1)).await
    else {
        return;
    };

    // 1. reader() is the replica; writes there are refused.
    let sessions = registry.sessions();
    let reader = sessions.reader().unwrap();
    assert_eq!(reader.engine_name(), "replica");
    assert_eq!(probe(reader).await, (true, 0));
    let err = reader
        .execute("INSERT INTO items(name) VALUES ('x')", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
    drop(sessions);

    // 2. Read-your-writes with replay paused: the replica cannot have our writes.
    let control = common::pause_replay(&replica_url).await;
    let sessions = registry.sessions();
    sessions
        .writer()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('autocommit')", &[])
        .await
        .unwrap();
    assert_eq!(
        probe(sessions.reader().unwrap()).await,
        (false, 1),
        "read after an autocommit write goes to the primary"
    );
    // The same statement again runs from the statement cache, with the WAL
    // position read pipelined behind it: the read still sees the write.
    let writer = sessions.writer().unwrap();
    writer
        .execute("INSERT INTO items(name) VALUES ('autocommit')", &[])
        .await
        .unwrap();
    assert_eq!(probe(sessions.reader().unwrap()).await, (false, 2));
    // Served by the primary, the reader is still read-only.
    let err = sessions
        .reader()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('x')", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
    let tx = sessions.writer().unwrap().begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('tx')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        probe(sessions.reader().unwrap()).await,
        (false, 3),
        "read after a commit goes to the primary"
    );
    // Another request that wrote nothing reads the (stale) replica.
    let other = registry.sessions();
    assert_eq!(
        probe(other.reader().unwrap()).await,
        (true, 0),
        "no earlier write: the replica serves"
    );
    // Once replay catches up, this request's reads return to the replica.
    control
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    let reader = sessions.reader().unwrap();
    until("reads to return to the caught-up replica", || async {
        probe(reader).await == (true, 3)
    })
    .await;
    drop((sessions, other));

    // A write from the statement cache, whose WAL position is read pipelined
    // behind it, in a request whose replica was caught up: had the position
    // been read before the write, this read would go to the stale replica.
    control
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    let sessions = registry.sessions();
    sessions
        .writer()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('autocommit')", &[])
        .await
        .unwrap();
    assert_eq!(probe(sessions.reader().unwrap()).await, (false, 4));
    // A batch is a write like any other: a new request that wrote only
    // through batch_execute reads its write (from the primary).
    let batched = registry.sessions();
    batched
        .writer()
        .unwrap()
        .batch_execute("INSERT INTO items(name) VALUES ('batch')")
        .await
        .unwrap();
    assert_eq!(
        probe(batched.reader().unwrap()).await,
        (false, 5),
        "read after a batch write goes to the primary"
    );
    // A batch on the reader is routed by the same decision: to the primary
    // while the replica lags behind this request's write, so it sees it.
    let err = batched
        .reader()
        .unwrap()
        .batch_execute("DO $$ BEGIN IF (SELECT count(*) FROM items) <> 5 OR pg_is_in_recovery() THEN RAISE 'stale'; END IF; END $$")
        .await;
    assert!(err.is_ok(), "{err:?}");
    // Another request that wrote nothing: its batch reads the stale replica.
    let fresh = registry.sessions();
    let err = fresh
        .reader()
        .unwrap()
        .batch_execute(
            "DO $$ BEGIN IF NOT pg_is_in_recovery() THEN RAISE 'primary'; END IF; END $$",
        )
        .await;
    assert!(err.is_ok(), "{err:?}");
    control
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    drop((sessions, batched, fresh));

    // 3. Replica down: reads fall back to the primary, and return when it is back.
    replica.stop_server().unwrap();
    let sessions = registry.sessions();
    assert_eq!(probe(sessions.reader().unwrap()).await, (false, 5));
    assert_eq!(probe(sessions.reader().unwrap()).await, (false, 5));
    replica.start_server().unwrap();
    let reader = sessions.reader().unwrap();
    until("reads to return to the restarted replica", || async {
        probe(reader).await.0
    })
    .await;
    replica.stop();
}
