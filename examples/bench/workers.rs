//! The workloads, the contenders that run them, and the timed loop.
//!
//! Every contender runs the same statements with the same random keys and
//! decodes the same column, so the only difference is the client stack.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bb8_postgres::PostgresConnectionManager;
use futures::future::join_all;
use pgassist::{EngineConfig, Registry, Session, ToSql};
use tokio_postgres::{Client, NoTls, Statement};

use crate::alloc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Res<T> = Result<T, BoxError>;

pub const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
pub const UPDATE: &str = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2";
pub const SELECT_TELLER: &str = "SELECT tbalance FROM pgbench_tellers WHERE tid = $1";
pub const SELECT_BRANCH: &str = "SELECT bbalance FROM pgbench_branches WHERE bid = $1";
/// Set by the bench from [`probe_full_join`] before W3 runs.
pub static FULL_JOIN: AtomicBool = AtomicBool::new(true);
/// The application work of one W4 request, during which no query runs.
pub const IDLE_WORK: Duration = Duration::from_millis(5);
/// W5's checkout timeout.
pub const OVERLOAD_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// W1: autocommit `SELECT abalance … WHERE aid = $1`.
    PointSelect,
    /// W2: BEGIN; UPDATE pgbench_accounts …; COMMIT.
    WriteTx,
    /// W3: BEGIN; three point selects (accounts, tellers, branches); COMMIT.
    ReadTx,
    /// W4: select, 5 ms of application work, select.
    IdleHeavy,
    /// W5: W1 from far more tasks than connections, no think time, a 2 s
    /// checkout timeout: overload, where a pool that serves waiters out of
    /// order shows a long tail and timeouts.
    Overload,
}

impl Workload {
    pub fn id(self) -> &'static str {
        match self {
            Workload::PointSelect => "W1",
            Workload::WriteTx => "W2",
            Workload::ReadTx => "W3",
            Workload::IdleHeavy => "W4",
            Workload::Overload => "W5",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Workload::PointSelect => "autocommit point select",
            Workload::WriteTx => "one-statement write transaction",
            Workload::ReadTx => "read transaction of three selects",
            Workload::IdleHeavy => "select / 5 ms work / select",
            Workload::Overload => "overload: point selects, no think time, 2 s checkout timeout",
        }
    }

    /// The checkout timeout every pool gets (each pool's default otherwise).
    pub fn checkout_timeout(self) -> Option<Duration> {
        match self {
            Workload::Overload => Some(OVERLOAD_TIMEOUT),
            _ => None,
        }
    }

    /// The contenders measured on this workload; the first is the reference
    /// the ratios are taken against.
    pub fn contenders(self) -> &'static [Contender] {
        use Contender::*;
        match self {
            Workload::PointSelect | Workload::WriteTx => {
                &[Pgassist, Raw, Bb8Tuned, Bb8Naive, Deadpool, Sqlx, Pgbench]
            }
            Workload::ReadTx => &[
                Pgassist,
                PgassistJoin,
                Raw,
                Bb8Tuned,
                Bb8Naive,
                Deadpool,
                Sqlx,
                Pgbench,
            ],
            Workload::IdleHeavy => &[
                Pgassist,
                PgassistPipelined,
                PgassistPinned,
                Bb8Tuned,
                Bb8Held,
            ],
            Workload::Overload => &[Pgassist, Bb8Tuned, Deadpool, Sqlx],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// pgassist autocommit session (W1, W4) / `session.begin()` (W2, W3).
    Pgassist,
    /// W3 with the three selects in flight together (`futures::join!` on `&tx`).
    PgassistJoin,
    /// W4 with the connection pinned for the whole request (a transaction).
    PgassistPinned,
    /// W4 with `EngineConfig::pipeline(64)`: while all 8 connections are
    /// busy, autocommit statements are pipelined onto them.
    PgassistPipelined,
    /// tokio-postgres, one client per task, statements prepared once.
    Raw,
    /// bb8-postgres, `test_on_check_out(false)`, statements prepared once per connection.
    Bb8Tuned,
    /// W4: bb8 tuned with the connection held for the whole request.
    Bb8Held,
    /// bb8-postgres with its defaults, `query(&str)` each time.
    Bb8Naive,
    /// deadpool-postgres (fast recycling), `prepare_cached`.
    Deadpool,
    /// sqlx `PgPool` with its defaults (runtime-tokio, postgres, no TLS).
    Sqlx,
    /// pgbench itself, `-M prepared`, same client count.
    Pgbench,
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Pgassist => "pgassist",
            Contender::PgassistJoin => "pgassist join!",
            Contender::PgassistPinned => "pgassist pinned",
            Contender::PgassistPipelined => "pgassist pipelined",
            Contender::Raw => "tokio-postgres raw",
            Contender::Bb8Tuned => "bb8 tuned",
            Contender::Bb8Held => "bb8 tuned, held",
            Contender::Bb8Naive => "bb8 naive",
            Contender::Deadpool => "deadpool cached",
            Contender::Sqlx => "sqlx PgPool",
            Contender::Pgbench => "pgbench",
        }
    }
}

