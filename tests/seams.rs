//! The seams between the pieces that hold a connection's state, each bug
//! found there pinned by a test that observes the server: a savepoint that
//! outlives its transaction, a batch that slips transaction control past the
//! text check, a COPY that leaves the protocol out of step.

mod common;

use std::time::Duration;

use common::{Db, in_transaction_backends};
use pgassist::{Error, TxOptions};

/// Statements the server logged for this test since `from`, in order,
/// reduced to their SQL text.
fn logged(db: &Db, from: u64) -> Vec<String> {
    db.statements_since(from)
        .iter()
        .filter_map(|l| {
            l.split_once("statement: ")
                .or_else(|| l.split_once(": "))
                .map(|(_, sql)| sql.trim().to_owned())
        })
        .collect()
}

/// A database whose connections read backslashes in '…' strings as escapes
/// (`standard_conforming_strings = off`), the setting the text check cannot
/// see, and a registry of one connection on it.
async fn backslash_escapes_on() -> (Db, pgassist::Registry) {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET standard_conforming_strings = off",
            db.db.name
        ))
        .await
        .unwrap();
    let registry = db.registry(|c| c.max_size(1)).await;
    (db, registry)
}

/// A savepoint taken from a per-request transaction cannot run anything
/// once `finish(true)` has committed the request: it gets a typed error and
/// nothing reaches the server (the bug: the INSERT ran in autocommit and
/// was committed on its own, and RELEASE failed with 25P01).
#[tokio::test]
async fn a_savepoint_cannot_outlive_its_request_transaction() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let from = db.log_offset();
    let sessions = registry.sessions_in_transaction(TxOptions::new());
    let writer = sessions.writer().unwrap().clone();
    writer
        .execute("INSERT INTO items(name) VALUES ('outer')", &[])
        .await
        .unwrap();
    let sp = writer.begin().await.unwrap();
    assert_eq!(sp.depth(), 1);
    sp.execute("INSERT INTO items(name) VALUES ('in savepoint')", &[])
        .await
        .unwrap();
    sessions.finish(true).await.unwrap();

    let late = sp
        .execute("INSERT INTO items(name) VALUES ('after the end')", &[])
        .await;
    assert!(
        matches!(late, Err(Error::Usage(ref m)) if m.contains("ended")),
        "{late:?}"
    );
    let release = sp.commit().await;
    assert!(matches!(release, Err(Error::Usage(_))), "{release:?}");

    if db.has_log() {
        let sql = logged(&db, from);
        let commit = sql
            .iter()
            .position(|s| s == "COMMIT")
            .expect("COMMIT logged");
        assert!(
            sql[commit + 1..].is_empty(),
            "nothing may follow the COMMIT: {sql:#?}"
        );
    }
    assert_eq!(db.plain_names().await, ["in savepoint", "outer"]);
    db.wait_no_transactions().await;
}

/// The same when the container is dropped (which rolls back) and when the
/// outer transaction of a plain session ends first.
#[tokio::test]
async fn a_savepoint_is_refused_after_its_container_is_dropped() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    let sessions = registry.sessions_in_transaction(TxOptions::new());
    let writer = sessions.writer().unwrap().clone();
    let sp = writer.begin().await.unwrap();
    sp.execute("INSERT INTO items(name) VALUES ('rolled back')", &[])
        .await
        .unwrap();
    let from = db.log_offset();
    drop(sessions);
    // The drop's ROLLBACK runs on a spawned task; the savepoint is refused
    // whether it is still in flight or answered.
    let late = sp
        .execute("INSERT INTO items(name) VALUES ('late')", &[])
        .await;
    assert!(matches!(late, Err(Error::Usage(_))), "{late:?}");
    db.wait_no_transactions().await;
    drop(sp);
    assert!(db.plain_names().await.is_empty());
    if db.has_log() {
        let sql = logged(&db, from);
        assert!(
            !sql.iter().any(|s| s.contains("'late'")),
            "the refused INSERT reached the server: {sql:#?}"
        );
    }
}

