//! SQL text that hides transaction control (issue 11), checked against what
//! the server did, not against pgassist's own opinion: after every case no
//! backend of the test is `idle in transaction` and nothing is prepared
//! (`pg_stat_activity`, `pg_prepared_xacts`, read from a separate plain
//! connection), and inside a transaction a row inserted before the hostile
//! statement stays invisible to another connection until commit and is
//! visible after it. pgassist may refuse a case with `Error::Usage`, or run
//! it, or the server may reject it — but a case that returns and leaves the
//! server in (or out of) a transaction behind pgassist's back is a failure.
//!
//! Every case runs through `Session::execute`, `Session::batch_execute`,
//! `Transaction::execute` and `Transaction::batch_execute`, on a database
//! with `standard_conforming_strings` on and one with it off (set with
//! ALTER DATABASE, so every pooled connection has it).

mod common;

use std::fmt::Write as _;

use common::{Db, Rng};
use pgassist::{Error, Registry, Session};

/// One database (`standard_conforming_strings` on or off), its pool and a
/// plain watcher connection.
struct Target {
    db: Db,
    registry: Registry,
    watcher: tokio_postgres::Client,
    standard: bool,
}

impl Target {
    async fn new(standard: bool) -> Target {
        let db = Db::new().await;
        let watcher = db.plain().await;
        if !standard {
            watcher
                .batch_execute(&format!(
                    "ALTER DATABASE \"{}\" SET standard_conforming_strings = off",
                    db.db.name
                ))
                .await
                .unwrap();
        }
        let registry = db.registry(|c| c.max_size(2)).await;
        let target = Target {
            db,
            registry,
            watcher,
            standard,
        };
        // The pooled connections read strings the way this target says.
        let setting: String = target
            .session()
            .query_one("SHOW standard_conforming_strings", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(setting, if standard { "on" } else { "off" });
        target
    }

    fn session(&self) -> Session {
        self.registry.session("writer").unwrap()
    }

    /// (backends of ours in a transaction, prepared transactions of this
    /// database, rows named `marker`), in one round trip.
    async fn server_state(&self, marker: &str) -> (i64, i64, i64) {
        let row = self
            .watcher
            .query_one(
                "SELECT (SELECT count(*) FROM pg_stat_activity \
                         WHERE application_name = $1 AND state LIKE 'idle in transaction%'), \
                        (SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()), \
                        (SELECT count(*) FROM items WHERE name = $2)",
                &[&self.db.app, &marker],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    }

    /// After a failure: no backend of ours stays in a transaction and
    /// nothing stays prepared, so the next case starts clean.
    async fn reset(&self) {
        common::terminate_backends(&self.watcher, &self.db.app).await;
        let gids = self
            .watcher
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
                &[],
            )
            .await
            .unwrap();
        for row in gids {
            let gid: String = row.get(0);
            self.watcher
                .batch_execute(&format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''")))
                .await
                .unwrap();
        }
        common::eventually(std::time::Duration::from_secs(5), || async {
            self.db.backends().await.is_empty()
        })
        .await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    SessionExecute,
    SessionBatch,
    TxExecute,
    TxBatch,
}

const APIS: [Api; 4] = [
    Api::SessionExecute,
    Api::SessionBatch,
    Api::TxExecute,
    Api::TxBatch,
];

/// What pgassist answered.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Refused,
    Ran,
    /// The server rejected it (or another error).
    Failed,
}

fn answer(r: &pgassist::Result<()>) -> Answer {
    match r {
        Ok(()) => Answer::Ran,
        Err(Error::Usage(_)) => Answer::Refused,
        Err(_) => Answer::Failed,
    }
}

/// Runs `sql` through `api` on `target` and checks the server afterwards.
/// `Err` describes a failure (and the target has been reset).
async fn run_case(target: &Target, api: Api, sql: &str, n: usize) -> Result<Answer, String> {
    let session = target.session();
    let marker = format!("marker {n}");
    let failure = match api {
        Api::SessionExecute | Api::SessionBatch => {
            let r = if api == Api::SessionExecute {
                session.execute(sql, &[]).await.map(|_| ())
            } else {
                session.batch_execute(sql).await
            };
            let (in_tx, prepared, _) = target.server_state(&marker).await;
            if in_tx == 0 && prepared == 0 {
                return Ok(answer(&r));
            }
            format!(
                "answered {r:?}, then {in_tx} backend(s) idle in transaction, {prepared} prepared"
            )
        }
        Api::TxExecute | Api::TxBatch => {
            let tx = session.begin().await.unwrap();
            tx.execute("INSERT INTO items(name) VALUES ($1)", &[&marker])
                .await
                .unwrap();
            let r = if api == Api::TxExecute {
                tx.execute(sql, &[]).await.map(|_| ())
            } else {
                tx.batch_execute(sql).await
            };
            let (_, _, early) = target.server_state(&marker).await;
            let commit = tx.commit().await;
            let (in_tx, prepared, after) = target.server_state(&marker).await;
            let kept = commit.is_ok() && after == 1;
            let verdict = answer(&r);
            if early == 0 && in_tx == 0 && prepared == 0 && (verdict == Answer::Failed || kept) {
                return Ok(verdict);
            }
            format!(
                "answered {r:?}; row visible before commit: {early}; commit: {commit:?}, \
                 row visible after: {after}; then {in_tx} backend(s) idle in transaction, \
                 {prepared} prepared"
            )
        }
    };
    target.reset().await;
    Err(format!(
        "{api:?} on standard_conforming_strings={}: {sql:?}: {failure}",
        if target.standard { "on" } else { "off" }
    ))
}

/// How a hostile case gets through without the fix.
#[derive(Clone, Copy, Debug)]
enum Protocol {
    /// One statement, extended protocol (`execute`).
    Extended,
    /// A batch, simple protocol (`batch_execute`).
    Simple,
}

/// What the hostile case does to the server when it gets through.
#[derive(Clone, Copy, Debug)]
enum Effect {
    /// Leaves an autocommit connection in a transaction.
    Opens,
    /// Ends the transaction it runs in.
    Ends,
}

/// Hostile cases known to fool a naive check: (sql, protocol, effect,
/// standard_conforming_strings values under which the server runs the
/// hidden statement).
const HOSTILE: &[(&str, Protocol, Effect, &[bool])] = &[
    (";BEGIN", Protocol::Extended, Effect::Opens, &[true, false]),
    (
        "/* x */ ; START TRANSACTION",
        Protocol::Extended,
        Effect::Opens,
        &[true, false],
    ),
    (
        "\n;\n;begin",
        Protocol::Extended,
        Effect::Opens,
        &[true, false],
    ),
    (
        "; -- c\n ; /* ; */ ;\tBegin Work",
        Protocol::Extended,
        Effect::Opens,
        &[true, false],
    ),
    (
        "-- c\rBEGIN",
        Protocol::Extended,
        Effect::Opens,
        &[true, false],
    ),
    (";COMMIT", Protocol::Extended, Effect::Ends, &[true, false]),
    ("; END", Protocol::Extended, Effect::Ends, &[true, false]),
    (
        ";ROLLBACK",
        Protocol::Extended,
        Effect::Ends,
        &[true, false],
    ),
    (
        ";PREPARE TRANSACTION 'hostile'",
        Protocol::Extended,
        Effect::Ends,
        &[true, false],
    ),
    (
        "SELECT begin, atomic FROM (VALUES (1, 2)) AS v(begin, atomic); BEGIN",
        Protocol::Simple,
        Effect::Opens,
        &[true, false],
    ),
    (
        "SELECT begin, atomic FROM (VALUES (1, 2)) AS v(begin, atomic); COMMIT",
        Protocol::Simple,
        Effect::Ends,
        &[true, false],
    ),
    (
        "SELECT 1; -- c\rBEGIN",
        Protocol::Simple,
        Effect::Opens,
        &[true, false],
    ),
    (
        "SELECT 'a\\', '; BEGIN; SELECT ''",
        Protocol::Simple,
        Effect::Opens,
        &[false],
    ),
    (
        "SELECT 'a\\', '; COMMIT; SELECT ''",
        Protocol::Simple,
        Effect::Ends,
        &[false],
    ),
    (
        "SELECT 'a\\'; BEGIN; SELECT ''",
        Protocol::Simple,
        Effect::Opens,
        &[true],
    ),
    (
        "SELECT 'x\\'\n'; END; SELECT ''",
        Protocol::Simple,
        Effect::Ends,
        &[false],
    ),
    (
        "CREATE OR REPLACE FUNCTION f_hostile() RETURNS int LANGUAGE sql \
         BEGIN ATOMIC SELECT 1; END; COMMIT",
        Protocol::Simple,
        Effect::Ends,
        &[true, false],
    ),
];

/// Whether `client` is inside a transaction block begun by an earlier
/// request: a simple query outside one starts its own transaction, whose
/// start time is the statement's.
async fn in_block(client: &tokio_postgres::Client) -> bool {
    let messages = client
        .simple_query("SELECT now() <> statement_timestamp()")
        .await
        .unwrap();
    messages.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
        _ => false,
    })
}

