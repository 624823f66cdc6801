//! The small remainders of the session-state issue, each checked from the
//! server: the statement cache survives `DEALLOCATE ALL` / `DISCARD ALL`,
//! and `Sessions::reader()` never falls back to a writable engine. (PgBouncer
//! mode is in tests/pgbouncer.rs, `batch_execute` read-your-writes in
//! tests/replicas.rs.)

mod common;

use common::Db;
use futures::StreamExt;
use pgassist::Session;

/// Statements pgassist caches (prepared on the server), with the backend
/// that ran them.
async fn cached_statements(session: &Session) -> i32 {
    for n in 0..3i32 {
        let row = session
            .query_one("SELECT $1::int + 1, pg_backend_pid()", &[&n])
            .await
            .unwrap_or_else(|e| panic!("cached statement after DEALLOCATE: {e}"));
        assert_eq!(row.get::<_, i32>(0), n + 1);
    }
    let row = session
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    row.get(0)
}

/// On a pool of one connection: `DEALLOCATE ALL` / `DISCARD ALL` inside a
/// transaction, committed, and then the statements pgassist had cached
/// run again from another session, on the same backend (the connection
/// was kept, its cache mended).
#[tokio::test]
async fn the_statement_cache_survives_deallocate_in_a_transaction() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let first = registry.session("writer").unwrap();
    let pid = cached_statements(&first).await;
    for sql in ["DEALLOCATE ALL", "DISCARD ALL", "deallocate prepare all"] {
        for batch in [true, false] {
            if sql == "DISCARD ALL" && !batch {
                continue; // DISCARD ALL cannot run inside a transaction block
            }
            let tx = first.begin().await.unwrap();
            tx.query("SELECT $1::int + 1, pg_backend_pid()", &[&1i32])
                .await
                .unwrap();
            let ran = if batch {
                tx.batch_execute(sql).await
            } else {
                tx.execute(sql, &[]).await.map(drop)
            };
            if sql == "DISCARD ALL" {
                // Refused by the server inside a transaction: the cache is
                // cleared anyway (harmless), the transaction aborted.
                assert!(ran.is_err(), "{sql}");
                drop(tx);
            } else {
                ran.unwrap_or_else(|e| panic!("{sql}: {e}"));
                // The same transaction goes on with statements it had cached.
                tx.query("SELECT $1::int + 1, pg_backend_pid()", &[&1i32])
                    .await
                    .unwrap_or_else(|e| panic!("after {sql} in the transaction: {e}"));
                tx.commit().await.unwrap();
            }
            let other = registry.session("writer").unwrap();
            assert_eq!(cached_statements(&other).await, pid, "{sql}");
        }
    }
    // Hidden from the text check (dynamic SQL): the next transaction's
    // statement fails once, the cache is cleared, and everything after works.
    let tx = first.begin().await.unwrap();
    tx.batch_execute("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let tx = first.begin().await.unwrap();
    let failed = tx
        .query("SELECT $1::int + 1, pg_backend_pid()", &[&1i32])
        .await
        .unwrap_err();
    assert_eq!(
        failed.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME),
        "{failed}"
    );
    drop(tx);
    assert_eq!(cached_statements(&first).await, pid);
    // In autocommit the same hidden DEALLOCATE is mended without an error.
    first
        .batch_execute("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$")
        .await
        .unwrap();
    assert_eq!(cached_statements(&first).await, pid);
    let stats = registry.stats();
    assert_eq!(stats.engines[0].discarded_dirty, 0, "{stats:?}");
}

/// The same on a pinned connection: `DEALLOCATE ALL` and `DISCARD ALL`
/// run there, later statements on the pin and, after it is dropped, from
/// another session on the same backend all succeed.
#[tokio::test]
async fn the_statement_cache_survives_deallocate_on_a_pinned_connection() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let pid = cached_statements(&session).await;
    for sql in ["DEALLOCATE ALL", "DISCARD ALL"] {
        for batch in [true, false] {
            let mut pinned = session.pin().await.unwrap();
            assert_eq!(pinned.backend_pid(), pid);
            pinned
                .query("SELECT $1::int + 1, pg_backend_pid()", &[&1i32])
                .await
                .unwrap();
            if batch {
                pinned.batch_execute(sql).await.unwrap();
            } else {
                pinned.execute(sql, &[]).await.unwrap();
            }
            // Streaming takes the cached statement as is (no second try):
            // it runs only because the cache was cleared.
            let rows: Vec<_> = pinned
                .query_raw("SELECT $1::int + 1, pg_backend_pid()", [2i32])
                .await
                .unwrap_or_else(|e| panic!("after {sql} on the pin: {e}"))
                .collect()
                .await;
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].as_ref().unwrap().get::<_, i32>(0), 3);
            let left: i64 = pinned
                .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(left, 2, "only the statements prepared since");
            pinned
                .query("SELECT $1::int + 1, pg_backend_pid()", &[&1i32])
                .await
                .unwrap();
            drop(pinned);
            let other = registry.session("writer").unwrap();
            assert_eq!(cached_statements(&other).await, pid, "{sql}");
        }
    }
    let stats = registry.stats();
    assert_eq!(stats.engines[0].discarded_dirty, 0, "{stats:?}");
}

/// `Sessions::reader()` never falls back silently to the writable default
/// engine: without a `reader` or a replica engine it is an error naming
/// `reader` (as `logger()` is); with a replica it is the replica; with a
/// `reader` it is that, read-only as the server says.
#[tokio::test]
async fn reader_without_a_reader_engine_is_an_error() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let sessions = registry.sessions();
    match sessions.reader() {
        Err(pgassist::Error::UnknownEngine { name, known }) => {
            assert_eq!((name.as_str(), known.as_str()), ("reader", "writer"));
        }
        other => panic!("{other:?}"),
    }
    assert!(sessions.logger().is_err());
    // The default engine is still there for who asks for it by name.
    assert!(sessions.writer().is_ok());

    let with_replica = pgassist::Registry::builder()
        .engine("writer", db.config())
        .engine("standby", db.config().replica_of("writer"))
        .build()
        .await
        .unwrap();
    let sessions = with_replica.sessions();
    assert_eq!(sessions.reader().unwrap().engine_name(), "standby");

    let three = db.three_engines().await;
    let sessions = three.sessions();
    let reader = sessions.reader().unwrap();
    assert_eq!(reader.engine_name(), "reader");
    let read_only: String = reader
        .query_one("SELECT current_setting('transaction_read_only')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(read_only, "on");
}
