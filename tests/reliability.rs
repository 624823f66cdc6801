//! Cancellation safety and fault tolerance (issue 3), observed from the
//! server: `pg_stat_activity`, a plain second connection, VACUUM through
//! every pooled connection, and a TCP proxy that cuts connections exactly
//! while COMMIT is in flight.
//!
//! Tests that restart or stop the server live in `tests/faults.rs`, which
//! has a cluster of its own.

mod common;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::proxy::{CommitMode, Proxy};
use common::{Db, Rng, assert_pool_clean, env_u64, eventually, within};
use pgassist::{EngineConfig, Error, IsolationLevel, Outcome, Registry, TxOptions};
use pgassist_testing::{ClusterOptions, TestCluster};

// ---------------------------------------------------------------------------
// 1. Randomized cancellation
// ---------------------------------------------------------------------------

/// How a future is cut off, if at all.
#[derive(Clone, Copy, Debug)]
enum Cut {
    Never,
    /// Dropped on its (n+1)-th poll: polled at most n times (0 = never).
    AfterPolls(u32),
    /// Dropped when the timeout fires (`tokio::time::timeout`).
    After(Duration),
}

impl Cut {
    fn random(rng: &mut Rng, percent: u64) -> Cut {
        if !rng.percent(percent) {
            return Cut::Never;
        }
        if rng.percent(50) {
            Cut::AfterPolls(rng.below(4) as u32)
        } else {
            Cut::After(Duration::from_micros(rng.below(2500)))
        }
    }
}

/// Polls the inner future at most `left` times, then drops it.
struct PollLimit<F: Future> {
    inner: Option<Pin<Box<F>>>,
    left: u32,
}

impl<F: Future> Future for PollLimit<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.left == 0 {
            self.inner = None; // dropped here, mid-flight
            return Poll::Ready(None);
        }
        self.left -= 1;
        let inner = self.inner.as_mut().expect("polled after completion");
        match inner.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Runs `fut` unless `cut` drops it first; `None` means it was cut off.
