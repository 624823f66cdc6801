//! Through a real PgBouncer in transaction pooling mode (Debian's package;
//! `.ci/run` installs it): autocommit, transactions, savepoints, and a clear
//! error for two-phase commit.

mod common;

use common::Db;
use pgassist::{EngineConfig, Error, Registry};
use pgassist_testing::PgBouncer;

/// A PgBouncer in front of the test cluster, or `None` (said why) where
/// none can be started.
fn bouncer(db: &Db) -> Option<PgBouncer> {
    if db.cluster.is_external() {
        eprintln!("DATABASE_URL is set: no PgBouncer is started next to it; skipping");
        return None;
    }
    let bouncer = db.cluster.start_pgbouncer().unwrap();
    if bouncer.is_none() {
        eprintln!("pgbouncer is not installed; skipping (.ci/run installs it)");
    }
    bouncer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_works_through_pgbouncer_transaction_pooling() {
    let db = Db::new().await;
    let Some(bouncer) = bouncer(&db) else {
        return;
    };
    let through = EngineConfig::from_url(&bouncer.url(&db.db.name))
        .unwrap()
        .pgbouncer(true)
        .max_size(8);
    let registry = Registry::builder()
        .engine("bounced", through)
        .engine("direct", db.config())
        .build()
        .await
        .unwrap();
    let s = registry.session("bounced").unwrap();

    // Autocommit with parameters, many statements over many server connections.
    let mut tasks = Vec::new();
    for t in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let name = format!("t{t}-{i}");
                s.execute("INSERT INTO items(name) VALUES ($1)", &[&name])
                    .await
                    .unwrap();
                let row = s
                    .query_one("SELECT name FROM items WHERE name = $1", &[&name])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, String>(0), name);
                let n: i64 = s
                    .query_one("SELECT count(*) FROM items WHERE id > $1", &[&0_i32])
                    .await
                    .unwrap()
                    .get(0);
                assert!(n > 0);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 400);

    // A transaction with a savepoint.
    let mut tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ($1)", &[&"in tx"])
        .await
        .unwrap();
    {
        let sp = tx.begin().await.unwrap();
        sp.execute("DELETE FROM items WHERE name LIKE $1", &[&"t%"])
            .await
            .unwrap();
        sp.rollback().await.unwrap();
    }
    assert_eq!(
        db.plain_count("SELECT count(*) FROM items WHERE name = 'in tx'")
            .await,
        0
    );
    tx.commit().await.unwrap();
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 401);

    // Errors stay typed; the pool stays usable.
    let err = s
        .query("SELECT $1::int", &[&"not an int"])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Query { .. }), "{err:?}");
    let err = s.query("SELEC 1", &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(&pgassist::SqlState::SYNTAX_ERROR));
    assert_eq!(s.query("SELECT 1", &[]).await.unwrap().len(), 1);

    // Two-phase commit cannot work through transaction pooling: said clearly.
    let mut uow = registry.unit_of_work();
    uow.get("direct")
        .await
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('2pc')", &[])
        .await
        .unwrap();
    let err = uow.get("bounced").await.unwrap_err();
    assert!(
        matches!(err, Error::Config(_)) && err.to_string().contains("PgBouncer"),
        "{err}"
    );
    uow.rollback().await.unwrap();

    // read_only cannot be enforced through it: refused at build, not ignored.
    let ro = EngineConfig::from_url(&bouncer.url(&db.db.name))
        .unwrap()
        .pgbouncer(true)
        .read_only(true);
    assert!(matches!(
        Registry::builder().engine("ro", ro).build().await,
        Err(Error::Config(_))
    ));
    registry.close().await;
    bouncer.stop();
}

