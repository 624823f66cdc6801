//! A connection's life around its statements: connecting fails fast when
//! trying again cannot help, the registry checks its engines at start and
//! reports their health, and a statement nobody waits for any more is
//! cancelled on the server.

mod common;

use std::time::{Duration, Instant};

use common::{Db, first_failure, slow_to_give_up};
use pgassist::tokio_postgres::error::SqlState;
use pgassist::{EngineConfig, Error, Registry};
use pgassist_testing::{ClusterOptions, TestCluster};

/// What every fail-fast case allows: far below the 30 s timeout, and
/// generous for a noisy machine (they take milliseconds).
const FAST: Duration = Duration::from_secs(5);

/// Asserts a fast `Error::Connect` with `code` (or none) and prints the latency.
async fn assert_fails_fast(what: &str, url: &str, code: Option<SqlState>) {
    for lazy in [false, true] {
        let (err, took) = first_failure(url, lazy).await;
        println!("{what} (lazy: {lazy}): {took:?}: {err}");
        assert!(matches!(err, Error::Connect { .. }), "{what}: {err:?}");
        assert_eq!(err.code(), code.as_ref(), "{what}: {err}");
        assert!(took < FAST, "{what}: took {took:?}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }
}

#[tokio::test]
async fn an_unknown_database_or_role_fails_at_once_with_its_sqlstate() {
    let db = Db::new().await;
    let url = |dbname: &str| db.cluster.url(dbname);
    assert_fails_fast(
        "unknown database",
        &url("pgassist_no_such_db"),
        Some(SqlState::INVALID_CATALOG_NAME),
    )
    .await;
    let no_role = url(&db.db.name).replacen("postgres@", "pgassist_no_such_role@", 1);
    assert_fails_fast(
        "unknown role",
        &no_role,
        Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
    )
    .await;
}

#[tokio::test]
async fn an_unknown_host_fails_at_once() {
    // `.invalid` never resolves (RFC 2606): the resolver says so at once.
    assert_fails_fast(
        "unknown host",
        "postgres://ann:s3cr3t@pgassist-no-such-host.invalid:5432/app",
        None,
    )
    .await;
}

#[tokio::test]
async fn a_wrong_password_fails_at_once_with_28p01() {
    let Some(cluster) = own_cluster().await else {
        return;
    };
    // One role that must give its password over TCP; everyone else keeps trust.
    let admin = connect_plain(&cluster.admin_url()).await;
    admin
        .batch_execute("CREATE ROLE pw_user LOGIN PASSWORD 'right-pw'")
        .await
        .unwrap();
    let hba = cluster.data_dir().unwrap().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "host all pw_user 127.0.0.1/32 scram-sha-256\n\
             host all pw_user ::1/128 scram-sha-256\n{rules}"
        ),
    )
    .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at = |pw: &str| {
        format!(
            "postgres://pw_user:{pw}@{}:{}/postgres",
            cluster.host(),
            cluster.port()
        )
    };
    // The right password works (so the refusal below is the password's).
    let registry = Registry::builder()
        .engine("db", slow_to_give_up(&at("right-pw")))
        .build()
        .await
        .unwrap();
    registry
        .session("db")
        .unwrap()
        .execute("SELECT 1", &[])
        .await
        .unwrap();
    assert_fails_fast(
        "wrong password",
        &at("s3cr3t-wrong"),
        Some(SqlState::INVALID_PASSWORD),
    )
    .await;
    // Health reports the refusal with its SQLSTATE, also at once.
    let lazy = Registry::builder()
        .engine("db", slow_to_give_up(&at("s3cr3t-wrong")))
        .lazy()
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let health = lazy.health().await;
    assert!(started.elapsed() < FAST);
    let entry = health.engine("db").unwrap();
    assert!(!entry.reachable);
    assert_eq!(entry.code.as_deref(), Some("28P01"));
    assert!(!format!("{health:?}").contains("s3cr3t"));
}

