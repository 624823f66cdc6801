//! The core contract, observed from the server: the statement log
//! (`log_statement = 'all'`), `pg_stat_activity`, and a second plain
//! connection — not only pgassist's own counters.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Db, in_transaction_backends};
use pgassist::{EngineConfig, Error, IsolationLevel, Outcome, Queryable, Registry, TxOptions};

#[tokio::test]
async fn autocommit_sends_no_begin_and_is_visible_at_once() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let from = db.log_offset();
    session
        .execute("INSERT INTO items(name) VALUES ($1)", &[&"a"])
        .await
        .unwrap();
    // Visible to another connection at once: it was committed by itself.
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 1);
    session.query("SELECT * FROM items", &[]).await.unwrap();
    session
        .batch_execute("UPDATE items SET name = 'b'")
        .await
        .unwrap();
    assert_eq!(
        db.plain_count("SELECT count(*) FROM items WHERE name = 'b'")
            .await,
        1
    );

    let log = db.statements_since(from);
    assert!(
        !db.has_log() || log.iter().any(|l| l.contains("INSERT INTO items")),
        "{log:#?}"
    );
    assert!(
        !db.has_log() || log.iter().any(|l| l.contains("UPDATE items")),
        "{log:#?}"
    );
    for line in &log {
        let upper = line.to_uppercase();
        assert!(
            !upper.contains(": BEGIN") && !upper.contains("COMMIT"),
            "sent a transaction statement: {line}"
        );
    }
    // No connection is held between statements.
    let stats = registry.stats();
    let writer = stats.engine("writer").unwrap();
    assert_eq!(writer.in_use, 0);
    assert_eq!(writer.in_transaction, 0);
    assert_eq!(writer.begun, 0);
}

#[tokio::test]
async fn pool_of_one_serves_two_interleaved_sessions() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let a = registry.session("writer").unwrap();
    let b = registry.session("writer").unwrap();
    for i in 0..5 {
        a.execute("INSERT INTO items(name) VALUES ($1)", &[&format!("a{i}")])
            .await
            .unwrap();
        b.execute("INSERT INTO items(name) VALUES ($1)", &[&format!("b{i}")])
            .await
            .unwrap();
    }
    // And concurrently: the one connection is shared statement by statement.
    let run = |s: pgassist::Session, tag: &'static str| async move {
        for i in 0..20 {
            s.execute(
                "INSERT INTO items(name) VALUES ($1)",
                &[&format!("{tag}{i}")],
            )
            .await
            .unwrap();
        }
    };
    tokio::join!(run(a.clone(), "x"), run(b.clone(), "y"));
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 50);
    assert_eq!(
        db.backends().await.len(),
        1,
        "one server connection served both sessions"
    );
}

#[tokio::test]
async fn uncommitted_work_is_invisible_and_rollback_or_drop_discard_it() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();

    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('rolled back')", &[])
        .await
        .unwrap();
    assert_eq!(
        db.plain_count("SELECT count(*) FROM items").await,
        0,
        "uncommitted row visible"
    );
    assert_eq!(in_transaction_backends(&db).await, 1);
    tx.rollback().await.unwrap();
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);

    {
        let tx = session.begin().await.unwrap();
        tx.execute("INSERT INTO items(name) VALUES ('dropped')", &[])
            .await
            .unwrap();
    } // dropped unfinished
    db.wait_no_transactions().await;
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);

    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('kept')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        db.plain_count("SELECT count(*) FROM items WHERE name = 'kept'")
            .await,
        1
    );
    db.wait_no_transactions().await;
    assert_eq!(registry.stats().open_transactions, 0);
}