/// A transaction's stream (right and wrong parameter counts), COPY in and
/// COPY out, committed.
async fn in_transaction(s: &pgassist::Session, sql: &str, name: &str) {
    use futures::{SinkExt, TryStreamExt};
    let mut tx = s.begin().await.unwrap();
    let rows: Vec<_> = tx
        .query_raw(sql, [3i32, 3])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 6);
    let err = tx.query_raw(sql, [3i32]).await.map(drop).unwrap_err();
    assert!(err.to_string().contains("parameters"), "{err:?}");
    let mut sink = tx.copy_in("COPY items (name) FROM STDIN").await.unwrap();
    sink.send(bytes::Bytes::from(format!("{name}\n")))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    let out: Vec<bytes::Bytes> = tx
        .copy_out("COPY (SELECT count(*) FROM items) TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(!out.is_empty());
    tx.commit().await.unwrap();
}

/// PgBouncer mode prepares no named statement that outlives its
/// transaction, on any path: many statements with the wrong number of
/// parameters (which take the driver's own error path), through every
/// method and a streamed query, and streams and COPY inside transactions,
/// concurrently; then each of PgBouncer's
/// server connections — all held at once through PgBouncer, so every one
/// is reached — shows no prepared statement in `pg_prepared_statements`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_mode_leaves_no_prepared_statement_behind() {
    use futures::StreamExt;

    let db = Db::new().await;
    let Some(bouncer) = bouncer(&db) else {
        return;
    };
    let url = bouncer.url(&db.db.name);
    let through = EngineConfig::from_url(&url)
        .unwrap()
        .pgbouncer(true)
        .max_size(8);
    let registry = Registry::builder()
        .engine("bounced", through)
        .build()
        .await
        .unwrap();
    let s = registry.session("bounced").unwrap();
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40u32 {
                // A text per task and round, so types are learnt many times too.
                let sql = format!("SELECT $1::int + $2::int AS n{t}_{}", i % 5);
                let err = match i % 4 {
                    0 => s.query(&sql, &[&1i32]).await.map(drop),
                    1 => s.execute(&sql, &[&1i32, &2i32, &3i32]).await.map(drop),
                    2 => s.query_opt(&sql, &[]).await.map(drop),
                    _ => s.query_raw(&sql, [1i32]).await.map(drop),
                }
                .unwrap_err();
                assert!(
                    matches!(err, Error::Query { .. }) && err.to_string().contains("parameters"),
                    "{err:?}"
                );
                // And the right count runs, streamed or not.
                let n: i32 = s.query_one(&sql, &[&1i32, &2i32]).await.unwrap().get(0);
                assert_eq!(n, 3);
                let rows: Vec<_> = s.query_raw(&sql, [2i32, 2]).await.unwrap().collect().await;
                assert_eq!(rows[0].as_ref().unwrap().get::<_, i32>(0), 4);
                if i % 8 == t % 8 {
                    // Streaming and COPY inside a transaction.
                    in_transaction(&s, &sql, &format!("copied {t}-{i}")).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    registry.close().await;

    // PgBouncer's server connections, as the server lists them.
    let direct = db.plain().await;
    let servers: std::collections::BTreeSet<i32> = direct
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!servers.is_empty());
    // Hold as many transactions through PgBouncer as its pool has server
    // connections (default_pool_size = 10), so each one is reached; the
    // simple protocol prepares nothing itself.
    let mut clients = Vec::new();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let messages = client
            .simple_query(
                "BEGIN; SELECT pg_backend_pid()::text || ' ' || \
                 (SELECT count(*) FROM pg_prepared_statements)::text",
            )
            .await
            .unwrap();
        let line = messages
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap();
        let (pid, count) = line.split_once(' ').unwrap();
        seen.insert(pid.parse::<i32>().unwrap(), count.parse::<i64>().unwrap());
        clients.push(client);
    }
    for pid in &servers {
        assert!(seen.contains_key(pid), "server {pid} not reached: {seen:?}");
    }
    assert!(seen.values().all(|&n| n == 0), "left behind: {seen:?}");
    drop(clients);
    bouncer.stop();
}