async fn run_cut<F: Future>(cut: Cut, fut: F) -> Option<F::Output> {
    match cut {
        Cut::Never => Some(fut.await),
        Cut::AfterPolls(n) => {
            PollLimit {
                inner: Some(Box::pin(fut)),
                left: n,
            }
            .await
        }
        Cut::After(d) => tokio::time::timeout(d, fut).await.ok(),
    }
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum End {
    #[default]
    NotTried,
    Ok,
    Err,
    Cut,
}

impl<T> From<Option<Result<T, Error>>> for End {
    fn from(r: Option<Result<T, Error>>) -> End {
        match r {
            None => End::Cut,
            Some(Ok(_)) => End::Ok,
            Some(Err(_)) => End::Err,
        }
    }
}

/// What one iteration did, to be checked against the table afterwards.
#[derive(Clone, Debug, Default)]
struct Record {
    id: i64,
    tx_id: Option<u64>,
    insert: End,
    savepoint: bool,
    sp_insert: End,
    sp_release: End,
    sp_rollback: End,
    commit: End,
    /// Ended by `rollback()` (whatever its result) or by drop.
    abandoned: bool,
}

#[derive(Default)]
struct Totals {
    iterations: AtomicU64,
    cut_ops: AtomicU64,
    acked: AtomicU64,
    commit_cut: AtomicU64,
    commit_err: AtomicU64,
    aborted_errors: AtomicU64,
}

struct Shared {
    totals: Totals,
    /// Errors other than `TransactionAborted`: none are expected without faults.
    unexpected: Mutex<Vec<String>>,
    /// Ids whose on-commit callback ran.
    on_commit_ran: Arc<Mutex<HashSet<i64>>>,
    /// Transaction id -> outcomes reported by the end hook.
    outcomes: Arc<Mutex<HashMap<u64, Vec<Outcome>>>>,
}

impl Shared {
    fn check<T>(&self, what: &str, r: &Option<Result<T, Error>>) {
        if let Some(Err(e)) = r {
            if matches!(e, Error::TransactionAborted { .. }) {
                self.totals.aborted_errors.fetch_add(1, Ordering::Relaxed);
            } else {
                self.unexpected
                    .lock()
                    .unwrap()
                    .push(format!("{what}: {e:?}"));
            }
        }
    }
}

/// One transaction whose every step may be cut off at a random point.
async fn one_iteration(
    session: &mut pgassist::Session,
    rng: &mut Rng,
    id: i64,
    shared: &Shared,
) -> Record {
    const CUT: u64 = 22;
    let mut rec = Record {
        id,
        ..Record::default()
    };
    let cut = |rng: &mut Rng| {
        let c = Cut::random(rng, CUT);
        if !matches!(c, Cut::Never) {
            shared.totals.cut_ops.fetch_add(1, Ordering::Relaxed);
        }
        c
    };
    // An autocommit statement first, also cut off at random; the pool is
    // pipelined, so it often shares a connection with others in flight.
    if rng.percent(30) {
        let c = cut(rng);
        let r = run_cut(c, session.query_one("SELECT $1::bigint", &[&id])).await;
        if let Some(Ok(row)) = &r {
            if row.get::<_, i64>(0) != id {
                shared.unexpected.lock().unwrap().push(format!(
                    "autocommit select {id}: another statement's answer"
                ));
            }
        }
        shared.check("autocommit select", &r);
    }
    let c = cut(rng);
    let mut tx = match run_cut(c, session.begin()).await {
        None => return rec,
        Some(Err(e)) => {
            shared
                .unexpected
                .lock()
                .unwrap()
                .push(format!("begin: {e:?}"));
            return rec;
        }
        Some(Ok(tx)) => tx,
    };
    rec.tx_id = Some(tx.id());
    let ran = shared.on_commit_ran.clone();
    tx.on_commit(move || {
        ran.lock().unwrap().insert(id);
    });

    let c = cut(rng);
    let r = run_cut(
        c,
        tx.execute("INSERT INTO t(id, kind) VALUES ($1, 'main')", &[&id]),
    )
    .await;
    shared.check("insert", &r);
    rec.insert = End::from(r);

    if rng.percent(50) {
        rec.savepoint = true;
        let c = cut(rng);
        match run_cut(c, tx.begin()).await {
            None => {}
            Some(Err(e)) => shared.check::<()>("savepoint", &Some(Err(e))),
            Some(Ok(sp)) => {
                let c = cut(rng);
                let r = run_cut(
                    c,
                    sp.execute("INSERT INTO t(id, kind) VALUES ($1, 'sp')", &[&-id]),
                )
                .await;
                shared.check("savepoint insert", &r);
                rec.sp_insert = End::from(r);
                match rng.below(3) {
                    0 => {
                        let c = cut(rng);
                        let r = run_cut(c, sp.commit()).await;
                        shared.check("release", &r);
                        rec.sp_release = End::from(r);
                    }
                    1 => {
                        let c = cut(rng);
                        let r = run_cut(c, sp.rollback()).await;
                        shared.check("rollback to savepoint", &r);
                        rec.sp_rollback = End::from(r);
                    }
                    _ => drop(sp),
                }
            }
        }
    }

    if rng.percent(30) {
        let c = cut(rng);
        let r = run_cut(c, tx.query("SELECT count(*) FROM t WHERE id = $1", &[&id])).await;
        shared.check("select", &r);
    }

    match rng.below(10) {
        0..=5 => {
            let c = cut(rng);
            let r = run_cut(c, tx.commit()).await;
            shared.check("commit", &r);
            rec.commit = End::from(r);
            match rec.commit {
                End::Ok => shared.totals.acked.fetch_add(1, Ordering::Relaxed),
                End::Cut => shared.totals.commit_cut.fetch_add(1, Ordering::Relaxed),
                _ => shared.totals.commit_err.fetch_add(1, Ordering::Relaxed),
            };
        }
        6..=7 => {
            rec.abandoned = true;
            let c = cut(rng);
            let r = run_cut(c, tx.rollback()).await;
            shared.check("rollback", &r);
        }
        _ => {
            rec.abandoned = true;
            drop(tx);
        }
    }
    rec
}

const CANCEL_POOL: u32 = 4;
const CANCEL_TASKS: u64 = 8;
const CANCEL_PER_TASK: u64 = 50;

/// Checks one batch against the server's truth.
async fn verify_batch(db: &Db, registry: &Registry, shared: &Shared, recs: &[Record]) {
    // Nothing dirty: no backend idle in transaction, the connection map
    // empty, and every pooled connection's next statement outside a
    // transaction block.
    assert_pool_clean(db, registry, CANCEL_POOL as usize).await;
    let backends = db.backends().await;
    assert!(
        backends.len() <= CANCEL_POOL as usize,
        "more backends than the pool allows: {backends:?}"
    );
    let unexpected = std::mem::take(&mut *shared.unexpected.lock().unwrap());
    assert!(unexpected.is_empty(), "unexpected errors: {unexpected:#?}");

    let ids: Vec<i64> = recs.iter().flat_map(|r| [r.id, -r.id]).collect();
    let present: HashSet<i64> = db
        .plain()
        .await
        .query("SELECT id FROM t WHERE id = ANY($1)", &[&ids])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ran = shared.on_commit_ran.lock().unwrap().clone();
    let outcomes = shared.outcomes.lock().unwrap().clone();
    let (mut rows, mut acked_all, mut acked_rows, mut cut) = (0, 0, 0, 0);
    for rec in recs {
        let main = present.contains(&rec.id);
        let sp = present.contains(&-rec.id);
        let commit_maybe = matches!(rec.commit, End::Ok | End::Cut);
        rows += main as u64;
        acked_all += (rec.commit == End::Ok) as u64;
        acked_rows += (rec.commit == End::Ok && rec.insert == End::Ok) as u64;
        cut += (rec.commit == End::Cut) as u64;
        // Nothing of a transaction that was rolled back, dropped, or whose
        // commit returned an error is visible.
        assert!(
            !(main || sp) || commit_maybe,
            "rows of an uncommitted tx: {rec:?}"
        );
        // An acknowledged insert in an acknowledged commit is there.
        if rec.commit == End::Ok && rec.insert == End::Ok {
            assert!(main, "acknowledged commit lost: {rec:?}");
        }
        // Savepoints: rolled back work is gone, released work is kept.
        if sp {
            assert!(
                rec.sp_rollback != End::Ok,
                "rolled back savepoint kept: {rec:?}"
            );
        }
        if rec.commit == End::Ok && rec.sp_insert == End::Ok && rec.sp_release == End::Ok {
            assert!(sp, "released savepoint lost: {rec:?}");
        }
        // On-commit callbacks run exactly for acknowledged commits.
        assert_eq!(
            ran.contains(&rec.id),
            rec.commit == End::Ok,
            "on_commit vs commit result: {rec:?}"
        );
        // The end hook fired once, and never calls a committed tx rolled back.
        if let Some(tx_id) = rec.tx_id {
            let seen = outcomes.get(&tx_id).cloned().unwrap_or_default();
            assert_eq!(seen.len(), 1, "end hook fired {seen:?} for {rec:?}");
            let outcome = seen[0];
            match rec.commit {
                End::Ok => assert_eq!(outcome, Outcome::Committed, "{rec:?}"),
                End::Err | End::NotTried => assert_eq!(outcome, Outcome::RolledBack, "{rec:?}"),
                End::Cut => {}
            }
            if main || sp {
                assert_ne!(
                    outcome,
                    Outcome::RolledBack,
                    "committed, reported rolled back: {rec:?}"
                );
            }
        }
    }
    assert!(rows >= acked_rows && rows <= acked_all + cut);
    let st = registry.stats();
    let w = st.engine("writer").unwrap();
    assert_eq!(w.in_transaction, 0, "{w:?}");
    assert_eq!(
        w.begun,
        w.committed + w.rolled_back + w.commit_unknown,
        "every begun transaction ended once: {w:?}"
    );
}

async fn cancellation_run(total: u64, budget: Duration) {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, kind text NOT NULL)")
        .await
        .unwrap();
    let outcomes: Arc<Mutex<HashMap<u64, Vec<Outcome>>>> = Arc::default();
    let hook = outcomes.clone();
    let registry = Registry::builder()
        .engine(
            "writer",
            db.config()
                .max_size(CANCEL_POOL)
                .pipeline(4)
                .connection_timeout(Duration::from_secs(10)),
        )
        .on_end(move |ev, outcome| {
            hook.lock()
                .unwrap()
                .entry(ev.transaction_id())
                .or_default()
                .push(outcome)
        })
        .build()
        .await
        .unwrap();
    let shared = Arc::new(Shared {
        totals: Totals::default(),
        unexpected: Mutex::default(),
        on_commit_ran: Arc::default(),
        outcomes,
    });
    let seed = Rng::seed("cancellation");
    let started = Instant::now();
    let (mut next_id, mut batches, mut done) = (1_i64, 0_u64, 0_u64);
    while done < total {
        if started.elapsed() > budget {
            println!("cancellation: time budget of {budget:?} reached");
            break;
        }
        let mut handles = Vec::new();
        for t in 0..CANCEL_TASKS {
            let mut session = registry.session("writer").unwrap();
            let shared = shared.clone();
            let mut rng = Rng::new(seed ^ (batches * CANCEL_TASKS + t).wrapping_mul(0x2545_f491));
            let first = next_id + (t * CANCEL_PER_TASK) as i64;
            handles.push(tokio::spawn(async move {
                let mut recs = Vec::new();
                for k in 0..CANCEL_PER_TASK as i64 {
                    recs.push(one_iteration(&mut session, &mut rng, first + k, &shared).await);
                    shared.totals.iterations.fetch_add(1, Ordering::Relaxed);
                }
                recs
            }));
        }
        next_id += (CANCEL_TASKS * CANCEL_PER_TASK) as i64;
        let mut recs = Vec::new();
        for h in handles {
            recs.extend(
                within(Duration::from_secs(120), "a batch of iterations", h)
                    .await
                    .unwrap(),
            );
        }
        done += recs.len() as u64;
        batches += 1;
        verify_batch(&db, &registry, &shared, &recs).await;
    }
    let t = &shared.totals;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let st = registry.stats();
    let w = st.engine("writer").unwrap();
    println!(
        "cancellation: {} iterations in {} batches in {:.1?} (pool {CANCEL_POOL}, {CANCEL_TASKS} tasks): \
         {} futures cut off, {} commits acknowledged, {} commits cut off, {} commits failed, \
         {} TransactionAborted errors; {} dirty connections discarded, {} rolled back, {} commit outcomes unknown; \
         {} autocommit statements pipelined onto a busy connection",
        get(&t.iterations),
        batches,
        started.elapsed(),
        get(&t.cut_ops),
        get(&t.acked),
        get(&t.commit_cut),
        get(&t.commit_err),
        get(&t.aborted_errors),
        w.discarded_dirty,
        w.rolled_back,
        w.commit_unknown,
        w.pipelined,
    );
    assert!(done >= total.min(1000), "too few iterations ran: {done}");
}

