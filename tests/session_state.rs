//! No session state survives its user: on a pool of one connection, each
//! statement that changes session state is either refused (autocommit) or
//! undone before the next user gets the connection (inside a transaction,
//! or where only a function call shows it) — checked from the server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Db;
use pgassist::{Error, Session};

/// What the next user of the (only) connection sees, as one row of text:
/// every piece of session state the policy covers.
const STATE_SQL: &str = "SELECT current_setting('statement_timeout') || '|' || \
     current_setting('search_path') || '|' || current_setting('work_mem') || '|' || \
     (current_user = session_user)::text || '|' || \
     (SELECT count(*) FROM pg_listening_channels())::text || '|' || \
     (SELECT count(*) FROM pg_prepared_statements WHERE from_sql)::text || '|' || \
     (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())::text || '|' || \
     (SELECT count(*) FROM pg_cursors WHERE name <> '')::text || '|' || \
     (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())::text";

/// The server's defaults, as [`STATE_SQL`] shows them.
const DEFAULTS: &str = "0|\"$user\", public|4MB|true|0|0|0|0|0";

async fn state(session: &Session) -> (String, i32) {
    let row = session
        .query_one(&format!("SELECT ({STATE_SQL}), pg_backend_pid()"), &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// A role the test may switch to (the harness connects as a superuser).
async fn role(db: &Db) -> String {
    let role = format!("r_{}", db.db.name);
    db.plain()
        .await
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS \"{role}\"; CREATE ROLE \"{role}\""
        ))
        .await
        .unwrap();
    role
}