/// The hostile cases are real: on a plain tokio-postgres connection the
/// server does what a naive check would let through. And pgassist refuses
/// every one of them, through every API, in both string modes.
#[tokio::test]
async fn hostile_sql_is_real_and_refused() {
    let targets = [Target::new(true).await, Target::new(false).await];
    for &(sql, protocol, effect, live) in HOSTILE {
        for &standard in live {
            let plain = targets[0].db.plain().await;
            let setting = if standard { "on" } else { "off" };
            plain
                .batch_execute(&format!("SET standard_conforming_strings = {setting}"))
                .await
                .unwrap();
            if let Effect::Ends = effect {
                plain.batch_execute("BEGIN").await.unwrap();
            }
            let r = match protocol {
                Protocol::Extended => plain.execute(sql, &[]).await.map(|_| ()),
                Protocol::Simple => plain.batch_execute(sql).await,
            };
            r.unwrap_or_else(|e| panic!("{sql:?} (scs {setting}): {e}"));
            let open = in_block(&plain).await;
            match effect {
                Effect::Opens => assert!(open, "{sql:?} (scs {setting}) opened no transaction"),
                Effect::Ends => assert!(!open, "{sql:?} (scs {setting}) ended no transaction"),
            }
            let _ = plain.batch_execute("ROLLBACK").await;
            let _ = plain.batch_execute("ROLLBACK PREPARED 'hostile'").await;
        }
    }
    let mut n = 0;
    for target in &targets {
        for &(sql, protocol, _, _) in HOSTILE {
            for api in APIS {
                if matches!(protocol, Protocol::Simple)
                    && matches!(api, Api::SessionExecute | Api::TxExecute)
                {
                    // A batch through the extended protocol is a server
                    // error anyway; still checked by the generated cases.
                    continue;
                }
                n += 1;
                let answer = run_case(target, api, sql, n).await.unwrap();
                assert_eq!(answer, Answer::Refused, "{api:?}: {sql:?}");
            }
        }
    }
}