/// Thousands of transactions whose begin, statements, savepoint begin /
/// release / rollback, commit and rollback futures are dropped at random
/// points (after a random number of polls, or by a timeout of a random
/// fraction of a millisecond), by 8 tasks over a pool of 4, with pipelined
/// autocommit statements (also cut off) in between. After every
/// batch of 400: nothing dirty on the server or in the pool, nothing lost,
/// nothing uncommitted visible, hooks and callbacks truthful.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_cancellation_leaves_nothing_dirty_and_loses_nothing() {
    let total = env_u64("PGASSIST_CANCEL_ITERS", 50_000);
    let budget = Duration::from_secs(env_u64("PGASSIST_CANCEL_SECS", 45));
    cancellation_run(total, budget).await;
}

/// The long run: `cargo test --all-features --test reliability -- --ignored`
/// (`PGASSIST_CANCEL_ITERS`, default 100 000, and `PGASSIST_CANCEL_SECS`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn randomized_cancellation_long_run() {
    let total = env_u64("PGASSIST_CANCEL_ITERS", 100_000);
    let budget = Duration::from_secs(env_u64("PGASSIST_CANCEL_SECS", 3600));
    cancellation_run(total, budget).await;
}

// ---------------------------------------------------------------------------
// 3. COMMIT with an unknown outcome
// ---------------------------------------------------------------------------

/// A registry whose connections go through `proxy`.
async fn via_proxy(db: &Db, proxy: &Proxy, max_size: u32) -> Registry {
    let config = EngineConfig::from_url(&proxy.url(&db.db.name))
        .unwrap()
        .application_name(&db.app)
        .max_size(max_size)
        .connection_timeout(Duration::from_secs(2));
    Registry::builder()
        .engine("writer", config)
        .build()
        .await
        .unwrap()
}

async fn items_named(db: &Db, name: &str) -> i64 {
    db.plain()
        .await
        .query_one("SELECT count(*) FROM items WHERE name = $1", &[&name])
        .await
        .unwrap()
        .get(0)
}

/// Cuts the connection exactly while COMMIT is in flight, in each way the
/// proxy can, and checks the error (always `CommitOutcomeUnknown`), the
/// server's truth, the counters, and that the pool heals.
#[tokio::test]
async fn a_connection_cut_during_commit_is_commit_outcome_unknown() {
    let db = Db::new().await;
    let proxy = Proxy::start(db.cluster.port()).await;
    let registry = via_proxy(&db, &proxy, 2).await;
    let s = registry.session("writer").unwrap();
    s.query("SELECT 1", &[]).await.expect("the proxy forwards");

    // (mode, row name, committed on the server?)
    let cases = [
        (
            CommitMode::DropBeforeServer,
            "dropped before the server",
            false,
        ),
        (CommitMode::DropReply, "reply dropped", true),
        (CommitMode::FatalAfterCommit, "fatal after commit", true),
    ];
    for (i, (mode, name, committed)) in cases.into_iter().enumerate() {
        proxy.set_commit_mode(mode);
        let tx = s.begin().await.unwrap();
        tx.execute("INSERT INTO items(name) VALUES ($1)", &[&name])
            .await
            .unwrap();
        let err = within(Duration::from_secs(10), "commit", tx.commit())
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::CommitOutcomeUnknown { .. }),
            "{mode:?}: {err:?}"
        );
        assert!(err.is_connection_error() && !err.is_retryable());
        // The server's truth, from a plain connection.
        assert_eq!(
            items_named(&db, name).await,
            committed as i64,
            "{mode:?}: committed on the server?"
        );
        proxy.set_commit_mode(CommitMode::Forward);
        // Nothing dirty, and the pool heals at once.
        db.wait_no_transactions().await;
        let w = registry.stats().engines[0].clone();
        assert_eq!(w.commit_unknown, i as u64 + 1, "{w:?}");
        assert_eq!(
            (w.in_transaction, registry.stats().open_transactions),
            (0, 0)
        );
        let tx = s.begin().await.unwrap();
        tx.execute("INSERT INTO items(name) VALUES ('after')", &[])
            .await
            .unwrap();
        tx.commit()
            .await
            .expect("the pool heals after a cut COMMIT");
    }
    assert_eq!((proxy.commits_dropped(), proxy.replies_dropped()), (1, 2));
    assert_eq!(items_named(&db, "after").await, 3);
}

/// The closure form never runs the closure again after
/// `CommitOutcomeUnknown`, even with retries allowed.
#[tokio::test]
async fn the_closure_form_never_retries_an_unknown_commit() {
    let db = Db::new().await;
    let proxy = Proxy::start(db.cluster.port()).await;
    let registry = via_proxy(&db, &proxy, 2).await;
    let s = registry.session("writer").unwrap();
    for mode in [CommitMode::DropBeforeServer, CommitMode::DropReply] {
        proxy.set_commit_mode(mode);
        let runs = Arc::new(AtomicU64::new(0));
        let r: Result<(), Error> = s
            .transaction(
                TxOptions::new()
                    .isolation(IsolationLevel::Serializable)
                    .retries(5),
                |tx| {
                    let runs = runs.clone();
                    Box::pin(async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tx.execute("INSERT INTO items(name) VALUES ('closure')", &[])
                            .await?;
                        Ok(())
                    })
                },
            )
            .await;
        assert!(
            matches!(r, Err(Error::CommitOutcomeUnknown { .. })),
            "{mode:?}: {r:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "{mode:?}: retried");
    }
    proxy.set_commit_mode(CommitMode::Forward);
    // Dropped before the server: not committed; reply dropped: committed.
    assert_eq!(items_named(&db, "closure").await, 1);
    db.wait_no_transactions().await;
}

/// A real server-side "committed, but the client cannot know": COMMIT waits
/// for a synchronous standby that does not exist (the commit record is
/// already written locally), and the backend is terminated in that wait.
/// PostgreSQL then closes the connection without an answer.
#[tokio::test]
async fn a_backend_terminated_while_commit_waits_for_a_standby_is_outcome_unknown() {
    if TestCluster::shared().is_external() {
        println!("skipped: needs a cluster of its own (DATABASE_URL is set)");
        return;
    }
    let cluster = tokio::task::spawn_blocking(|| {
        TestCluster::start(ClusterOptions {
            extra_conf: vec![("synchronous_standby_names".into(), "nobody".into())],
            ..Default::default()
        })
        .expect("start a cluster with a synchronous standby that never comes")
    })
    .await
    .unwrap();
    let db = cluster.create_database().await.unwrap();
    let plain = connect_plain(&db.url).await;
    plain
        .batch_execute("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL)")
        .await
        .unwrap();
    let app = "pgassist_syncrep";
    let registry = Registry::builder()
        .engine(
            "writer",
            EngineConfig::from_url(&db.url)
                .unwrap()
                .application_name(app)
                .max_size(2),
        )
        .build()
        .await
        .unwrap();
    let s = registry.session("writer").unwrap();
    let tx = s.begin().await.unwrap();
    // The cluster runs with synchronous_commit = off; this COMMIT waits.
    tx.batch_execute("SET LOCAL synchronous_commit = on")
        .await
        .unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('local')", &[])
        .await
        .unwrap();
    // Commit, and meanwhile terminate the backend once it waits for the standby.
    let killer = async {
        let waiting = eventually(Duration::from_secs(5), || {
            let plain = &plain;
            async move {
                plain
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE application_name = $1 AND wait_event = 'SyncRep'",
                        &[&app],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
                    == 1
            }
        })
        .await;
        assert!(waiting, "COMMIT never waited for the standby");
        common::terminate_backends(&plain, app).await
    };
    let (r, killed) = within(Duration::from_secs(10), "commit", async {
        tokio::join!(tx.commit(), killer)
    })
    .await;
    assert_eq!(killed, 1);
    assert!(
        matches!(r, Err(Error::CommitOutcomeUnknown { .. })),
        "{r:?}"
    );
    let n: i64 = plain
        .query_one("SELECT count(*) FROM items WHERE name = 'local'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the server had committed locally");
    assert_eq!(registry.stats().open_transactions, 0);
    // The pool heals.
    let s = registry.session("writer").unwrap();
    within(
        Duration::from_secs(5),
        "statement",
        s.query("SELECT 1", &[]),
    )
    .await
    .unwrap();
    drop(registry);
    drop(plain);
    cluster.stop();
}

