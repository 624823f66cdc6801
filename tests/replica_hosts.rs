//! One replica engine over two streaming hot standbys (`host=a,b`): it
//! reads from both, with health and lag per host. A host stopped is taken
//! out alone and reads go on on the other without an error (a read that
//! meets the dead host runs again on the other one, not on the primary); a
//! host started again comes back; `Registry::health()` shows each host.
//! Also the build with a host that cannot be reached (checked and lazy),
//! and the names and host lists an attacker (or a typo) could try. Who
//! served a read is `inet_server_port()`, returned by the read itself.
//!
//! One test on a private cluster: the scenarios stop and start the
//! standbys, so they run in order.

use std::collections::HashMap;
use std::time::Duration;

mod common;

use common::{Rng, eventually, plain_at as plain};
use pgassist::{EngineConfig, Error, Registry};
use pgassist_testing::{ClusterOptions, TestCluster};

/// A sampler every 100 ms: hosts found down and back quickly.
const FAST: Duration = Duration::from_millis(100);
/// A sampler too slow to notice anything during the test: only reads find
/// a host down.
const SLOW: Duration = Duration::from_secs(3600);

/// Polls `cond` until it holds, for at most 30 s.
async fn until<F: std::future::Future<Output = bool>>(what: &str, cond: impl FnMut() -> F) {
    assert!(
        eventually(Duration::from_secs(30), cond).await,
        "timed out waiting for {what}"
    );
}

/// The replica engine `reader` over `hosts` (`host:port,host:port`).
fn reader(hosts: &str, db: &str, interval: Duration) -> EngineConfig {
    EngineConfig::from_url(&format!("postgres://postgres@{hosts}/{db}"))
        .unwrap()
        .application_name("pgassist_replica_hosts")
        .replica_of("writer")
        .max_size(4)
        .connection_timeout(Duration::from_millis(1000))
        .replica_lag_interval(interval)
}

