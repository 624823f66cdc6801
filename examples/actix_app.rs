//! The users service of `axum_app`, on actix-web, through pgassist's
//! framework-agnostic API: no tower, a small middleware of our own.
//!
//! ```text
//! cargo run --example actix_app --features serde
//! curl -i -X POST localhost:3000/users -H 'content-type: application/json' -d '{"name":"ann"}'
//! curl localhost:3000/users
//! curl localhost:3000/debug/db
//! open http://localhost:3000/debug/db.html
//! ```
//!
//! The middleware, [`sessions_per_request`], does per request what the
//! tower layer does: a safe method (GET, HEAD, OPTIONS) gets autocommit
//! sessions (`registry.sessions()`), any other one a transaction per engine
//! (`registry.sessions_in_transaction`), committed by `Sessions::finish` on
//! a 1xx-3xx answer and rolled back on 4xx / 5xx. The container sits in the
//! request extensions as an `Arc<Sessions>`; handlers take it with
//! `web::ReqData<Arc<Sessions>>`.
//!
//! Unlike hyper (axum), actix-web does not drop a handler whose client went
//! away: the handler runs on, holding its transaction. So the middleware
//! gives every request a deadline ([`RequestTimeout`], 30 s unless the app
//! sets one): past it, the handler is dropped, the request's transactions
//! are rolled back at once, and the answer is a 503.
//!
//! Uses `DATABASE_URL` when set; otherwise starts a throwaway PostgreSQL.
//! Listens on `BIND` (default 127.0.0.1:3000).

mod shared;

use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpMessage, HttpResponse, HttpServer, ResponseError, web};
use pgassist::{Registry, Sessions, TxOptions};
pub use shared::{NewUser, connect, create_schema};

/// The request's sessions, as handlers extract them.
pub type Db = web::ReqData<Arc<Sessions>>;

/// How long a request may run; set with `App::app_data(web::Data::new(..))`.
#[derive(Clone, Copy, Debug)]
pub struct RequestTimeout(pub Duration);

/// The deadline of a request when the app sets none.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-request sessions: created before the handler, finished after it.
pub async fn sessions_per_request(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let registry = req
        .app_data::<web::Data<Registry>>()
        .expect("the app has web::Data<Registry>")
        .clone();
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let sessions = Arc::new(if safe {
        registry.sessions()
    } else {
        registry.sessions_in_transaction(TxOptions::new())
    });
    req.extensions_mut().insert(sessions.clone());
    let deadline = req
        .app_data::<web::Data<RequestTimeout>>()
        .map_or(DEFAULT_REQUEST_TIMEOUT, |t| t.0);

    let result = match tokio::time::timeout(deadline, next.call(req)).await {
        Ok(result) => result,
        Err(_) => {
            // The handler was dropped (its client may be long gone): roll
            // back now, even if a clone of the container is still around.
            let _ = sessions.finish(false).await;
            return Err(actix_web::error::ErrorServiceUnavailable(format!(
                "the request took longer than {deadline:?}; its database work was rolled back"
            )));
        }
    };

    // The handler is done. `finish` takes &self: the clone in the request
    // extensions lives on until the response is written, but can run
    // nothing more.
    let commit = !safe && matches!(&result, Ok(res) if res.status().as_u16() < 400);
    let finished = sessions.finish(commit).await;
    let res = result?;
    match finished {
        Err(e) if commit => Ok(res.into_response(
            HttpResponse::InternalServerError()
                .insert_header(("x-pgassist-commit", "failed"))
                .body(format!(
                    "500 Internal Server Error: the request's database transaction failed to commit, so nothing it wrote was saved: {}\n",
                    shared::error_message(&e)
                )),
        )),
        _ => Ok(res.map_into_boxed_body()),
    }
}

/// The routes; the app around them needs `web::Data<Registry>` and
/// [`sessions_per_request`].
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/users")
            .route(web::get().to(list_users))
            .route(web::post().to(create_user)),
    )
    .route("/debug/db", web::get().to(debug_json))
    .route("/debug/db.html", web::get().to(debug_html));
}

/// The server on `listener`, with two workers.
pub fn server(registry: Registry, listener: std::net::TcpListener) -> std::io::Result<Server> {
    Ok(HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(registry.clone()))
            .wrap(from_fn(sessions_per_request))
            .configure(routes)
    })
    .listen(listener)?
    .workers(2)
    .run())
}

/// `GET /users`: through the reader, in autocommit.
async fn list_users(db: Db) -> Result<HttpResponse, AppError> {
    Ok(HttpResponse::Ok().json(shared::list_users(&db).await?))
}

/// `POST /users`: the user through the writer and an audit row through the
/// logger, in this request's transactions.
async fn create_user(db: Db, new: web::Json<NewUser>) -> Result<HttpResponse, AppError> {
    Ok(HttpResponse::Created().json(shared::create_user(&db, &new).await?))
}

/// `GET /debug/db`: this request's `Sessions::report()` as JSON.
async fn debug_json(db: Db) -> Result<HttpResponse, AppError> {
    shared::ping_all(&db).await?;
    Ok(HttpResponse::Ok().json(db.report()))
}

/// `GET /debug/db.html`: the same report as a small HTML page.
async fn debug_html(db: Db) -> Result<HttpResponse, AppError> {
    shared::ping_all(&db).await?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(shared::render_html(&db.report())))
}

/// An error answer: a status and a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct AppError(shared::Failure);

impl<E: Into<shared::Failure>> From<E> for AppError {
    fn from(e: E) -> AppError {
        AppError(e.into())
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(serde_json::json!({ "error": self.0.message }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = shared::database_url().await?;
    let registry = connect(&url, "actix_app").await?;
    create_schema(&registry).await?;
    let listener = std::net::TcpListener::bind(shared::bind_addr())?;
    println!("listening on http://{}", listener.local_addr()?);
    server(registry, listener)?.await?;
    Ok(())
}