/// Statements that look like control but are not: they run, in both string
/// modes, through every API (no false alarm).
#[tokio::test]
async fn look_alikes_run() {
    let targets = [Target::new(true).await, Target::new(false).await];
    let single = [
        "SELECT 'BEGIN'",
        "SELECT $$; COMMIT$$",
        "SELECT E'\\'; COMMIT'",
        "SELECT 1 AS \"begin\"",
        "SELECT begin, atomic FROM (VALUES (1, 2)) AS v(begin, atomic)",
        "SELECT begin atomic FROM (VALUES (1)) AS v(begin)",
        ";;SELECT 1",
        "/* BEGIN */ SELECT 1 -- COMMIT",
        "CREATE OR REPLACE FUNCTION f_body(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC \
         SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END; SELECT 2 AS end; END",
        "CREATE OR REPLACE PROCEDURE p_body() LANGUAGE sql BEGIN /* c */ ATOMIC \
         INSERT INTO items(name) VALUES ('from p_body; BEGIN'); END",
        "DO $x$ BEGIN PERFORM 1; END $x$",
    ];
    let batches = [
        "SELECT 'a'\n'; COMMIT'; SELECT 1",
        "SELECT E'a'\n'\\'; COMMIT'; SELECT 1",
        "CREATE OR REPLACE FUNCTION f_batch() RETURNS int LANGUAGE sql BEGIN ATOMIC \
         SELECT 1; SELECT 2; END; SELECT f_batch()",
        "SELECT \"begin\" FROM (VALUES (1)) AS v(\"begin\"); SELECT 'end;'",
        "DO $$ BEGIN PERFORM 1; END $$; SELECT 'x; COMMIT'",
    ];
    let mut n = 1000;
    for target in &targets {
        for sql in single {
            for api in APIS {
                n += 1;
                let answer = run_case(target, api, sql, n).await.unwrap();
                assert_eq!(answer, Answer::Ran, "{api:?}: {sql:?}");
            }
        }
        for sql in batches {
            for api in [Api::SessionBatch, Api::TxBatch] {
                n += 1;
                let answer = run_case(target, api, sql, n).await.unwrap();
                assert_eq!(answer, Answer::Ran, "{api:?}: {sql:?}");
            }
        }
    }
}

