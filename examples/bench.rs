//! pgassist against its peers on one server (issue 4).
//!
//! ```text
//! cargo run --release --example bench               # full run, under 5 minutes
//! cargo run --release --example bench -- --quick    # smoke run, under 1 minute
//! cargo run --release --example bench -- --json target/bench/bench.jsonl
//! ```
//!
//! Uses `DATABASE_URL` when set (a fresh database is created in it),
//! otherwise starts a throwaway PostgreSQL; loads `pgbench -i -s 10`; runs
//! W1–W4 in interleaved rounds (every round runs every contender of every
//! cell once, the contender order rotating from round to round) and reports
//! medians, ratios to pgassist, latency percentiles (p50, p99, p99.9, max
//! of one operation, checkout wait included), the goals of issues 4 and 13,
//! and a PNG chart.
//!
//! W5 is overload: point selects from 256 tasks on a pool of 8, no think
//! time, a 2 s checkout timeout for every pool; timeouts are counted (and
//! their 2 s are in the percentiles), not fatal.
//!
//! Pool size rule: every pool gets as many connections as the cell has
//! clients, capped at 64 (raw tokio-postgres and pgbench open one
//! connection per client); W4 uses 256 clients over a pool of 8.
//!
//! `--callgrind-mode N --contender pgassist|pgassist-untimed|raw|bb8` runs N autocommit point
//! selects on one connection and nothing else inside `callgrind_measured`,
//! for `valgrind --tool=callgrind --toggle-collect='*callgrind_measured*'`;
//! `scripts/bench-client-cost` runs it and prints instructions per query.

#[path = "bench/alloc.rs"]
mod alloc;
#[path = "bench/chart.rs"]
mod chart;
#[path = "bench/pgbench.rs"]
mod pgbench;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/workers.rs"]
mod workers;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pgassist_testing::{TestCluster, TestDatabase};
use tokio::runtime::Runtime;

use report::{Cell, CellResult, Series};
use workers::{Contender, Res, Rng, Sample, Timing, Worker, Workload};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// pgbench's scale: 1 000 000 accounts.
const SCALE: i32 = 10;
/// The most connections one pool opens (the throwaway server allows 200).
const MAX_POOL: usize = 64;
/// W4: requests in flight and the pool they share.
const W4_CLIENTS: usize = 256;
const W4_POOL: u32 = 8;
/// W5 (overload): tasks and the pool they share.
const W5_CLIENTS: usize = 256;
const W5_POOL: u32 = 8;

const USAGE: &str =
    "usage: bench [--quick] [--verbose] [--rounds N] [--secs S] [--warmup S] [--only W1,W2,..]
             [--json FILE] [--chart FILE]
       bench --callgrind-mode N [--contender pgassist|pgassist-untimed|raw|bb8] [--workload W1|W2|W3]";

struct Args {
    rounds: usize,
    timing: Timing,
    only: Option<Vec<String>>,
    json: Option<PathBuf>,
    chart: PathBuf,
    quick: bool,
    verbose: bool,
    callgrind: Option<(u64, String)>,
    /// The workload of `--callgrind-mode` (W1 unless `--workload` says).
    callgrind_workload: Workload,
}

