//! Streaming rows through a session: a million rows in bounded memory,
//! measured in a process of its own (no other test's allocations in the
//! figure), and a stream dropped early is cancelled, its connection replaced.

mod common;

use std::time::Duration;

use common::Db;
use futures::StreamExt;
use pgassist::Error;

const ROWS: usize = 1_000_000;

/// Resident memory of this process, in kB.
fn rss_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A million rows (about 130 MB as text) stream through a session in
/// bounded memory; a stream dropped early is cancelled, its connection
/// replaced by a clean one.
#[tokio::test]
async fn a_million_row_stream_runs_in_bounded_memory() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let sql = "SELECT g, repeat('x', 120) FROM generate_series(1, $1) g";
    let before = rss_kb();
    let mut peak = before;
    let mut stream = session.query_raw(sql, [ROWS as i32]).await.unwrap();
    let mut count = 0usize;
    let mut sum = 0i64;
    while let Some(row) = stream.next().await {
        let row = row.unwrap();
        sum += i64::from(row.get::<_, i32>(0));
        count += 1;
        if count % 20_000 == 0 {
            peak = peak.max(rss_kb());
        }
    }
    drop(stream);
    let delta_mb = peak.saturating_sub(before) as f64 / 1024.0;
    println!("streamed {count} rows; peak RSS grew by {delta_mb:.1} MB (from {before} kB)");
    assert_eq!(count, ROWS);
    assert_eq!(sum, (ROWS as i64) * (ROWS as i64 + 1) / 2);
    // Collected into a Vec the rows would take well over 130 MB.
    assert!(delta_mb < 16.0, "peak RSS grew by {delta_mb:.1} MB");

    // Dropped after a few rows: the statement is cancelled, and the only
    // connection replaced by a clean one.
    let mut stream = session.query_raw(sql, [ROWS as i32]).await.unwrap();
    for _ in 0..1000 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    let row = common::within(
        Duration::from_secs(30),
        "the next statement after a dropped stream",
        session.query_one("SELECT 41 + 1", &[]),
    )
    .await
    .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let stats = registry.stats();
    assert_eq!(stats.engines[0].discarded_dirty, 1, "{stats:?}");
    // Session-state rules hold for streams too.
    assert!(matches!(
        session
            .query_raw("SET x.y = 1", std::iter::empty::<i32>())
            .await,
        Err(Error::Usage(_))
    ));
}

/// An autocommit stream dropped early (a request cancelled mid-download)
/// must not make the next, unrelated user of its pooled connection wait
/// for the rest of the result: here a billion rows (minutes of streaming).
/// The statement is cancelled and the connection replaced; the next
/// statement answers at once, nothing of the stream runs on the server
/// afterwards, and the pool is clean.
#[tokio::test]
async fn a_dropped_autocommit_stream_does_not_hold_up_the_next_user() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let sql = "SELECT generate_series(1, 1000000000)";
    let mut stream = session
        .query_raw(sql, std::iter::empty::<i32>())
        .await
        .unwrap();
    for _ in 0..100 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    let row = common::within(
        Duration::from_secs(10),
        "the next statement after a dropped endless stream",
        session.query_one("SELECT 41 + 1", &[]),
    )
    .await
    .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    let plain = db.plain().await;
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            plain
                .query(
                    "SELECT 1 FROM pg_stat_activity WHERE query LIKE '%generate_series(1, 1000000000)%' \
                     AND query NOT LIKE '%pg_stat_activity%' \
                     AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap()
                .is_empty()
        })
        .await,
        "the dropped stream's statement still runs"
    );
    common::assert_pool_clean(&db, &registry, 1).await;
}