async fn connect_plain(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// Cuts every proxied connection at random moments while 6 tasks commit
/// transactions through the proxy: an `Ok` commit is always on the server,
/// an error other than `CommitOutcomeUnknown` never is, nothing is left
/// dirty, and the pool keeps healing by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_connection_cuts_never_misreport_a_commit() {
    let db = Db::new().await;
    let proxy = Arc::new(Proxy::start(db.cluster.port()).await);
    let registry = via_proxy(&db, &proxy, 4).await;
    let seed = Rng::seed("random cuts");
    let deadline = Instant::now() + Duration::from_secs(env_u64("PGASSIST_CUT_SECS", 6));
    // (row name, result, was it CommitOutcomeUnknown)
    type Results = Arc<Mutex<Vec<(String, Result<(), String>, bool)>>>;
    let results: Results = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..6_u64 {
        let s = registry.session("writer").unwrap();
        let results = results.clone();
        let mut rng = Rng::new(seed.wrapping_add(t));
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let name = format!("cut-{t}-{n}");
                let work = async {
                    let tx = s.begin().await?;
                    tx.execute("INSERT INTO items(name) VALUES ($1)", &[&name])
                        .await?;
                    if rng.percent(50) {
                        tx.query("SELECT pg_sleep(0.002)", &[]).await?;
                    }
                    tx.commit().await
                };
                let r = within(Duration::from_secs(10), "transaction", work).await;
                let unknown = matches!(r, Err(Error::CommitOutcomeUnknown { .. }));
                results
                    .lock()
                    .unwrap()
                    .push((name, r.map_err(|e| format!("{e:?}")), unknown));
            }
        }));
    }
    let cutter = {
        let proxy = proxy.clone();
        let mut rng = Rng::new(seed ^ 0xc0ffee);
        tokio::spawn(async move {
            let mut cuts = 0;
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20 + rng.below(80))).await;
                cuts += proxy.cut_all();
            }
            cuts
        })
    };
    for t in tasks {
        t.await.unwrap();
    }
    let cuts = cutter.await.unwrap();
    let results = std::mem::take(&mut *results.lock().unwrap());
    let present: HashSet<String> = db.plain_names().await.into_iter().collect();
    let (mut ok, mut unknown, mut failed, mut unknown_committed) = (0, 0, 0, 0);
    for (name, r, is_unknown) in &results {
        match (r, is_unknown) {
            (Ok(()), _) => {
                ok += 1;
                assert!(present.contains(name), "acknowledged commit lost: {name}");
            }
            (Err(_), true) => {
                unknown += 1;
                unknown_committed += present.contains(name) as u32;
            }
            (Err(e), false) => {
                failed += 1;
                assert!(
                    !present.contains(name),
                    "{name} failed with {e} but is committed"
                );
            }
        }
    }
    println!(
        "random cuts: {} transactions, {cuts} connections cut: {ok} ok, {failed} failed, \
         {unknown} unknown ({unknown_committed} of them committed)",
        results.len()
    );
    assert!(cuts > 0 && ok > 0 && failed > 0, "the faults did not bite");
    assert_pool_clean(&db, &registry, 4).await;
}

// ---------------------------------------------------------------------------
// 2. The drop path is prompt
// ---------------------------------------------------------------------------

/// How the transaction holding the lock goes away.
#[derive(Clone, Copy, Debug)]
enum Release {
    /// `drop(tx)` on a runtime thread.
    DropGuard,
    /// The request future holding it loses a `select!` (a client that went away).
    SelectDropsRequest,
    /// The spawned task holding it is aborted.
    AbortTask,
    /// Dropped on a plain thread with no runtime.
    DropOffRuntime,
}

/// Has a transaction lock row 1, has a second session block on it, ends
/// the transaction as `how` says, and returns how long the second session
/// then waited for the lock.
async fn lock_wait_after(db: &Db, registry: &Registry, how: Release) -> Duration {
    let watcher = &db.plain().await;
    let app = &db.app;
    let waiting = move || async move {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[app],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    };
    let start_waiter = || {
        let s = registry.session("writer").unwrap();
        tokio::spawn(async move {
            s.execute("UPDATE items SET name = 'waiter' WHERE id = 1", &[])
                .await
                .expect("the waiter's update");
            Instant::now()
        })
    };
    const LOCK: &str = "UPDATE items SET name = 'holder' WHERE id = 1";
    let (released_at, waiter) = match how {
        Release::DropGuard | Release::DropOffRuntime => {
            let s = registry.session("writer").unwrap();
            let tx = s.begin().await.unwrap();
            tx.execute(LOCK, &[]).await.unwrap();
            let waiter = start_waiter();
            assert!(eventually(Duration::from_secs(5), &waiting).await);
            let at = Instant::now();
            if let Release::DropOffRuntime = how {
                std::thread::scope(|scope| {
                    scope
                        .spawn(move || drop(tx))
                        .join()
                        .expect("dropped off the runtime")
                });
            } else {
                drop(tx);
            }
            (at, waiter)
        }
        Release::SelectDropsRequest => {
            let s = registry.session("writer").unwrap();
            let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
            let request = async {
                let tx = s.begin().await.unwrap();
                tx.execute(LOCK, &[]).await.unwrap();
                locked_tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_secs(60)).await;
                tx.commit().await
            };
            let mut waiter = None;
            tokio::select! {
                _ = request => panic!("the request should have been dropped"),
                _ = async {
                    locked_rx.await.unwrap();
                    waiter = Some(start_waiter());
                    assert!(eventually(Duration::from_secs(5), &waiting).await);
                } => {}
            }
            (Instant::now(), waiter.unwrap())
        }
        Release::AbortTask => {
            let s = registry.session("writer").unwrap();
            let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
            let holder = tokio::spawn(async move {
                let tx = s.begin().await.unwrap();
                tx.execute(LOCK, &[]).await.unwrap();
                locked_tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_secs(60)).await;
                tx.commit().await
            });
            locked_rx.await.unwrap();
            let waiter = start_waiter();
            assert!(eventually(Duration::from_secs(5), &waiting).await);
            let at = Instant::now();
            holder.abort();
            (at, waiter)
        }
    };
    let got_lock = within(Duration::from_secs(10), "the waiter", waiter)
        .await
        .unwrap();
    got_lock.saturating_duration_since(released_at)
}

