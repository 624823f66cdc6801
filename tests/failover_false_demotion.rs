//! Writers that follow the primary, attacked with refusals that are not a
//! demotion: the server's `default_transaction_read_only` is reported on,
//! but by the caller's own doing (`SET SESSION CHARACTERISTICS` on a pinned
//! connection, `set_config` in a transaction) or by the role's / the
//! database's configuration from the first moment of every connection
//! (`ALTER ROLE … SET`). None of them may discard the pool: the first would
//! let one careless caller drop every other user's connection, the second
//! would make the pool flap forever (every new generation is refused
//! again). Single-host writers on the shared cluster (PostgreSQL 15).

mod common;

use common::Db;
use pgassist::{Error, Registry};

/// The engine's pool switches so far.
fn switches(registry: &Registry) -> u64 {
    registry.stats().engine("writer").unwrap().primary_switches
}

/// A write refused with 25006, as the caller sees it.
fn assert_refused<T: std::fmt::Debug>(out: Result<T, Error>) {
    match out {
        Err(e @ Error::ReadOnly { .. }) => {
            assert_eq!(e.code().map(|c| c.code()), Some("25006"));
        }
        other => panic!("expected a 25006 refusal, got {other:?}"),
    }
}

const INSERT: &str = "INSERT INTO items(name) VALUES ('x')";

/// `SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY` on a pinned
/// connection sets `default_transaction_read_only` for that session: the
/// server reports it on, and the next write is refused. The server is
/// still the primary; the pool must stay. In plain and pipelined mode.
#[tokio::test]
async fn a_callers_own_read_only_session_is_not_a_demotion() {
    let db = Db::new().await;
    for pipeline in [1, 4] {
        let registry = db.registry(|c| c.max_size(3).pipeline(pipeline)).await;
        let session = registry.session("writer").unwrap();
        session.execute(INSERT, &[]).await.unwrap();
        let mut pinned = session.pin().await.unwrap();
        pinned
            .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            .await
            .unwrap();
        for _ in 0..3 {
            assert_refused(pinned.execute(INSERT, &[]).await);
        }
        // Inside a transaction of the pinned connection, too.
        let tx = pinned.begin().await.unwrap();
        assert_refused(tx.execute(INSERT, &[]).await);
        drop(tx);
        // `set_config` in a transaction, then a savepoint-less write in the
        // next transaction of the same pinned session.
        pinned
            .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
            .await
            .unwrap();
        {
            let tx = pinned.begin().await.unwrap();
            tx.query_one(
                "SELECT set_config('default_transaction_read_only', 'on', false)",
                &[],
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        assert_refused(pinned.execute(INSERT, &[]).await);
        drop(pinned);
        assert_eq!(switches(&registry), 0, "pipeline {pipeline}");
        // The rest of the pool kept writing on the same primary all along.
        session.execute(INSERT, &[]).await.unwrap();
        assert_eq!(switches(&registry), 0, "pipeline {pipeline}");
        registry.close().await;
    }
}

/// `ALTER ROLE … SET default_transaction_read_only = on`: every connection
/// of that role is read-only from its first moment, and every write is
/// refused. That is how the server is configured, not a demotion: a new
/// pool would connect to the same and be refused again, so the pool must
/// not be replaced at all (else it would flap forever, dropping every
/// connection, readers included, at each refusal).
#[tokio::test]
async fn a_role_configured_read_only_does_not_make_the_pool_flap() {
    let db = Db::new().await;
    let role = format!("ro_{}", db.db.name);
    let admin = db.plain().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'hunter2'; \
             GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}; \
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}; \
             ALTER ROLE {role} SET default_transaction_read_only = on"
        ))
        .await
        .unwrap();
    let config = db.config();
    let mut pg = config.pg_config().clone();
    pg.user(&role).password("hunter2");
    let config = pgassist::EngineConfig::from_pg_config(pg)
        .application_name(&db.app)
        .max_size(3);
    for pipeline in [1, 4] {
        let registry = Registry::builder()
            .engine("writer", config.clone().pipeline(pipeline))
            .build()
            .await
            .unwrap();
        let session = registry.session("writer").unwrap();
        for _ in 0..5 {
            assert_refused(session.execute(INSERT, &[]).await);
            let tx = session.begin().await.unwrap();
            assert_refused(tx.execute(INSERT, &[]).await);
            drop(tx);
        }
        session.query_one("SELECT 1", &[]).await.unwrap();
        assert_eq!(switches(&registry), 0, "pipeline {pipeline}");
        registry.close().await;
    }
    admin
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .await
        .unwrap();
}

/// Refusals from the caller's own `READ ONLY` transactions and from a
/// read-only pinned session, on a writer with pipelining, by 4 tasks whose
/// futures are dropped at random — also during the empty round trip that
/// follows a refusal. No switch, nothing idle in a transaction, the pool
/// clean afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_cut_at_random_neither_switch_nor_leak() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(3).pipeline(4)).await;
    let seed = common::Rng::seed("refusals cut");
    let mut tasks = Vec::new();
    for task in 0..4u64 {
        let session = registry.session("writer").unwrap();
        let mut rng = common::Rng::new(seed ^ task.wrapping_mul(0x9e37_79b9));
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let limit = std::time::Duration::from_micros(rng.below(4000));
                match rng.below(3) {
                    0 => {
                        let options = pgassist::TxOptions::new().read_only(true);
                        let work = async {
                            let tx = session.begin_with(options).await?;
                            let refused = tx.execute(INSERT, &[]).await;
                            assert!(
                                matches!(refused, Err(Error::ReadOnly { .. })),
                                "{refused:?}"
                            );
                            tx.commit().await
                        };
                        let _ = tokio::time::timeout(limit, work).await;
                    }
                    1 => {
                        let work = async {
                            let pinned = session.pin().await?;
                            pinned
                                .batch_execute(
                                    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
                                )
                                .await?;
                            let refused = pinned.execute(INSERT, &[]).await;
                            assert!(
                                matches!(refused, Err(Error::ReadOnly { .. })),
                                "{refused:?}"
                            );
                            Ok::<_, Error>(())
                        };
                        let _ = tokio::time::timeout(limit, work).await;
                    }
                    _ => {
                        let _ = tokio::time::timeout(limit, session.execute(INSERT, &[])).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        common::within(std::time::Duration::from_secs(60), "task", t)
            .await
            .unwrap();
    }
    assert_eq!(switches(&registry), 0);
    db.wait_no_transactions().await;
    common::assert_pool_clean(&db, &registry, 3).await;
}
