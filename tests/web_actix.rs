//! examples/actix_app.rs over real HTTP: actix-web on 127.0.0.1:0, a reqwest
//! client, and the server's side seen through a plain connection and
//! `pg_stat_activity`. Needs the feature `serde`.

mod common;

#[path = "../examples/actix_app.rs"]
#[allow(dead_code)]
mod actix_app;

use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::middleware::from_fn;
use actix_web::{App, HttpResponse, HttpServer, web};
use common::{Db, Disconnect, disconnect_mid_request};

/// An actix server with the example's middleware and routes plus `extra`,
/// one worker, on a free loopback port. Stop it with the handle.
fn serve(
    registry: pgassist::Registry,
    timeout: Duration,
    extra: impl Fn(&mut web::ServiceConfig) + Clone + Send + 'static,
) -> (String, ServerHandle) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(registry.clone()))
            .app_data(web::Data::new(actix_app::RequestTimeout(timeout)))
            .wrap(from_fn(actix_app::sessions_per_request))
            .configure(actix_app::routes)
            .configure(extra.clone())
    })
    .listen(listener)
    .unwrap()
    .workers(1)
    .disable_signals()
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    (format!("http://{addr}"), handle)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn actix_example_lists_creates_and_reports_over_http() {
    let db = Db::new().await;
    let registry = actix_app::connect(&db.db.url, &db.app).await.unwrap();
    actix_app::create_schema(&registry).await.unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = actix_app::server(registry.clone(), listener).unwrap();
    let handle = server.handle();
    tokio::spawn(server);
    common::users_api::exercise(&base, &db).await;
    db.wait_no_transactions().await;
    assert_eq!(registry.stats().open_transactions, 0);
    handle.stop(false).await;
}

async fn write_then_answer(db: actix_app::Db, path: web::Path<(u16, String)>) -> HttpResponse {
    let (status, name) = path.into_inner();
    common::insert_on_writer_and_logger(&db, &name).await;
    if name == "deferred" {
        // Succeeds now; the deferred unique check fails at COMMIT.
        db.writer()
            .unwrap()
            .execute("INSERT INTO once VALUES (1), (1)", &[])
            .await
            .unwrap();
    }
    HttpResponse::build(StatusCode::from_u16(status).unwrap()).body(format!("answered {status}"))
}

#[tokio::test]
async fn actix_middleware_commits_on_success_and_rolls_back_on_error_statuses() {
    let db = Db::new().await;
    db.plain()
        .await
        .batch_execute("CREATE TABLE once (x int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        .await
        .unwrap();
    let registry = actix_app::connect(&db.db.url, &db.app).await.unwrap();
    let (base, handle) = serve(registry.clone(), Duration::from_secs(30), |cfg| {
        cfg.route("/write/{status}/{name}", web::post().to(write_then_answer));
    });
    let http = client();
    for (status, committed) in [(200, true), (201, true), (400, false), (500, false)] {
        let res = http
            .post(format!("{base}/write/{status}/s{status}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status);
        let visible = db
            .plain_count(&format!(
                "SELECT count(*) FROM items WHERE name LIKE 's{status}-%'"
            ))
            .await;
        assert_eq!(visible, if committed { 2 } else { 0 }, "status {status}");
    }

    // A 201 whose commit fails is a 500 that says why; nothing is saved.
    let res = http
        .post(format!("{base}/write/201/deferred"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 500);
    assert_eq!(res.headers()["x-pgassist-commit"], "failed");
    let body = res.text().await.unwrap();
    assert!(
        body.contains("failed to commit") && body.contains("duplicate key"),
        "{body}"
    );
    assert_eq!(
        db.plain_count("SELECT count(*) FROM items WHERE name LIKE 'deferred-%'")
            .await,
        0
    );
    db.wait_no_transactions().await;
    assert_eq!(registry.stats().open_transactions, 0);
    handle.stop(false).await;
}

/// actix-web keeps running a handler whose client disconnected (upstream
/// issues 1313, 3029, 3462), so the example's middleware bounds every
/// request: past its deadline the handler is dropped and its transaction
/// rolled back at once. Here the deadline is 2 s and the handler would
/// sleep 30 s.
#[tokio::test]
async fn actix_client_that_disconnects_mid_request_is_rolled_back_at_the_deadline() {
    const DEADLINE: Duration = Duration::from_secs(2);
    let db = Db::new().await;
    let registry = actix_app::connect(&db.db.url, &db.app).await.unwrap();
    let (handler, updated, mut probe) = common::SlowHandler::setup(&db).await;
    let (base, handle) = serve(registry.clone(), DEADLINE, move |cfg| {
        let handler = handler.clone();
        cfg.route(
            "/slow",
            web::post().to(move |db: actix_app::Db| {
                let handler = handler.clone();
                async move {
                    handler.run(&db).await;
                    HttpResponse::Ok().body("too late")
                }
            }),
        );
    });

    let sent = Instant::now();
    let request = tokio::spawn(client().post(format!("{base}/slow")).send());
    let Disconnect {
        gave_up,
        counter: n,
        lock_released,
        clean,
    } = disconnect_mid_request(&db, request, updated, Duration::from_secs(10)).await;
    assert_eq!(n, 10, "the request's +1 was rolled back");
    // Measured from when the request was sent: the deadline counts from there.
    let after_disconnect = lock_released;
    let lock_released = gave_up - sent + lock_released;
    let clean = gave_up - sent + clean;
    eprintln!(
        "actix: deadline {DEADLINE:?}; row lock released {lock_released:?} after the request was sent \
         ({after_disconnect:?} after the client disconnected); no backend idle in transaction after {clean:?}"
    );
    assert!(
        lock_released < DEADLINE + Duration::from_secs(1),
        "{lock_released:?}"
    );
    assert!(clean < DEADLINE + Duration::from_secs(1), "{clean:?}");
    assert!(
        !probe.completed().await,
        "the middleware dropped the handler"
    );
    assert_eq!(registry.stats().open_transactions, 0);
    handle.stop(false).await;
}
