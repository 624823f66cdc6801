//! Three streaming hot standbys of one primary, declared replicas of the
//! same writer: reads are balanced over them; one with replay paused gets
//! no reads once it is further behind than `max_replica_lag`; one stopped
//! is taken out and comes back when restarted; read-your-writes picks the
//! replica that has replayed the write; with every replica down reads go to
//! the primary. Who served a read is `inet_server_port()`, returned by the
//! read itself. Also: the configurations an attacker (or a typo) could try.
//!
//! One test on a private cluster: the scenarios share the replicas and stop
//! and pause them, so they run in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::{Rng, eventually, plain_at as plain};
use pgassist::{EngineConfig, Error, Registry, Sessions};
use pgassist_testing::{ClusterOptions, TestCluster};

/// pgassist's warnings (feature `tracing`), to count the down and back lines.
#[cfg(feature = "tracing")]
mod warnings {
    use std::sync::{Arc, Mutex, OnceLock};
    use tracing_subscriber::layer::SubscriberExt;

    static LINES: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();

    struct Message<'a>(&'a mut String);
    impl tracing::field::Visit for Message<'_> {
        fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!("{value:?}"));
        }
    }

    struct Capture(Arc<Mutex<Vec<String>>>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut line = String::new();
            event.record(&mut Message(&mut line));
            self.0.lock().unwrap().push(line);
        }
    }

    /// Starts capturing (once per process).
    pub fn capture() {
        let lines = LINES.get_or_init(Default::default).clone();
        let subscriber = tracing_subscriber::registry().with(Capture(lines));
        let _ = tracing::subscriber::set_global_default(subscriber);
    }

    /// Captured lines containing `text`.
    pub fn count(text: &str) -> usize {
        LINES.get().map_or(0, |l| {
            l.lock()
                .unwrap()
                .iter()
                .filter(|m| m.contains(text))
                .count()
        })
    }
}

/// Polls `cond` until it holds, for at most 30 s.
async fn until<F: std::future::Future<Output = bool>>(what: &str, cond: impl FnMut() -> F) {
    assert!(
        eventually(Duration::from_secs(30), cond).await,
        "timed out waiting for {what}"
    );
}

/// Whether the standby at `url` has replayed the test table yet.
async fn has_items(url: &str) -> bool {
    let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
        return false;
    };
    tokio::spawn(conn);
    client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .is_ok()
}

/// No read on `out`; a third or more of them on each of `among`.
fn assert_shared(served: &HashMap<u16, usize>, out: u16, among: [u16; 2]) {
    let total: usize = served.values().sum();
    assert_eq!(served.get(&out), None, "{served:?}");
    for port in among {
        let share = served.get(&port).copied().unwrap_or(0);
        assert!(share * 3 >= total, "{served:?}");
    }
}

/// Pauses or resumes WAL replay on a standby.
async fn replay(standby: &tokio_postgres::Client, pause: bool) {
    let sql = if pause {
        "SELECT pg_wal_replay_pause()"
    } else {
        "SELECT pg_wal_replay_resume()"
    };
    standby.batch_execute(sql).await.unwrap();
}

/// The port of the server that served one read, and the rows it saw.
async fn read(sessions: &Sessions) -> (u16, i64) {
    let row = sessions
        .reader()
        .unwrap()
        .query_one(
            "SELECT inet_server_port(), (SELECT count(*) FROM items)",
            &[],
        )
        .await
        .unwrap();
    (row.get::<_, i32>(0) as u16, row.get(1))
}

/// `n` reads, each in a request of its own (nothing written): reads per port.
async fn spread(registry: &Registry, n: usize) -> HashMap<u16, usize> {
    let mut served = HashMap::new();
    for _ in 0..n {
        let (port, _) = read(&registry.sessions()).await;
        *served.entry(port).or_default() += 1;
    }
    served
}