#[tokio::test]
async fn savepoint_rollback_discards_only_inner_work_at_several_depths() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();
    let from = db.log_offset();

    let mut tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('d0')", &[])
        .await
        .unwrap();
    {
        let mut sp1 = tx.begin().await.unwrap();
        assert_eq!(sp1.depth(), 1);
        sp1.execute("INSERT INTO items(name) VALUES ('d1')", &[])
            .await
            .unwrap();
        {
            let mut sp2 = sp1.begin().await.unwrap();
            sp2.execute("INSERT INTO items(name) VALUES ('d2')", &[])
                .await
                .unwrap();
            {
                let sp3 = sp2.begin().await.unwrap();
                sp3.execute("INSERT INTO items(name) VALUES ('d3')", &[])
                    .await
                    .unwrap();
                sp3.rollback().await.unwrap(); // d3 gone
            }
            sp2.execute("INSERT INTO items(name) VALUES ('d2b')", &[])
                .await
                .unwrap();
            sp2.commit().await.unwrap(); // d2, d2b kept (in sp1)
        }
        {
            let sp2 = sp1.begin().await.unwrap();
            sp2.execute("INSERT INTO items(name) VALUES ('dropped')", &[])
                .await
                .unwrap();
        } // dropped: rolled back before sp1's next statement
        sp1.execute("INSERT INTO items(name) VALUES ('d1b')", &[])
            .await
            .unwrap();
        sp1.commit().await.unwrap();
    }
    {
        let sp = tx.begin().await.unwrap();
        sp.execute("INSERT INTO items(name) VALUES ('gone')", &[])
            .await
            .unwrap();
        sp.rollback().await.unwrap();
    }
    tx.commit().await.unwrap();

    let names = db.plain_names().await;
    assert_eq!(names, ["d0", "d1", "d1b", "d2", "d2b"]);
    let log = db.statements_since(from).join("\n");
    let expected: &[&str] = if db.has_log() {
        &[
            "SAVEPOINT pgassist_sp_3",
            "ROLLBACK TO SAVEPOINT pgassist_sp_3",
            "RELEASE SAVEPOINT pgassist_sp_2",
        ]
    } else {
        &[]
    };
    for expected in expected {
        assert!(log.contains(expected), "missing {expected} in\n{log}");
    }
}

#[tokio::test]
async fn every_ended_transaction_returns_its_connection_clean() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let probe = registry.session("writer").unwrap();

    // commit, rollback, drop, statement error then commit, error then drop
    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('c')", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_autocommit(&db, &probe).await;

    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('r')", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_autocommit(&db, &probe).await;

    {
        let tx = session.begin().await.unwrap();
        tx.execute("INSERT INTO items(name) VALUES ('d')", &[])
            .await
            .unwrap();
    }
    assert_autocommit(&db, &probe).await;

    let tx = session.begin().await.unwrap();
    assert!(tx.execute("SELECT 1/0", &[]).await.is_err());
    assert!(matches!(
        tx.commit().await,
        Err(Error::TransactionAborted { .. })
    ));
    assert_autocommit(&db, &probe).await;

    {
        let tx = session.begin().await.unwrap();
        assert!(tx.execute("SELECT 1/0", &[]).await.is_err());
    }
    assert_autocommit(&db, &probe).await;

    assert_eq!(in_transaction_backends(&db).await, 0);
    assert_eq!(db.plain_names().await, ["c"]);
    let s = registry.stats();
    let w = s.engine("writer").unwrap();
    assert_eq!(
        (w.begun, w.committed, w.rolled_back, w.in_transaction),
        (5, 1, 4, 0)
    );
}

/// The server shows no backend of ours inside a transaction, and the next
/// statement on the pooled connection runs in autocommit: VACUUM refuses to
/// run inside a transaction block, so it succeeding proves it.
async fn assert_autocommit(db: &Db, probe: &pgassist::Session) {
    db.wait_no_transactions().await;
    probe
        .batch_execute("VACUUM items")
        .await
        .expect("the pooled connection is inside a transaction");
}

#[tokio::test]
async fn commit_after_a_statement_error_is_transaction_aborted_and_commits_nothing() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let session = registry.session("writer").unwrap();

    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('x')", &[])
        .await
        .unwrap();
    let err = tx
        .execute("INSERT INTO items(id, name) VALUES (NULL, 'y')", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Db { .. }), "{err:?}");
    // Using the aborted transaction is a typed error, without a round trip.
    let again = tx.query("SELECT 1", &[]).await.unwrap_err();
    assert!(
        matches!(again, Error::TransactionAborted { .. }),
        "{again:?}"
    );
    let commit = tx.commit().await.unwrap_err();
    assert!(
        matches!(commit, Error::TransactionAborted { .. }),
        "{commit:?}"
    );
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);

    // A failure pgassist never saw (the statement's future was dropped while
    // the server ran it): COMMIT still cannot report success.
    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('z')", &[])
        .await
        .unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(50),
        tx.execute(
            "SELECT 1 / (count(*) - count(*))::int FROM (SELECT pg_sleep(0.3)) s",
            &[],
        ),
    )
    .await;
    assert!(cut.is_err(), "the statement should have been cut off");
    let commit = tx.commit().await.unwrap_err();
    assert!(
        matches!(commit, Error::TransactionAborted { .. }),
        "{commit:?}"
    );
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
    db.wait_no_transactions().await;
}

