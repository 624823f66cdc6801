//! On-commit / on-rollback callbacks and durable transactions.

mod common;

use std::sync::{Arc, Mutex};

use common::Db;
use pgassist::{Error, TxOptions};

type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, s: &str) -> impl FnOnce() + Send + 'static {
    let (log, s) = (log.clone(), s.to_owned());
    move || log.lock().unwrap().push(s)
}

#[tokio::test]
async fn callbacks_follow_what_happened_to_their_work() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();
    let log: Log = Arc::default();

    let mut tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('a')", &[])
        .await
        .unwrap();
    tx.on_commit(push(&log, "commit 1"));
    tx.on_rollback(push(&log, "rollback outer"));
    {
        let sp = tx.begin().await.unwrap();
        sp.on_commit(push(&log, "commit in released savepoint"));
        sp.commit().await.unwrap();
    }
    {
        let sp = tx.begin().await.unwrap();
        sp.on_commit(push(&log, "commit in rolled back savepoint"));
        sp.on_rollback(push(&log, "rollback of savepoint"));
        sp.rollback().await.unwrap();
    }
    {
        let sp = tx.begin().await.unwrap();
        sp.on_commit(push(&log, "commit in dropped savepoint"));
    }
    let l = log.clone();
    tx.on_commit_async(move || {
        Box::pin(async move {
            tokio::task::yield_now().await;
            l.lock().unwrap().push("async commit".into());
        })
    });
    tx.on_commit(|| panic!("a failing callback does not fail the commit"));
    tx.on_commit(push(&log, "commit last"));
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .all(|e| e.starts_with("rollback")),
        "nothing before COMMIT"
    );
    tx.commit().await.expect("callback panics are contained");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "rollback of savepoint",
            "commit 1",
            "commit in released savepoint",
            "async commit",
            "commit last"
        ]
    );
    assert_eq!(db.plain_names().await, ["a"]);

    log.lock().unwrap().clear();
    let tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('b')", &[])
        .await
        .unwrap();
    tx.on_commit(push(&log, "never"));
    tx.on_rollback(push(&log, "rolled back"));
    tx.rollback().await.unwrap();
    let tx = s.begin().await.unwrap();
    tx.execute("SELECT 1", &[]).await.unwrap();
    tx.on_rollback(push(&log, "dropped"));
    drop(tx);
    let tx = s.begin().await.unwrap();
    tx.execute("SELECT 1/0", &[]).await.unwrap_err();
    tx.on_commit(push(&log, "never"));
    tx.on_rollback(push(&log, "failed commit"));
    tx.commit().await.unwrap_err();
    assert_eq!(
        *log.lock().unwrap(),
        ["rolled back", "dropped", "failed commit"]
    );
}

#[tokio::test]
async fn a_failed_retry_attempt_drops_its_own_callbacks() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();
    let log: Log = Arc::default();
    let l = log.clone();
    s.transaction(TxOptions::new().retries(2), move |tx| {
        let l = l.clone();
        Box::pin(async move {
            let attempt = tx.attempt();
            tx.on_commit(push(&l, &format!("commit of attempt {attempt}")));
            if attempt == 1 {
                // A real serialization failure is raised by the server; this
                // raises the same SQLSTATE so the attempt is retried.
                tx.batch_execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                )
                .await?;
            }
            Ok::<_, Error>(())
        })
    })
    .await
    .unwrap();
    assert_eq!(*log.lock().unwrap(), ["commit of attempt 2"]);
}

#[tokio::test]
async fn durable_refuses_to_be_nested() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    // Outermost: fine.
    let tx = registry
        .session("writer")
        .unwrap()
        .begin_with(TxOptions::new().durable())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // Inside a transaction-per-request scope it would be a savepoint: refused.
    let sessions = registry.sessions_in_transaction(TxOptions::new());
    let err = sessions
        .writer()
        .unwrap()
        .begin_with(TxOptions::new().durable())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err:?}");
    assert!(err.to_string().contains("durable"));
}
