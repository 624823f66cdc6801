//! Causal tokens against real servers (features `causal` and `axum`): a
//! primary and a hot standby whose replay is paused, so the standby cannot
//! have any write made after the pause. Which server answered is read on
//! the server side (`inet_server_port()`, `pg_is_in_recovery()`).
//!
//! One test with a replica: its scenarios pause and resume the same
//! standby, so they run in order.

mod common;

use std::time::Duration;

use axum::Router;
use axum::http::HeaderName;
use axum::routing::{get, post};
use common::Db;
use pgassist::integrations::axum::Db as DbExtractor;
use pgassist::integrations::tower::{CAUSAL_TOKEN_HEADER, CausalTokenRejected, SessionsLayer};
use pgassist::{
    CausalTokenError, EngineConfig, Error, Registry, RegistryBuilder, Session, TxOptions,
};

const KEY: &[u8] = b"a test key of at least 32 bytes, never a real one";
const OLD_KEY: &[u8] = b"the key before the rotation, also 32 bytes or more";

/// (port of the server that answered, in recovery?, rows in items)
async fn probe(s: &Session) -> (i32, bool, i64) {
    let row = s
        .query_one(
            "SELECT inet_server_port(), pg_is_in_recovery(), (SELECT count(*) FROM items)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// A request on `registry` that inserts `name` and hands out its token.
async fn write_and_token(registry: &Registry, name: &str) -> String {
    let request = registry.sessions();
    request
        .writer()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ($1)", &[&name])
        .await
        .unwrap();
    request.causal_token().unwrap().expect("a write, a token")
}

/// writer + replica of it, as every process of the application builds it.
fn builder(db: &Db, replica_url: &str) -> RegistryBuilder {
    Registry::builder()
        .engine("writer", db.config())
        .engine(
            "replica",
            EngineConfig::from_url(replica_url)
                .unwrap()
                .application_name(&db.app)
                .replica_of("writer")
                // Paused replay never catches up: do not wait long for it.
                .replica_max_wait(Duration::from_millis(200)),
        )
        .default_engine("writer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_carry_read_your_writes_across_registries_and_http() {
    let db = Db::new().await;
    let Some((replica, replica_url)) = common::replica_with_test_db(&db).await else {
        return;
    };
    let primary_port: i32 = db.cluster.port().into();
    let replica_port: i32 = replica.port().into();
    assert_ne!(primary_port, replica_port);

    // "Process" A signs with the new key; B (another registry, built apart)
    // also accepts the old one, as during a key rotation.
    let a = builder(&db, &replica_url)
        .causal_key(KEY)
        .build()
        .await
        .unwrap();
    let b = builder(&db, &replica_url)
        .causal_key(KEY)
        .causal_retired_key(OLD_KEY)
        .build()
        .await
        .unwrap();
    let old = builder(&db, &replica_url)
        .causal_key(OLD_KEY)
        .build()
        .await
        .unwrap();
    let control = common::pause_replay(&replica_url).await;

    // Request 1, in A: nothing written yet, no token; then a write.
    assert_eq!(a.sessions().causal_token().unwrap(), None);
    let token = write_and_token(&a, "one").await;

    // Request 2, in B, with the token: the read sees the write, served by
    // the primary (the replica cannot have it).
    let request2 = b.sessions_after(&token).unwrap();
    assert_eq!(
        probe(request2.reader().unwrap()).await,
        (primary_port, false, 1),
        "with the token, the read goes to the primary"
    );
    // Request 2 without the token reads the paused replica: the token is
    // what made the difference.
    let without = b.sessions();
    assert_eq!(
        probe(without.reader().unwrap()).await,
        (replica_port, true, 0),
        "without a token, the stale replica serves"
    );
    // A read-only request passes the token on without renewing it.
    let passed = request2.causal_token().unwrap().expect("carried on");
    assert_eq!(
        passed.split('.').nth(1),
        token.split('.').nth(1),
        "same issue time"
    );
    drop((request2, without));

    // A token signed with the retired key is still honoured by B, and the
    // write it carries seen.
    let old_token = write_and_token(&old, "two").await;
    assert_eq!(
        probe(b.sessions_after(&old_token).unwrap().reader().unwrap()).await,
        (primary_port, false, 2)
    );
    // A, which never had the old key, refuses it.
    let refused = a.sessions_after(&old_token).unwrap_err();
    assert!(
        matches!(refused, Error::CausalToken(CausalTokenError::BadSignature)),
        "{refused:?}"
    );

    // A forged token — the position raised, the signature kept — is refused.
    let (body, tag) = token.rsplit_once('.').unwrap();
    let (head, lsn) = body.rsplit_once('-').unwrap();
    let forged = format!("{head}-{}.{tag}", "f".repeat(lsn.len().max(9)));
    assert!(matches!(
        b.sessions_after(&forged),
        Err(Error::CausalToken(CausalTokenError::BadSignature))
    ));

    // Expired tokens are ignored, not refused: the read goes to the replica.
    let brief = builder(&db, &replica_url)
        .causal_key(KEY)
        .causal_max_age(Duration::ZERO)
        .lazy()
        .build()
        .await
        .unwrap();
    let short_lived = write_and_token(&brief, "three").await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let late = brief.sessions();
    let observed = late.observe_causal_token(&short_lived).unwrap();
    assert!(observed.expired, "{observed:?}");
    assert_eq!(probe(late.reader().unwrap()).await, (replica_port, true, 0));
    drop(late);

    // Another service with other engines: unknown names are ignored.
    let other = Registry::builder()
        .engine("orders", db.config())
        .causal_key(KEY)
        .lazy()
        .build()
        .await
        .unwrap();
    let elsewhere = other.sessions();
    let observed = elsewhere.observe_causal_token(&token).unwrap();
    assert_eq!((observed.applied, observed.unknown_engines), (0, 1));

    http_round_trips(&db, &replica_url, primary_port, replica_port).await;
    through_pgbouncer(&db, &replica, &token, primary_port, replica_port).await;

    control
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    replica.stop();
}

/// A PgBouncer (transaction pooling) in front of the replica only: the
/// replica engine goes through it, read-your-writes polls the replay
/// position through it, and a token still sends the read to the primary.
async fn through_pgbouncer(
    db: &Db,
    replica: &pgassist_testing::TestCluster,
    token: &str,
    primary_port: i32,
    replica_port: i32,
) {
    let Some(bouncer) = replica.start_pgbouncer().unwrap() else {
        eprintln!("pgbouncer is not installed; skipping its part (.ci/run installs it)");
        return;
    };
    let bounced = EngineConfig::from_url(&bouncer.url(&db.db.name))
        .unwrap()
        .pgbouncer(true)
        .replica_of("writer")
        .replica_max_wait(Duration::from_millis(200));
    let registry = Registry::builder()
        .engine("writer", db.config())
        .engine("replica", bounced)
        .causal_key(KEY)
        .build()
        .await
        .unwrap();
    let rows = db.plain_count("SELECT count(*) FROM items").await;
    // The server behind PgBouncer answers inet_server_port(): the replica.
    assert_eq!(
        probe(registry.sessions().reader().unwrap()).await,
        (replica_port, true, 0)
    );
    let after = registry.sessions_after(token).unwrap();
    assert_eq!(
        probe(after.reader().unwrap()).await,
        (primary_port, false, rows)
    );
    let token = write_and_token(&registry, "bounced").await;
    let after = registry.sessions_after(&token).unwrap();
    assert_eq!(
        probe(after.reader().unwrap()).await,
        (primary_port, false, rows + 1)
    );
    drop(registry);
    bouncer.stop();
}

/// The tower layer's header pair over real HTTP, replay still paused.
async fn http_round_trips(db: &Db, replica_url: &str, primary_port: i32, replica_port: i32) {
    let registry = builder(db, replica_url)
        .causal_key(KEY)
        .build()
        .await
        .unwrap();
    let header = HeaderName::from_static(CAUSAL_TOKEN_HEADER);
    let layer = SessionsLayer::new(registry.clone())
        .causal_headers(header.clone(), header.clone())
        .unwrap();
    let base = serve(layer).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let rows = db.plain_count("SELECT count(*) FROM items").await;

    let read = |token: Option<String>| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let mut req = http.get(format!("{base}/read"));
            if let Some(t) = token {
                req = req.header(CAUSAL_TOKEN_HEADER, t);
            }
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            let set = res.headers().contains_key(CAUSAL_TOKEN_HEADER);
            (res.text().await.unwrap(), set)
        }
    };

    // A request that writes answers with a token; one that only reads, none.
    let res = http.post(format!("{base}/write")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let token = header_token(res.headers(), CAUSAL_TOKEN_HEADER).expect("a write, a token");
    let (body, set) = read(None).await;
    assert_eq!(body, format!("{replica_port} 0 -"), "no token: the replica");
    assert!(!set, "a read-only request hands no token out");
    // The next request brings it back: it reads its write, from the primary.
    let (body, _) = read(Some(token.clone())).await;
    assert_eq!(body, format!("{primary_port} {} -", rows + 1));
    // Forged or garbled headers are ignored (the replica serves) and the
    // handler can see why.
    let mut forged = token.clone().into_bytes();
    let last = forged.len() - 1;
    forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
    let forged = String::from_utf8(forged).unwrap();
    for (bad, why) in [
        (forged, "BadSignature"),
        ("garbage".to_owned(), "Malformed"),
        ("x".repeat(5000), "TooLong"),
    ] {
        let (body, _) = read(Some(bad)).await;
        assert!(
            body.starts_with(&format!("{replica_port} 0 ")) && body.contains(why),
            "{body}"
        );
    }
    // Two header lines (a proxy may have added one), or the same folded
    // into one line, comma-separated (RFC 9110, 5.3): a garbled value
    // beside the good token does not hide it, in either order, whatever
    // the blanks around them.
    let folded = [
        format!("garbage, {token}"),
        format!("{token},garbage"),
        format!(" \t{token} , \t"),
        format!("{token},{token}"),
    ];
    for value in folded {
        let (body, _) = read(Some(value.clone())).await;
        assert!(
            body.starts_with(&format!("{primary_port} {} ", rows + 1)),
            "{value:?}: {body}"
        );
    }
    let res = http
        .get(format!("{base}/read"))
        .header(CAUSAL_TOKEN_HEADER, "garbage")
        .header(CAUSAL_TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    let body = res.text().await.unwrap();
    assert!(
        body.starts_with(&format!("{primary_port} {} Malformed", rows + 1)),
        "{body}"
    );
    // At most 8 tokens a request are read (each is a signature check per
    // key): the ninth is refused unread, and the replica serves.
    let (body, _) = read(Some(format!("{}{token}", "garbage,".repeat(8)))).await;
    assert!(
        body.starts_with(&format!("{replica_port} 0 Malformed")),
        "{body}"
    );
    // Non-ASCII bytes in the header.
    let res = http
        .get(format!("{base}/read"))
        .header(
            CAUSAL_TOKEN_HEADER,
            reqwest::header::HeaderValue::from_bytes(b"1.\xff\xfe").unwrap(),
        )
        .send()
        .await
        .unwrap();
    let body = res.text().await.unwrap();
    assert!(
        body.starts_with(&format!("{replica_port} 0 Malformed")),
        "{body}"
    );

    // Transaction per request, other header names: the position is taken
    // at the commit the layer makes after the handler.
    let layer = SessionsLayer::per_request_transaction(registry, TxOptions::new())
        .causal_headers(
            HeaderName::from_static("x-read-after"),
            HeaderName::from_static("x-wrote"),
        )
        .unwrap();
    let base = serve(layer).await;
    let res = http.post(format!("{base}/write")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(!res.headers().contains_key(CAUSAL_TOKEN_HEADER));
    let token = header_token(res.headers(), "x-wrote").expect("a commit, a token");
    let res = http
        .get(format!("{base}/read"))
        .header("x-read-after", token)
        .send()
        .await
        .unwrap();
    assert!(
        !res.headers().contains_key("x-wrote"),
        "a read hands nothing out"
    );
    assert_eq!(
        res.text().await.unwrap(),
        format!("{primary_port} {} -", rows + 2)
    );
}

/// The test app behind `layer`: POST /write inserts a row; GET /read says
/// which server answered, the rows it sees, and why a token was refused.
/// Served on a free loopback port for the rest of the test.
async fn serve(layer: SessionsLayer) -> String {
    let app = Router::new()
        .route(
            "/write",
            post(|db: DbExtractor| async move {
                db.writer()?
                    .execute("INSERT INTO items(name) VALUES ('http')", &[])
                    .await?;
                Ok::<_, Error>("written")
            }),
        )
        .route(
            "/read",
            get(
                |db: DbExtractor, rejected: Option<axum::Extension<CausalTokenRejected>>| async move {
                    let (port, _, count) = probe(db.reader()?).await;
                    let note = rejected.map_or("-".to_owned(), |r| format!("{:?}", r.0 .0));
                    Ok::<_, Error>(format!("{port} {count} {note}"))
                },
            ),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn header_token(headers: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn without_a_key_tokens_are_a_typed_error_and_short_keys_are_refused() {
    let db = Db::new().await;
    let registry = Registry::builder()
        .engine("writer", db.config())
        .lazy()
        .build()
        .await
        .unwrap();
    let no_key =
        |r: pgassist::Result<_>| matches!(r, Err(Error::CausalToken(CausalTokenError::NoKey)));
    assert!(no_key(registry.sessions().causal_token().map(drop)));
    assert!(no_key(
        registry
            .sessions()
            .observe_causal_token("1.0..00")
            .map(drop)
    ));
    assert!(no_key(registry.sessions_after("x").map(drop)));
    let layer = SessionsLayer::new(registry).causal_headers(
        HeaderName::from_static("x-a"),
        HeaderName::from_static("x-b"),
    );
    assert!(matches!(
        layer,
        Err(Error::CausalToken(CausalTokenError::NoKey))
    ));
    for builder in [
        Registry::builder().causal_key(b"short"),
        Registry::builder().causal_retired_key(KEY),
    ] {
        let built = builder.engine("writer", db.config()).lazy().build().await;
        assert!(matches!(built, Err(Error::Config(_))), "{built:?}");
    }
}
