//! The per-request container, observed from the server.

mod common;

use std::time::{Duration, Instant};

use common::Db;
use pgassist::{EngineState, Error, TxOptions};

#[derive(Debug, PartialEq)]
struct RequestId(u64);

#[tokio::test]
async fn sessions_are_lazy_memoised_and_share_the_info_stash() {
    let db = Db::new().await;
    // Lazy: a checked build would open one connection per engine.
    let registry = db.three_engines_builder().lazy().build().await.unwrap();
    let mut sessions = registry.sessions();
    sessions.info_mut().insert(RequestId(42));
    let writer = sessions.writer().unwrap();
    assert!(std::ptr::eq(writer, sessions.writer().unwrap()), "memoised");
    assert!(matches!(
        sessions.get("nope"),
        Err(Error::UnknownEngine { .. })
    ));
    // Nothing checked out until a statement runs: the server sees no backend of ours.
    assert!(registry.stats().engines.iter().all(|e| e.checkouts == 0));
    assert!(db.backends().await.is_empty(), "{:?}", db.backends().await);
    assert!(
        sessions
            .report()
            .engines
            .iter()
            .all(|e| e.state == EngineState::Init)
    );
    assert_eq!(
        sessions.any().unwrap().engine_name(),
        "writer",
        "nothing used: the default engine"
    );

    // Code deep down finds the request id through the session it was given.
    async fn deep(s: &pgassist::Session) -> u64 {
        s.info::<RequestId>().expect("request id").0
    }
    assert_eq!(deep(sessions.logger().unwrap()).await, 42);
    assert!(
        registry
            .session("writer")
            .unwrap()
            .info::<RequestId>()
            .is_none()
    );

    sessions
        .logger()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('log')", &[])
        .await
        .unwrap();
    assert_eq!(
        sessions.any().unwrap().engine_name(),
        "logger",
        "the session already used"
    );
    let report = sessions.report();
    let logger = report.engines.iter().find(|e| e.name == "logger").unwrap();
    assert_eq!((logger.state, logger.statements), (EngineState::Start, 1));
    assert!(logger.time_ms > 0.0);
    // The backend pid in the report is the server's.
    let pids: Vec<i32> = db.backends().await.iter().map(|b| b.0).collect();
    assert!(
        logger.backend_pids.iter().all(|p| pids.contains(p)) && logger.backend_pids.len() == 1,
        "{logger:?} {pids:?}"
    );
    assert_eq!(
        report
            .engines
            .iter()
            .filter(|e| e.state == EngineState::Init)
            .count(),
        2
    );
    assert!(
        report
            .engines
            .iter()
            .find(|e| e.name == "reader")
            .unwrap()
            .read_only
    );
    assert!(
        report
            .engines
            .iter()
            .find(|e| e.name == "writer")
            .unwrap()
            .is_default
    );
}

#[tokio::test]
async fn report_shows_open_transactions_and_their_depth() {
    let db = Db::new().await;
    let registry = db.three_engines().await;
    let sessions = registry.sessions();
    let mut tx = sessions.writer().unwrap().begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('a')", &[])
        .await
        .unwrap();
    let sp = tx.begin().await.unwrap();
    let report = sessions.report();
    let w = report.engines.iter().find(|e| e.name == "writer").unwrap();
    assert_eq!(w.open_transactions.len(), 1);
    assert_eq!(
        (w.open_transactions[0].depth, w.open_transactions[0].begun),
        (1, true)
    );
    sp.commit().await.unwrap();
    tx.commit().await.unwrap();
    let report = sessions.report();
    assert!(
        report
            .engines
            .iter()
            .all(|e| e.open_transactions.is_empty())
    );
}

#[tokio::test]
async fn dropping_the_container_rolls_back_its_request_transaction_promptly() {
    let db = Db::new().await;
    let registry = db.three_engines().await;
    db.plain()
        .await
        .execute("INSERT INTO items(id, name) VALUES (1, 'x')", &[])
        .await
        .unwrap();
    let sessions = registry.sessions_in_transaction(TxOptions::new());
    sessions
        .writer()
        .unwrap()
        .execute("UPDATE items SET name = 'locked' WHERE id = 1", &[])
        .await
        .unwrap();
    // A second connection blocks on the row lock the request holds.
    let plain = db.plain().await;
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        plain
            .execute("UPDATE items SET name = 'second' WHERE id = 1", &[])
            .await
            .unwrap();
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dropped = Instant::now();
    drop(sessions);
    let waited = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("lock released")
        .unwrap();
    assert!(
        dropped.elapsed() < Duration::from_secs(1),
        "rollback took {:?}",
        dropped.elapsed()
    );
    assert!(waited >= Duration::from_millis(90));
    assert_eq!(db.plain_names().await, ["second"]);
    db.wait_no_transactions().await;
}