/// Pieces for generated cases.
const PREFIXES: &[&str] = &[
    "",
    " ",
    "\t",
    "\n",
    "\r\n",
    "\r",
    ";",
    " ; ",
    ";;",
    "/* c */",
    "/* ; */",
    "/* a /* nested; */ b */",
    "-- c\n",
    "-- ; c\r",
];
const GAPS: &[&str] = &[" ", "\t", "\n", "/* c */", "-- c\n", "\r"];
const CONTROL: &[&[&str]] = &[
    &["BEGIN"],
    &["BEGIN", "WORK"],
    &["START", "TRANSACTION"],
    &["COMMIT"],
    &["END"],
    &["ROLLBACK"],
    &["ABORT"],
    &["SAVEPOINT", "gen"],
    &["RELEASE", "SAVEPOINT", "gen"],
    &["PREPARE", "TRANSACTION", "'generated'"],
];
/// Statements that are not control in either string mode.
const DECOYS: &[&str] = &[
    "SELECT 1",
    "SELECT 'BEGIN'",
    "SELECT 'x; COMMIT'",
    "SELECT 'it''s; END'",
    "SELECT E'\\'; COMMIT'",
    "SELECT $$; ROLLBACK$$",
    "SELECT $t$ $$; COMMIT $t$",
    "SELECT begin, atomic FROM (VALUES (1, 2)) AS v(begin, atomic)",
    "SELECT 1 AS end",
    "SELECT 'a'\n'; COMMIT'",
    "SELECT 1 /* ; COMMIT */",
    "DO $x$ BEGIN PERFORM 1; END $x$",
];
/// Openings that hide what follows under one reading of backslashes:
/// continued by a control statement and a closing piece.
const HIDERS: &[(&str, &str)] = &[
    ("SELECT 'a\\', '; ", "; SELECT ''"),
    ("SELECT 'a\\'; ", "; SELECT ''"),
    ("SELECT E'a'\n'\\'; ", "; --'"),
    ("SELECT 'x\\'\n'; ", "; SELECT '"),
];