fn replica_config(url: &str) -> EngineConfig {
    EngineConfig::from_url(url)
        .unwrap()
        .application_name("pgassist_replicas_many")
        .replica_of("writer")
        .max_size(4)
        .connection_timeout(Duration::from_millis(1000))
        .max_replica_lag(Duration::from_millis(1500))
        .replica_lag_interval(Duration::from_millis(100))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_balanced_lag_aware_and_healed() {
    if std::env::var_os("DATABASE_URL").is_some() {
        eprintln!("DATABASE_URL is set: no replicas can be started next to it; skipping");
        return;
    }
    #[cfg(feature = "tracing")]
    warnings::capture();
    let primary = TestCluster::start(ClusterOptions::default()).expect("start a primary");
    let db = primary.create_database().await.expect("create a database");
    plain(&db.url)
        .await
        .batch_execute("CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL)")
        .await
        .unwrap();
    let replicas: Vec<TestCluster> = (0..3)
        .map(|_| primary.start_replica().expect("start a hot standby"))
        .collect();
    let urls: Vec<String> = replicas.iter().map(|r| r.url(&db.name)).collect();
    let ports: Vec<u16> = replicas.iter().map(TestCluster::port).collect();
    for url in &urls {
        until("each replica to have the test table", || has_items(url)).await;
    }
    let registry = Registry::builder()
        .engine(
            "writer",
            EngineConfig::from_url(&db.url)
                .unwrap()
                .application_name("pgassist_replicas_many"),
        )
        .engine(
            "r0",
            replica_config(&urls[0]).max_replica_lag_bytes(64 * 1024),
        )
        .engine("r1", replica_config(&urls[1]))
        .engine(
            "r2",
            replica_config(&urls[2]).replica_max_wait(Duration::from_secs(5)),
        )
        .build()
        .await
        .unwrap();
    let stats = |name: &str| {
        registry
            .stats()
            .engine(name)
            .and_then(|e| e.replica.clone())
            .unwrap()
    };
    until("a first lag sample of every replica", || async {
        ["r0", "r1", "r2"]
            .iter()
            .all(|r| stats(r).standby == Some(true) && stats(r).lag.is_some())
    })
    .await;

    // 1. Sequential reads rotate over the three (reader() is r0, and r0's
    //    reads are the group's).
    let served = spread(&registry, 30).await;
    eprintln!("30 reads over 3 healthy replicas: {served:?}");
    for port in &ports {
        assert!(served.get(port).copied().unwrap_or(0) >= 5, "{served:?}");
    }
    assert_eq!(served.values().sum::<usize>(), 30);
    // Through another replica engine of the group, just the same.
    let through_r2: HashMap<u16, usize> = {
        let mut m = HashMap::new();
        for _ in 0..12 {
            let row = registry
                .session("r2")
                .unwrap()
                .query_one("SELECT inet_server_port()", &[])
                .await
                .unwrap();
            *m.entry(row.get::<_, i32>(0) as u16).or_default() += 1;
        }
        m
    };
    assert_eq!(through_r2.len(), 3, "{through_r2:?}");

    // Reads dropped at random points (while choosing, checking out,
    // running): nothing stays checked out, and the group still serves.
    let mut rng = Rng::new(Rng::seed("replicas_many cancellation"));
    for _ in 0..60 {
        let sessions = registry.sessions();
        if rng.percent(30) {
            sessions
                .writer()
                .unwrap()
                .execute("SELECT 1", &[])
                .await
                .unwrap();
        }
        let budget = Duration::from_micros(rng.below(3000));
        let _ = tokio::time::timeout(budget, read(&sessions)).await;
    }
    until("dropped reads to give their connections back", || async {
        ["r0", "r1", "r2"]
            .iter()
            .all(|r| registry.stats().engine(r).unwrap().in_use == 0)
    })
    .await;
    assert_eq!(spread(&registry, 9).await.len(), 3);

    // Every pool busy for longer than a sample may take: least-busy puts 4
    // long reads on each member, and no member is mistaken for a dead one.
    let long_reads = (0..12).map(|_| async {
        let row = registry
            .session("r0")
            .unwrap()
            .query_one("SELECT inet_server_port(), pg_sleep(2.5)::text", &[])
            .await
            .unwrap();
        row.get::<_, i32>(0) as u16
    });
    let mut busy: HashMap<u16, usize> = HashMap::new();
    for port in futures::future::join_all(long_reads).await {
        *busy.entry(port).or_default() += 1;
    }
    assert_eq!(
        busy.values().copied().collect::<Vec<_>>(),
        [4, 4, 4],
        "{busy:?}"
    );
    assert!(["r0", "r1", "r2"].iter().all(|r| stats(r).healthy));

    // What routing costs: reads through the group against reads on a
    // plain read-only engine on one of the same standbys.
    let direct = Registry::builder()
        .engine(
            "plain",
            EngineConfig::from_url(&urls[0]).unwrap().read_only(true),
        )
        .build()
        .await
        .unwrap();
    let plain_session = direct.session("plain").unwrap();
    let grouped = registry.session("r0").unwrap();
    for (what, session) in [
        ("group", &grouped),
        ("plain", &plain_session),
        ("group", &grouped),
    ] {
        let started = Instant::now();
        for _ in 0..500 {
            session.query_one("SELECT 1", &[]).await.unwrap();
        }
        eprintln!("500 reads, {what}: {:?} per read", started.elapsed() / 500);
    }
    drop(direct);

    // 2. Replay paused on r1 while the primary writes: once its lag passes
    //    max_replica_lag it gets no reads; the other two share them.
    let r1 = plain(&urls[1]).await;
    replay(&r1, true).await;
    let writing = Arc::new(AtomicBool::new(true));
    let writer_task = {
        let writing = writing.clone();
        let url = db.url.clone();
        tokio::spawn(async move {
            let c = plain(&url).await;
            let mut n = 0u64;
            while writing.load(Ordering::Relaxed) {
                c.execute("INSERT INTO items(name) VALUES ('tick')", &[])
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        })
    };
    let paused_at = Instant::now();
    until("the paused replica to be out of rotation", || async {
        !stats("r1").serving
    })
    .await;
    let lagging = stats("r1");
    eprintln!(
        "r1 out after {:?}: lag {:?}, {:?} bytes",
        paused_at.elapsed(),
        lagging.lag,
        lagging.lag_bytes
    );
    assert!(lagging.lag.unwrap() > Duration::from_millis(1500));
    assert!(lagging.lag_bytes.unwrap() > 0);
    let served = spread(&registry, 30).await;
    eprintln!("30 reads with r1 paused and behind: {served:?}");
    assert_shared(&served, ports[1], [ports[0], ports[2]]);
    writing.store(false, Ordering::Relaxed);
    let ticks = writer_task.await.unwrap();
    eprintln!("{ticks} rows written while r1 was paused");
    replay(&r1, false).await;
    until("the resumed replica to be back in rotation", || async {
        stats("r1").serving
    })
    .await;
    let served = spread(&registry, 30).await;
    assert!(
        served.get(&ports[1]).copied().unwrap_or(0) >= 5,
        "{served:?}"
    );
    // The byte limit: one burst of WAL on the primary while r0's replay is
    // paused puts it out at once, long before its time limit.
    let r0 = plain(&urls[0]).await;
    replay(&r0, true).await;
    plain(&db.url)
        .await
        .execute(
            "INSERT INTO items(name) SELECT 'burst ' || i FROM generate_series(1, 3000) i",
            &[],
        )
        .await
        .unwrap();
    until("r0 to be out of rotation by bytes", || async {
        !stats("r0").serving
    })
    .await;
    let behind = stats("r0");
    eprintln!(
        "r0 out by bytes: {:?} bytes, {:?}",
        behind.lag_bytes, behind.lag
    );
    assert!(behind.lag_bytes.unwrap() > 64 * 1024, "{behind:?}");
    assert_shared(&spread(&registry, 30).await, ports[0], [ports[1], ports[2]]);
    replay(&r0, false).await;

    // Idle primary, caught-up replicas: time lag counts as zero, however
    // long ago the last commit was.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    until("caught-up replicas to report no lag", || async {
        ["r0", "r1", "r2"]
            .iter()
            .all(|r| stats(r).lag == Some(Duration::ZERO) && stats(r).serving)
    })
    .await;

    // 3. Read-your-writes across the group: replay paused on r0 and r1, so
    //    only r2 (or the primary) can serve this request's reads.
    replay(&r0, true).await;
    replay(&r1, true).await;
    let mut on_r2 = 0;
    for i in 0..10 {
        let sessions = registry.sessions();
        let mine = format!("mine {i}");
        sessions
            .writer()
            .unwrap()
            .execute("INSERT INTO items(name) VALUES ($1)", &[&mine])
            .await
            .unwrap();
        // Through r2, which waits up to 5 s for a replica to replay the write.
        let row = sessions
            .get("r2")
            .unwrap()
            .query_one(
                "SELECT inet_server_port(), count(*) FROM items WHERE name = $1",
                &[&mine],
            )
            .await
            .unwrap();
        let port = row.get::<_, i32>(0) as u16;
        assert!(
            port == ports[2] || port == primary.port(),
            "read-your-writes read on a paused replica: {port}"
        );
        assert_eq!(row.get::<_, i64>(1), 1, "the read saw this request's write");
        on_r2 += usize::from(port == ports[2]);
    }
    eprintln!("read-your-writes with two of three replicas paused: {on_r2}/10 on the live one");
    assert!(on_r2 > 0, "a caught-up replica serves read-your-writes");
    replay(&r0, false).await;
    replay(&r1, false).await;
    drop((r0, r1));

    // 4. A replica stopped: reads go on without an error (the first that
    //    meets it falls back to the primary), then over the other two.
    replicas[1].stop_server().unwrap();
    let served = spread(&registry, 30).await;
    eprintln!("30 reads right after r1 stopped: {served:?}");
    until("the stopped replica to be found down", || async {
        !stats("r1").healthy
    })
    .await;
    let served = spread(&registry, 30).await;
    eprintln!("30 reads with r1 down: {served:?}");
    assert_shared(&served, ports[1], [ports[0], ports[2]]);
    replicas[1].start_server().unwrap();
    let back = Instant::now();
    until("the restarted replica to be back in rotation", || async {
        spread(&registry, 6).await.contains_key(&ports[1])
    })
    .await;
    eprintln!(
        "r1 back in rotation {:?} after its server started",
        back.elapsed()
    );
    // One line when it went down, one when it came back — not one per
    // statement or probe.
    #[cfg(feature = "tracing")]
    {
        assert_eq!(warnings::count("`r1` is unreachable"), 1);
        assert_eq!(warnings::count("`r1` is back"), 1);
        assert_eq!(warnings::count("`r0` is unreachable"), 0);
    }

    // 5. Every replica down: reads on the primary, without errors.
    for r in &replicas {
        r.stop_server().unwrap();
    }
    let served = spread(&registry, 10).await;
    assert_eq!(served.get(&primary.port()), Some(&10), "{served:?}");
    until("all replicas found down", || async {
        ["r0", "r1", "r2"].iter().all(|r| !stats(r).healthy)
    })
    .await;
    let served = spread(&registry, 10).await;
    assert_eq!(served.get(&primary.port()), Some(&10), "{served:?}");
    let reads: u64 = ["r0", "r1", "r2"].iter().map(|r| stats(r).reads).sum();
    eprintln!("reads routed to replicas in all: {reads}");
    for r in &replicas {
        r.start_server().unwrap();
    }
    until("the replicas to be back", || async {
        ["r0", "r1", "r2"].iter().all(|r| stats(r).healthy)
    })
    .await;
    let served = spread(&registry, 30).await;
    assert_eq!(served.len(), 3, "{served:?}");

    // 6. A "replica" that is in fact a primary (not in recovery) gets no reads.
    let odd = Registry::builder()
        .engine("writer", EngineConfig::from_url(&db.url).unwrap())
        .engine("fake", replica_config(&db.url))
        .engine("real", replica_config(&urls[0]))
        .build()
        .await
        .unwrap();
    until("the fake replica to be sampled", || async {
        odd.stats()
            .engine("fake")
            .unwrap()
            .replica
            .clone()
            .unwrap()
            .standby
            == Some(false)
    })
    .await;
    let served = spread(&odd, 10).await;
    assert_eq!(served.get(&ports[0]), Some(&10), "{served:?}");
    let fake = odd.stats().engine("fake").unwrap().replica.clone().unwrap();
    assert!(!fake.serving && fake.reads == 0, "{fake:?}");
    #[cfg(feature = "serde")]
    {
        let json = serde_json::to_string(&odd.stats()).unwrap();
        assert!(json.contains("\"standby\":false"), "{json}");
    }
    drop(odd);

    // 7. One replica engine over two hosts: one member per host (the
    //    URL's load_balance_hosts, once needed, is now inert); see
    //    tests/replica_hosts.rs for the per-host health.
    let pair_url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{}?load_balance_hosts=random",
        ports[0], ports[2], db.name
    );
    let pair = Registry::builder()
        .engine("writer", EngineConfig::from_url(&db.url).unwrap())
        .engine(
            "pair",
            replica_config(&pair_url)
                .max_size(16)
                .application_name("pgassist_pair"),
        )
        .build()
        .await
        .unwrap();
    let reads = (0..16).map(|_| async {
        let row = pair
            .session("pair")
            .unwrap()
            .query_one("SELECT inet_server_port(), pg_sleep(0.2)::text", &[])
            .await
            .unwrap();
        row.get::<_, i32>(0) as u16
    });
    let mut hosts: Vec<u16> = futures::future::join_all(reads).await;
    hosts.sort_unstable();
    hosts.dedup();
    assert_eq!(hosts, {
        let mut p = vec![ports[0], ports[2]];
        p.sort_unstable();
        p
    });
    // Dropping the registry ends its lag sampler too: no connection of it
    // stays open on either standby.
    drop(pair);
    let left = |port: u16| {
        let url = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
        async move {
            plain(&url)
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgassist_pair'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    until("the dropped registry's connections to close", || async {
        left(ports[0]).await + left(ports[2]).await == 0
    })
    .await;

    drop(registry);
    for r in &replicas {
        r.stop();
    }
}

