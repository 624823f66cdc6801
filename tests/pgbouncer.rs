//! Through a real PgBouncer in transaction pooling mode (Debian's package;
//! `.ci/run` installs it): autocommit, transactions, savepoints, and a clear
//! error for two-phase commit.

mod common;

use common::Db;
use pgassist::{EngineConfig, Error, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_works_through_pgbouncer_transaction_pooling() {
    let db = Db::new().await;
    if db.cluster.is_external() {
        eprintln!("DATABASE_URL is set: no PgBouncer is started next to it; skipping");
        return;
    }
    let Some(bouncer) = db.cluster.start_pgbouncer().unwrap() else {
        eprintln!("pgbouncer is not installed; skipping (.ci/run installs it)");
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