/// Every session-state statement of the policy, with the kind of state it leaves.
fn statements(role: &str) -> Vec<String> {
    [
        "SET statement_timeout = '1ms'",
        "SET search_path TO pg_catalog",
        "set work_mem = '1MB'",
        "RESET work_mem",
        &format!("SET ROLE \"{role}\""),
        &format!("SET SESSION AUTHORIZATION \"{role}\""),
        "CREATE TEMP TABLE t_temp (a int)",
        "CREATE TEMPORARY VIEW v_temp AS SELECT 1",
        "SELECT 1 AS a INTO TEMP t_into",
        "PREPARE p_user AS SELECT 1",
        "DEALLOCATE ALL",
        "LISTEN some_channel",
        "UNLISTEN *",
        "DECLARE c_hold CURSOR WITH HOLD FOR SELECT 1",
        "DISCARD TEMP",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Autocommit: every statement is refused, as a single statement and as
/// part of a batch, with the advice the docs give; nothing reached the
/// connection, and the example (`pg_sleep` after a 1 ms timeout)
/// runs.
#[tokio::test]
async fn autocommit_refuses_every_session_state_statement() {
    let db = Db::new().await;
    let role = role(&db).await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let mut all = statements(&role);
    all.push("LOAD 'auto_explain'".into());
    for sql in &all {
        for batch in [false, true] {
            let result = if batch {
                session
                    .batch_execute(&format!("SELECT 1; {sql}; SELECT 2"))
                    .await
            } else {
                session.execute(sql.as_str(), &[]).await.map(drop)
            };
            match result {
                Err(Error::Usage(m)) => {
                    assert!(m.contains("SET LOCAL"), "{sql}: {m}");
                    assert!(m.contains("session.pin()"), "{sql}: {m}");
                    assert!(m.contains("EngineConfig::setting"), "{sql}: {m}");
                }
                other => panic!("{sql} (batch {batch}): {other:?}"),
            }
        }
        assert_eq!(state(&session).await.0, DEFAULTS, "after {sql}");
    }
    // The example.
    session.query("SELECT pg_sleep(0.01)", &[]).await.unwrap();
    // Not session state: SET LOCAL, SET TRANSACTION and look-alikes run.
    session
        .batch_execute("CREATE TABLE temp (a int)")
        .await
        .unwrap();
    session
        .execute("INSERT INTO temp VALUES (1)", &[])
        .await
        .unwrap();
    session
        .execute("UPDATE items SET name = 'set x = 1'", &[])
        .await
        .unwrap();
}

/// Inside a transaction each statement runs (a plain SET there outlives
/// its COMMIT on the server) and the connection is reset before the next
/// user: the same connection (same backend) shows the server's defaults.
#[tokio::test]
async fn inside_a_transaction_the_connection_is_reset_before_its_next_user() {
    let db = Db::new().await;
    let role = role(&db).await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let (before, pid) = state(&session).await;
    assert_eq!(before, DEFAULTS);
    // DEALLOCATE ALL included: it also drops pgassist's own cached
    // statements, and the cache is cleared with them (tests/leftovers.rs).
    for sql in statements(&role) {
        // A 1 ms timeout would fail the COMMIT itself: a longer one shows the same.
        let sql = sql.replace("'1ms'", "'900ms'");
        for commit in [true, false] {
            let tx = session.begin().await.unwrap();
            tx.batch_execute(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            if commit {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
            let (after, now) = state(&session).await;
            assert_eq!(after, DEFAULTS, "after {sql} (commit {commit})");
            assert_eq!(now, pid, "{sql}: the connection was reset, not replaced");
        }
    }
    // The example, inside a transaction this time.
    let tx = session.begin().await.unwrap();
    tx.execute("SET statement_timeout = '1ms'", &[])
        .await
        .unwrap();
    drop(tx);
    session.query("SELECT pg_sleep(0.01)", &[]).await.unwrap();
    // Extended protocol, plain statement inside a transaction, committed.
    let tx = session.begin().await.unwrap();
    tx.execute("SET search_path TO pg_catalog", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(state(&session).await, (DEFAULTS.to_owned(), pid));
    let stats = registry.stats();
    assert_eq!(stats.engines[0].discarded_dirty, 0, "{stats:?}");
}

/// What the text cannot name — a session advisory lock, `set_config(…,
/// false)`, a DO block — runs in autocommit, and its connection is reset:
/// the lock is free for a second connection, the setting gone.
#[tokio::test]
async fn function_calls_that_change_the_session_are_undone() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let (_, pid) = state(&session).await;
    let plain = db.plain().await;
    let calls = [
        "SELECT pg_advisory_lock(42)",
        "SELECT pg_try_advisory_lock_shared(42)",
        "SELECT set_config('search_path', 'pg_catalog', false)",
        "SELECT set_config('work_mem', '1MB', false)",
        "DO $$ BEGIN PERFORM pg_catalog.pg_advisory_lock(42); END $$",
        "DO $$ BEGIN EXECUTE 'SET search_path TO pg_catalog'; EXECUTE 'LISTEN x'; END $$",
        "CREATE TABLE pg_temp.t_qualified (a int)",
    ];
    for sql in calls {
        session.batch_execute(sql).await.unwrap();
        assert_eq!(state(&session).await, (DEFAULTS.to_owned(), pid), "{sql}");
        // A second connection takes the lock at once: nothing holds it.
        let free: bool = plain
            .query_one("SELECT pg_try_advisory_lock(42)", &[])
            .await
            .unwrap()
            .get(0);
        assert!(free, "{sql}: the advisory lock leaked");
        plain
            .query("SELECT pg_advisory_unlock_all()", &[])
            .await
            .unwrap();
        // The extended protocol too.
        if !sql.starts_with("DO") && !sql.starts_with("CREATE") {
            session.query(sql, &[]).await.unwrap();
            assert_eq!(state(&session).await, (DEFAULTS.to_owned(), pid), "{sql}");
        }
    }
}

/// Connect-time settings reach every connection and survive resets; the
/// after_connect hook runs on each new connection and again after each
/// reset, so what it sets is there for every user.
#[tokio::test]
async fn connect_time_settings_and_the_after_connect_hook_survive_resets() {
    let db = Db::new().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let registry = db
        .registry(move |c| {
            c.max_size(1)
                .setting("search_path", "pg_catalog, public")
                .setting("statement_timeout", "5s")
                .setting("lc_monetary", "C")
                .after_connect(move |client| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Box::pin(async move { client.batch_execute("SET work_mem = '7MB'").await })
                })
        })
        .await;
    let session = registry.session("writer").unwrap();
    let show = "SELECT current_setting('search_path') || '|' || \
                current_setting('statement_timeout') || '|' || current_setting('work_mem') || '|' || \
                current_setting('lc_monetary')";
    let want = "pg_catalog, public|5s|7MB|C";
    let row = session.query_one(show, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), want);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let tx = session.begin().await.unwrap();
    tx.batch_execute("SET search_path TO public; SET work_mem = '1MB'; SET statement_timeout = 0")
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let row = session.query_one(show, &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), want);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the hook ran again after the reset"
    );
    // A bad setting name is refused when the registry is built.
    let bad = pgassist::Registry::builder()
        .engine("x", db.config().setting("a b", "1"))
        .build()
        .await;
    assert!(matches!(bad, Err(Error::Config(_))), "{bad:?}");
}

/// A reset that fails discards the connection instead of handing it on:
/// here the flagged connection's backend is terminated before its reset.
#[tokio::test]
async fn a_connection_whose_reset_fails_is_discarded() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let (_, pid) = state(&session).await;
    let tx = session.begin().await.unwrap();
    tx.execute("SET search_path TO pg_catalog", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The reset may already be done; either way the next user sees defaults.
    let _ = db
        .plain()
        .await
        .query("SELECT pg_terminate_backend($1)", &[&pid])
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (after, _) = state(&session).await;
    assert_eq!(after, DEFAULTS);
}
