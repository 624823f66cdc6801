//! One unit of work across engines: plain COMMIT for one engine, two-phase
//! commit for several, recovery after a crash at every step of the protocol.

mod common;

use std::time::Duration;

use common::Db;
use percent_encoding::percent_decode_str;
use pgassist::CrashPoint;
use pgassist::{EngineConfig, Error, RecoveryReport, Registry};
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

/// Every point of the protocol a process can die at, with three engines.
const STEPS: [CrashPoint; 5] = [
    CrashPoint::AfterPrepare(1),
    CrashPoint::AfterPrepare(2),
    CrashPoint::AfterDecision,
    CrashPoint::AfterCommitPrepared(1),
    CrashPoint::AfterCommitPrepared(2),
];

/// Starts a unit of work over `names` (coordinator first, on `t.dbs` in
/// order) and kills it after `step`.
async fn crash(t: &Three, names: &[&str; 3], step: CrashPoint) {
    let mut uow = t.registry.unit_of_work();
    write_all(&mut uow, names).await;
    uow.crash_after(step);
    let err = uow.commit().await.unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
}

/// Recovers with no grace period after a crash at `step`, and checks on
/// the server that every database has the row or none does, nothing is
/// left prepared and the decision record is gone.
async fn recover_and_check(
    t: &Three,
    names: &[&str; 3],
    step: CrashPoint,
    expected: &mut [i64; 3],
) -> RecoveryReport {
    // In doubt now: some engines may have prepared work.
    let report = t.registry.recover_older_than(Duration::ZERO).await.unwrap();
    let committed = !matches!(step, CrashPoint::AfterPrepare(_));
    if committed {
        *expected = expected.map(|n| n + 1);
    }
    for db in &t.dbs {
        db.wait_no_transactions().await;
    }
    let context = format!("{names:?} after {step:?}: {report:?}");
    assert_eq!(t.counts().await, *expected, "{context}");
    assert_eq!(t.prepared().await, 0, "{context}");
    assert_eq!(t.decisions().await, 0, "{context}");
    assert!(report.unresolved.is_empty(), "{context}");
    match step {
        CrashPoint::AfterPrepare(n) => assert_eq!(report.rolled_back.len(), n, "{report:?}"),
        CrashPoint::AfterDecision => assert_eq!(report.committed.len(), 2, "{report:?}"),
        CrashPoint::AfterCommitPrepared(n) => {
            assert_eq!(report.committed.len(), 2 - n, "{report:?}")
        }
    }
    report
}

#[tokio::test]
async fn after_a_crash_at_any_step_recover_makes_every_engine_agree() {
    let t = three().await;
    let mut expected = [0i64; 3];
    for step in STEPS {
        crash(&t, &NAMES, step).await;
        recover_and_check(&t, &NAMES, step, &mut expected).await;
    }
    // A young undecided one is left alone by the default grace period.
    let mut uow = t.registry.unit_of_work();
    write_all(&mut uow, &NAMES).await;
    uow.crash_after(CrashPoint::AfterPrepare(1));
    uow.commit().await.unwrap_err();
    let report = t.registry.recover().await.unwrap();
    assert_eq!(report.left_in_doubt.len(), 1, "{report:?}");
    t.registry.recover_older_than(Duration::ZERO).await.unwrap();
    assert_eq!(t.prepared().await, 0);
}

/// A registry with `names` on `dbs`, in order.
async fn registry_on(dbs: &[Db; 3], names: [&str; 3]) -> Result<Registry, Error> {
    let mut builder = Registry::builder();
    for (name, db) in names.iter().zip(dbs) {
        builder = builder.engine(*name, db.config());
    }
    builder.build().await
}

