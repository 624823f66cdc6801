//! Databases the harness creates on a user's server (`DATABASE_URL`) are
//! dropped with their handles, and the server's password never shows. The
//! "user's server" is a cluster the harness started, reached through
//! `TestCluster::existing` exactly as `TestCluster::shared` reaches
//! `DATABASE_URL`; the server itself (pg_database, pg_prepared_xacts,
//! pg_stat_activity) is asked what happened.

use std::sync::OnceLock;
use std::time::Duration;

use pgassist_testing::{ClusterOptions, TestCluster};
use tokio_postgres::{Client, NoTls};

/// A password in the URL; the cluster trusts loopback, so any one works.
const SECRET: &str = "pa$$:w/o@rd";
const SECRET_ENCODED: &str = "pa%24%24%3Aw%2Fo%40rd";

/// The "user's server": one cluster for this test binary.
fn server() -> &'static TestCluster {
    static SERVER: OnceLock<TestCluster> = OnceLock::new();
    SERVER.get_or_init(|| TestCluster::start(ClusterOptions::default()).expect("start a cluster"))
}

/// The user's server as `DATABASE_URL` would name it, with a password.
fn as_database_url(user: &str) -> TestCluster {
    let url = format!(
        "postgres://{user}:{SECRET_ENCODED}@127.0.0.1:{}/postgres?connect_timeout=10",
        server().port()
    );
    TestCluster::existing(url).expect("wrap the server")
}

async fn admin() -> Client {
    let (client, connection) = tokio_postgres::connect(&server().admin_url(), NoTls)
        .await
        .expect("connect as admin");
    tokio::spawn(connection);
    client
}

async fn exists(name: &str) -> bool {
    let row = admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) == 1
}

fn assert_no_secret(text: &str) {
    assert!(
        !text.contains(SECRET) && !text.contains(SECRET_ENCODED),
        "password shown: {text}"
    );
}

#[tokio::test]
async fn dropping_the_handle_drops_the_database_even_with_sessions_and_prepared_transactions() {
    let user_server = as_database_url("postgres");
    assert!(user_server.is_external());
    assert_no_secret(&format!("{user_server:?}"));

    let db = user_server.create_database().await.unwrap();
    assert!(db.drops_on_drop());
    assert!(db.url.contains(SECRET_ENCODED), "connectable as given");
    assert_no_secret(&format!("{db:?}"));
    assert!(exists(&db.name).await);

    // A session the test left open (a pool not shut down) and a prepared
    // transaction: each would make a plain DROP DATABASE fail.
    let (left_open, connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    let left_open_conn = tokio::spawn(connection);
    left_open
        .batch_execute(
            "CREATE TABLE t (id int); BEGIN; INSERT INTO t VALUES (1); \
             PREPARE TRANSACTION 'it''s \\ prepared'",
        )
        .await
        .unwrap();
    let admin = admin().await;
    let prepared: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_prepared_xacts WHERE database = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(prepared, 1);

    let name = db.name.clone();
    drop(db); // inside the test's runtime

    assert!(!exists(&name).await, "{name} is still in pg_database");
    let row = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_prepared_xacts WHERE database = $1), \
                    (SELECT count(*) FROM pg_stat_activity WHERE datname = $1)",
            &[&name],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (0, 0));
    // The session that was left open was ended by the server.
    let ended = tokio::time::timeout(Duration::from_secs(10), left_open_conn).await;
    assert!(ended.is_ok(), "the left-open connection is still alive");
    assert!(left_open.is_closed());
}

/// Outside any runtime, e.g. a handle kept in a synchronous test.
#[test]
fn dropping_the_handle_outside_a_runtime_drops_the_database() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = runtime
        .block_on(as_database_url("postgres").create_database())
        .unwrap();
    let name = db.name.clone();
    assert!(runtime.block_on(exists(&name)));
    drop(db);
    assert!(!runtime.block_on(exists(&name)));
}

#[tokio::test]
async fn a_kept_database_stays() {
    let db = as_database_url("postgres").create_database().await.unwrap();
    let name = db.name.clone();
    let url = db.keep();
    assert!(url.contains(&name));
    assert!(exists(&name).await);
    admin()
        .await
        .batch_execute(&format!("DROP DATABASE \"{name}\""))
        .await
        .unwrap();
}

#[tokio::test]
async fn databases_of_a_server_the_harness_started_are_not_dropped_one_by_one() {
    let db = server().create_database().await.unwrap();
    assert!(!db.drops_on_drop());
    let name = db.name.clone();
    drop(db);
    assert!(exists(&name).await, "it goes with the cluster");
}

/// CREATE DATABASE refused by the server (a role without CREATEDB): the
/// error says why and does not show the password.
#[tokio::test]
async fn a_refused_create_database_does_not_print_the_password() {
    admin()
        .await
        .batch_execute("CREATE ROLE no_createdb LOGIN NOCREATEDB")
        .await
        .unwrap();
    let user_server = as_database_url("no_createdb");
    let e = user_server.create_database().await.unwrap_err();
    let shown = format!("{e}\n{e:?}");
    assert!(
        shown.contains("permission denied to create database"),
        "{shown}"
    );
    assert!(shown.contains("no_createdb:***@127.0.0.1"), "{shown}");
    assert_no_secret(&shown);
}
