//! One unit of work across engines: plain COMMIT for one engine, two-phase
//! commit for several, recovery after a crash at every step of the protocol.

mod common;

use std::time::Duration;

use common::Db;
use pgassist::unit_of_work::Step;
use pgassist::{EngineConfig, Error, Registry};
use pgassist_testing::{ClusterOptions, TestCluster};

/// Three engines on three databases of the test cluster.
struct Three {
    dbs: [Db; 3],
    registry: Registry,
}

const NAMES: [&str; 3] = ["writer", "logger", "audit"];

async fn three() -> Three {
    let dbs = [Db::new().await, Db::new().await, Db::new().await];
    let mut builder = Registry::builder().route_table("audit_log", "audit");
    for (name, db) in NAMES.iter().zip(&dbs) {
        builder = builder.engine(*name, db.config());
    }
    let registry = builder.build().await.unwrap();
    Three { dbs, registry }
}

impl Three {
    async fn counts(&self) -> Vec<i64> {
        let mut out = Vec::new();
        for db in &self.dbs {
            out.push(db.plain_count("SELECT count(*) FROM items").await);
        }
        out
    }

    async fn prepared(&self) -> i64 {
        let mut n = 0;
        for db in &self.dbs {
            n += db
                .plain_count(
                    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()",
                )
                .await;
        }
        n
    }

    async fn decisions(&self) -> i64 {
        self.dbs[0]
            .plain_count(
                "SELECT count(*) FROM pg_tables WHERE tablename = 'pgassist_2pc_decisions'",
            )
            .await
            .min(1)
            * self.dbs[0]
                .plain_count("SELECT count(*) FROM pgassist_2pc_decisions")
                .await
                .max(0)
    }
}

async fn write_all(uow: &mut pgassist::UnitOfWork, engines: &[&str]) {
    for name in engines {
        uow.get(name)
            .await
            .unwrap()
            .execute("INSERT INTO items(name) VALUES ($1)", &[name])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn one_engine_commits_plainly_and_several_commit_atomically() {
    let t = three().await;
    let from = t.dbs[0].log_offset();
    let mut uow = t.registry.unit_of_work();
    write_all(&mut uow, &["writer"]).await;
    uow.commit().await.unwrap();
    assert_eq!(t.counts().await, [1, 0, 0]);
    if t.dbs[0].has_log() {
        let log = t.dbs[0].statements_since(from).join("\n");
        assert!(log.contains("COMMIT") && !log.contains("PREPARE"), "{log}");
    }

    let from = t.dbs[1].log_offset();
    let mut uow = t.registry.unit_of_work();
    write_all(&mut uow, &NAMES).await;
    assert_eq!(uow.engines(), NAMES);
    uow.commit().await.unwrap();
    assert_eq!(t.counts().await, [2, 1, 1]);
    assert_eq!(t.prepared().await, 0);
    assert_eq!(
        t.decisions().await,
        0,
        "decision records are removed once done"
    );
    if t.dbs[1].has_log() {
        let log = t.dbs[1].statements_since(from).join("\n");
        assert!(
            log.contains("PREPARE TRANSACTION 'pgassist:") && log.contains("COMMIT PREPARED"),
            "{log}"
        );
    }
    t.registry.close().await;
}

#[tokio::test]
async fn a_failure_before_the_decision_rolls_back_everywhere() {
    let t = three().await;
    let mut uow = t.registry.unit_of_work();
    write_all(&mut uow, &NAMES).await;
    // The last engine's transaction fails: its PREPARE cannot succeed.
    uow.get("audit")
        .await
        .unwrap()
        .execute("SELECT 1/0", &[])
        .await
        .unwrap_err();
    let err = uow.commit().await.unwrap_err();
    assert!(matches!(err, Error::TransactionAborted { .. }), "{err:?}");
    assert_eq!(t.counts().await, [0, 0, 0]);
    assert_eq!(t.prepared().await, 0);
    for db in &t.dbs {
        db.wait_no_transactions().await;
    }
}

#[tokio::test]
async fn routed_tables_pick_their_engine() {
    let t = three().await;
    t.dbs[2]
        .plain()
        .await
        .batch_execute("CREATE TABLE audit_log (msg text)")
        .await
        .unwrap();
    let sessions = t.registry.sessions();
    sessions
        .for_table("audit_log")
        .execute("INSERT INTO audit_log VALUES ('x')", &[])
        .await
        .unwrap();
    assert_eq!(
        sessions.for_table("items").engine_name(),
        "writer",
        "unmapped: the default engine"
    );
    let mut uow = sessions.unit_of_work();
    uow.for_table("audit_log")
        .await
        .unwrap()
        .execute("INSERT INTO audit_log VALUES ('y')", &[])
        .await
        .unwrap();
    uow.for_table("items")
        .await
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('i')", &[])
        .await
        .unwrap();
    assert_eq!(uow.engines(), ["audit", "writer"]);
    uow.commit().await.unwrap();
    assert_eq!(
        t.dbs[2].plain_count("SELECT count(*) FROM audit_log").await,
        2
    );
    assert_eq!(t.counts().await, [1, 0, 0]);
    let err = Registry::builder()
        .engine("w", t.dbs[0].config())
        .route_table("t", "nope")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)));
}