#[tokio::test]
async fn futures_cut_off_mid_control_statement_never_return_a_dirty_connection() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let probe = registry.session("writer").unwrap();

    // Cut off COMMIT right after it went on the wire (first poll).
    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('maybe')", &[])
        .await
        .unwrap();
    poll_once_then_drop(tx.commit()).await;
    assert_autocommit(&db, &probe).await;

    // Cut off SAVEPOINT creation, then try to keep using the transaction.
    let mut tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('no')", &[])
        .await
        .unwrap();
    poll_once_then_drop(tx.begin()).await;
    let err = tx.execute("SELECT 1", &[]).await.unwrap_err();
    assert!(matches!(err, Error::TransactionAborted { .. }), "{err:?}");
    assert!(matches!(
        tx.commit().await,
        Err(Error::TransactionAborted { .. })
    ));
    assert_autocommit(&db, &probe).await;

    // Cut off the first statement (which carries the lazy BEGIN).
    let tx = session.begin().await.unwrap();
    poll_once_then_drop(tx.execute("INSERT INTO items(name) VALUES ('cut')", &[])).await;
    drop(tx);
    assert_autocommit(&db, &probe).await;

    assert_eq!(in_transaction_backends(&db).await, 0);
    let names = db.plain_names().await;
    assert!(names.iter().all(|n| n == "maybe"), "{names:?}");
}

async fn poll_once_then_drop<F: std::future::Future>(fut: F) {
    let mut fut = std::pin::pin!(fut);
    assert!(
        futures::poll!(fut.as_mut()).is_pending(),
        "expected the future to be in flight"
    );
}

#[tokio::test]
async fn read_only_engine_refuses_writes_with_a_typed_error() {
    let db = Db::new().await;
    let registry = Registry::builder()
        .engine("writer", db.config())
        .engine("reader", db.config().read_only(true))
        .build()
        .await
        .unwrap();
    let reader = registry.session("reader").unwrap();
    let err = reader
        .execute("INSERT INTO items(name) VALUES ('no')", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
    assert_eq!(
        err.code(),
        Some(&pgassist::SqlState::READ_ONLY_SQL_TRANSACTION)
    );
    let tx = reader.begin().await.unwrap();
    let err = tx
        .execute("INSERT INTO items(name) VALUES ('no')", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err:?}");
    drop(tx);
    assert_eq!(reader.query("SELECT 1", &[]).await.unwrap().len(), 1);
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
}

#[tokio::test]
async fn hooks_fire_once_per_outermost_transaction_with_the_outcome() {
    let db = Db::new().await;
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let (b, e) = (events.clone(), events.clone());
    let registry = Registry::builder()
        .engine("writer", db.config())
        .on_begin(move |ev| b.lock().unwrap().push(format!("begin {}", ev.engine())))
        .on_end(move |ev, outcome| {
            e.lock()
                .unwrap()
                .push(format!("end {} {outcome:?}", ev.engine()))
        })
        .build()
        .await
        .unwrap();
    let s = registry.session("writer").unwrap();
    let mut tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('h')", &[])
        .await
        .unwrap();
    tx.begin().await.unwrap().commit().await.unwrap(); // savepoints fire nothing
    tx.commit().await.unwrap();
    s.begin().await.unwrap().rollback().await.unwrap();
    let tx = s.begin().await.unwrap();
    tx.execute("SELECT 1/0", &[]).await.unwrap_err();
    tx.commit().await.unwrap_err();
    drop(s.begin().await.unwrap());
    assert_eq!(
        *events.lock().unwrap(),
        [
            "begin writer",
            "end writer Committed",
            "begin writer",
            "end writer RolledBack",
            "begin writer",
            "end writer RolledBack",
            "begin writer",
            "end writer RolledBack",
        ]
    );
    let st = registry.stats();
    let w = st.engine("writer").unwrap();
    assert_eq!((w.begun, w.committed, w.rolled_back), (4, 1, 3));
    assert!(w.checkouts >= 4 && w.statements >= 2, "{w:?}");
    let _ = Outcome::Committed;
}

#[tokio::test]
async fn begin_with_sends_all_options_in_one_statement_lazily() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();
    let from = db.log_offset();
    // A transaction that runs nothing sends nothing.
    s.begin().await.unwrap().commit().await.unwrap();
    let opts = TxOptions::new()
        .isolation(IsolationLevel::Serializable)
        .read_only(true)
        .deferrable(true);
    let tx = s.begin_with(opts).await.unwrap();
    let row = tx.query_one("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')", &[]).await.unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0).as_str(),
            row.get::<_, String>(1).as_str()
        ),
        ("serializable", "on")
    );
    tx.commit().await.unwrap();
    let log = db.statements_since(from);
    if !db.has_log() {
        return;
    }
    let begins: Vec<_> = log.iter().filter(|l| l.contains("BEGIN")).collect();
    assert_eq!(begins.len(), 1, "{log:#?}");
    assert!(
        begins[0].contains("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE"),
        "{log:#?}"
    );
}