/// `n` sequential reads through `engine`, each in a request of its own, in
/// autocommit or in a read transaction: reads per port. Panics on an error.
async fn spread(registry: &Registry, engine: &str, n: usize, in_tx: bool) -> HashMap<u16, usize> {
    const SQL: &str = "SELECT inet_server_port()";
    let mut served = HashMap::new();
    for _ in 0..n {
        let db = registry.sessions();
        let session = db.get(engine).unwrap();
        let row = if in_tx {
            let tx = session.begin().await.unwrap();
            let row = tx.query_one(SQL, &[]).await.unwrap();
            tx.commit().await.unwrap();
            row
        } else {
            session.query_one(SQL, &[]).await.unwrap()
        };
        *served.entry(row.get::<_, i32>(0) as u16).or_default() += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_engine_over_two_hosts() {
    if std::env::var_os("DATABASE_URL").is_some() {
        eprintln!("DATABASE_URL is set: no replicas can be started next to it; skipping");
        return;
    }
    let primary = TestCluster::start(ClusterOptions::default()).expect("start a primary");
    let db = primary.create_database().await.expect("create a database");
    let standbys: Vec<TestCluster> = (0..2)
        .map(|_| primary.start_replica().expect("start a hot standby"))
        .collect();
    let ports: Vec<u16> = standbys.iter().map(TestCluster::port).collect();
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let member = |i: usize| format!("reader@127.0.0.1:{}", ports[i]);
    let writer = || EngineConfig::from_url(&db.url).unwrap();
    // `reader` over both standbys, sampled every `interval`.
    let builder = |interval| {
        Registry::builder()
            .engine("writer", writer())
            .engine("reader", reader(&hosts, &db.name, interval))
    };

    let registry = builder(FAST).build().await.unwrap();
    // The engine sessions use is the user's; its hosts are members with
    // names of their own in the stats, not engines to open sessions on.
    assert!(registry.session("reader").is_ok());
    assert!(matches!(
        registry.session(&member(1)),
        Err(Error::UnknownEngine { .. })
    ));
    assert_eq!(
        registry.engine_names().collect::<Vec<_>>(),
        ["writer", "reader"]
    );
    let stats = registry.stats();
    let names: Vec<&str> = stats.engines.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["writer", "reader", &member(0), &member(1)]);
    let entry = stats.engine("reader").unwrap().replica.clone().unwrap();
    assert_eq!(entry.hosts, [member(0), member(1)]);
    until("a first sample of both hosts", || async {
        let health = registry.health().await;
        health.replicas.len() == 2
            && health
                .replicas
                .iter()
                .all(|m| m.state.standby == Some(true) && m.state.lag.is_some())
    })
    .await;

    // 1. Reads spread over both hosts.
    let served = spread(&registry, "reader", 20, false).await;
    eprintln!("20 reads over two hosts: {served:?}");
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(ports.iter().all(|p| served[p] >= 5), "{served:?}");
    let served = spread(&registry, "reader", 10, true).await;
    assert_eq!(served.len(), 2, "read transactions too: {served:?}");

    // 2. One host stopped: reads go on without an error, on the other;
    //    health shows that host down and the engine still reachable.
    standbys[1].stop_server().unwrap();
    let served = spread(&registry, "reader", 20, false).await;
    eprintln!("20 reads right after host 1 stopped: {served:?}");
    assert_eq!(served.get(&ports[0]), Some(&20), "{served:?}");
    until("the stopped host to be found down", || async {
        let health = registry.health().await;
        health.replica(&member(1)).is_some_and(|m| !m.state.healthy)
    })
    .await;
    let health = registry.health().await;
    assert!(health.replica(&member(0)).unwrap().state.healthy);
    assert!(health.engine("reader").unwrap().reachable, "{health:?}");
    let entry = registry
        .stats()
        .engine("reader")
        .unwrap()
        .replica
        .clone()
        .unwrap();
    assert!(entry.healthy && entry.serving, "{entry:?}");
    #[cfg(feature = "serde")]
    {
        let json = serde_json::to_string(&health).unwrap();
        let down = format!("\"name\":\"{}\",\"engine\":\"reader\"", member(1));
        assert!(json.contains(&down), "{json}");
        assert!(json.contains("\"healthy\":false"), "{json}");
    }

    // 3. Started again: back in rotation.
    standbys[1].start_server().unwrap();
    until("the restarted host to be back in rotation", || async {
        spread(&registry, "reader", 4, false)
            .await
            .contains_key(&ports[1])
    })
    .await;
    assert!(
        registry
            .health()
            .await
            .replicas
            .iter()
            .all(|m| m.state.healthy)
    );

    // 4. A read that meets the dead host runs again on the other one, not
    //    on the primary, in autocommit and for BEGIN: registries whose
    //    sampler is too slow to see the outage first (a read finds it).
    for in_tx in [false, true] {
        let slow = builder(SLOW).build().await.unwrap();
        let warm = spread(&slow, "reader", 8, in_tx).await;
        assert_eq!(warm.len(), 2, "{warm:?}");
        standbys[1].stop_server().unwrap();
        // Reads in tens until one has met the dead host: a member whose
        // pool is reconnecting in the background (min_idle) counts as busy
        // and is passed over by the least-busy choice until that fails,
        // which on a loaded machine can outlast the first ten reads.
        let mut rounds = 0;
        loop {
            rounds += 1;
            let served = spread(&slow, "reader", 10, in_tx).await;
            eprintln!("10 reads (in a transaction: {in_tx}), host 1 stopped: {served:?}");
            assert_eq!(served.get(&ports[0]), Some(&10), "{served:?}");
            let health = slow.health().await;
            if !health.replica(&member(1)).unwrap().state.healthy {
                break;
            }
            assert!(rounds < 10, "no read met the dead host in {rounds} rounds");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        drop(slow);
        standbys[1].start_server().unwrap();
    }

    // 4b. Reads dropped at random points while one of them meets the dead
    //     host and retries: no connection stays checked out, and reads go
    //     on afterwards.
    let slow = builder(SLOW).build().await.unwrap();
    let warm = spread(&slow, "reader", 8, false).await;
    assert_eq!(warm.len(), 2, "{warm:?}");
    standbys[1].stop_server().unwrap();
    let mut rng = Rng::new(Rng::seed("replica_hosts cancellation"));
    for _ in 0..40 {
        let budget = Duration::from_micros(rng.below(3000));
        let in_tx = rng.percent(30);
        let _ = tokio::time::timeout(budget, spread(&slow, "reader", 1, in_tx)).await;
    }
    until("every dropped read to give its connection back", || async {
        slow.stats().engines.iter().all(|e| e.in_use == 0)
    })
    .await;
    let served = spread(&slow, "reader", 10, false).await;
    assert_eq!(served.get(&ports[0]), Some(&10), "{served:?}");
    drop(slow);
    standbys[1].start_server().unwrap();

    // 5. Built while a host is down: a checked build goes on with that host
    //    marked down; reads all go to the other. A lazy build finds out on
    //    the first read that meets it, which still succeeds.
    standbys[1].stop_server().unwrap();
    let checked = builder(FAST).build().await.unwrap();
    let health = checked.health().await;
    assert!(
        !health.replica(&member(1)).unwrap().state.healthy,
        "{health:?}"
    );
    let served = spread(&checked, "reader", 10, false).await;
    assert_eq!(served.get(&ports[0]), Some(&10), "{served:?}");
    let lazy = builder(SLOW).lazy().build().await.unwrap();
    let served = spread(&lazy, "reader", 10, false).await;
    assert_eq!(served.get(&ports[0]), Some(&10), "{served:?}");
    drop(lazy);
    // Every host down at build: the checked build fails, as for one host.
    standbys[0].stop_server().unwrap();
    let none = builder(FAST).build().await;
    assert!(matches!(none, Err(Error::Connect { .. })), "{none:?}");
    standbys[0].start_server().unwrap();
    standbys[1].start_server().unwrap();
    return_to_rotation(&checked, &ports).await;
    drop(checked);

    // No connection of the dropped registries stays open on the standbys.
    drop(registry);
    for port in &ports {
        let url = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
        until("the dropped registries' connections to close", || async {
            plain(&url)
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'pgassist_replica_hosts'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                == 0
        })
        .await;
    }
    for s in &standbys {
        s.stop();
    }
}

/// Waits until reads through `registry` reach both hosts again.
async fn return_to_rotation(registry: &Registry, ports: &[u16]) {
    until("both hosts back in rotation", || async {
        spread(registry, "reader", 6, false).await.len() == ports.len()
    })
    .await;
}

/// Host lists and names refused (or accepted) when the registry is built;
/// no server needed.
#[tokio::test]
async fn host_lists_and_names_an_attacker_could_try() {
    let writer = || EngineConfig::from_url("postgres://nobody@127.0.0.1:1/none").unwrap();
    let replica = |hosts: &str| {
        EngineConfig::from_url(&format!("postgres://nobody@{hosts}/none"))
            .unwrap()
            .replica_of("writer")
    };
    let refused = |builder: pgassist::RegistryBuilder| async move {
        match builder.lazy().build().await {
            Err(Error::Config(message)) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    };
    // The same host twice (also with the port spelt out once).
    for twice in ["127.0.0.1:1,127.0.0.1:1", "127.0.0.1,127.0.0.1:5432"] {
        let m = refused(
            Registry::builder()
                .engine("writer", writer())
                .engine("r", replica(twice)),
        )
        .await;
        assert!(m.contains("twice"), "{m}");
    }
    // A user engine named like a host member of another.
    let m = refused(
        Registry::builder()
            .engine("writer", writer())
            .engine("r", replica("127.0.0.1:1,127.0.0.1:2"))
            .engine("r@127.0.0.1:2", replica("127.0.0.1:3")),
    )
    .await;
    assert!(m.contains("`r@127.0.0.1:2`"), "{m}");
    // Names with `@` and `:` that clash with nothing are fine.
    let odd = Registry::builder()
        .engine("writer", writer())
        .engine("a@b:c", replica("127.0.0.1:1,127.0.0.1:2"))
        .engine("a@b:c@127.0.0.1", replica("127.0.0.1:3,127.0.0.1:4"))
        .lazy()
        .build()
        .await
        .unwrap();
    assert!(odd.session("a@b:c").is_ok());
    let stats = odd.stats();
    let names: Vec<&str> = stats.engines.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "writer",
            "a@b:c",
            "a@b:c@127.0.0.1:1",
            "a@b:c@127.0.0.1:2",
            "a@b:c@127.0.0.1",
            "a@b:c@127.0.0.1@127.0.0.1:3",
            "a@b:c@127.0.0.1@127.0.0.1:4",
        ]
    );
    // A writer over several hosts is one engine, one pool (it follows the
    // primary; see docs/failover.md): no members.
    let writers = Registry::builder()
        .engine(
            "writer",
            EngineConfig::from_url("postgres://nobody@127.0.0.1:1,127.0.0.1:2/none")
                .unwrap()
                .connection_timeout(Duration::from_millis(200)),
        )
        .lazy()
        .build()
        .await
        .unwrap();
    assert_eq!(writers.stats().engines.len(), 1);
    assert!(writers.health().await.replicas.is_empty());
}