/// A batch whose text hides a BEGIN from the text check (a backslash in a
/// string, with `standard_conforming_strings = off` on the server) is
/// caught: by the text check, or by the transaction-status probe pipelined
/// behind the batch. Never `Ok` with the connection left in a transaction.
#[tokio::test]
async fn a_batch_cannot_leave_its_connection_in_a_transaction() {
    let (db, registry) = backslash_escapes_on().await;
    let session = registry.session("writer").unwrap();
    for hidden in [
        r"SELECT 'a\', '; BEGIN; SELECT ''",
        r"SELECT 'a\', '; START TRANSACTION; INSERT INTO items(name) VALUES ('x'); SELECT ''",
        r"SELECT 'a\', '; BEGIN; SELECT 1/0; SELECT ''",
    ] {
        let r = session.batch_execute(hidden).await;
        assert!(r.is_err(), "{hidden}: {r:?}");
        assert_eq!(in_transaction_backends(&db).await, 0, "{hidden}");
        // The pool's one connection serves the next statement, in autocommit:
        // what it writes is visible from outside at once.
        session
            .execute("INSERT INTO items(name) VALUES ('next')", &[])
            .await
            .unwrap();
        assert_eq!(db.plain_names().await, ["next"], "{hidden}");
        db.plain()
            .await
            .batch_execute("DELETE FROM items")
            .await
            .unwrap();
    }
    assert!(db.plain_names().await.is_empty());
    // Plain batches still pass, and the probe costs no extra round trip's
    // worth of trouble: many in a row on one connection.
    for _ in 0..20 {
        session
            .batch_execute("INSERT INTO items(name) VALUES ('ok'); SELECT 1")
            .await
            .unwrap();
    }
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 20);
}

/// Inside a transaction, a batch that would end the transaction behind the
/// text check's back never does so unnoticed: either the text check refuses
/// it before anything is sent (the transaction goes on, its work still
/// invisible outside), or the status probe behind the batch sees the
/// transaction gone and the transaction goes no further.
#[tokio::test]
async fn a_batch_cannot_end_a_transaction_early_unnoticed() {
    let (db, registry) = backslash_escapes_on().await;
    let session = registry.session("writer").unwrap();
    let tx = session.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('first')", &[])
        .await
        .unwrap();
    let r = tx.batch_execute(r"SELECT 'a\', '; COMMIT; SELECT ''").await;
    match r {
        // Refused before sending: still one open transaction, nothing visible.
        Err(Error::Usage(_)) => {
            assert!(db.plain_names().await.is_empty(), "committed early");
            tx.execute("INSERT INTO items(name) VALUES ('second')", &[])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            assert_eq!(db.plain_names().await, ["first", "second"]);
        }
        // Sent, and the probe saw the transaction end: it goes no further.
        Err(Error::TransactionAborted { .. }) => {
            let next = tx
                .execute("INSERT INTO items(name) VALUES ('second')", &[])
                .await;
            assert!(next.is_err(), "{next:?}");
            assert!(tx.commit().await.is_err());
            assert!(!db.plain_names().await.contains(&"second".to_owned()));
        }
        other => panic!("the batch must not pass: {other:?}"),
    }
    db.wait_no_transactions().await;
    session.query_one("SELECT 1", &[]).await.unwrap();
}