#[tokio::test]
async fn closure_form_commits_on_ok_and_rolls_back_on_err() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();
    let id: i32 = s
        .transaction(TxOptions::new(), |tx| {
            Box::pin(async move {
                let row = tx
                    .query_one("INSERT INTO items(name) VALUES ($1) RETURNING id", &[&"ok"])
                    .await?;
                Ok::<_, Error>(row.get(0))
            })
        })
        .await
        .unwrap();
    assert!(id > 0);
    #[derive(Debug)]
    enum AppError {
        Db(#[allow(dead_code)] Error),
        Invalid,
    }
    impl From<Error> for AppError {
        fn from(e: Error) -> Self {
            AppError::Db(e)
        }
    }
    let r: Result<(), AppError> = s
        .transaction(TxOptions::new(), |tx| {
            Box::pin(async move {
                tx.execute("INSERT INTO items(name) VALUES ('err')", &[])
                    .await?;
                Err(AppError::Invalid)
            })
        })
        .await;
    assert!(matches!(r, Err(AppError::Invalid)));
    assert_eq!(db.plain_names().await, ["ok"]);
    let _ = AppError::Db(Error::Usage(String::new()));
    db.wait_no_transactions().await;
}

async fn count_items(q: &impl Queryable) -> i64 {
    q.query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn queryable_is_generic_over_session_and_transaction() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();
    assert_eq!(count_items(&s).await, 0);
    let tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('q')", &[])
        .await
        .unwrap();
    assert_eq!(count_items(&tx).await, 1);
    tx.rollback().await.unwrap();
    assert_eq!(count_items(&s).await, 0);
}

#[tokio::test]
async fn bad_input_gives_typed_errors_and_no_password() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let err = registry.session("nope").unwrap_err();
    assert!(matches!(err, Error::UnknownEngine { .. }), "{err}");
    assert!(err.to_string().contains("writer"));

    let s = registry.session("writer").unwrap();
    let err = s.batch_execute("BEGIN").await.unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err}");
    let err = s.query("SELECT $1::int", &[]).await.unwrap_err();
    assert!(matches!(err, Error::Query { .. }), "{err:?}");
    let err = s.query("SELECT $1::int", &[&"text"]).await.unwrap_err();
    assert!(matches!(err, Error::Query { .. }), "{err:?}");
    let err = s.query_one("SELECT 1 WHERE false", &[]).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let err = s.query("SELEC 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&pgassist::SqlState::SYNTAX_ERROR));
    assert!(s.query("", &[]).await.unwrap().is_empty());

    for bad in [
        Registry::builder().build().await.unwrap_err(),
        Registry::builder()
            .engine("w", db.config().max_size(0))
            .build()
            .await
            .unwrap_err(),
        Registry::builder()
            .engine("w", db.config())
            .engine("w", db.config())
            .build()
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(bad, Error::Config(_)), "{bad}");
    }
    let err = Registry::builder()
        .engine("w", db.config())
        .default_engine("x")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownEngine { .. }));

    let cfg = EngineConfig::from_url("postgres://ann:s3cr3t-pw@127.0.0.1:1/x").unwrap();
    let reg = Registry::builder()
        .engine("w", cfg.connection_timeout(Duration::from_millis(300)))
        .lazy()
        .build()
        .await
        .unwrap();
    assert!(!format!("{reg:?}").contains("s3cr3t-pw"));
    let err = reg
        .session("w")
        .unwrap()
        .query("SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("s3cr3t-pw"));
}