/// A second session blocked on a row lock held by a transaction that is
/// dropped unfinished gets the lock promptly: the drop path sends ROLLBACK
/// at once, not when the connection is next used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_transaction_releases_its_locks_promptly() {
    let db = Db::new().await;
    // min_idle = max_size: the pool replaces a connection it discards at
    // once, by spawning from the thread that gave it back.
    let registry = db.registry(|c| c.max_size(3).min_idle(3)).await;
    db.plain()
        .await
        .batch_execute("INSERT INTO items(id, name) VALUES (1, 'row')")
        .await
        .unwrap();
    let mut report = Vec::new();
    for round in 0..3 {
        for how in [
            Release::DropGuard,
            Release::SelectDropsRequest,
            Release::AbortTask,
            Release::DropOffRuntime,
        ] {
            let waited = lock_wait_after(&db, &registry, how).await;
            assert!(
                waited < Duration::from_secs(1),
                "{how:?}: the lock was released only after {waited:?}"
            );
            report.push(format!("{how:?} {:.1} ms", waited.as_secs_f64() * 1e3));
            if round == 0 {
                assert_pool_clean(&db, &registry, 3).await;
            }
        }
    }
    println!("drop path, lock wait after the drop: {}", report.join(", "));
    assert_pool_clean(&db, &registry, 3).await;
}

// ---------------------------------------------------------------------------
// 6. Retries
// ---------------------------------------------------------------------------

/// 8 tasks increment one counter under SERIALIZABLE through the closure
/// form with retries: the final value is exactly the number of `Ok`
/// results, retries happened, and the failures are exhausted retries of
/// serialization failures only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_increments_are_retried_and_counted_exactly() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute("CREATE TABLE counter (id int PRIMARY KEY, v bigint NOT NULL); INSERT INTO counter VALUES (1, 0)")
        .await
        .unwrap();
    let registry = db.registry(|c| c.max_size(8)).await;
    let per_task = env_u64("PGASSIST_RETRY_INCREMENTS", 25);
    let max_attempt = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = registry.session("writer").unwrap();
        let (max_attempt, retried) = (max_attempt.clone(), retried.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0_u64, Vec::new());
            for _ in 0..per_task {
                let r = s
                    .transaction(
                        TxOptions::new()
                            .isolation(IsolationLevel::Serializable)
                            .retries(10),
                        |tx| {
                            let (max_attempt, retried) = (max_attempt.clone(), retried.clone());
                            Box::pin(async move {
                                let attempt = tx.attempt() as u64;
                                max_attempt.fetch_max(attempt, Ordering::Relaxed);
                                retried.fetch_add((attempt > 1) as u64, Ordering::Relaxed);
                                // Read, think, write: a lost update unless serialized.
                                let v: i64 = tx
                                    .query_one("SELECT v FROM counter WHERE id = 1", &[])
                                    .await?
                                    .get(0);
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                tx.execute("UPDATE counter SET v = $1 WHERE id = 1", &[&(v + 1)])
                                    .await?;
                                Ok::<_, Error>(())
                            })
                        },
                    )
                    .await;
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, Vec::new());
    for t in tasks {
        let (o, f) = within(Duration::from_secs(120), "incrementers", t)
            .await
            .unwrap();
        ok += o;
        failed.extend(f);
    }
    let v: i64 = db
        .plain()
        .await
        .query_one("SELECT v FROM counter WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    println!(
        "retries: {ok} increments ok, {} failed after 10 retries, {} retried attempts, \
         highest attempt {}",
        failed.len(),
        retried.load(Ordering::Relaxed),
        max_attempt.load(Ordering::Relaxed)
    );
    assert_eq!(
        v as u64, ok,
        "the counter equals the acknowledged increments"
    );
    assert!(retried.load(Ordering::Relaxed) > 0, "no retry happened");
    for e in &failed {
        assert!(e.is_retryable(), "only exhausted retries may fail: {e:?}");
    }
    db.wait_no_transactions().await;
    assert_eq!(registry.stats().open_transactions, 0);
}

/// A write skew under SERIALIZABLE: attempt 1 sees a conflicting commit
/// and fails with 40001 (at its write or at COMMIT), the closure runs
/// again as attempt 2, which commits. Without retries the same conflict
/// is returned to the caller, retryable.
#[tokio::test]
async fn a_serialization_failure_is_retried_with_the_attempt_number() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute(
            "CREATE TABLE on_call (id int PRIMARY KEY, on_duty bool NOT NULL); \
             INSERT INTO on_call VALUES (1, true), (2, true), (3, true)",
        )
        .await
        .unwrap();
    let registry = db.registry(|c| c).await;
    let s = registry.session("writer").unwrap();
    let other = Arc::new(db.plain().await);
    for retries in [3, 0] {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let r = s
            .transaction(
                TxOptions::new()
                    .isolation(IsolationLevel::Serializable)
                    .retries(retries),
                |tx| {
                    let (attempts, other) = (attempts.clone(), other.clone());
                    Box::pin(async move {
                        attempts.lock().unwrap().push(tx.attempt());
                        tx.query("SELECT count(*) FROM on_call WHERE on_duty", &[])
                            .await?;
                        if tx.attempt() == 1 {
                            // A concurrent doctor also checks, goes off duty and commits first.
                            other
                                .batch_execute(
                                    "BEGIN ISOLATION LEVEL SERIALIZABLE; \
                                     SELECT count(*) FROM on_call WHERE on_duty; \
                                     UPDATE on_call SET on_duty = NOT on_duty WHERE id = 2; COMMIT",
                                )
                                .await
                                .unwrap();
                        }
                        tx.execute("UPDATE on_call SET on_duty = NOT on_duty WHERE id = 1", &[])
                            .await?;
                        Ok::<_, Error>(())
                    })
                },
            )
            .await;
        let attempts = attempts.lock().unwrap().clone();
        if retries > 0 {
            r.expect("the second attempt commits");
            assert_eq!(attempts, [1, 2]);
        } else {
            let e = r.unwrap_err();
            assert!(e.is_retryable(), "{e:?}");
            assert_eq!(
                e.code(),
                Some(&pgassist::SqlState::T_R_SERIALIZATION_FAILURE)
            );
            assert_eq!(attempts, [1]);
        }
    }
    db.wait_no_transactions().await;
}

// ---------------------------------------------------------------------------
// 7. Bad input
// ---------------------------------------------------------------------------