fn parse_args() -> Res<Args> {
    let mut args = Args {
        rounds: 8,
        timing: Timing {
            warmup: Duration::from_millis(100),
            measure: Duration::from_millis(300),
        },
        only: None,
        json: None,
        chart: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/bench/bench.png"
        )),
        quick: false,
        verbose: false,
        callgrind: None,
        callgrind_workload: Workload::PointSelect,
    };
    let mut contender = "pgassist".to_string();
    let mut callgrind_n = None;
    let mut it = std::env::args().skip(1);
    let secs = |v: Option<String>| -> Res<Duration> {
        Ok(Duration::from_secs_f64(v.ok_or(USAGE)?.parse()?))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {
                args.quick = true;
                args.rounds = 3;
                args.timing = Timing {
                    warmup: Duration::from_millis(50),
                    measure: Duration::from_millis(100),
                };
            }
            "-v" | "--verbose" => args.verbose = true,
            "--rounds" => args.rounds = it.next().ok_or(USAGE)?.parse()?,
            "--secs" => args.timing.measure = secs(it.next())?,
            "--warmup" => args.timing.warmup = secs(it.next())?,
            "--only" => {
                args.only = Some(
                    it.next()
                        .ok_or(USAGE)?
                        .split(',')
                        .map(|s| s.trim().to_uppercase())
                        .collect(),
                )
            }
            "--json" => args.json = Some(it.next().ok_or(USAGE)?.into()),
            "--chart" => args.chart = it.next().ok_or(USAGE)?.into(),
            "--callgrind-mode" => callgrind_n = Some(it.next().ok_or(USAGE)?.parse()?),
            "--contender" => contender = it.next().ok_or(USAGE)?,
            "--workload" => {
                args.callgrind_workload = match it.next().ok_or(USAGE)?.to_uppercase().as_str() {
                    "W1" => Workload::PointSelect,
                    "W2" => Workload::WriteTx,
                    "W3" => Workload::ReadTx,
                    other => return Err(format!("--workload {other}: W1, W2 or W3").into()),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}").into()),
        }
    }
    args.callgrind = callgrind_n.map(|n| (n, contender));
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    Ok(args)
}

fn cells() -> Vec<Cell> {
    let cell = |workload, clients: usize| Cell {
        workload,
        clients,
        pool: clients.min(MAX_POOL) as u32,
    };
    vec![
        cell(Workload::PointSelect, 1),
        cell(Workload::PointSelect, 16),
        cell(Workload::PointSelect, 64),
        cell(Workload::WriteTx, 1),
        cell(Workload::WriteTx, 16),
        cell(Workload::ReadTx, 16),
        Cell {
            workload: Workload::IdleHeavy,
            clients: W4_CLIENTS,
            pool: W4_POOL,
        },
        Cell {
            workload: Workload::Overload,
            clients: W5_CLIENTS,
            pool: W5_POOL,
        },
    ]
}

/// A fresh database with pgbench's tables, statement logging off. Keep the
/// handle while the database is in use: on a `DATABASE_URL` server, dropping
/// it drops the database.
async fn prepare_database(scale: i32) -> Res<TestDatabase> {
    let cluster = TestCluster::shared();
    let db = cluster.create_database().await?;
    // The throwaway cluster logs every statement (for the tests); that
    // would cost the server more than the clients we measure.
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    if let Err(e) = client
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET log_statement = 'none'",
            db.name
        ))
        .await
    {
        eprintln!("note: could not switch statement logging off: {e}");
    }
    drop(client);
    let _ = conn.await;
    let pgbench = pgbench::binary()?;
    let took = pgbench::load(&pgbench, &db.url, scale).await?;
    eprintln!(
        "loaded pgbench -i -s {scale} into {} in {:.1} s",
        db.name,
        took.as_secs_f64()
    );
    Ok(db)
}

async fn describe_server(url: &str) -> Res<String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let mut parts = Vec::new();
    for setting in [
        "server_version",
        "max_connections",
        "shared_buffers",
        "fsync",
        "synchronous_commit",
    ] {
        let row = client.query_one(&format!("SHOW {setting}"), &[]).await?;
        parts.push(format!("{setting}={}", row.get::<_, String>(0)));
    }
    Ok(parts.join(" "))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}