/// Configurations that must be refused when the registry is built.
#[tokio::test]
async fn replica_configurations_that_are_refused() {
    let url = "postgres://nobody@127.0.0.1:1/none";
    let config = || EngineConfig::from_url(url).unwrap();
    let refused = |builder: pgassist::RegistryBuilder| async move {
        match builder.lazy().build().await {
            Err(Error::Config(message)) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    };
    let m = refused(
        Registry::builder()
            .engine("writer", config())
            .engine("r", config().replica_of("wirter")),
    )
    .await;
    assert!(m.contains("unknown engine `wirter`"), "{m}");
    let m = refused(
        Registry::builder()
            .engine("writer", config())
            .engine("r1", config().replica_of("writer"))
            .engine("r2", config().replica_of("r1")),
    )
    .await;
    assert!(m.contains("replica_of must name a primary"), "{m}");
    let m = refused(
        Registry::builder()
            .engine("writer", config())
            .engine("r", config().replica_of("r")),
    )
    .await;
    assert!(m.contains("replica_of must name a primary"), "{m}");
    for zero in [
        config()
            .replica_of("writer")
            .max_replica_lag(Duration::ZERO),
        config().replica_of("writer").max_replica_lag_bytes(0),
    ] {
        let m = refused(
            Registry::builder()
                .engine("writer", config())
                .engine("r", zero),
        )
        .await;
        assert!(m.contains("zero max_replica_lag"), "{m}");
    }
    let m = refused(
        Registry::builder().engine("writer", config()).engine(
            "r",
            config()
                .replica_of("writer")
                .replica_lag_interval(Duration::ZERO),
        ),
    )
    .await;
    assert!(m.contains("replica_lag_interval"), "{m}");
    // From settings, too.
    let settings = [
        ("db.r.url", url),
        ("db.r.replica_of", "writer"),
        ("db.r.max_replica_lag", "2s"),
        ("db.r.max_replica_lag_bytes", "1048576"),
        ("db.r.replica_lag_interval", "250ms"),
    ];
    let parsed = EngineConfig::from_settings(settings, "db.r.").unwrap();
    let shown = format!("{parsed:?}");
    assert!(shown.contains("max_replica_lag: Some(2s)"), "{shown}");
    assert!(
        shown.contains("max_replica_lag_bytes: Some(1048576)"),
        "{shown}"
    );
    assert!(
        EngineConfig::from_settings(
            [("db.r.url", url), ("db.r.max_replica_lag", "soon")],
            "db.r."
        )
        .is_err()
    );
    // Without replicas no sampler runs and no stats say "replica".
    let plain = Registry::builder()
        .engine("writer", config())
        .lazy()
        .build()
        .await
        .unwrap();
    assert!(plain.stats().engine("writer").unwrap().replica.is_none());
}