/// Malformed URLs and settings: `Error::Config`, no panic, no password.
#[tokio::test]
async fn malformed_urls_and_settings_are_config_errors_without_the_password() {
    const PW: &str = "Pw-4b8e1c";
    for url in [
        "postgres://",
        "postgres://ann:Pw-4b8e1c@",
        "postgres://ann:Pw-4b8e1c@db:99999/app",
        "postgres://ann:Pw-4b8e1c@db:-1/app",
        "postgres://ann:Pw-4b8e1c@[::1/app",
        "postgres://ann:Pw-4b8e1c@db/app?sslmode=sometimes",
        "postgres://ann:Pw-4b8e1c@db/app?connect_timeout=soon",
        "postgres://ann:Pw-4b8e1c@db/app?keepalives=maybe",
        "postgres://ann:Pw-4b8e1c@db/app?nonsense=1",
        "postgres://ann:Pw-4b8e1c@db/app?application_name",
        "postgres://ann:Pw-4b8e1c@db/app?host=%ff",
        "postgres://ann:Pw-4b8e1c@db/%ff",
        "postgres://%ff:Pw-4b8e1c@db/app",
        "postgresql://ann:Pw-4b8e1c@db/app?target_session_attrs=primary-ish",
        "http://ann:Pw-4b8e1c@db/app",
        "host=db password=Pw-4b8e1c port=five",
        "host=db password='Pw-4b8e1c",
        "host=db password=Pw-4b8e1c sslmode",
        "host=db password=Pw-4b8e1c =x",
        "\u{0}",
        "    ",
    ] {
        match EngineConfig::from_url(url) {
            Err(e) => {
                assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
                let shown = format!("{e} {e:?}");
                assert!(!shown.contains(PW), "{url}: the password leaked: {shown}");
                assert!(!shown.is_empty());
            }
            // Some are valid for the driver; then building must refuse or accept them cleanly.
            Ok(cfg) => {
                let shown = format!("{cfg} {cfg:?}");
                assert!(!shown.contains(PW), "{url}: the password leaked: {shown}");
                // Lazy: this checks the description, not the (made-up) server.
                let built = Registry::builder().engine("w", cfg).lazy().build().await;
                if let Err(e) = built {
                    assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
                    assert!(!format!("{e} {e:?}").contains(PW));
                }
            }
        }
    }
    // A URL without a host parses, but the registry refuses it.
    let cfg = EngineConfig::from_url("postgres:///app").unwrap();
    let e = Registry::builder()
        .engine("w", cfg)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");

    let base = EngineConfig::from_url("postgres://ann:Pw-4b8e1c@127.0.0.1:1/app").unwrap();
    for (what, cfg) in [
        ("max_size 0", base.clone().max_size(0)),
        ("min_idle > max_size", base.clone().max_size(2).min_idle(3)),
        (
            "connection_timeout 0",
            base.clone().connection_timeout(Duration::ZERO),
        ),
        (
            "idle_timeout 0",
            base.clone().idle_timeout(Some(Duration::ZERO)),
        ),
        (
            "max_lifetime 0",
            base.clone().max_lifetime(Some(Duration::ZERO)),
        ),
    ] {
        let e = Registry::builder()
            .engine("w", cfg)
            .build()
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{what}: {e:?}");
        assert!(
            e.to_string().contains("`w`"),
            "{what}: names the engine: {e}"
        );
        assert!(!format!("{e} {e:?}").contains(PW));
    }
    for (what, b) in [
        ("empty name", Registry::builder().engine("", base.clone())),
        (
            "duplicate",
            Registry::builder()
                .engine("w", base.clone())
                .engine("w", base.clone()),
        ),
    ] {
        let e = b.build().await.unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{what}: {e:?}");
    }
}

/// Unknown engines, empty SQL, NUL bytes, wrong parameter counts and
/// types: typed errors, and a transaction survives the ones the server
/// never saw.
#[tokio::test]
async fn bad_statements_give_typed_errors_and_leave_transactions_usable() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(2)).await;
    for name in ["", "nope", "Writer", "writer "] {
        let e = registry.session(name).unwrap_err();
        assert!(matches!(e, Error::UnknownEngine { .. }), "{name:?}: {e:?}");
        assert!(
            e.to_string().contains("writer"),
            "lists the known engines: {e}"
        );
        assert!(matches!(
            registry.engine(name),
            Err(Error::UnknownEngine { .. })
        ));
        assert!(matches!(
            registry.reinit(name).await,
            Err(Error::UnknownEngine { .. })
        ));
    }

    let s = registry.session("writer").unwrap();
    // Empty and comment-only SQL run and return nothing.
    for sql in ["", "   ", ";", "-- nothing", "/* nothing */"] {
        assert!(s.query(sql, &[]).await.unwrap().is_empty(), "{sql:?}");
        assert_eq!(s.execute(sql, &[]).await.unwrap(), 0, "{sql:?}");
        s.batch_execute(sql).await.unwrap();
    }
    let e = s.query_one("", &[]).await.unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e:?}");

    // Clear messages: what went wrong, in the error's own Display.
    let e = s.query("SELEC 1", &[]).await.unwrap_err();
    assert!(e.to_string().contains("syntax error"), "{e}");
    assert!(e.to_string().contains("42601"), "{e}");
    let e = s.query("SELECT $1::int", &[&"text"]).await.unwrap_err();
    assert!(e.to_string().contains("int4"), "{e}");
    let e = s.query("SELECT $1::int", &[]).await.unwrap_err();
    assert!(
        e.to_string().contains("expected 1 parameters but got 0"),
        "{e}"
    );
    let e = s.query("SELECT 1\u{0}", &[]).await.unwrap_err();
    assert!(e.to_string().contains("null"), "{e}");
    let unreachable = Registry::builder()
        .engine(
            "w",
            EngineConfig::from_url("postgres://ann:Pw-4b8e1c@127.0.0.1:1/x")
                .unwrap()
                .connection_timeout(Duration::from_millis(300)),
        )
        .lazy()
        .build()
        .await
        .unwrap();
    let e = unreachable
        .session("w")
        .unwrap()
        .query("SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(!format!("{e} {e:?}").contains("Pw-4b8e1c"));

    // Rejected before the server sees them: Query, not a connection error.
    let nul = "SELECT 1\u{0}";
    let cases: [(&str, &[&(dyn pgassist::ToSql + Sync)]); 4] = [
        ("SELECT $1::int", &[]),
        ("SELECT $1::int", &[&1_i32, &2_i32]),
        ("SELECT $1::int", &[&"text"]),
        (nul, &[]),
    ];
    for (sql, params) in cases {
        let e = s.query(sql, params).await.unwrap_err();
        assert!(matches!(e, Error::Query { .. }), "{sql:?}: {e:?}");
        assert!(!e.is_connection_error(), "{sql:?}: {e:?}");
    }
    let e = s.batch_execute(nul).await.unwrap_err();
    assert!(matches!(e, Error::Query { .. }), "{e:?}");

    // Inside a transaction the same errors leave it usable: the server
    // never saw them.
    let tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('before')", &[])
        .await
        .unwrap();
    for (sql, params) in cases {
        let e = tx.query(sql, params).await.unwrap_err();
        assert!(matches!(e, Error::Query { .. }), "{sql:?}: {e:?}");
    }
    assert!(matches!(
        tx.batch_execute(nul).await,
        Err(Error::Query { .. })
    ));
    assert_eq!(tx.execute("", &[]).await.unwrap(), 0);
    tx.execute("INSERT INTO items(name) VALUES ('after')", &[])
        .await
        .unwrap();
    tx.commit()
        .await
        .expect("the transaction survived client-side errors");
    assert_eq!(db.plain_names().await, ["after", "before"]);

    // A statement the server rejects aborts the transaction: typed errors
    // without a round trip, commit rolls back.
    let tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('lost')", &[])
        .await
        .unwrap();
    let e = tx
        .execute("INSERT INTO nowhere VALUES (1)", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(&pgassist::SqlState::UNDEFINED_TABLE));
    for _ in 0..3 {
        let e = tx.query("SELECT 1", &[]).await.unwrap_err();
        assert!(matches!(e, Error::TransactionAborted { .. }), "{e:?}");
    }
    assert!(matches!(
        tx.commit().await,
        Err(Error::TransactionAborted { .. })
    ));
    assert_eq!(db.plain_names().await, ["after", "before"]);
    db.wait_no_transactions().await;
}