#[tokio::test]
async fn pool_exhaustion_is_a_pool_timeout() {
    let db = Db::new().await;
    let registry = db
        .registry(|c| c.max_size(1).connection_timeout(Duration::from_millis(200)))
        .await;
    let a = registry.session("writer").unwrap();
    let b = registry.session("writer").unwrap();
    let _tx = a.begin().await.unwrap();
    let err = b.query("SELECT 1", &[]).await.unwrap_err();
    assert!(matches!(err, Error::PoolTimeout { .. }), "{err:?}");
    assert_eq!(
        registry.stats().engine("writer").unwrap().checkout_timeouts,
        1
    );
}

#[tokio::test]
async fn reinit_replaces_connections_and_close_refuses_new_work() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(2)).await;
    let s = registry.session("writer").unwrap();
    let pid = |s: pgassist::Session| async move {
        s.query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    };
    let before = pid(s.clone()).await;
    assert_eq!(
        before,
        pid(s.clone()).await,
        "the pooled connection is reused"
    );
    registry.reinit("writer").await.unwrap();
    let after = pid(s.clone()).await;
    assert_ne!(before, after);
    assert!(matches!(
        registry.reinit("nope").await,
        Err(Error::UnknownEngine { .. })
    ));
    registry.close().await;
    let err = s.query("SELECT 1", &[]).await.unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    // The old connections are gone from the server.
    for _ in 0..100 {
        if db.backends().await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "connections still open after close: {:?}",
        db.backends().await
    );
}

#[tokio::test]
async fn a_cached_plan_invalidated_by_a_schema_change_is_prepared_again() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let s = registry.session("writer").unwrap();
    s.execute("INSERT INTO items(name) VALUES ('p')", &[])
        .await
        .unwrap();
    assert_eq!(
        s.query("SELECT * FROM items", &[]).await.unwrap()[0].len(),
        2
    );
    s.batch_execute("ALTER TABLE items ADD COLUMN extra int")
        .await
        .unwrap();
    assert_eq!(
        s.query("SELECT * FROM items", &[]).await.unwrap()[0].len(),
        3
    );
}

#[tokio::test]
async fn statements_in_flight_together_share_the_transaction_and_its_one_begin() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();
    let from = db.log_offset();
    // The first statements of a transaction, pipelined on `&tx`: the lazy
    // BEGIN goes out first, and the others run inside it.
    let tx = s.begin().await.unwrap();
    let xid = "SELECT txid_current()::text";
    let (a, b, c) = tokio::join!(
        tx.query_one(xid, &[]),
        tx.execute("INSERT INTO items(name) VALUES ('joined')", &[]),
        tx.query_one(xid, &[]),
    );
    let (a, c) = (
        a.unwrap().get::<_, String>(0),
        c.unwrap().get::<_, String>(0),
    );
    assert_eq!(b.unwrap(), 1);
    assert_eq!(a, c, "one transaction");
    assert_eq!(
        db.plain_count("SELECT count(*) FROM items").await,
        0,
        "not committed yet"
    );
    tx.commit().await.unwrap();
    assert_eq!(db.plain_names().await, ["joined"]);
    if db.has_log() {
        let log = db.statements_since(from);
        assert_eq!(
            log.iter().filter(|l| l.contains("BEGIN")).count(),
            1,
            "{log:#?}"
        );
        assert!(
            log.iter().any(|l| l.ends_with("statement: COMMIT")),
            "a plain COMMIT: {log:#?}"
        );
    }
}

/// A transaction dropped while the runtime it began on shuts down: its
/// ROLLBACK task never runs, yet its entry leaves the connection map, the
/// connection is discarded rather than reused, and the server keeps
/// nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_dropped_as_its_runtime_shuts_down_leaves_nothing_open() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(2)).await;
    let session = registry.session("writer").unwrap();
    let dropped = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tx = rt.block_on(async {
            let tx = session.begin().await.unwrap();
            tx.execute("INSERT INTO items(name) VALUES ('never')", &[])
                .await
                .unwrap();
            tx
        });
        rt.shutdown_background();
        drop(tx); // its ROLLBACK task is dropped at once
    });
    dropped.join().unwrap();
    let stats = registry.stats();
    assert_eq!(stats.open_transactions, 0, "{stats:?}");
    db.wait_no_transactions().await;
    assert!(db.plain_names().await.is_empty());
    // The pool goes on working, in autocommit.
    let s = registry.session("writer").unwrap();
    s.execute("INSERT INTO items(name) VALUES ('after')", &[])
        .await
        .unwrap();
    assert_eq!(db.plain_names().await, ["after"]);
    common::assert_pool_clean(&db, &registry, 2).await;
}