/// A splitmix64 generator: cheap, seedable, allocation free.
pub struct Rng {
    state: u64,
    scale: i32,
}

impl Rng {
    pub fn new(seed: u64, scale: i32) -> Rng {
        Rng {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            scale,
        }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: i32) -> i32 {
        (self.next() % n as u64) as i32
    }

    /// An account id in 1..=100_000 × scale (1..=1_000_000 at scale 10).
    pub fn aid(&mut self) -> i32 {
        1 + self.below(100_000 * self.scale)
    }

    pub fn tid(&mut self) -> i32 {
        1 + self.below(10 * self.scale)
    }

    pub fn bid(&mut self) -> i32 {
        1 + self.below(self.scale)
    }

    /// pgbench's own delta range.
    pub fn delta(&mut self) -> i32 {
        self.below(10_001) - 5_000
    }
}

/// One task's way of running one operation of its workload.
pub trait Worker: Send + 'static {
    fn op(&mut self, rng: &mut Rng) -> impl Future<Output = Res<()>> + Send;
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
}

/// One round of one contender on one workload.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub ops_per_sec: f64,
    /// Bytes allocated by the whole bench process per operation (NaN for pgbench).
    pub bytes_per_op: f64,
    pub allocs_per_op: f64,
    /// Latency of one operation (checkout wait included), in µs, over the
    /// operations that ended in the measured window or were in flight when
    /// it closed: p50, p99, p99.9, max (NaN for pgbench).
    pub latency: [f64; 4],
    /// Operations that gave up waiting for a connection (pool timeout),
    /// counted as operations that took as long.
    pub timeouts: u64,
}

impl Sample {
    /// pgbench's: throughput only.
    pub fn throughput(ops_per_sec: f64) -> Sample {
        Sample {
            ops_per_sec,
            bytes_per_op: f64::NAN,
            allocs_per_op: f64::NAN,
            latency: [f64::NAN; 4],
            timeouts: 0,
        }
    }
}

/// Latencies in log-linear buckets: exact below 16 µs, then 16 buckets per
/// power of two (within 1/16). Fixed size, allocated before the clock
/// starts, so recording allocates nothing.
pub struct Hist(Vec<u64>);

impl Hist {
    const SUB: u32 = 16;

    fn new() -> Hist {
        Hist(vec![0; 64 * Self::SUB as usize])
    }

    fn index(micros: u64) -> usize {
        if micros < Self::SUB as u64 {
            return micros as usize;
        }
        let exp = 63 - micros.leading_zeros(); // >= 4
        let sub = (micros >> (exp - 4)) & (Self::SUB as u64 - 1);
        (Self::SUB * (exp - 3) + sub as u32) as usize
    }

    /// The largest value of bucket `i`.
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        let sub = Self::SUB as u64;
        if i < sub {
            return i;
        }
        let exp = i / sub + 3;
        let s = i % sub;
        ((sub + s + 1) << (exp - 4)) - 1
    }

    fn record(&mut self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0[Self::index(micros)] += 1;
    }

    fn merge(&mut self, other: &Hist) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a += b;
        }
    }

    /// p50, p99, p99.9 and max in µs (NaN when empty).
    fn summary(&self) -> [f64; 4] {
        let total: u64 = self.0.iter().sum();
        if total == 0 {
            return [f64::NAN; 4];
        }
        let at = |q: f64| {
            let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
            let mut seen = 0;
            for (i, n) in self.0.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return Self::upper(i) as f64;
                }
            }
            f64::NAN
        };
        [at(0.5), at(0.99), at(0.999), at(1.0)]
    }
}