/// Transaction control statements sent through a transaction or savepoint
/// would end or reshape it behind pgassist's back (a COMMIT there commits,
/// and later statements would run in autocommit): `Error::Usage`, and the
/// transaction goes on untouched.
#[tokio::test]
async fn transaction_control_inside_a_transaction_is_refused() {
    let db = Db::new().await;
    let registry = db.registry(|c| c.max_size(1)).await;
    let s = registry.session("writer").unwrap();
    let control = [
        "COMMIT",
        "commit;",
        "END",
        "ROLLBACK",
        "ABORT",
        "BEGIN",
        "START TRANSACTION",
        "SAVEPOINT mine",
        "RELEASE SAVEPOINT pgassist_sp_1",
        "ROLLBACK TO SAVEPOINT pgassist_sp_1",
        "PREPARE TRANSACTION 'x'",
        "  /* sneaky */ COMMIT",
    ];
    let mut tx = s.begin().await.unwrap();
    tx.execute("INSERT INTO items(name) VALUES ('outer')", &[])
        .await
        .unwrap();
    for sql in control {
        let e = tx.batch_execute(sql).await.unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{sql}: {e:?}");
        let e = tx.execute(sql, &[]).await.unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{sql}: {e:?}");
    }
    // Behind another statement of a batch, too (quotes and dollar-quoted
    // bodies are no hiding place, and no false alarm either).
    for batch in [
        "SELECT 1; COMMIT",
        "INSERT INTO items(name) VALUES ('a;b'); COMMIT",
        "DO $$ BEGIN PERFORM 1; END $$; END",
    ] {
        let e = tx.batch_execute(batch).await.unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "{batch}: {e:?}");
    }
    tx.batch_execute("DO $$ BEGIN PERFORM 1; END $$; SELECT 'x; COMMIT'")
        .await
        .unwrap();
    {
        let sp = tx.begin().await.unwrap();
        sp.execute("INSERT INTO items(name) VALUES ('inner')", &[])
            .await
            .unwrap();
        for sql in control {
            assert!(
                matches!(sp.batch_execute(sql).await, Err(Error::Usage(_))),
                "{sql}"
            );
        }
        sp.rollback().await.unwrap();
    }
    tx.execute(
        "INSERT INTO items(name) VALUES ('still in the transaction')",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        db.plain_names().await.is_empty(),
        "nothing was committed behind the transaction's back"
    );
    // The autocommit session refuses them too (tests/core.rs has more),
    // also behind another statement: `SELECT 1; BEGIN` would otherwise
    // return the pooled connection inside a transaction.
    for batch in ["COMMIT", "SELECT 1; BEGIN", "SELECT 1; START TRANSACTION"] {
        assert!(
            matches!(s.batch_execute(batch).await, Err(Error::Usage(_))),
            "{batch}"
        );
    }
    s.batch_execute("SELECT 1; SELECT 2").await.unwrap();
    db.wait_no_transactions().await;
    assert_eq!(common::in_transaction_backends(&db).await, 0);
    // The next user of the one pooled connection runs in autocommit: a
    // row it inserts is visible from a second connection at once.
    s.execute("INSERT INTO items(name) VALUES ('after')", &[])
        .await
        .unwrap();
    assert_eq!(db.plain_names().await, ["after"]);
}

// ---------------------------------------------------------------------------
// 4 (without a restart). Pool exhaustion
// ---------------------------------------------------------------------------

/// Both connections held by open transactions: every statement, begin and
/// closure transaction waiting meanwhile fails with `PoolTimeout` after
/// connection_timeout (never hangs), waiters whose futures are dropped
/// leave nothing behind, and once the transactions end everything works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_a_pool_timeout_for_every_waiter_and_recovers() {
    let db = Db::new().await;
    let timeout = Duration::from_millis(300);
    let registry = db
        .registry(|c| c.max_size(2).connection_timeout(timeout))
        .await;
    let (a, b) = (
        registry.session("writer").unwrap(),
        registry.session("writer").unwrap(),
    );
    let ta = a.begin().await.unwrap();
    let tb = b.begin().await.unwrap();
    ta.execute("INSERT INTO items(name) VALUES ('a')", &[])
        .await
        .unwrap();
    tb.execute("INSERT INTO items(name) VALUES ('b')", &[])
        .await
        .unwrap();

    let started = Instant::now();
    let mut waiters = Vec::new();
    for i in 0..12 {
        let s = registry.session("writer").unwrap();
        waiters.push(tokio::spawn(async move {
            let began = Instant::now();
            let e = match i % 3 {
                0 => s.query("SELECT 1", &[]).await.map(|_| ()).unwrap_err(),
                1 => s.begin().await.map(|_| ()).unwrap_err(),
                _ => s
                    .transaction(TxOptions::new().retries(3), |tx| {
                        Box::pin(async move { tx.execute("SELECT 1", &[]).await.map(|_| ()) })
                    })
                    .await
                    .unwrap_err(),
            };
            (e, began.elapsed())
        }));
    }
    // Waiters cut off while queued for a connection.
    for _ in 0..5 {
        let s = registry.session("writer").unwrap();
        let cut = tokio::time::timeout(Duration::from_millis(50), s.query("SELECT 1", &[])).await;
        assert!(cut.is_err());
    }
    for w in waiters {
        let (e, waited) = within(Duration::from_secs(5), "a waiter", w).await.unwrap();
        assert!(matches!(e, Error::PoolTimeout { .. }), "{e:?}");
        assert!(
            waited >= timeout && waited < timeout + Duration::from_millis(700),
            "waited {waited:?}"
        );
        assert!(e.to_string().contains("pool exhausted"), "{e}");
    }
    println!(
        "pool exhaustion: 12 waiters got PoolTimeout after {:?}",
        started.elapsed()
    );
    ta.commit().await.unwrap();
    tb.rollback().await.unwrap();
    let s = registry.session("writer").unwrap();
    for _ in 0..10 {
        within(
            Duration::from_secs(5),
            "after the exhaustion",
            s.query("SELECT 1", &[]),
        )
        .await
        .unwrap();
    }
    assert_eq!(db.plain_names().await, ["a"]);
    let w = registry.stats().engines[0].clone();
    assert!(w.checkout_timeouts >= 12, "{w:?}");
    assert_pool_clean(&db, &registry, 2).await;
}

// ---------------------------------------------------------------------------
// 7 (continued). Generated and mutated URLs
// ---------------------------------------------------------------------------

const MARK_PW: &str = "Zq7-s3cret-9x";