fn case_word(rng: &mut Rng, word: &str) -> String {
    word.chars()
        .map(|c| {
            if rng.percent(50) {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect()
}

fn generated_control(rng: &mut Rng) -> String {
    let words = rng.pick(CONTROL);
    let mut out = String::new();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            out.push_str(rng.pick::<&str>(GAPS));
        }
        out.push_str(&case_word(rng, word));
    }
    out
}

fn generated_prefix(rng: &mut Rng) -> String {
    (0..rng.below(3)).map(|_| *rng.pick(PREFIXES)).collect()
}

/// A generated case and whether it holds control (under some reading).
fn generate(rng: &mut Rng) -> (String, bool) {
    let mut sql = String::new();
    match rng.below(4) {
        // One control statement behind white space, comments, semicolons.
        0 => {
            sql.push_str(&generated_prefix(rng));
            sql.push_str(&generated_control(rng));
            sql.push_str(rng.pick::<&str>(&["", ";", " ; ", " -- c"]));
            (sql, true)
        }
        // Decoys, then maybe a control statement.
        1 | 2 => {
            for _ in 0..1 + rng.below(3) {
                sql.push_str(&generated_prefix(rng));
                sql.push_str(rng.pick::<&str>(DECOYS));
                sql.push_str(rng.pick::<&str>(&[";", " ;\n"]));
            }
            let control = rng.percent(50);
            if control {
                sql.push_str(&generated_prefix(rng));
                sql.push_str(&generated_control(rng));
            }
            (sql, control)
        }
        // A control statement hidden under one reading of backslashes.
        _ => {
            let (open, close) = rng.pick(HIDERS);
            let _ = write!(sql, "{open}{}{close}", generated_control(rng));
            (sql, true)
        }
    }
}

/// Generated SQL through every API in both string modes: refused, or the
/// server is clean; and a case without control is never refused.
#[tokio::test]
async fn generated_sql_never_leaves_the_server_in_a_transaction() {
    let targets = [Target::new(true).await, Target::new(false).await];
    let seed = Rng::seed("generated_sql_never_leaves_the_server_in_a_transaction");
    let mut rng = Rng::new(seed);
    let cases = common::env_u64("PGASSIST_CONTROL_CASES", 60) as usize;
    let mut failures = Vec::new();
    let mut refused = 0;
    let mut n = 10_000;
    for _ in 0..cases {
        let (sql, control) = generate(&mut rng);
        for target in &targets {
            for api in APIS {
                n += 1;
                match run_case(target, api, &sql, n).await {
                    Ok(Answer::Refused) if !control => {
                        failures.push(format!("{api:?}: false alarm on {sql:?}"))
                    }
                    Ok(Answer::Refused) => refused += 1,
                    Ok(_) => {}
                    Err(failure) => failures.push(failure),
                }
            }
        }
    }
    assert!(
        refused > 0,
        "nothing generated was refused: the generator is broken"
    );
    assert!(
        failures.is_empty(),
        "seed {seed}: {} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Under a client encoding such as SJIS, a backslash after a non-ASCII byte
/// is part of the character: `E'Á\'; BEGIN; --'` is one string in UTF-8
/// and a string, a BEGIN and a comment in SJIS. pgassist never sets such an
/// encoding, but a statement can: such batches are refused.
#[tokio::test]
async fn escapes_that_depend_on_the_client_encoding_are_refused() {
    let db = Db::new().await;
    let hostile = "SELECT E'\u{c1}\\'; BEGIN; --'";
    // Real on a plain connection.
    let plain = db.plain().await;
    plain
        .batch_execute("SET client_encoding = 'SJIS'")
        .await
        .unwrap();
    plain.batch_execute(hostile).await.unwrap();
    assert!(in_block(&plain).await, "the SJIS reading ran no BEGIN");
    plain.batch_execute("ROLLBACK").await.unwrap();

    // Through pgassist, on a pooled connection set to SJIS (by the engine's
    // after_connect hook: a SET in autocommit is refused).
    let registry = db
        .registry(|c| {
            c.max_size(1).after_connect(|client| {
                Box::pin(async move { client.batch_execute("SET client_encoding = 'SJIS'").await })
            })
        })
        .await;
    let session = registry.session("writer").unwrap();
    let e = session.batch_execute(hostile).await.unwrap_err();
    assert!(matches!(e, Error::Usage(_)), "{e:?}");
    let tx = session.begin().await.unwrap();
    let e = tx.batch_execute(hostile).await.unwrap_err();
    assert!(matches!(e, Error::Usage(_)), "{e:?}");
    tx.rollback().await.unwrap();
    assert_eq!(common::in_transaction_backends(&db).await, 0);
}