/// A pool's "gave up waiting for a connection", from any contender.
fn is_pool_timeout(e: &BoxError) -> bool {
    if let Some(e) = e.downcast_ref::<pgassist::Error>() {
        return matches!(e, pgassist::Error::PoolTimeout { .. });
    }
    if let Some(e) = e.downcast_ref::<bb8::RunError<tokio_postgres::Error>>() {
        return matches!(e, bb8::RunError::TimedOut);
    }
    if let Some(e) = e.downcast_ref::<deadpool_postgres::PoolError>() {
        return matches!(e, deadpool_postgres::PoolError::Timeout(_));
    }
    if let Some(e) = e.downcast_ref::<sqlx::Error>() {
        return matches!(e, sqlx::Error::PoolTimedOut);
    }
    false
}

/// Runs every worker on its own task until the window closes and counts
/// the operations completed inside the window (after the warm-up). The
/// latencies are those of every operation that ended in the window or was
/// still in flight when it closed, whenever it started: counting only the
/// operations *started* in the window would leave out a task passed over
/// from the warm-up to the end — exactly the starvation the percentiles
/// are there to show (with an unfair pool, Little's law then disagrees
/// with the recorded mean by an order of magnitude). A pool timeout is
/// counted, not fatal.
pub async fn measure<W: Worker>(workers: Vec<W>, t: Timing, scale: i32) -> Res<Sample> {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let timeouts = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(i, mut w)| {
            let (stop, ops) = (stop.clone(), ops.clone());
            let (measuring, timeouts) = (measuring.clone(), timeouts.clone());
            let mut hist = Hist::new();
            tokio::spawn(async move {
                let mut rng = Rng::new(i as u64 + 1, scale);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let out = w.op(&mut rng).await;
                    // Counted when it ends in the window or after it closed
                    // (it was in flight then), whenever it started: an
                    // operation that waited through the warm-up and the
                    // whole window is the tail, not to be left out.
                    let counted = measuring.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed);
                    if counted {
                        hist.record(started.elapsed());
                    }
                    match out {
                        Ok(()) => {}
                        Err(e) if is_pool_timeout(&e) => {
                            if counted {
                                timeouts.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, BoxError>(hist)
            })
        })
        .collect();
    tokio::time::sleep(t.warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let (o0, a0, t0) = (
        ops.load(Ordering::Relaxed),
        alloc::snapshot(),
        Instant::now(),
    );
    tokio::time::sleep(t.measure).await;
    let (o1, a1, t1) = (
        ops.load(Ordering::Relaxed),
        alloc::snapshot(),
        Instant::now(),
    );
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut hist = Hist::new();
    for task in tasks {
        hist.merge(&task.await??);
    }
    let n = o1 - o0;
    let (bytes_per_op, allocs_per_op) = a0.per_op(a1, n);
    Ok(Sample {
        ops_per_sec: n as f64 / (t1 - t0).as_secs_f64(),
        bytes_per_op,
        allocs_per_op,
        latency: hist.summary(),
        timeouts: timeouts.load(Ordering::Relaxed),
    })
}

/// Builds `contender` for one cell (`clients` tasks over a pool of `pool`
/// connections), runs it, and closes its connections.
pub async fn run(
    contender: Contender,
    workload: Workload,
    clients: usize,
    pool: u32,
    url: &str,
    t: Timing,
    scale: i32,
) -> Res<Sample> {
    use Contender::*;
    let size = pool;
    let timeout = workload.checkout_timeout();
    match contender {
        Pgassist | PgassistJoin | PgassistPinned | PgassistPipelined => {
            let pipelined = contender == PgassistPipelined;
            let registry = pgassist_registry_with(url, pool, |c| {
                let c = match timeout {
                    Some(t) => c.connection_timeout(t),
                    None => c,
                };
                if pipelined { c.pipeline(PIPELINE) } else { c }
            })
            .await?;
            let workers = (0..clients)
                .map(|_| PgassistWorker {
                    session: registry.default_session(),
                    workload,
                    contender,
                    full_join: FULL_JOIN.load(Ordering::Relaxed),
                })
                .collect();
            let sample = measure(workers, t, scale).await;
            registry.close().await;
            sample
        }
        Raw => {
            let workers = join_all((0..clients).map(|_| RawWorker::connect(url, workload)))
                .await
                .into_iter()
                .collect::<Res<Vec<_>>>()?;
            measure(workers, t, scale).await
        }
        Bb8Tuned | Bb8Held => {
            let pool = bb8_tuned_pool(url, size, timeout).await?;
            let workers = (0..clients)
                .map(|_| Bb8TunedWorker {
                    pool: pool.clone(),
                    workload,
                    held: contender == Bb8Held,
                })
                .collect();
            measure(workers, t, scale).await
        }
        Bb8Naive => {
            let pool = bb8::Pool::builder()
                .max_size(pool)
                .build(PostgresConnectionManager::new(url.parse()?, NoTls))
                .await?;
            let held = checkouts(size, || pool.get()).await?;
            for r in join_all(held.iter().map(|c| warm_sql(c))).await {
                r?;
            }
            drop(held);
            let workers = (0..clients)
                .map(|_| Bb8NaiveWorker {
                    pool: pool.clone(),
                    workload,
                })
                .collect();
            measure(workers, t, scale).await
        }
        Deadpool => {
            let manager = deadpool_postgres::Manager::from_config(
                url.parse()?,
                NoTls,
                deadpool_postgres::ManagerConfig {
                    recycling_method: deadpool_postgres::RecyclingMethod::Fast,
                },
            );
            let pool = deadpool_postgres::Pool::builder(manager)
                .max_size(pool as usize)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(timeout)
                .build()?;
            let held = checkouts(size, || pool.get()).await?;
            for r in join_all(held.iter().map(warm_deadpool)).await {
                r?;
            }
            drop(held);
            let workers = (0..clients)
                .map(|_| DeadpoolWorker {
                    pool: pool.clone(),
                    workload,
                })
                .collect();
            measure(workers, t, scale).await
        }
        Sqlx => {
            let options = sqlx::postgres::PgPoolOptions::new().max_connections(pool);
            let options = match timeout {
                Some(t) => options.acquire_timeout(t),
                None => options,
            };
            let pool = options.connect(url).await?;
            let mut held = checkouts(size, || pool.acquire()).await?;
            for r in join_all(held.iter_mut().map(warm_sqlx)).await {
                r?;
            }
            drop(held);
            let workers = (0..clients)
                .map(|_| SqlxWorker {
                    pool: pool.clone(),
                    workload,
                })
                .collect();
            let sample = measure(workers, t, scale).await;
            pool.close().await;
            sample
        }
        Pgbench => unreachable!("pgbench runs as a subprocess"),
    }
}

/// Opens all `size` connections of a pool by holding that many checkouts
/// at once, and returns them.
///
/// Before the clock starts every contender opens all its connections and
/// runs each statement once on each (statement caches filled, the server
/// backend's catalog caches loaded), so no cell measures cold connections.
async fn checkouts<F, Fut, C, E>(size: u32, checkout: F) -> Res<Vec<C>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<C, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut held = Vec::new();
    for c in join_all((0..size).map(|_| checkout())).await {
        held.push(c?);
    }
    Ok(held)
}

/// Keys for warming: real rows for the selects, no row for the update.
const WARM_KEY: i32 = 1;
const NO_ROW: i32 = 0;

async fn warm_sql(c: &Client) -> Result<(), tokio_postgres::Error> {
    c.query_one(SELECT, &[&WARM_KEY]).await?;
    c.execute(UPDATE, &[&NO_ROW, &NO_ROW]).await?;
    c.query_one(SELECT_TELLER, &[&WARM_KEY]).await?;
    c.query_one(SELECT_BRANCH, &[&WARM_KEY]).await?;
    Ok(())
}

async fn warm_deadpool(c: &deadpool_postgres::Client) -> Result<(), tokio_postgres::Error> {
    for (sql, update) in [
        (SELECT, false),
        (UPDATE, true),
        (SELECT_TELLER, false),
        (SELECT_BRANCH, false),
    ] {
        let st = c.prepare_cached(sql).await?;
        if update {
            c.execute(&st, &[&NO_ROW, &NO_ROW]).await?;
        } else {
            c.query_one(&st, &[&WARM_KEY]).await?;
        }
    }
    Ok(())
}

async fn warm_sqlx(c: &mut sqlx::pool::PoolConnection<sqlx::Postgres>) -> Res<()> {
    for sql in [SELECT, SELECT_TELLER, SELECT_BRANCH] {
        let _: i32 = sqlx::query_scalar(sql)
            .bind(WARM_KEY)
            .fetch_one(&mut **c)
            .await?;
    }
    sqlx::query(UPDATE)
        .bind(NO_ROW)
        .bind(NO_ROW)
        .execute(&mut **c)
        .await?;
    Ok(())
}

async fn warm_pgassist(tx: &pgassist::Transaction<'_>) -> pgassist::Result<()> {
    tx.query_one(SELECT, &[&WARM_KEY]).await?;
    tx.execute(UPDATE, &[&NO_ROW, &NO_ROW]).await?;
    tx.query_one(SELECT_TELLER, &[&WARM_KEY]).await?;
    tx.query_one(SELECT_BRANCH, &[&WARM_KEY]).await?;
    Ok(())
}

/// The hand-tuned bb8 pool, every connection open and its statements
/// prepared; `timeout` for checkouts (bb8's default otherwise).
pub async fn bb8_tuned_pool(
    url: &str,
    size: u32,
    timeout: Option<Duration>,
) -> Res<bb8::Pool<TunedManager>> {
    let builder = bb8::Pool::builder();
    let builder = match timeout {
        Some(t) => builder.connection_timeout(t),
        None => builder,
    };
    let pool = builder
        .max_size(size)
        .test_on_check_out(false)
        .build(TunedManager(PostgresConnectionManager::new(
            url.parse()?,
            NoTls,
        )))
        .await?;
    let held = checkouts(size, || pool.get()).await?;
    for r in join_all(held.iter().map(|c| c.st.warm(&c.client))).await {
        r?;
    }
    drop(held);
    Ok(pool)
}

/// A pgassist registry with one engine, "bench", every connection open.
pub async fn pgassist_registry(url: &str, pool: u32) -> Res<Registry> {
    pgassist_registry_with(url, pool, |c| c).await
}

/// [`pgassist_registry`] with the engine's config adjusted by `tune`.
pub async fn pgassist_registry_with(
    url: &str,
    pool: u32,
    tune: impl FnOnce(EngineConfig) -> EngineConfig,
) -> Res<Registry> {
    let config = EngineConfig::from_url(url)?
        .max_size(pool)
        .application_name("bench pgassist");
    let registry = Registry::builder()
        .engine("bench", tune(config))
        .build()
        .await?;
    // Open and warm every connection now: `begin` pins one per session.
    let mut sessions: Vec<Session> = (0..pool).map(|_| registry.default_session()).collect();
    let mut txs = Vec::new();
    for tx in join_all(sessions.iter_mut().map(|s| s.begin())).await {
        txs.push(tx?);
    }
    for r in join_all(txs.iter().map(warm_pgassist)).await {
        r?;
    }
    for tx in txs {
        tx.rollback().await?;
    }
    Ok(registry)
}

/// Prepared statements of one connection.
pub struct Stmts {
    select: Statement,
    update: Statement,
    teller: Statement,
    branch: Statement,
}

impl Stmts {
    async fn warm(&self, c: &Client) -> Result<(), tokio_postgres::Error> {
        c.query_one(&self.select, &[&WARM_KEY]).await?;
        c.execute(&self.update, &[&NO_ROW, &NO_ROW]).await?;
        c.query_one(&self.teller, &[&WARM_KEY]).await?;
        c.query_one(&self.branch, &[&WARM_KEY]).await?;
        Ok(())
    }

    async fn prepare(c: &Client) -> Result<Stmts, tokio_postgres::Error> {
        Ok(Stmts {
            select: c.prepare(SELECT).await?,
            update: c.prepare(UPDATE).await?,
            teller: c.prepare(SELECT_TELLER).await?,
            branch: c.prepare(SELECT_BRANCH).await?,
        })
    }
}

/// The three selects of W3 in order, on a tokio-postgres transaction.
async fn three_selects(
    tx: &tokio_postgres::Transaction<'_>,
    st: &Stmts,
    rng: &mut Rng,
) -> Result<(), tokio_postgres::Error> {
    let _: i32 = tx.query_one(&st.select, &[&rng.aid()]).await?.get(0);
    let _: i32 = tx.query_one(&st.teller, &[&rng.tid()]).await?.get(0);
    let _: i32 = tx.query_one(&st.branch, &[&rng.bid()]).await?.get(0);
    Ok(())
}

// ---------------------------------------------------------------- pgassist

pub struct PgassistWorker {
    pub session: Session,
    pub workload: Workload,
    pub contender: Contender,
    /// W3 `join!`: all three selects at once (BEGIN pipelined in front of
    /// them), or — where pgassist refuses that — the first alone, then two.
    pub full_join: bool,
}

/// The three W3 selects in flight together on one transaction.
async fn join3(
    tx: &pgassist::Transaction<'_>,
    aid: i32,
    tid: i32,
    bid: i32,
) -> (
    pgassist::Result<tokio_postgres::Row>,
    pgassist::Result<tokio_postgres::Row>,
    pgassist::Result<tokio_postgres::Row>,
) {
    let (a, t, b): (Params, Params, Params) = ([&aid], [&tid], [&bid]);
    futures::join!(
        tx.query_one(SELECT, &a),
        tx.query_one(SELECT_TELLER, &t),
        tx.query_one(SELECT_BRANCH, &b),
    )
}

/// Autocommit statements in flight per connection for `pgassist pipelined`.
pub const PIPELINE: u32 = 64;

/// One statement parameter (a named array: `join!` outlives temporaries).
type Params<'a> = [&'a (dyn ToSql + Sync); 1];