#[tokio::test]
async fn transaction_per_request_commits_or_rolls_back_every_touched_engine() {
    let db = Db::new().await;
    let registry = db.three_engines().await;
    let from = db.log_offset();

    let sessions = registry.sessions_in_transaction(TxOptions::new());
    let writer = sessions.writer().unwrap();
    writer
        .execute("INSERT INTO items(name) VALUES ('w')", &[])
        .await
        .unwrap();
    sessions
        .logger()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('l')", &[])
        .await
        .unwrap();
    // begin() inside the request transaction is a savepoint.
    let sp = writer.begin().await.unwrap();
    sp.execute("INSERT INTO items(name) VALUES ('undone')", &[])
        .await
        .unwrap();
    sp.rollback().await.unwrap();
    assert_eq!(
        db.plain_count("SELECT count(*) FROM items").await,
        0,
        "nothing visible before the end"
    );
    assert_eq!(registry.stats().open_transactions, 2);
    let report = sessions.finish(true).await.unwrap();
    assert!(
        report
            .engines
            .iter()
            .filter(|e| e.name != "reader")
            .all(|e| e.state == EngineState::End)
    );
    assert_eq!(db.plain_names().await, ["l", "w"]);
    let err = sessions
        .writer()
        .unwrap()
        .query("SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    if db.has_log() {
        let log = db.statements_since(from).join("\n");
        assert!(log.contains("SAVEPOINT"), "{log}");
    }

    let sessions = registry.sessions_in_transaction(TxOptions::new());
    sessions
        .writer()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('no')", &[])
        .await
        .unwrap();
    sessions.finish(false).await.unwrap();
    assert_eq!(db.plain_names().await, ["l", "w"]);
    db.wait_no_transactions().await;
    assert_eq!(registry.stats().open_transactions, 0);
}

#[tokio::test]
async fn reinit_lets_work_in_flight_finish_and_serves_new_work_from_new_backends() {
    let db = Db::new().await;
    let registry = db.three_engines().await;
    let s = registry.session("writer").unwrap();
    let pid = |s: pgassist::Session| async move {
        s.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };
    let old = pid(s.clone()).await;
    // In flight during reinit: an open transaction and a running statement.
    let tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('in flight')", &[])
        .await
        .unwrap();
    let slow = tokio::spawn({
        let s = s.clone();
        async move {
            s.query_one("SELECT pg_sleep(0.3)::text, pg_backend_pid()", &[])
                .await
                .map(|r| r.get::<_, i32>(1))
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    registry.reinit("writer").await.unwrap();
    let fresh = pid(s.clone()).await;
    let slow_pid = slow.await.unwrap().expect("the running statement finishes");
    tx.commit()
        .await
        .expect("the open transaction finishes on its old connection");
    assert_ne!(fresh, old);
    assert_ne!(fresh, slow_pid);
    assert_eq!(db.plain_names().await, ["in flight"]);
    // The old pool's connections close once returned.
    for _ in 0..100 {
        let pids: Vec<i32> = db.backends().await.iter().map(|b| b.0).collect();
        if !pids.contains(&old) && !pids.contains(&slow_pid) {
            assert!(pids.contains(&fresh));
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "old backends still open after reinit: {:?}",
        db.backends().await
    );
}

#[tokio::test]
async fn finish_through_a_shared_handle_ends_the_request_for_every_clone() {
    let db = Db::new().await;
    let registry = db.three_engines().await;

    // A web framework shares the container: the middleware and the handler
    // each hold a clone, and the middleware finishes it.
    let shared = std::sync::Arc::new(registry.sessions_in_transaction(TxOptions::new()));
    let handler = shared.clone();
    handler
        .writer()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('kept')", &[])
        .await
        .unwrap();
    shared.finish(true).await.unwrap();
    assert_eq!(db.plain_names().await, ["kept"]);
    // The clone that outlived the request can run nothing more.
    let err = handler
        .writer()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('late')", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");

    // A statement racing with finish either runs inside the request
    // transaction and is committed, or is refused, or (still in flight when
    // finish takes the transaction) is rolled back and finish says so; it
    // never begins a transaction that outlives the request. A fresh registry
    // per round makes the statement connect first, and finish starts at a
    // different moment each round, some while the request transaction is
    // being begun.
    for i in 0..30u64 {
        let registry = db.three_engines().await;
        let shared = std::sync::Arc::new(registry.sessions_in_transaction(TxOptions::new()));
        let handler = shared.clone();
        let name = format!("race{i}");
        let statement = tokio::spawn(async move {
            handler
                .logger()
                .unwrap()
                .execute("INSERT INTO items(name) VALUES ($1)", &[&name])
                .await
        });
        tokio::time::sleep(Duration::from_micros(i * 700)).await;
        let finished = shared.finish(true).await;
        let ran = statement.await.unwrap();
        let visible = db
            .plain_count(&format!(
                "SELECT count(*) FROM items WHERE name = 'race{i}'"
            ))
            .await;
        match (&finished, &ran) {
            (Ok(_), Ok(_)) => assert_eq!(visible, 1, "round {i}: ran, so committed"),
            (Ok(_), Err(Error::Closed { .. })) => assert_eq!(visible, 0, "round {i}: refused"),
            (Err(Error::Usage(_)), _) => assert_eq!(visible, 0, "round {i}: rolled back"),
            other => panic!("round {i}: unexpected outcome {other:?}"),
        }
        drop(shared);
        db.wait_no_transactions().await;
        registry.close().await;
    }
}