/// A URL or key=value string built from plausible and broken pieces.
fn generated_url(rng: &mut Rng) -> String {
    let pw_enc = MARK_PW.replace('-', "%2D");
    let schemes = [
        "postgres://",
        "postgresql://",
        "postgres:/",
        "mysql://",
        "",
        "//",
    ];
    let users = [
        String::new(),
        "ann@".into(),
        format!("ann:{MARK_PW}@"),
        format!(":{MARK_PW}@"),
        format!("ann:{pw_enc}@"),
        format!("a%ZZ:{MARK_PW}@"),
        format!("ann:{MARK_PW}@x@"),
    ];
    let hosts = [
        "db",
        "127.0.0.1",
        "[::1]",
        "db1,db2:6432",
        "%2Ftmp",
        "",
        "[::1",
        "h:5432",
        "h:99999",
        "h:x",
        "h:",
        ",",
        "[]",
    ];
    let paths = ["/app", "", "/", "/a%ff", "/%2F", "/a/b"];
    let queries = [
        String::new(),
        "?sslmode=require".into(),
        "?sslmode=bogus".into(),
        "?connect_timeout=5".into(),
        "?connect_timeout=-5".into(),
        "?application_name=x&options=-c%20a%3Db".into(),
        "?host=/tmp".into(),
        format!("?password={MARK_PW}"),
        "?=".into(),
        "?a".into(),
        "?target_session_attrs=read-write".into(),
        "?keepalives=1&keepalives_idle=9999999999999".into(),
        "?load_balance_hosts=random".into(),
        "?hostaddr=1.2.3.4".into(),
        "?port=1&port=2".into(),
        "?user=%00".into(),
    ];
    if rng.percent(25) {
        // key=value form
        let parts = [
            "host=db".to_owned(),
            format!("password={MARK_PW}"),
            format!("password='{MARK_PW} x'"),
            format!("password='{MARK_PW}\\'"),
            "port=5432".into(),
            "port=five".into(),
            "dbname=app".into(),
            "user=ann".into(),
            "sslmode=disable".into(),
            "connect_timeout=x".into(),
            "=".into(),
            "''".into(),
        ];
        let n = 1 + rng.below(5);
        return (0..n)
            .map(|_| rng.pick(&parts).clone())
            .collect::<Vec<_>>()
            .join(" ");
    }
    format!(
        "{}{}{}{}{}",
        rng.pick(&schemes),
        rng.pick(&users),
        rng.pick(&hosts),
        rng.pick(&paths),
        rng.pick(&queries)
    )
}

/// A few random edits: deletions, insertions of special characters,
/// duplications, truncation.
fn mutated(rng: &mut Rng, s: &str) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    let specials = [
        ':',
        '@',
        '/',
        '?',
        '&',
        '=',
        '%',
        '[',
        ']',
        '\'',
        '\\',
        ' ',
        ',',
        '\0',
        'é',
        '\u{10FFFF}',
        '0',
        'x',
    ];
    for _ in 0..rng.below(4) {
        let at = if chars.is_empty() {
            0
        } else {
            rng.below(chars.len() as u64) as usize
        };
        match rng.below(5) {
            0 if !chars.is_empty() => {
                chars.remove(at);
            }
            1 => chars.insert(at, *rng.pick(&specials)),
            2 if !chars.is_empty() => {
                let end = (at + 1 + rng.below(6) as usize).min(chars.len());
                let piece: Vec<char> = chars[at..end].to_vec();
                chars.splice(at..at, piece);
            }
            3 => chars.truncate(at),
            _ => {
                if chars.len() > 1 {
                    let other = rng.below(chars.len() as u64) as usize;
                    chars.swap(at, other);
                }
            }
        }
    }
    chars.into_iter().collect()
}

/// What the input says the password is, by syntax: the userinfo password
/// of a URL (raw and percent-decoded: after the first ':' and before the
/// '@' of the authority, which ends at the first '/' or '?') and
/// `password=` values.
fn password_candidates(input: &str) -> Vec<String> {
    let mut out = Vec::new();
    let url = input.starts_with("postgres://") || input.starts_with("postgresql://");
    if let Some((_, rest)) = input.split_once("://").filter(|_| url) {
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        if let Some(at) = authority.rfind('@') {
            if let Some((_, pw)) = authority[..at].split_once(':') {
                out.push(pw.to_owned());
                let decoded = pw.replace("%2D", "-");
                out.push(decoded);
            }
        }
    }
    // Query parameters of a URL, or the pairs of a key=value string.
    let pairs: Vec<&str> = if url {
        input
            .split_once('?')
            .map_or(vec![], |(_, q)| q.split('&').collect())
    } else {
        input.split(' ').collect()
    };
    for part in pairs {
        if let Some(v) = part.strip_prefix("password=") {
            out.push(v.trim_matches('\'').to_owned());
        }
    }
    out.retain(|p| p.len() >= 6);
    out
}

/// Thousands of generated and mutated URLs through `EngineConfig::from_url`
/// and `Registry::builder().build()`: no panic, only `Error::Config`, and
/// the password never in an error, `Display` or `Debug`. (The cargo-fuzz
/// target in fuzz/ runs the same checks coverage-guided.)
#[tokio::test]
async fn generated_and_mutated_urls_never_panic_or_leak_the_password() {
    let seed = Rng::seed("urls");
    let mut rng = Rng::new(seed);
    let n = env_u64("PGASSIST_URL_CASES", 20_000);
    let (mut parsed, mut built, mut refused) = (0, 0, 0);
    for i in 0..n {
        let base = generated_url(&mut rng);
        let input = if i % 4 == 0 {
            base
        } else {
            mutated(&mut rng, &base)
        };
        let candidates = password_candidates(&input);
        let leaks = |shown: &str| {
            candidates
                .iter()
                .find(|pw| shown.contains(pw.as_str()))
                .cloned()
        };
        let outcome = std::panic::catch_unwind(|| EngineConfig::from_url(&input));
        let Ok(result) = outcome else {
            panic!("from_url panicked on {input:?}");
        };
        match result {
            Err(e) => {
                refused += 1;
                assert!(matches!(e, Error::Config(_)), "{input:?}: {e:?}");
                let shown = format!("{e} {e:?}");
                assert_eq!(leaks(&shown), None, "{input:?} leaked in {shown}");
            }
            Ok(cfg) => {
                parsed += 1;
                let mut secrets = candidates.clone();
                if let Some(pw) = cfg.pg_config().get_password() {
                    let pw = String::from_utf8_lossy(pw).into_owned();
                    if pw.len() >= 6 {
                        secrets.push(pw);
                    }
                }
                // A mutation can turn the text into a user or database
                // name (say by deleting the ':'); those are shown by design.
                let pg = cfg.pg_config();
                let mut fields: Vec<String> =
                    pg.get_user().into_iter().map(str::to_owned).collect();
                fields.extend(pg.get_dbname().map(str::to_owned));
                for host in pg.get_hosts() {
                    fields.push(match host {
                        tokio_postgres::config::Host::Tcp(h) => h.clone(),
                        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                    });
                }
                secrets.retain(|pw| !fields.iter().any(|f| f.contains(pw.as_str())));
                let shown = format!("{cfg} {cfg:?} {cfg:#?}");
                for pw in &secrets {
                    assert!(
                        !shown.contains(pw.as_str()),
                        "{input:?}: {pw:?} shown in {shown}"
                    );
                }
                match Registry::builder().engine("w", cfg).lazy().build().await {
                    Ok(registry) => {
                        built += 1;
                        let shown = format!("{registry:?} {:?}", registry.stats());
                        for pw in &secrets {
                            assert!(!shown.contains(pw.as_str()), "{input:?}: {pw:?} in {shown}");
                        }
                    }
                    Err(e) => {
                        assert!(matches!(e, Error::Config(_)), "{input:?}: {e:?}");
                        let shown = format!("{e} {e:?}");
                        for pw in &secrets {
                            assert!(!shown.contains(pw.as_str()), "{input:?}: {pw:?} in {shown}");
                        }
                    }
                }
            }
        }
    }
    println!(
        "urls: {n} generated/mutated inputs: {refused} refused by from_url, {parsed} parsed, \
         {built} built into a registry"
    );
    assert!(refused > 0 && built > 0);
}