#[tokio::test]
async fn after_a_crash_at_any_step_recover_makes_every_engine_agree() {
    let t = three().await;
    let steps = [
        Step::AfterPrepare(1),
        Step::AfterPrepare(2),
        Step::AfterDecision,
        Step::AfterCommitPrepared(1),
        Step::AfterCommitPrepared(2),
    ];
    let mut expected = [0i64; 3];
    for step in steps {
        let mut uow = t.registry.unit_of_work();
        write_all(&mut uow, &NAMES).await;
        uow.crash_after(step);
        let err = uow.commit().await.unwrap_err();
        assert!(err.to_string().contains("simulated crash"), "{err}");
        // In doubt now: some engines may have prepared work.
        let report = t.registry.recover_older_than(Duration::ZERO).await.unwrap();
        let committed = !matches!(step, Step::AfterPrepare(_));
        if committed {
            expected = expected.map(|n| n + 1);
        }
        for db in &t.dbs {
            db.wait_no_transactions().await;
        }
        assert_eq!(t.counts().await, expected, "after {step:?}: {report:?}");
        assert_eq!(t.prepared().await, 0, "after {step:?}: {report:?}");
        assert_eq!(t.decisions().await, 0, "after {step:?}: {report:?}");
        match step {
            Step::AfterPrepare(n) => assert_eq!(report.rolled_back.len(), n, "{report:?}"),
            Step::AfterDecision => assert_eq!(report.committed.len(), 2, "{report:?}"),
            Step::AfterCommitPrepared(n) => assert_eq!(report.committed.len(), 2 - n, "{report:?}"),
        }
    }
    // A young undecided one is left alone by the default grace period.
    let mut uow = t.registry.unit_of_work();
    write_all(&mut uow, &NAMES).await;
    uow.crash_after(Step::AfterPrepare(1));
    uow.commit().await.unwrap_err();
    let report = t.registry.recover().await.unwrap();
    assert_eq!(report.left_in_doubt.len(), 1, "{report:?}");
    t.registry.recover_older_than(Duration::ZERO).await.unwrap();
    assert_eq!(t.prepared().await, 0);
}

#[tokio::test]
async fn two_phase_commit_without_prepared_transactions_fails_before_writing() {
    let db = Db::new().await;
    if db.cluster.is_external() {
        return;
    }
    let no_2pc = TestCluster::start(ClusterOptions {
        extra_conf: vec![("max_prepared_transactions".into(), "0".into())],
        ..Default::default()
    })
    .unwrap();
    let other = no_2pc.create_database().await.unwrap();
    let registry = Registry::builder()
        .engine("writer", db.config())
        .engine("logger", EngineConfig::from_url(&other.url).unwrap())
        .build()
        .await
        .unwrap();
    let mut uow = registry.unit_of_work();
    uow.get("writer")
        .await
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('w')", &[])
        .await
        .unwrap();
    let err = uow.get("logger").await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(
        err.to_string().contains("max_prepared_transactions = 0"),
        "{err}"
    );
    uow.rollback().await.unwrap();
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
    registry.close().await;
}
