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

/// The listener's connection gets the engine's connect-time settings and
/// `after_connect` hook, like a pooled connection, and again after a
/// reconnect: the hook records each backend it ran on with the setting it
/// saw, and sets `application_name`, seen in `pg_stat_activity`.
#[tokio::test]
async fn the_listener_runs_the_engines_settings_and_after_connect_hook() {
    let db = Db::new().await;
    let hooked_app = format!("{}-hooked", db.app);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i32, String)>::new()));
    let record = seen.clone();
    let set_app = format!("SET application_name = '{hooked_app}'");
    let registry = db
        .registry(move |c| {
            c.setting("statement_timeout", "4321ms")
                .after_connect(move |client| {
                    let (record, set_app) = (record.clone(), set_app.clone());
                    Box::pin(async move {
                        let row = client
                            .query_one(
                                "SELECT pg_backend_pid(), current_setting('statement_timeout')",
                                &[],
                            )
                            .await?;
                        record.lock().unwrap().push((row.get(0), row.get(1)));
                        client.batch_execute(&set_app).await
                    })
                })
        })
        .await;
    let engine = registry.engine("writer").unwrap();
    let mut listener = engine.listener(&["jobs"]).await.unwrap();
    let plain = db.plain().await;
    let listening = || async {
        plain
            .query(
                "SELECT pid, application_name FROM pg_stat_activity \
                 WHERE datname = $1 AND query LIKE 'LISTEN %'",
                &[&db.db.name],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
    };
    let first = listening().await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].1, hooked_app);
    assert!(
        seen.lock()
            .unwrap()
            .contains(&(first[0].0, "4321ms".to_owned())),
        "{first:?} not in {:?}",
        seen.lock().unwrap()
    );

    plain
        .query("SELECT pg_terminate_backend($1)", &[&first[0].0])
        .await
        .unwrap();
    let back = common::eventually(Duration::from_secs(10), || async {
        let now = listening().await;
        now.len() == 1 && now[0].0 != first[0].0
    })
    .await;
    assert!(back, "the listener did not come back");
    let second = listening().await;
    assert_eq!(second[0].1, hooked_app);
    assert!(
        seen.lock()
            .unwrap()
            .contains(&(second[0].0, "4321ms".to_owned())),
        "{second:?} not in {:?}",
        seen.lock().unwrap()
    );
    // And it still delivers.
    registry
        .session("writer")
        .unwrap()
        .notify("jobs", "after")
        .await
        .unwrap();
    let n = within(Duration::from_secs(10), "a notification", listener.next())
        .await
        .unwrap();
    assert_eq!(n.payload(), "after");
}
