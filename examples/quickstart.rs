//! A tour of pgassist: autocommit reads, a transaction with a savepoint, a
//! rollback, hooks firing, and the stats.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Uses `DATABASE_URL` when set; otherwise starts a throwaway PostgreSQL
//! (initdb + postgres from the machine's packages) and removes it at exit.

//! A tour of pgassist: autocommit reads, a transaction with a savepoint, a
//! rollback, hooks firing, and the stats.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Where it runs:
//! - `PGASSIST_WRITER_URL` set (the docker-compose stack, see the README):
//!   the engines [`Registry::from_env`] builds (a `reader` engine if
//!   configured, a replica if it says `replica_of`);
//! - else `DATABASE_URL` set: a `writer` and a read-only `reader` engine on
//!   that server (no replica);
//! - else a throwaway primary and a streaming standby (initdb + postgres
//!   from the machine's packages), removed at exit.
//!
//! On a server of yours it creates one table, `pgassist_quickstart_<pid>`,
//! and drops it again (also when the tour fails). It never prints a URL.

use pgassist::{EngineConfig, Error, IsolationLevel, Queryable, Registry, TxOptions};
use pgassist_testing::TestCluster;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        // Display only: pgassist's errors never carry a password.
        eprintln!("quickstart failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let hooks = |b: pgassist::RegistryBuilder| {
        b.on_begin(|ev| println!("  [hook] begin #{} on {}", ev.transaction_id(), ev.engine()))
            .on_end(|ev, outcome| {
                println!(
                    "  [hook] end   #{} on {}: {outcome:?}",
                    ev.transaction_id(),
                    ev.engine()
                )
            })
    };
    let table = format!("pgassist_quickstart_{}", std::process::id());
    if std::env::var_os("PGASSIST_WRITER_URL").is_some() {
        println!("server: the engines of PGASSIST_* (Registry::from_env)");
        let registry = Registry::from_env().await?;
        return tour_and_drop(registry, &table).await;
    }
    if let Ok(url) = std::env::var("DATABASE_URL") {
        println!("server: DATABASE_URL (reader: a read-only engine on the same server)");
        let registry = hooks(Registry::builder())
            .engine(
                "writer",
                EngineConfig::from_url(&url)?
                    .max_size(4)
                    .connection_timeout(std::time::Duration::from_secs(5))
                    .application_name("quickstart"),
            )
            .engine(
                "reader",
                EngineConfig::from_url(&url)?
                    .max_size(4)
                    .connection_timeout(std::time::Duration::from_secs(5))
                    .read_only(true),
            )
            .default_engine("writer")
            .build()
            .await?;
        return tour_and_drop(registry, &table).await;
    }

    let cluster = TestCluster::shared();
    let db = cluster.create_database().await?;
    println!("server: a throwaway primary, database {}", db.name);
    // A real streaming replica next to the throwaway primary.
    let replica = cluster.start_replica()?;
    let reader_url = replica.url(&db.name);
    wait_for_database(&reader_url).await;
    println!("reader: a streaming hot standby");
    let registry = hooks(Registry::builder())
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
        .build()
        .await?;
    tour(&registry, &table).await?;
    registry.close().await;
    Ok(())
}

/// The tour on a server that outlives it: the table goes again, whatever
/// happened.
async fn tour_and_drop(registry: Registry, table: &str) -> Result<(), Box<dyn std::error::Error>> {
    let out = tour(&registry, table).await;
    // Nothing to drop when the server could not be reached at all.
    let unreachable = out.as_ref().is_err_and(|e| {
        e.downcast_ref::<Error>()
            .is_some_and(|e| e.is_connection_error() || matches!(e, Error::PoolTimeout { .. }))
    });
    let dropped = if unreachable {
        Ok(())
    } else {
        registry
            .default_session()
            .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
            .await
    };
    registry.close().await;
    out?;
    dropped?;
    println!("dropped {table}");
    Ok(())
}

async fn tour(registry: &Registry, table: &str) -> Result<(), Box<dyn std::error::Error>> {
    let has_reader = registry.engine("reader").is_ok();
    let replica = registry
        .engine("reader")
        .is_ok_and(|e| e.config().replica_of_engine().is_some());
    // One request's sessions: reads on the replica see this request's writes
    // (read-your-writes by WAL position), or go to the primary until they can.
    let request = registry.sessions();
    let writer = request.writer()?;
    let reader = if has_reader {
        request.reader()?
    } else {
        request.writer()?
    };

    // Autocommit: no BEGIN, the connection goes back to the pool after each statement.
    writer
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigserial PRIMARY KEY, name text NOT NULL UNIQUE)"
        ))
        .await?;
    writer
        .execute(&format!("INSERT INTO {table}(name) VALUES ($1)"), &[&"ann"])
        .await?;
    println!(
        "autocommit read through the reader: {} user(s)",
        count(&reader, table).await?
    );

    // The reader refuses writes, with a typed error.
    if has_reader {
        match reader
            .execute(&format!("INSERT INTO {table}(name) VALUES ('eve')"), &[])
            .await
        {
            Err(Error::ReadOnly { .. }) => println!("reader refused a write: Error::ReadOnly"),
            other => println!("unexpected: {other:?}"),
        }
    }

    // An opt-in transaction with a savepoint.
    println!("transaction with a savepoint:");
    let mut tx = writer.begin().await?;
    tx.execute(&format!("INSERT INTO {table}(name) VALUES ($1)"), &[&"bo"])
        .await?;
    {
        let sp = tx.begin().await?;
        sp.execute(&format!("UPDATE {table} SET name = upper(name)"), &[])
            .await?;
        sp.rollback().await?; // only the UPDATE is undone
    }
    tx.on_commit(|| println!("  [on_commit] welcome mail for bo"));
    println!(
        "  inside: {} rows; others see {}",
        count(&tx, table).await?,
        count(&reader, table).await?
    );
    tx.commit().await?;
    println!("  after commit others see {}", count(&reader, table).await?);

    // A rollback discards everything.
    println!("transaction rolled back:");
    let tx = writer.begin().await?;
    tx.execute(&format!("DELETE FROM {table}"), &[]).await?;
    tx.rollback().await?;
    println!("  still {} rows", count(&reader, table).await?);

    // Closure form: commit on Ok, roll back on Err, retry serialization failures.
    println!("closure form (serializable, up to 3 retries):");
    let insert = format!("INSERT INTO {table}(name) VALUES ($1) RETURNING id");
    let id: i64 = writer
        .transaction(
            TxOptions::new()
                .isolation(IsolationLevel::Serializable)
                .retries(3),
            |tx| {
                let insert = insert.clone();
                Box::pin(async move {
                    let row = tx.query_one(&insert, &[&"cy"]).await?;
                    Ok::<_, Error>(row.get(0))
                })
            },
        )
        .await?;
    println!("  inserted cy with id {id}");

    if replica {
        let row = reader
            .query_one(
                &format!("SELECT count(*), pg_is_in_recovery() FROM {table}"),
                &[],
            )
            .await?;
        println!(
            "read after the last write: {} rows, served by the {}",
            row.get::<_, i64>(0),
            if row.get::<_, bool>(1) {
                "replica (it had replayed the write)"
            } else {
                "primary (the replica had not replayed it yet)"
            }
        );
    }
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

async fn count(db: &impl Queryable, table: &str) -> Result<i64, Error> {
    Ok(db
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0))
}
