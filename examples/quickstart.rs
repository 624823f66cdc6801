//! A tour of pgassist: autocommit reads, a transaction with a savepoint, a
//! rollback, hooks firing, and the stats.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Uses `DATABASE_URL` when set; otherwise starts a throwaway PostgreSQL
//! (initdb + postgres from the machine's packages) and removes it at exit.

use pgassist::{EngineConfig, Error, IsolationLevel, Queryable, Registry, TxOptions};
use pgassist_testing::TestCluster;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = TestCluster::shared();
    let db = cluster.create_database().await?;
    println!("database: {}", db.name);

    // A real streaming replica next to a throwaway primary; with DATABASE_URL,
    // a read-only engine on the same database stands in for it.
    let replica = if cluster.is_external() {
        None
    } else {
        Some(cluster.start_replica()?)
    };
    let reader_url = match &replica {
        Some(r) => {
            wait_for_database(&r.url(&db.name)).await;
            r.url(&db.name)
        }
        None => db.url.clone(),
    };
    println!(
        "reader: {}",
        if replica.is_some() {
            "a streaming hot standby"
        } else {
            "read-only engine"
        }
    );

    let registry = Registry::builder()
        .engine(
            "writer",
            EngineConfig::from_url(&db.url)?
                .max_size(4)
                .application_name("quickstart"),
        )
        .engine(
            "reader",
            EngineConfig::from_url(&reader_url)?
                .max_size(4)
                .read_only(true)
                .replica_of("writer"),
        )
        .default_engine("writer")
        .on_begin(|ev| println!("  [hook] begin #{} on {}", ev.transaction_id(), ev.engine()))
        .on_end(|ev, outcome| {
            println!(
                "  [hook] end   #{} on {}: {outcome:?}",
                ev.transaction_id(),
                ev.engine()
            )
        })
        .build()
        .await?;

    // One request's sessions: reads on the replica see this request's writes
    // (read-your-writes by WAL position), or go to the primary until they can.
    let request = registry.sessions();
    let writer = request.writer()?;
    let reader = request.reader()?;

    // Autocommit: no BEGIN, the connection goes back to the pool after each statement.
    writer
        .batch_execute("CREATE TABLE users (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE)")
        .await?;
    writer
        .execute("INSERT INTO users(name) VALUES ($1)", &[&"ann"])
        .await?;
    println!(
        "autocommit read through the reader: {} user(s)",
        count(&reader).await?
    );

    // The reader refuses writes, with a typed error.
    match reader
        .execute("INSERT INTO users(name) VALUES ('eve')", &[])
        .await
    {
        Err(Error::ReadOnly { .. }) => println!("reader refused a write: Error::ReadOnly"),
        other => println!("unexpected: {other:?}"),
    }

    // An opt-in transaction with a savepoint.
    println!("transaction with a savepoint:");
    let mut tx = writer.begin().await?;
    tx.execute("INSERT INTO users(name) VALUES ($1)", &[&"bo"])
        .await?;
    {
        let sp = tx.begin().await?;
        sp.execute("UPDATE users SET name = upper(name)", &[])
            .await?;
        sp.rollback().await?; // only the UPDATE is undone
    }
    tx.on_commit(|| println!("  [on_commit] welcome mail for bo"));
    println!(
        "  inside: {} users; others see {}",
        count(&tx).await?,
        count(&reader).await?
    );
    tx.commit().await?;
    println!("  after commit others see {}", count(&reader).await?);

    // A rollback discards everything.
    println!("transaction rolled back:");
    let tx = writer.begin().await?;
    tx.execute("DELETE FROM users", &[]).await?;
    tx.rollback().await?;
    println!("  still {} users", count(&reader).await?);

    // Closure form: commit on Ok, roll back on Err, retry serialization failures.
    println!("closure form (serializable, up to 3 retries):");
    let id: i64 = writer
        .transaction(
            TxOptions::new()
                .isolation(IsolationLevel::Serializable)
                .retries(3),
            |tx| {
                Box::pin(async move {
                    let row = tx
                        .query_one("INSERT INTO users(name) VALUES ($1) RETURNING id", &[&"cy"])
                        .await?;
                    Ok::<_, Error>(row.get(0))
                })
            },
        )
        .await?;
    println!("  inserted cy with id {id}");

    let row = reader
        .query_one("SELECT count(*), pg_is_in_recovery() FROM users", &[])
        .await?;
    println!(
        "read after the last write: {} users, served by the {}",
        row.get::<_, i64>(0),
        if row.get::<_, bool>(1) {
            "replica (it had replayed the write)"
        } else {
            "primary (the replica had not replayed it yet)"
        }
    );
    println!(
        "request report: {:?}",
        request
            .report()
            .engines
            .iter()
            .map(|e| (&e.name, e.state, e.statements))
            .collect::<Vec<_>>()
    );
    drop(request);

    let stats = registry.stats();
    for e in &stats.engines {
        println!(
            "stats {:>6}: open {} idle {} in use {} | checkouts {} statements {} | begun {} committed {} rolled back {} | in transaction now {}",
            e.name,
            e.connections,
            e.idle,
            e.in_use,
            e.checkouts,
            e.statements,
            e.begun,
            e.committed,
            e.rolled_back,
            e.in_transaction
        );
    }
    registry.close().await;
    Ok(())
}

/// Waits until the replica has replayed the database's creation.
async fn wait_for_database(url: &str) {
    for _ in 0..500 {
        if let Ok((client, conn)) =
            pgassist::tokio_postgres::connect(url, pgassist::tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            if client.simple_query("SELECT 1").await.is_ok() {
                return;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn count(db: &impl Queryable) -> Result<i64, Error> {
    Ok(db
        .query_one("SELECT count(*) FROM users", &[])
        .await?
        .get(0))
}