/// `COPY … FROM STDIN` sent as a plain statement puts the server in COPY
/// mode, which the driver did not start: the statement fails, and the
/// connection is discarded instead of being handed to the next session
/// (the bug: the next `SELECT 1` on the pool got `Closed`).
#[tokio::test]
async fn a_copy_pgassist_did_not_start_never_reaches_the_next_user() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let before: i32 = session
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let r = session.execute("COPY items FROM STDIN", &[]).await;
    assert!(r.is_err(), "{r:?}");
    let other = registry.session("writer").unwrap();
    let after: i32 = common::within(
        Duration::from_secs(10),
        "the statement after a COPY",
        other.query_one("SELECT pg_backend_pid()", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert_ne!(before, after, "the connection in COPY mode was reused");
    assert!(registry.stats().engine("writer").unwrap().discarded_dirty >= 1);

    // Inside a transaction: the transaction cannot go on, and its rollback
    // leaves nothing behind.
    let tx = other.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('in tx')", &[])
        .await
        .unwrap();
    assert!(tx.execute("COPY items FROM STDIN", &[]).await.is_err());
    assert!(tx.execute("SELECT 1", &[]).await.is_err());
    tx.rollback().await.unwrap();
    db.wait_no_transactions().await;
    assert!(db.plain_names().await.is_empty());
    other.query_one("SELECT 1", &[]).await.unwrap();
}

/// `Sessions::commit` and `Sessions::rollback` end a request as
/// `finish(true)` / `finish(false)` do, seen from a second connection.
#[tokio::test]
async fn a_request_ends_by_name() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    for (commit, name) in [(false, "rolled back"), (true, "committed")] {
        let sessions = registry.sessions_in_transaction(TxOptions::new());
        sessions
            .writer()
            .unwrap()
            .execute("INSERT INTO items(name) VALUES ($1)", &[&name])
            .await
            .unwrap();
        assert!(db.plain_names().await.is_empty(), "{name}: visible early");
        let report = if commit {
            sessions.commit().await
        } else {
            sessions.rollback().await
        };
        assert!(report.is_ok(), "{report:?}");
        let late = sessions.writer().unwrap().execute("SELECT 1", &[]).await;
        assert!(matches!(late, Err(Error::Closed { .. })), "{late:?}");
    }
    assert_eq!(db.plain_names().await, ["committed"]);
    db.wait_no_transactions().await;
}

/// The transaction-status probe says what the server's state is — checked
/// on a plain connection, sent the way pgassist sends it (its own message,
/// pipelined behind the batch): `f` in autocommit (also right after a
/// batch that committed), `t` inside a block opened by an earlier message
/// or earlier in the same pipeline, an error in an aborted block. The text
/// check catches every hidden BEGIN the tests know, so the probe is proven
/// here directly.
#[tokio::test]
async fn the_status_probe_reads_the_servers_transaction_state() {
    let db = Db::new().await;
    let c = db.plain().await;
    let probe = || c.simple_query(pgassist::STATUS_PROBE);
    let answer = |m: Vec<tokio_postgres::SimpleQueryMessage>| {
        m.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .expect("a row")
    };
    for _ in 0..50 {
        // Autocommit, alone and pipelined behind a batch.
        assert_eq!(answer(probe().await.unwrap()), "f");
        let (batch, p) = tokio::join!(c.batch_execute("SELECT 1; SELECT 2"), probe());
        batch.unwrap();
        assert_eq!(answer(p.unwrap()), "f");
        // A batch that opens a block, the probe pipelined behind it.
        let (batch, p) = tokio::join!(c.batch_execute("SELECT 1; BEGIN; SELECT 2"), probe());
        batch.unwrap();
        assert_eq!(answer(p.unwrap()), "t", "inside the block the batch opened");
        // A batch that ends it again.
        let (batch, p) = tokio::join!(c.batch_execute("SELECT 3; COMMIT"), probe());
        batch.unwrap();
        assert_eq!(answer(p.unwrap()), "f", "after the batch's COMMIT");
        // An aborted block: the probe fails with 25P02.
        let (batch, p) = tokio::join!(c.batch_execute("BEGIN; SELECT 1/0"), probe());
        assert!(batch.is_err());
        let e = p.unwrap_err();
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
        );
        c.batch_execute("ROLLBACK").await.unwrap();
    }
}
