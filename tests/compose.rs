//! docker-compose.yml, checked without Docker: the services, their ports on
//! loopback, health checks that run over TCP (so they pass on the final
//! server only, not on the image's socket-only init server), the replica's
//! restart policy and re-bootstrap, and images pinned to the versions the
//! tests run against (PostgreSQL 15, the PgBouncer found here).

use serde_yaml::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docker-compose.yml"))
        .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn health(service: &Value) -> String {
    let test = &service["healthcheck"]["test"];
    let parts: Vec<&str> = test
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(parts[0], "CMD-SHELL", "{parts:?}");
    parts[1].to_owned()
}

#[test]
fn services_ports_and_images() {
    let c = compose();
    let services = &c["services"];
    for (name, port) in [("primary", 54320), ("replica", 54321), ("pgbouncer", 64320)] {
        let s = &services[name];
        assert!(s.is_mapping(), "service {name} is missing");
        let ports: Vec<&str> = s["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(
            ports,
            [format!("127.0.0.1:{port}:5432")],
            "{name}: loopback only"
        );
    }
    assert_eq!(services["primary"]["image"].as_str(), Some("postgres:15"));
    assert_eq!(services["replica"]["image"].as_str(), Some("postgres:15"));
    let bouncer = services["pgbouncer"]["image"].as_str().unwrap();
    assert!(
        !bouncer.ends_with(":latest") && bouncer.contains(':'),
        "{bouncer}"
    );
    // The PgBouncer the tests run against, when this machine has one.
    if let Ok(out) = std::process::Command::new("pgbouncer")
        .arg("--version")
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(version) = text.split_whitespace().nth(1) {
            assert!(
                bouncer.ends_with(&format!(":{version}")),
                "{bouncer} vs {text}"
            );
        }
    }
}

#[test]
fn health_checks_use_tcp_and_the_replica_must_stream() {
    let c = compose();
    let services = &c["services"];
    for name in ["primary", "replica", "pgbouncer"] {
        let check = health(&services[name]);
        assert!(check.contains("-h 127.0.0.1"), "{name}: {check}");
        assert!(services[name]["healthcheck"]["retries"].as_u64().unwrap() >= 10);
    }
    let replica = health(&services["replica"]);
    assert!(replica.contains("pg_is_in_recovery()"), "{replica}");
    assert!(replica.contains("status = 'streaming'"), "{replica}");
    for name in ["replica", "pgbouncer"] {
        assert_eq!(
            services[name]["depends_on"]["primary"]["condition"].as_str(),
            Some("service_healthy"),
            "{name}"
        );
    }
}

#[test]
fn the_replica_restarts_and_rebootstraps_from_a_new_primary() {
    let c = compose();
    let replica = &c["services"]["replica"];
    assert_eq!(replica["restart"].as_str(), Some("on-failure"));
    let command = replica["command"].as_str().unwrap();
    // Compares the primary's system identifier with its own data directory's.
    assert!(command.contains("IDENTIFY_SYSTEM"), "{command}");
    assert!(command.contains("Database system identifier"), "{command}");
    assert!(
        command.contains("pg_basebackup") && command.contains(" -R "),
        "{command}"
    );
    assert!(
        command.starts_with("bash -ec"),
        "a failed step must exit non-zero: {command}"
    );
    // The primary keeps no named volume, so a replica volume can never
    // outlive it unnoticed: the identifier check above catches it.
    assert!(c["services"]["primary"]["volumes"].is_null());
}

#[test]
fn environment_matches_the_documented_urls() {
    let c = compose();
    let services = &c["services"];
    assert_eq!(
        services["primary"]["environment"]["POSTGRES_PASSWORD"].as_str(),
        Some("postgres")
    );
    assert_eq!(
        services["replica"]["environment"]["PGPASSWORD"].as_str(),
        Some("postgres")
    );
    let bouncer = &services["pgbouncer"]["environment"];
    assert_eq!(bouncer["POOL_MODE"].as_str(), Some("transaction"));
    assert_eq!(bouncer["DB_HOST"].as_str(), Some("primary"));
    assert_eq!(bouncer["DB_PASSWORD"].as_str(), Some("postgres"));
    // The command in the README runs the quickstart through from_env.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for needle in [
        "docker compose up -d --wait",
        "PGASSIST_WRITER_URL=postgres://postgres:postgres@127.0.0.1:64320/postgres PGASSIST_WRITER_PGBOUNCER=true",
        "PGASSIST_READER_URL=postgres://postgres:postgres@127.0.0.1:54321/postgres PGASSIST_READER_REPLICA_OF=writer",
        "cargo run --example quickstart",
    ] {
        assert!(readme.contains(needle), "README lacks {needle:?}");
    }
}