#[tokio::test]
async fn a_refused_connection_is_retried_until_the_server_is_up() {
    let Some(cluster) = own_cluster().await else {
        return;
    };
    let url = cluster.admin_url();
    let cluster = std::sync::Arc::new(cluster);
    let stop = cluster.clone();
    tokio::task::spawn_blocking(move || stop.stop_server().unwrap())
        .await
        .unwrap();

    // Down: a short timeout gives up with the refusal, without a SQLSTATE.
    let short = EngineConfig::from_url(&url)
        .unwrap()
        .connection_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let err = Registry::builder()
        .engine("db", short)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert_eq!(err.code(), None);
    assert!(started.elapsed() >= Duration::from_millis(400), "retried");

    // A lazy registry starts while the server is down; a checked build
    // waits for it. Both are reached once the server is up.
    let lazy = Registry::builder()
        .engine("db", slow_to_give_up(&url))
        .lazy()
        .build()
        .await
        .unwrap();
    let health = lazy.health();
    let checked = Registry::builder()
        .engine("db", slow_to_give_up(&url))
        .build();
    let start = cluster.clone();
    let starter = async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::spawn_blocking(move || start.start_server().unwrap())
            .await
            .unwrap();
        Instant::now()
    };
    let (health, checked, up) = tokio::join!(health, checked, starter);
    let checked = checked.expect("the checked build waits for the server");
    println!("reached {:?} after the server was up", up.elapsed());
    assert!(health.all_reachable(), "{health:?}");
    let rtt = health.engine("db").unwrap().round_trip.unwrap();
    println!("round trip: {rtt:?}");
    // The build's connection stays in the pool for the first statement.
    assert_eq!(checked.stats().engine("db").unwrap().connections, 1);
    checked
        .session("db")
        .unwrap()
        .execute("SELECT 1", &[])
        .await
        .unwrap();
    lazy.session("db")
        .unwrap()
        .execute("SELECT 1", &[])
        .await
        .unwrap();
}

