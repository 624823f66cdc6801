//! Pinned connections and streaming, observed from the server: session
//! work on a pinned connection ends with the pin, COPY round-trips a
//! million rows exactly, and a million-row stream runs in bounded memory.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::{Db, advisory_locks};
use futures::{SinkExt, StreamExt};
use pgassist::{Error, Queryable};

/// Session work is allowed on a pinned connection and ends with it: the
/// advisory lock is released when the pin is dropped (pg_locks from a second
/// connection), and the same connection's next user sees no temp table, no
/// setting, no listen.
#[tokio::test]
async fn session_work_on_a_pinned_connection_ends_with_the_pin() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let pinned = session.pin().await.unwrap();
    let pid = pinned.backend_pid();
    pinned
        .query("SELECT pg_advisory_lock(42)", &[])
        .await
        .unwrap();
    pinned
        .batch_execute(
            "SET search_path TO pg_catalog, public; CREATE TEMP TABLE scratch (a int); \
             LISTEN pinned_channel; PREPARE p AS SELECT 1",
        )
        .await
        .unwrap();
    pinned
        .execute("INSERT INTO scratch VALUES (1)", &[])
        .await
        .unwrap();
    assert_eq!(advisory_locks(&db).await, 1);
    // Generic code takes it.
    async fn count(db: &impl Queryable) -> i64 {
        db.query_one("SELECT count(*) FROM scratch", &[])
            .await
            .unwrap()
            .get(0)
    }
    assert_eq!(count(&pinned).await, 1);
    // Transaction control stays refused.
    for sql in ["BEGIN", "COMMIT"] {
        assert!(matches!(
            pinned.execute(sql, &[]).await,
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            pinned.batch_execute(sql).await,
            Err(Error::Usage(_))
        ));
    }
    drop(pinned);
    // The pool's only connection: the next user waits for the reset.
    let row = session
        .query_one(
            "SELECT pg_backend_pid(), current_setting('search_path'), \
             (SELECT count(*) FROM pg_listening_channels()), \
             (SELECT count(*) FROM pg_prepared_statements WHERE from_sql), \
             to_regclass('pg_temp.scratch') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid, "reset, not replaced");
    assert_eq!(row.get::<_, String>(1), "\"$user\", public");
    assert_eq!(row.get::<_, i64>(2), 0);
    assert_eq!(row.get::<_, i64>(3), 0);
    assert!(row.get::<_, bool>(4));
    assert_eq!(advisory_locks(&db).await, 0, "the lock was released");
}

/// A pin dropped in the middle of a statement (a cancelled request) still
/// returns a clean connection: its lock is released once the statement is
/// answered and the reset has run.
#[tokio::test]
async fn a_pin_dropped_mid_statement_is_released_clean() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    for cut in [0u64, 5, 50, 200] {
        let pinned = session.pin().await.unwrap();
        pinned
            .query("SELECT pg_advisory_lock(7)", &[])
            .await
            .unwrap();
        let slow = pinned.query("SELECT pg_advisory_lock(8), pg_sleep(0.3)", &[]);
        let _ = tokio::time::timeout(Duration::from_millis(cut), slow).await;
        drop(pinned);
        let locks: i64 = session
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(locks, 0, "cut after {cut} ms");
        assert_eq!(advisory_locks(&db).await, 0, "cut after {cut} ms");
    }
}

/// The driver's surface on a pinned connection: typed prepare, simple
/// query, and a streamed query.
#[tokio::test]
async fn prepare_typed_simple_query_and_query_raw_on_a_pinned_connection() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let mut pinned = registry.session("writer").unwrap().pin().await.unwrap();
    let stmt = pinned
        .prepare_typed(
            "SELECT $1::text || 'x'",
            &[pgassist::tokio_postgres::types::Type::TEXT],
        )
        .await
        .unwrap();
    let rows = pinned.query_prepared(&stmt, &[&"a"]).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "ax");
    let messages = pinned.simple_query("SELECT 1; SELECT 2").await.unwrap();
    let rows = messages
        .iter()
        .filter(|m| matches!(m, pgassist::tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    assert_eq!(rows, 2);
    let stream = pinned
        .query_raw("SELECT g FROM generate_series(1, $1) g", [10_i32])
        .await
        .unwrap();
    let got: Vec<i32> = stream.map(|r| r.unwrap().get::<_, i32>(0)).collect().await;
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    let stream = pinned.query_raw_prepared(&stmt, ["b"]).await.unwrap();
    let got: Vec<String> = stream
        .map(|r| r.unwrap().get::<_, String>(0))
        .collect()
        .await;
    assert_eq!(got, ["bx"]);
}

const ROWS: usize = 1_000_000;

/// COPY of a million rows in and out, text and binary, round-trips exactly.
#[tokio::test]
async fn copy_of_a_million_rows_round_trips_exactly() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let mut pinned = registry.session("writer").unwrap().pin().await.unwrap();
    pinned
        .batch_execute(
            "CREATE TABLE copied (id int PRIMARY KEY, name text, n float8); \
             CREATE TABLE copied_bin (LIKE copied)",
        )
        .await
        .unwrap();
    // Text in, in chunks; values with tabs and backslashes escaped as COPY wants.
    let mut sent = Vec::with_capacity(ROWS * 24);
    let mut sink = pinned
        .copy_in::<VecDeque<u8>>("COPY copied (id, name, n) FROM STDIN")
        .await
        .unwrap();
    let mut chunk = Vec::new();
    for i in 0..ROWS {
        let line = format!("{i}\tname\\t{i}\\\\é\t{}\n", i as f64 / 8.0);
        chunk.extend_from_slice(line.as_bytes());
        if chunk.len() > 64 * 1024 || i + 1 == ROWS {
            sent.extend_from_slice(&chunk);
            sink.send(VecDeque::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    let n = sink.finish().await.unwrap();
    assert_eq!(n, ROWS as u64);
    // Text out, in order: byte for byte what went in.
    let mut out = pinned
        .copy_out("COPY (SELECT id, name, n FROM copied ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let mut received = Vec::with_capacity(sent.len());
    while let Some(chunk) = out.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    drop(out);
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "COPY text round trip differs");
    // Binary out of one table, binary into another (from a second pinned
    // connection: one connection answers its requests in order, so its
    // COPY IN would wait for the COPY OUT being read into it): the same rows.
    let mut out = pinned
        .copy_out("COPY copied TO STDOUT (FORMAT binary)")
        .await
        .unwrap();
    let mut other = registry.session("writer").unwrap().pin().await.unwrap();
    let mut sink = other
        .copy_in::<VecDeque<u8>>("COPY copied_bin FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    while let Some(chunk) = out.next().await {
        sink.send(VecDeque::from(chunk.unwrap().to_vec()))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), ROWS as u64);
    drop(out);
    drop(other);
    let differ: i64 = pinned
        .query_one(
            "SELECT count(*) FROM (SELECT * FROM copied EXCEPT ALL SELECT * FROM copied_bin) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(differ, 0);
    // A COPY sink dropped unfinished aborts that COPY; the connection goes on.
    let sink = pinned
        .copy_in::<VecDeque<u8>>("COPY copied_bin FROM STDIN")
        .await
        .unwrap();
    drop(sink);
    let one: i32 = pinned.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}
