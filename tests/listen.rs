//! LISTEN / NOTIFY: notifications arrive in order on a listener's own
//! connection; after its backend is terminated it is back by itself within
//! a second and receives the next ones.

mod common;

use std::time::{Duration, Instant};

use common::{Db, within};
use futures::StreamExt;

/// The backends of this test's database that are listening (their last
/// statement was our LISTEN).
async fn listening_backends(db: &Db, plain: &tokio_postgres::Client) -> Vec<i32> {
    plain
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN %'",
            &[&db.db.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn notifications_arrive_in_order_and_survive_a_terminated_backend() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let engine = registry.engine("writer").unwrap();
    let hostile = "odd \"channel\"; LISTEN x";
    let mut listener = engine.listener(&["jobs", hostile]).await.unwrap();
    let session = registry.session("writer").unwrap();
    for i in 0..5 {
        session.notify("jobs", &format!("job {i}")).await.unwrap();
    }
    session
        .notify(hostile, "'; DROP TABLE items; --")
        .await
        .unwrap();
    for i in 0..5 {
        let n = within(Duration::from_secs(10), "a notification", listener.next())
            .await
            .unwrap();
        assert_eq!(
            (n.channel(), n.payload()),
            ("jobs", format!("job {i}").as_str())
        );
    }
    let n = listener.next().await.unwrap();
    assert_eq!(
        (n.channel(), n.payload()),
        (hostile, "'; DROP TABLE items; --")
    );

    // Kill the listener's backend: it comes back by itself.
    let plain = db.plain().await;
    let before = listening_backends(&db, &plain).await;
    assert_eq!(before.len(), 1, "{before:?}");
    plain
        .query("SELECT pg_terminate_backend($1)", &[&before[0]])
        .await
        .unwrap();
    let killed = Instant::now();
    let back = loop {
        let now = listening_backends(&db, &plain).await;
        if now.len() == 1 && now[0] != before[0] {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no listener after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!("listener back {back:?} after pg_terminate_backend");
    assert!(back < Duration::from_secs(1), "back after {back:?}");
    assert_eq!(listener.reconnects(), 1);
    // The next ones arrive, in order, inside a transaction delivered at commit.
    let tx = session.begin().await.unwrap();
    for i in 5..10 {
        tx.execute("SELECT pg_notify('jobs', $1)", &[&format!("job {i}")])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    for i in 5..10 {
        let n = within(Duration::from_secs(10), "a notification", listener.next())
            .await
            .unwrap();
        assert_eq!(n.payload(), format!("job {i}"));
    }
    // Dropping the listener closes its connection.
    drop(listener);
    let gone = common::eventually(Duration::from_secs(5), || async {
        listening_backends(&db, &plain).await.is_empty()
    })
    .await;
    assert!(gone, "the listener's connection outlived it");
    // A bad channel name is refused before anything is sent.
    assert!(engine.listener(&["a\0b"]).await.is_err());
    assert!(engine.listener(&[]).await.is_err());
}