#[cfg(feature = "serde")]
#[tokio::test]
async fn health_serialises_for_a_readiness_probe() {
    let db = Db::new().await;
    let registry = Registry::builder()
        .engine("writer", db.config())
        .engine(
            "gone",
            EngineConfig::from_url(&db.cluster.url("pgassist_no_such_db")).unwrap(),
        )
        .lazy()
        .build()
        .await
        .unwrap();
    let health = registry.health().await;
    let json = serde_json::to_value(&health).unwrap();
    let engines = json["engines"].as_array().unwrap();
    assert_eq!(engines[0]["name"], "writer");
    assert_eq!(engines[0]["reachable"], true);
    assert!(engines[0]["round_trip_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(engines[1]["reachable"], false);
    assert_eq!(engines[1]["code"], "3D000");
    assert!(engines[1]["round_trip_ms"].is_null());
    println!("{json}");
}

/// Our backends still running something (pg_stat_activity, as a second
/// connection sees it), polled until none is left or `within` has passed;
/// returns how long that took, or panics with what still runs.
async fn wait_nothing_running(db: &Db, within: Duration) -> Duration {
    let plain = db.plain().await;
    let started = Instant::now();
    loop {
        let rows = plain
            .query(
                "SELECT query FROM pg_stat_activity WHERE application_name = $1 \
                 AND state = 'active'",
                &[&db.app],
            )
            .await
            .unwrap();
        if rows.is_empty() {
            return started.elapsed();
        }
        let running: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert!(started.elapsed() < within, "still running: {running:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_transaction_dropped_while_its_statement_runs_is_cancelled_and_frees_its_locks() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute("INSERT INTO items(name) VALUES ('locked')")
        .await
        .unwrap();
    let registry = db.registry(|c| c.max_size(2)).await;
    let session = registry.session("writer").unwrap();
    let tx = session.begin().await.unwrap();
    tx.execute("SELECT * FROM items FOR UPDATE", &[])
        .await
        .unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(300),
        tx.execute("SELECT pg_sleep(5)", &[]),
    )
    .await;
    assert!(cut.is_err(), "the statement should have been cut off");
    drop(tx);
    let took = wait_nothing_running(&db, Duration::from_secs(3)).await;
    println!("transaction: nothing of ours runs {took:?} after the drop");
    // The row lock is free: NOWAIT would fail at once with 55P03 otherwise.
    let plain = db.plain().await;
    let free = async {
        loop {
            match plain
                .query("SELECT * FROM items FOR UPDATE NOWAIT", &[])
                .await
            {
                Ok(_) => return,
                Err(e) => assert_eq!(e.code(), Some(&SqlState::LOCK_NOT_AVAILABLE), "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), free)
        .await
        .expect("the row lock is freed");
    println!("row lock free {:?} later", started.elapsed());
    // The pool serves on (the next statement is not cancelled).
    session.execute("SELECT 1", &[]).await.unwrap();
}

#[tokio::test]
async fn an_autocommit_statement_dropped_midway_is_cancelled() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let cut = tokio::time::timeout(
        Duration::from_millis(300),
        session.execute("SELECT pg_sleep(5)", &[]),
    )
    .await;
    assert!(cut.is_err());
    let took = wait_nothing_running(&db, Duration::from_secs(3)).await;
    println!("autocommit: nothing of ours runs {took:?} after the drop");
    let cut = tokio::time::timeout(
        Duration::from_millis(300),
        session.batch_execute("SELECT pg_sleep(5); SELECT pg_sleep(5)"),
    )
    .await;
    assert!(cut.is_err());
    let took = wait_nothing_running(&db, Duration::from_secs(3)).await;
    println!("autocommit batch: nothing of ours runs {took:?} after the drop");
    session.execute("SELECT 1", &[]).await.unwrap();
}

/// Cancels sent for statements that were about to finish anyway must not
/// hit the statements that follow on the same pooled connection.
#[tokio::test]
async fn a_late_cancel_never_hits_the_next_statement() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let session = registry.session("writer").unwrap();
    let mut failures = Vec::new();
    for i in 0..60_u64 {
        // Cut off around the statement's own end (10 ms), at varying points.
        let wait = Duration::from_micros(7_000 + (i * 797) % 6_000);
        if i % 2 == 0 {
            let _ = tokio::time::timeout(wait, session.execute("SELECT pg_sleep(0.01)", &[])).await;
        } else {
            let tx = session.begin().await.unwrap();
            let _ = tokio::time::timeout(wait, tx.execute("SELECT pg_sleep(0.01)", &[])).await;
            drop(tx);
        }
        // What follows at once (and a little later) must run untouched.
        for sql in ["SELECT pg_sleep(0.002)", "SELECT pg_sleep(0.02)"] {
            if let Err(e) = session.execute(sql, &[]).await {
                failures.push(format!("{i}: {e}"));
            }
        }
        let tx = session.begin().await.unwrap();
        let in_tx = tx.execute("SELECT pg_sleep(0.005)", &[]).await;
        if let Err(e) = in_tx.and(Ok(())).and(tx.commit().await) {
            failures.push(format!("{i} (transaction): {e}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    let stats = registry.stats();
    println!("{:?}", stats.engine("writer").unwrap());
}

/// A cluster of this test's own (it stops the server or edits pg_hba.conf),
/// or `None` with an external `DATABASE_URL`.
async fn own_cluster() -> Option<TestCluster> {
    if TestCluster::shared().is_external() {
        println!("skipped: needs a cluster of its own (DATABASE_URL is set)");
        return None;
    }
    let started = tokio::task::spawn_blocking(|| TestCluster::start(ClusterOptions::default()));
    Some(started.await.unwrap().expect("start a cluster"))
}

async fn connect_plain(url: &str) -> pgassist::tokio_postgres::Client {
    let (client, conn) = pgassist::tokio_postgres::connect(url, pgassist::tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}