fn main() -> Res<()> {
    let args = parse_args()?;
    if let Some((n, contender)) = &args.callgrind {
        return callgrind_mode(*n, contender, args.callgrind_workload);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: Args) -> Res<()> {
    let started = Instant::now();
    let db = prepare_database(SCALE).await?;
    let url = db.url.clone();
    let server = describe_server(&url).await?;
    let pgbench_bin = pgbench::binary()?;
    let out_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench"));
    let scripts = pgbench::write_scripts(&out_dir, SCALE)?;

    let cells: Vec<Cell> = cells()
        .into_iter()
        .filter(|c| {
            args.only
                .as_ref()
                .is_none_or(|o| o.iter().any(|w| w == c.workload.id()))
        })
        .collect();
    let mut notes = Vec::new();
    if cells.iter().any(|c| c.workload == Workload::ReadTx) {
        if let Some(e) = workers::probe_full_join(&url, SCALE).await? {
            workers::FULL_JOIN.store(false, std::sync::atomic::Ordering::Relaxed);
            notes.push(format!(
                "pgassist join! (W3): three selects in flight as the first statements of a \
                 transaction fail today ({e}); measured instead: the first select (with the \
                 lazy BEGIN) alone, then join! of the other two"
            ));
        } else {
            notes.push("pgassist join! (W3): BEGIN + three selects in flight together".into());
        }
    }
    let mut results: Vec<CellResult> = cells
        .iter()
        .map(|&cell| CellResult {
            cell,
            series: cell
                .workload
                .contenders()
                .iter()
                .map(|&contender| Series {
                    contender,
                    samples: Vec::new(),
                })
                .collect(),
        })
        .collect();

    println!("machine: {}", machine());
    println!("server:  {server} (log_statement=none for the bench database)");
    println!("client:  tokio multi-thread runtime, 2 workers; pgbench -j 2 (-j 1 at one client)");
    println!(
        "rounds:  {} interleaved, {:.2} s warm-up + {:.2} s measured per contender and cell \
         (pgbench: {}); pool = clients capped at {MAX_POOL} (W4: {W4_POOL})",
        args.rounds,
        args.timing.warmup.as_secs_f64(),
        args.timing.measure.as_secs_f64(),
        if args.quick {
            "-t sized to the same window"
        } else {
            "-T, whole seconds, at least 1"
        }
    );

    for round in 0..args.rounds {
        let round_started = Instant::now();
        for r in results.iter_mut() {
            let cell = r.cell;
            let k = r.series.len();
            // Rotate the order so that no contender always runs first.
            for j in 0..k {
                let idx = (j + round) % k;
                let run_started = Instant::now();
                let contender = r.series[idx].contender;
                let sample = if contender == Contender::Pgbench {
                    // pgbench's -T takes whole seconds; --quick sizes a -t run
                    // from its own last rate, or the best contender seen so far.
                    let estimate =
                        r.series[idx]
                            .samples
                            .last()
                            .map(|s| s.ops_per_sec)
                            .or_else(|| {
                                r.series
                                    .iter()
                                    .flat_map(|s| s.samples.last())
                                    .map(|s| s.ops_per_sec)
                                    .reduce(f64::max)
                            });
                    let duration = pgbench::duration_args(
                        args.timing.measure,
                        cell.clients,
                        estimate,
                        args.quick,
                    );
                    let tps = pgbench::run(
                        &pgbench_bin,
                        &scripts,
                        &url,
                        cell.workload,
                        cell.clients,
                        &duration,
                    )
                    .await?;
                    Sample::throughput(tps)
                } else {
                    workers::run(
                        contender,
                        cell.workload,
                        cell.clients,
                        cell.pool,
                        &url,
                        args.timing,
                        SCALE,
                    )
                    .await
                    .map_err(|e| format!("{} on {}: {e}", contender.name(), cell.label()))?
                };
                if args.verbose {
                    eprintln!(
                        "  {:<8} {:<20} {:>10.0} ops/s  p99.9 {:.0} µs, {} timeouts  \
                         ({:.2} s with setup)",
                        cell.label(),
                        contender.name(),
                        sample.ops_per_sec,
                        sample.latency[2],
                        sample.timeouts,
                        run_started.elapsed().as_secs_f64()
                    );
                }
                r.series[idx].samples.push(sample);
            }
        }
        eprintln!(
            "round {}/{} done in {:.1} s",
            round + 1,
            args.rounds,
            round_started.elapsed().as_secs_f64()
        );
    }

    println!();
    print!("{}", report::table(&results));
    println!();
    println!("goals of issue 4 (ratio = pgassist median / peer median):");
    for goal in report::goals(&results) {
        println!("  {}", goal.line());
    }
    println!(
        "  {:<9} client cost (instructions per query): run scripts/bench-client-cost",
        "n/a"
    );
    for line in report::tails(&results) {
        println!("  {line}");
    }
    for note in &notes {
        println!("note: {note}");
    }

    if let Some(path) = &args.json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, report::json_lines(&results))?;
        println!("json:  {}", path.display());
    }
    if let Some(dir) = args.chart.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let subtitle = format!(
        "{}; {}; {} rounds × {:.1} s, medians{}",
        machine(),
        server,
        args.rounds,
        args.timing.measure.as_secs_f64(),
        if args.quick { " (--quick)" } else { "" }
    );
    match chart::render(&results, &args.chart, &subtitle) {
        Ok(Some(_)) => println!("chart: {}", args.chart.display()),
        Ok(None) => println!(
            "chart: {} (no TrueType font found: bars without labels; set BENCH_FONT)",
            args.chart.display()
        ),
        Err(e) => println!("chart: not rendered: {e}"),
    }
    println!("total: {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ------------------------------------------------------------ client cost

/// Runs `n` operations of `workload` (autocommit point selects unless told
/// otherwise) on one connection of `contender`, on a
/// current-thread runtime so that every instruction of the query — the
/// caller's side and the connection task — runs inside
/// `callgrind_measured`, and prints the bytes allocated per query.
fn callgrind_mode(n: u64, contender: &str, workload: Workload) -> Res<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The client cost does not depend on the table size: scale 1 loads fast.
    let scale = 1;
    let db = rt.block_on(prepare_database(scale))?;
    let url = db.url.clone();
    match contender {
        "pgassist" | "pgassist-untimed" => {
            // `pgassist-untimed`: no idle timeout and no max lifetime, so
            // neither bb8's reaper nor pgassist's flush keeps a timer
            // pending (raw tokio-postgres has none; a pending timer costs
            // the runtime a clock read and a timer-wheel scan per park).
            let untimed = contender == "pgassist-untimed";
            let registry = rt.block_on(workers::pgassist_registry_with(&url, 1, |c| {
                if untimed {
                    c.idle_timeout(None).max_lifetime(None)
                } else {
                    c
                }
            }))?;
            let mut w = workers::PgassistWorker {
                session: registry.default_session(),
                workload,
                contender: Contender::Pgassist,
                full_join: false,
            };
            client_cost(&rt, &mut w, n, scale, contender)
        }
        "raw" => {
            let mut w = rt.block_on(workers::RawWorker::connect(&url, workload))?;
            client_cost(&rt, &mut w, n, scale, contender)
        }
        "bb8" => {
            let pool = rt.block_on(workers::bb8_tuned_pool(&url, 1, None))?;
            let mut w = workers::Bb8TunedWorker {
                pool,
                workload,
                held: false,
            };
            client_cost(&rt, &mut w, n, scale, contender)
        }
        other => Err(format!("--contender {other}: pgassist, pgassist-untimed, raw or bb8").into()),
    }
}