/// Whether pgassist accepts three statements in flight together as the
/// first statements of a transaction (while its lazy BEGIN is on the wire).
/// Returns the error it gave otherwise.
pub async fn probe_full_join(url: &str, scale: i32) -> Res<Option<String>> {
    let registry = pgassist_registry(url, 1).await?;
    let session = registry.default_session();
    let mut rng = Rng::new(7, scale);
    let tx = session.begin().await?;
    let (a, t, b) = join3(&tx, rng.aid(), rng.tid(), rng.bid()).await;
    let outcome = match (a, t, b) {
        (Ok(_), Ok(_), Ok(_)) => {
            tx.commit().await?;
            None
        }
        (a, t, b) => {
            let e = [a.err(), t.err(), b.err()].into_iter().flatten().next();
            drop(tx);
            e.map(|e| e.to_string())
        }
    };
    registry.close().await;
    Ok(outcome)
}

impl Worker for PgassistWorker {
    async fn op(&mut self, rng: &mut Rng) -> Res<()> {
        let s = &mut self.session;
        match (self.workload, self.contender) {
            (Workload::PointSelect | Workload::Overload, _) => {
                let _: i32 = s.query_one(SELECT, &[&rng.aid()]).await?.get(0);
            }
            (Workload::WriteTx, _) => {
                let tx = s.begin().await?;
                tx.execute(UPDATE, &[&rng.delta(), &rng.aid()]).await?;
                tx.commit().await?;
            }
            (Workload::ReadTx, Contender::PgassistJoin) => {
                let (aid, tid, bid) = (rng.aid(), rng.tid(), rng.bid());
                let tx = s.begin().await?;
                if self.full_join {
                    let (a, t, b) = join3(&tx, aid, tid, bid).await;
                    let _: (i32, i32, i32) = (a?.get(0), t?.get(0), b?.get(0));
                } else {
                    // The first select carries the lazy BEGIN; the other two
                    // go out together once it is confirmed.
                    let _: i32 = tx.query_one(SELECT, &[&aid]).await?.get(0);
                    let (pt, pb): (Params, Params) = ([&tid], [&bid]);
                    let (t, b) = futures::join!(
                        tx.query_one(SELECT_TELLER, &pt),
                        tx.query_one(SELECT_BRANCH, &pb),
                    );
                    let _: (i32, i32) = (t?.get(0), b?.get(0));
                }
                tx.commit().await?;
            }
            (Workload::ReadTx, _) => {
                let tx = s.begin().await?;
                let _: i32 = tx.query_one(SELECT, &[&rng.aid()]).await?.get(0);
                let _: i32 = tx.query_one(SELECT_TELLER, &[&rng.tid()]).await?.get(0);
                let _: i32 = tx.query_one(SELECT_BRANCH, &[&rng.bid()]).await?.get(0);
                tx.commit().await?;
            }
            (Workload::IdleHeavy, Contender::PgassistPinned) => {
                let tx = s.begin().await?;
                let _: i32 = tx.query_one(SELECT, &[&rng.aid()]).await?.get(0);
                tokio::time::sleep(IDLE_WORK).await;
                let _: i32 = tx.query_one(SELECT, &[&rng.aid()]).await?.get(0);
                tx.commit().await?;
            }
            (Workload::IdleHeavy, _) => {
                let _: i32 = s.query_one(SELECT, &[&rng.aid()]).await?.get(0);
                tokio::time::sleep(IDLE_WORK).await;
                let _: i32 = s.query_one(SELECT, &[&rng.aid()]).await?.get(0);
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------ raw tokio-postgres

pub struct RawWorker {
    client: Client,
    st: Stmts,
    workload: Workload,
}

impl RawWorker {
    pub async fn connect(url: &str, workload: Workload) -> Res<RawWorker> {
        let config: tokio_postgres::Config = url.parse()?;
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(connection);
        let st = Stmts::prepare(&client).await?;
        st.warm(&client).await?;
        Ok(RawWorker {
            client,
            st,
            workload,
        })
    }
}

impl Worker for RawWorker {
    async fn op(&mut self, rng: &mut Rng) -> Res<()> {
        match self.workload {
            Workload::PointSelect => {
                let _: i32 = self
                    .client
                    .query_one(&self.st.select, &[&rng.aid()])
                    .await?
                    .get(0);
            }
            Workload::WriteTx => {
                let tx = self.client.transaction().await?;
                tx.execute(&self.st.update, &[&rng.delta(), &rng.aid()])
                    .await?;
                tx.commit().await?;
            }
            Workload::ReadTx => {
                let tx = self.client.transaction().await?;
                three_selects(&tx, &self.st, rng).await?;
                tx.commit().await?;
            }
            Workload::IdleHeavy | Workload::Overload => unreachable!("raw clients are not pooled"),
        }
        Ok(())
    }
}

// --------------------------------------------------------------- bb8 tuned

/// bb8-postgres' manager plus the statements, prepared once per connection.
pub struct TunedManager(pub PostgresConnectionManager<NoTls>);

pub struct TunedConn {
    pub client: Client,
    st: Stmts,
}

impl bb8::ManageConnection for TunedManager {
    type Connection = TunedConn;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<TunedConn, tokio_postgres::Error> {
        let client = self.0.connect().await?;
        let st = Stmts::prepare(&client).await?;
        Ok(TunedConn { client, st })
    }

    async fn is_valid(&self, conn: &mut TunedConn) -> Result<(), tokio_postgres::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut TunedConn) -> bool {
        conn.client.is_closed()
    }
}

pub struct Bb8TunedWorker {
    pub pool: bb8::Pool<TunedManager>,
    pub workload: Workload,
    /// W4: hold one connection for the whole request.
    pub held: bool,
}

impl Bb8TunedWorker {
    async fn select(&self, rng: &mut Rng) -> Res<()> {
        let c = self.pool.get().await?;
        let _: i32 = c
            .client
            .query_one(&c.st.select, &[&rng.aid()])
            .await?
            .get(0);
        Ok(())
    }
}

impl Worker for Bb8TunedWorker {
    async fn op(&mut self, rng: &mut Rng) -> Res<()> {
        match self.workload {
            Workload::PointSelect | Workload::Overload => self.select(rng).await?,
            Workload::WriteTx => {
                let mut c = self.pool.get().await?;
                let c = &mut *c;
                let tx = c.client.transaction().await?;
                tx.execute(&c.st.update, &[&rng.delta(), &rng.aid()])
                    .await?;
                tx.commit().await?;
            }
            Workload::ReadTx => {
                let mut c = self.pool.get().await?;
                let c = &mut *c;
                let tx = c.client.transaction().await?;
                three_selects(&tx, &c.st, rng).await?;
                tx.commit().await?;
            }
            Workload::IdleHeavy if self.held => {
                let c = self.pool.get().await?;
                let _: i32 = c
                    .client
                    .query_one(&c.st.select, &[&rng.aid()])
                    .await?
                    .get(0);
                tokio::time::sleep(IDLE_WORK).await;
                let _: i32 = c
                    .client
                    .query_one(&c.st.select, &[&rng.aid()])
                    .await?
                    .get(0);
            }
            Workload::IdleHeavy => {
                self.select(rng).await?;
                tokio::time::sleep(IDLE_WORK).await;
                self.select(rng).await?;
            }
        }
        Ok(())
    }
}

// --------------------------------------------------------------- bb8 naive

pub struct Bb8NaiveWorker {
    pool: bb8::Pool<PostgresConnectionManager<NoTls>>,
    workload: Workload,
}

impl Worker for Bb8NaiveWorker {
    async fn op(&mut self, rng: &mut Rng) -> Res<()> {
        let mut c = self.pool.get().await?;
        match self.workload {
            Workload::PointSelect | Workload::Overload => {
                let _: i32 = c.query_one(SELECT, &[&rng.aid()]).await?.get(0);
            }
            Workload::WriteTx => {
                let tx = c.transaction().await?;
                tx.execute(UPDATE, &[&rng.delta(), &rng.aid()]).await?;
                tx.commit().await?;
            }
            Workload::ReadTx => {
                let tx = c.transaction().await?;
                let _: i32 = tx.query_one(SELECT, &[&rng.aid()]).await?.get(0);
                let _: i32 = tx.query_one(SELECT_TELLER, &[&rng.tid()]).await?.get(0);
                let _: i32 = tx.query_one(SELECT_BRANCH, &[&rng.bid()]).await?.get(0);
                tx.commit().await?;
            }
            Workload::IdleHeavy => unreachable!("not measured"),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- deadpool

pub struct DeadpoolWorker {
    pool: deadpool_postgres::Pool,
    workload: Workload,
}

impl Worker for DeadpoolWorker {
    async fn op(&mut self, rng: &mut Rng) -> Res<()> {
        let mut c = self.pool.get().await?;
        match self.workload {
            Workload::PointSelect | Workload::Overload => {
                let st = c.prepare_cached(SELECT).await?;
                let _: i32 = c.query_one(&st, &[&rng.aid()]).await?.get(0);
            }
            Workload::WriteTx => {
                let tx = c.transaction().await?;
                let st = tx.prepare_cached(UPDATE).await?;
                tx.execute(&st, &[&rng.delta(), &rng.aid()]).await?;
                tx.commit().await?;
            }
            Workload::ReadTx => {
                let tx = c.transaction().await?;
                for (sql, key) in [
                    (SELECT, rng.aid()),
                    (SELECT_TELLER, rng.tid()),
                    (SELECT_BRANCH, rng.bid()),
                ] {
                    let st = tx.prepare_cached(sql).await?;
                    let _: i32 = tx.query_one(&st, &[&key]).await?.get(0);
                }
                tx.commit().await?;
            }
            Workload::IdleHeavy => unreachable!("not measured"),
        }
        Ok(())
    }
}

// -------------------------------------------------------------------- sqlx

pub struct SqlxWorker {
    pool: sqlx::PgPool,
    workload: Workload,
}

impl Worker for SqlxWorker {
    async fn op(&mut self, rng: &mut Rng) -> Res<()> {
        match self.workload {
            Workload::PointSelect | Workload::Overload => {
                let _: i32 = sqlx::query_scalar(SELECT)
                    .bind(rng.aid())
                    .fetch_one(&self.pool)
                    .await?;
            }
            Workload::WriteTx => {
                let mut tx = self.pool.begin().await?;
                sqlx::query(UPDATE)
                    .bind(rng.delta())
                    .bind(rng.aid())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Workload::ReadTx => {
                let mut tx = self.pool.begin().await?;
                for (sql, key) in [
                    (SELECT, rng.aid()),
                    (SELECT_TELLER, rng.tid()),
                    (SELECT_BRANCH, rng.bid()),
                ] {
                    let _: i32 = sqlx::query_scalar(sql)
                        .bind(key)
                        .fetch_one(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
            }
            Workload::IdleHeavy => unreachable!("not measured"),
        }
        Ok(())
    }
}
