//! The tower layer and the axum extractor over real HTTP: an axum server on
//! 127.0.0.1:0, a reqwest client, and the server's side seen through a plain
//! connection and `pg_stat_activity`. Needs the features `axum` and `serde`.

mod common;

#[path = "../examples/axum_app.rs"]
#[allow(dead_code)]
mod axum_app;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use common::{Db, Disconnect, disconnect_mid_request};
use pgassist::integrations::axum::Db as DbExtractor;
use pgassist::integrations::tower::{COMMIT_FAILED_HEADER, RequestSessions, SessionsLayer};
use pgassist::{EngineState, Error, Registry, SessionsReport, TxOptions};

/// Serves `app` on a free loopback port for the rest of the test.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn axum_example_lists_creates_and_reports_over_http() {
    let db = Db::new().await;
    let registry = axum_app::connect(&db.db.url, &db.app).await.unwrap();
    axum_app::create_schema(&registry).await.unwrap();
    let base = serve(axum_app::app(registry.clone())).await;
    common::users_api::exercise(&base, &db).await;
    db.wait_no_transactions().await;
    assert_eq!(registry.stats().open_transactions, 0);
}

/// A router whose handlers write through the writer and the logger inside
/// the request's transactions, then answer with the status in the path.
fn writes_then_answers(registry: Registry) -> Router {
    Router::new()
        .route(
            "/write/{status}/{name}",
            post(
                |db: DbExtractor,
                 axum::extract::Path((status, name)): axum::extract::Path<(u16, String)>| async move {
                    common::insert_on_writer_and_logger(&db, &name).await;
                    (StatusCode::from_u16(status).unwrap(), format!("answered {status}"))
                },
            ),
        )
        .layer(SessionsLayer::per_request_transaction(
            registry,
            TxOptions::new(),
        ))
}