fn client_cost<W: Worker>(rt: &Runtime, w: &mut W, n: u64, scale: i32, name: &str) -> Res<()> {
    let mut rng = Rng::new(42, scale);
    // Warm: statement cache filled, buffers grown.
    rt.block_on(async {
        for _ in 0..200 {
            w.op(&mut rng).await?;
        }
        Ok::<_, workers::BoxError>(())
    })?;
    // Every move of a future or a pooled connection is a memcpy of this size.
    let op_future = std::mem::size_of_val(&w.op(&mut rng));
    println!(
        "sizes contender={name} op_future={op_future} tokio_postgres::Client={}",
        std::mem::size_of::<tokio_postgres::Client>()
    );
    let before = alloc::snapshot();
    let t = Instant::now();
    callgrind_measured(rt, w, n, &mut rng)?;
    let elapsed = t.elapsed();
    let (bytes, allocs) = before.per_op(alloc::snapshot(), n);
    println!(
        "client-cost contender={name} queries={n} bytes_per_query={bytes:.1} \
         allocs_per_query={allocs:.2} us_per_query={:.1}",
        elapsed.as_secs_f64() * 1e6 / n as f64
    );
    Ok(())
}

/// The measured loop, kept out of line so callgrind can collect only here.
#[inline(never)]
fn callgrind_measured<W: Worker>(rt: &Runtime, w: &mut W, n: u64, rng: &mut Rng) -> Res<()> {
    rt.block_on(async {
        for _ in 0..n {
            w.op(rng).await?;
        }
        Ok(())
    })
}