/// (gid, engines) of the decision records on `db`.
async fn decision_records(db: &Db) -> Vec<(String, String)> {
    let rows = db
        .plain()
        .await
        .query("SELECT gid, engines FROM pgassist_2pc_decisions", &[])
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Ids of the transactions prepared in `db`.
async fn prepared_gids(db: &Db) -> Vec<String> {
    let rows = db
        .plain()
        .await
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// Room for two engine names in an id with the default prefix: 199 bytes
/// minus `pgassist:`, the 32-digit id and two `:`.
const NAME_ROOM: usize = 199 - "pgassist:".len() - 32 - 2;

#[tokio::test]
async fn engine_names_with_any_characters_survive_a_crash_at_every_step() {
    // The longest name beside `w`: 20 × `é` (6 bytes each encoded), `:` (3)
    // and plain letters, 155 bytes encoded in all, for a 199-byte id.
    let longest = format!("{}:{}", "é".repeat(20), "x".repeat(NAME_ROOM - 1 - 123));
    let name_sets: [[&str; 3]; 4] = [
        // The reported case: the first `:` is inside the coordinator's name.
        ["shop:orders", "shop:ledger", "shop:audit"],
        ["with space", "it's \"quoted\", a\\b", "%41:%"],
        ["заказы", "платежи:журнал", "日本 ledger"],
        ["w", &longest, "v"],
    ];
    let mut t = three().await;
    let mut expected = [0i64; 3];
    for names in name_sets {
        t.registry.close().await;
        t.registry = registry_on(&t.dbs, names).await.unwrap();
        for step in STEPS {
            crash(&t, &names, step).await;
            if step == CrashPoint::AfterPrepare(2) {
                // On the server: ids are ASCII with exactly three `:`, and the
                // longest name's id is exactly PostgreSQL's limit.
                let gids = [
                    prepared_gids(&t.dbs[1]).await,
                    prepared_gids(&t.dbs[2]).await,
                ];
                for gid in gids.iter().flatten() {
                    assert!(gid.is_ascii() && gid.matches(':').count() == 3, "{gid}");
                }
                if names[1] == longest {
                    assert_eq!(gids[0].iter().map(String::len).max(), Some(199));
                }
            }
            if step == CrashPoint::AfterDecision {
                // The decision record lists the prepared engines unambiguously,
                // even with `,` in a name.
                let records = decision_records(&t.dbs[0]).await;
                assert_eq!(records.len(), 1, "{records:?}");
                let listed: Vec<String> = records[0]
                    .1
                    .split(',')
                    .map(|p| percent_decode_str(p).decode_utf8().unwrap().into_owned())
                    .collect();
                assert_eq!(listed, names[1..], "{records:?}");
            }
            recover_and_check(&t, &names, step, &mut expected).await;
        }
    }
    // One byte more than the longest name is refused when the registry is
    // built, naming the engine and the limit.
    let too_long = format!("{longest}x");
    let err = registry_on(&t.dbs, ["w", &too_long, "v"])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&too_long) && message.contains("199"),
        "{message}"
    );
    // The limit is the server's: a 200-byte id is refused, 199 accepted.
    let plain = t.dbs[1].plain().await;
    for (len, accepted) in [(200, false), (199, true)] {
        plain.batch_execute("BEGIN").await.unwrap();
        let prepared = plain
            .batch_execute(&format!("PREPARE TRANSACTION '{}'", "g".repeat(len)))
            .await;
        assert_eq!(prepared.is_ok(), accepted, "{len}: {prepared:?}");
        if accepted {
            plain
                .batch_execute(&format!("ROLLBACK PREPARED '{}'", "g".repeat(len)))
                .await
                .unwrap();
        } else {
            plain.batch_execute("ROLLBACK").await.unwrap();
        }
    }
    t.registry.close().await;
}

#[tokio::test]
async fn ids_from_before_the_encoding_recover_and_unreadable_ones_are_left_alone() {
    let mut t = three().await;
    let names = ["shop:orders", "shop:ledger", "shop:audit"];
    t.registry.close().await;
    t.registry = registry_on(&t.dbs, names).await.unwrap();
    // A committed unit of work creates the decision table.
    let mut uow = t.registry.unit_of_work();
    write_all(&mut uow, &names).await;
    uow.commit().await.unwrap();
    let coordinator = t.dbs[0].plain().await;
    let ledger = t.dbs[1].plain().await;
    let prepare = |gid: String| {
        let ledger = &ledger;
        async move {
            ledger.batch_execute("BEGIN").await.unwrap();
            ledger
                .execute("INSERT INTO items(name) VALUES ($1)", &[&gid])
                .await
                .unwrap();
            ledger
                .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
                .await
                .unwrap();
        }
    };
    let id = |n: u8| format!("{n:032x}");
    // Raw names, as written before the encoding: decided, and not decided.
    let decided = format!("pgassist:{}:shop:orders:shop:ledger", id(1));
    prepare(decided.clone()).await;
    coordinator
        .execute(
            "INSERT INTO pgassist_2pc_decisions(gid, engines) VALUES ($1, 'shop:ledger')",
            &[&format!("pgassist:{}:shop:orders", id(1))],
        )
        .await
        .unwrap();
    let undecided = format!("pgassist:{}:shop:orders:shop:ledger", id(2));
    prepare(undecided.clone()).await;
    // Unreadable, or naming a coordinator this registry lacks (whose
    // decision record must stay).
    let unreadable = [
        format!("pgassist:{}:shop%3aorders:shop%3Aledger", id(3)),
        "pgassist:not-hex:shop%3Aorders:shop%3Aledger".to_owned(),
        format!("pgassist:{}:gone:shop%3Aledger", id(4)),
    ];
    for gid in &unreadable {
        prepare(gid.clone()).await;
    }
    coordinator
        .execute(
            "INSERT INTO pgassist_2pc_decisions(gid, engines) VALUES ($1, 'shop%3Aledger')",
            &[&format!("pgassist:{}:gone", id(4))],
        )
        .await
        .unwrap();

    let report = t.registry.recover_older_than(Duration::ZERO).await.unwrap();
    let gids = |list: &[pgassist::InDoubt]| list.iter().map(|d| d.gid.clone()).collect::<Vec<_>>();
    assert_eq!(gids(&report.committed), [decided.as_str()], "{report:?}");
    assert_eq!(
        gids(&report.rolled_back),
        [undecided.as_str()],
        "{report:?}"
    );
    let mut left = gids(&report.unresolved);
    left.sort();
    let mut want = unreadable.to_vec();
    want.sort();
    assert_eq!(left, want, "{report:?}");
    // On the server: the decided row is there, the undecided one is not,
    // the unreadable ones are still prepared, and the record of `gone` kept.
    let rows = t.dbs[1].plain_names().await;
    assert!(
        rows.contains(&decided) && !rows.contains(&undecided),
        "{rows:?}"
    );
    let mut still = prepared_gids(&t.dbs[1]).await;
    still.sort();
    assert_eq!(still, want);
    let records = decision_records(&t.dbs[0]).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].0, format!("pgassist:{}:gone", id(4)));
    for gid in &unreadable {
        ledger
            .batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
            .await
            .unwrap();
    }
    assert_eq!(t.prepared().await, 0);
    t.registry.close().await;
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