#[tokio::test]
async fn transaction_per_request_commits_on_1xx_to_3xx_and_rolls_back_on_4xx_5xx() {
    let db = Db::new().await;
    let registry = db.three_engines().await;
    let base = serve(writes_then_answers(registry.clone())).await;
    let http = client();

    for (status, committed) in [
        (200, true),
        (201, true),
        (303, true),
        (400, false),
        (404, false),
        (409, false),
        (500, false),
        (503, false),
    ] {
        let res = http
            .post(format!("{base}/write/{status}/s{status}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.status().as_u16(),
            status,
            "the handler's status goes out"
        );
        let visible = db
            .plain_count(&format!(
                "SELECT count(*) FROM items WHERE name LIKE 's{status}-%'"
            ))
            .await;
        assert_eq!(
            visible,
            if committed { 2 } else { 0 },
            "status {status}: both engines committed, or neither"
        );
    }
    db.wait_no_transactions().await;
    assert_eq!(registry.stats().open_transactions, 0);
}

#[tokio::test]
async fn a_commit_that_fails_turns_the_success_into_a_500() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute("CREATE TABLE once (x int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        .await
        .unwrap();
    let registry = db.three_engines().await;
    let app = Router::new()
        .route(
            "/twice",
            post(|db: DbExtractor| async move {
                let writer = db.writer().unwrap();
                writer
                    .execute("INSERT INTO items(name) VALUES ('written')", &[])
                    .await
                    .unwrap();
                // Both inserts succeed; the deferred check fails at COMMIT.
                writer
                    .execute("INSERT INTO once VALUES (1), (1)", &[])
                    .await
                    .unwrap();
                (StatusCode::CREATED, "created")
            }),
        )
        .layer(SessionsLayer::per_request_transaction(
            registry.clone(),
            TxOptions::new(),
        ));
    let base = serve(app).await;
    let res = client().post(format!("{base}/twice")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.headers()[COMMIT_FAILED_HEADER], "failed");
    let body = res.text().await.unwrap();
    assert!(body.contains("failed to commit"), "{body}");
    assert!(
        body.contains("duplicate key"),
        "the server's reason: {body}"
    );
    assert_eq!(db.plain_count("SELECT count(*) FROM items").await, 0);
    assert_eq!(db.plain_count("SELECT count(*) FROM once").await, 0);
    db.wait_no_transactions().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_gets_its_transaction_rolled_back_at_once() {
    let db = Db::new().await;
    let registry = db.three_engines().await;
    let (handler, updated, mut probe) = common::SlowHandler::setup(&db).await;
    let app = Router::new()
        .route(
            "/slow",
            get(move |db: DbExtractor| {
                let handler = handler.clone();
                // A slow call to something else; the client gives up first.
                async move {
                    handler.run(&db).await;
                    "too late"
                }
            }),
        )
        .route(
            "/count",
            get(|db: DbExtractor| async move {
                let row = db
                    .writer()
                    .unwrap()
                    .query_one("SELECT n FROM counters WHERE id = 1", &[])
                    .await
                    .unwrap();
                row.get::<_, i32>(0).to_string()
            }),
        )
        .layer(SessionsLayer::per_request_transaction(
            registry.clone(),
            TxOptions::new(),
        ));
    let base = serve(app).await;

    let request = tokio::spawn(client().get(format!("{base}/slow")).send());
    let Disconnect {
        counter: n,
        lock_released,
        clean,
        ..
    } = disconnect_mid_request(&db, request, updated, Duration::from_secs(5)).await;
    assert_eq!(
        n, 10,
        "the request's +1 was rolled back, only the +10 counts"
    );
    eprintln!(
        "client disconnect -> row lock released in {lock_released:?}, no backend idle in transaction after {clean:?}"
    );
    assert!(lock_released < Duration::from_secs(1), "{lock_released:?}");
    assert!(clean < Duration::from_secs(1), "{clean:?}");

    // The server dropped the handler's future; it did not run to its end.
    assert!(!probe.completed().await, "the handler was cancelled");
    assert_eq!(registry.stats().open_transactions, 0);
    // The connection came back clean: the next request runs on the pool.
    let body = client()
        .get(format!("{base}/count"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "10");
    db.wait_no_transactions().await;
}

#[tokio::test]
async fn the_request_ends_when_the_response_is_ready() {
    let db = Db::new().await;
    let registry = db.three_engines().await;
    let kept: Arc<Mutex<Option<DbExtractor>>> = Arc::default();
    let slot = kept.clone();
    let app = Router::new()
        .route(
            "/keep",
            get(move |db: DbExtractor| async move {
                db.writer()
                    .unwrap()
                    .execute("INSERT INTO items(name) VALUES ('autocommit')", &[])
                    .await
                    .unwrap();
                // A clone that outlives the handler, as a spawned task's would.
                *slot.lock().unwrap() = Some(db.clone());
                "ok"
            }),
        )
        .layer(SessionsLayer::new(registry.clone()));
    let base = serve(app).await;
    let res = client().get(format!("{base}/keep")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(db.plain_names().await, ["autocommit"]);

    let late = kept.lock().unwrap().take().unwrap();
    let writer = late.report().engines.into_iter().next().unwrap();
    assert_eq!(
        (writer.name.as_str(), writer.state),
        ("writer", EngineState::End)
    );
    let err = late
        .writer()
        .unwrap()
        .execute("INSERT INTO items(name) VALUES ('late')", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    assert_eq!(db.plain_names().await, ["autocommit"]);
}

#[tokio::test]
async fn the_extractor_without_the_layer_is_a_500_that_says_why() {
    let app = Router::new().route("/", get(|_db: DbExtractor| async { "unreachable" }));
    let base = serve(app).await;
    let res = client().get(&base).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = res.text().await.unwrap();
    assert!(body.contains("SessionsLayer"), "{body}");
}

#[derive(Debug)]
struct RequestPath(String);

#[tokio::test]
async fn on_request_fills_the_info_stash_that_sessions_deep_down_can_read() {
    let db = Db::new().await;
    let registry = db.three_engines().await;
    let app = Router::new()
        .route(
            "/who/{x}",
            get(|db: DbExtractor| async move {
                // Code deep down gets only a Session, and finds the request.
                let session = db.logger().unwrap();
                session.info::<RequestPath>().unwrap().0.clone()
            }),
        )
        .layer(SessionsLayer::new(registry).on_request(|parts, sessions| {
            sessions
                .info_mut()
                .insert(RequestPath(parts.uri.path().to_owned()))
        }));
    let base = serve(app).await;
    let body = client()
        .get(format!("{base}/who/42"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "/who/42");
}

/// The layer on a plain tower service (no HTTP server): an `Err` from the
/// service rolls back, and a response carries the request's final report.
#[tokio::test]
async fn a_service_error_rolls_back_and_responses_carry_the_final_report() {
    use axum::http::{Request, Response};
    use tower::{Layer, ServiceExt};

    let db = Db::new().await;
    let registry = db.three_engines().await;
    let layer = SessionsLayer::per_request_transaction(registry.clone(), TxOptions::new());
    let service = layer.layer(tower::service_fn(|req: Request<()>| async move {
        let db = RequestSessions::from_extensions(req.extensions())
            .unwrap()
            .clone();
        let name = req.uri().path().trim_start_matches('/').to_owned();
        db.writer()
            .unwrap()
            .execute("INSERT INTO items(name) VALUES ($1)", &[&name])
            .await
            .unwrap();
        if name == "fails" {
            Err("the service failed")
        } else {
            Ok(Response::new(String::from("ok")))
        }
    }));

    let err = service
        .clone()
        .oneshot(Request::get("/fails").body(()).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err, "the service failed");
    let res = service
        .oneshot(Request::get("/works").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(db.plain_names().await, ["works"]);
    let report = res.extensions().get::<SessionsReport>().unwrap();
    let writer = &report.engines[0];
    assert_eq!((writer.state, writer.statements), (EngineState::End, 1));
    assert!(writer.open_transactions.is_empty());
    db.wait_no_transactions().await;
}

/// `pgassist::Error` returned from axum handlers with `?`: each status
/// mapping over real HTTP, with a body that is the reason phrase only —
/// no SQL, no parameter, no server message, no engine name.
#[tokio::test]
async fn errors_answer_with_their_status_and_no_details() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute("CREATE UNIQUE INDEX items_name ON items(name); INSERT INTO items(name) VALUES ('secret-key-value')")
        .await
        .unwrap();
    let registry = Registry::builder()
        .engine(
            "writer",
            db.config()
                .max_size(1)
                .connection_timeout(Duration::from_millis(300)),
        )
        .engine(
            "down",
            pgassist::EngineConfig::from_url("postgres://ann:Pw-secret@127.0.0.1:1/x")
                .unwrap()
                .connection_timeout(Duration::from_millis(300)),
        )
        .default_engine("writer")
        // The "down" engine is down on purpose: start without checking it.
        .lazy()
        .build()
        .await
        .unwrap();
    let app = Router::new()
        .route(
            "/missing",
            get(|db: DbExtractor| async move {
                let row = db
                    .writer()?
                    .query_one("SELECT name FROM items WHERE name = $1", &[&"secret-param"])
                    .await?;
                Ok::<_, Error>(row.try_get::<_, String>(0)?)
            }),
        )
        .route(
            "/duplicate",
            post(|db: DbExtractor| async move {
                db.writer()?
                    .execute(
                        "INSERT INTO items(name) VALUES ($1)",
                        &[&"secret-key-value"],
                    )
                    .await?;
                Ok::<_, Error>("created")
            }),
        )
        .route(
            "/serialization",
            post(|db: DbExtractor| async move {
                db.writer()?
                    .batch_execute(
                        "DO $$ BEGIN RAISE EXCEPTION 'secret-message' \
                         USING ERRCODE = 'serialization_failure'; END $$",
                    )
                    .await?;
                Ok::<_, Error>("done")
            }),
        )
        .route(
            "/busy",
            get(|db: DbExtractor| async move {
                db.writer()?.query("SELECT 'secret-busy'", &[]).await?;
                Ok::<_, Error>("ran")
            }),
        )
        .route(
            "/down",
            get(|db: DbExtractor| async move {
                db.get("down")?.query("SELECT 'secret-down'", &[]).await?;
                Ok::<_, Error>("ran")
            }),
        )
        .route(
            "/broken",
            get(|db: DbExtractor| async move {
                db.writer()?.query("SELEC 'secret-sql'", &[]).await?;
                Ok::<_, Error>("ran")
            }),
        )
        .route(
            "/decode",
            get(|db: DbExtractor| async move {
                let row = db.writer()?.query_one("SELECT 1::int8", &[]).await?;
                Ok::<_, Error>(row.try_get::<_, i32>(0)?.to_string())
            }),
        )
        .layer(SessionsLayer::new(registry.clone()));
    let base = serve(app).await;
    let http = client();

    let check = |status: u16, body: &str| {
        assert!(!body.contains("secret"), "{status}: {body}");
        assert!(!body.contains("SELEC"), "{status}: {body}");
        assert!(
            !body.contains("writer") && !body.contains("down"),
            "{status}: {body}"
        );
    };
    for (method, path, status, reason) in [
        ("GET", "/missing", 404, "Not Found"),
        ("POST", "/duplicate", 409, "Conflict"),
        ("POST", "/serialization", 409, "Conflict"),
        ("GET", "/down", 503, "Service Unavailable"),
        ("GET", "/broken", 500, "Internal Server Error"),
        ("GET", "/decode", 500, "Internal Server Error"),
    ] {
        let request = match method {
            "GET" => http.get(format!("{base}{path}")),
            _ => http.post(format!("{base}{path}")),
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body = response.text().await.unwrap();
        assert_eq!(body, reason, "{path}");
        check(status, &body);
    }

    // Pool timeout: the only writer connection is held by a transaction
    // outside the request.
    let holder = registry.session("writer").unwrap();
    let held = holder.begin().await.unwrap();
    held.execute("SELECT 1", &[]).await.unwrap();
    let response = http.get(format!("{base}/busy")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body = response.text().await.unwrap();
    assert_eq!(body, "Service Unavailable");
    check(503, &body);
    held.rollback().await.unwrap();
    let response = http.get(format!("{base}/busy")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);

    // The status mapping as a function, for other frameworks.
    use pgassist::integrations::axum::status_of;
    assert_eq!(
        status_of(&Error::NotFound { engine: "w".into() }),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(&Error::TooManyRows { engine: "w".into() }),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        db.plain_count("SELECT count(*) FROM items").await,
        1,
        "the duplicate was not inserted"
    );
}

/// Registry stats serialise (feature `serde`) for a health endpoint.
#[tokio::test]
async fn stats_serialize_to_json() {
    let db = Db::new().await;
    let registry = db.registry(|c| c).await;
    registry
        .session("writer")
        .unwrap()
        .query("SELECT 1", &[])
        .await
        .unwrap();
    let json = serde_json::to_value(registry.stats()).unwrap();
    assert_eq!(json["engines"][0]["name"], "writer");
    assert_eq!(json["engines"][0]["statements"], 1);
    assert_eq!(json["open_transactions"], 0);
}
