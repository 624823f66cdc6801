//! A tower [`Layer`] that gives every request its [`Sessions`].
//!
//! ```no_run
//! # async fn demo(registry: pgassist::Registry) {
//! use pgassist::integrations::tower::{RequestSessions, SessionsLayer};
//! use pgassist::TxOptions;
//!
//! // Autocommit sessions for every request:
//! let layer = SessionsLayer::new(registry.clone());
//! // Or one transaction per request and engine, committed on 1xx-3xx:
//! let tx_layer = SessionsLayer::per_request_transaction(registry, TxOptions::new());
//! # let _ = (layer, tx_layer);
//! // A service behind either finds the container in the request:
//! fn handle(req: &http::Request<()>) {
//!     let db: &RequestSessions = req.extensions().get().expect("SessionsLayer");
//!     let _writer = db.writer();
//! }
//! # }
//! ```
//!
//! The request ends when the inner service's future resolves: the layer
//! calls [`Sessions::finish`] before the response goes out, so no
//! connection or transaction is held while the body streams to the client,
//! and a clone of the handle kept past the response (by a spawned task, say)
//! gets [`Error::Closed`](crate::Error::Closed) for any later statement.
//! When the server drops the request instead (the client disconnected), the
//! handler's future and the layer's are dropped with their handles, and the
//! container's `Drop` sends the ROLLBACK at once.
//!
//! A response that went through the layer carries the request's final
//! [`SessionsReport`](crate::SessionsReport) in its extensions, for an outer layer that logs what
//! each request used.
//!
//! ## Causal tokens in headers
//!
//! With the cargo feature `causal` and a registry key,
//! [`SessionsLayer::causal_headers`] carries read-your-writes from one
//! request to the next without handler code: a response whose request
//! committed on a primary with replicas gets the request's
//! [causal token](crate::Sessions::causal_token) in the response header,
//! and a request that brings a token in the request header reads after
//! those writes ([`Sessions::observe_causal_token`]).
//!
//! A token that is refused (forged, altered, garbled, signed with a key
//! no longer accepted) is ignored: the request runs as one without a token,
//! and finds the refusal in its extensions as [`CausalTokenRejected`] — a
//! handler that prefers to answer 400 can. Ignoring is the default because
//! a token is a hint about freshness, not a credential: a forged one gains
//! its sender nothing, and a stale cookie signed with a retired key must not
//! break a user's next page. Refusals are not logged: a client could flood
//! the log with them.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::tower::{Layer, Service};
use futures::future::BoxFuture;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};

use crate::{Registry, Sessions, TxOptions};

/// Header set on the 500 response that replaces a response whose request
/// transaction failed to commit.
pub const COMMIT_FAILED_HEADER: &str = "x-pgassist-commit";

/// A request's [`Sessions`], shared between the middleware and the handler.
///
/// Cheap to clone (an `Arc`); derefs to [`Sessions`]. [`SessionsLayer`] puts
/// one in every request's extensions.
#[derive(Clone)]
pub struct RequestSessions(Arc<Sessions>);

impl RequestSessions {
    /// Shares `sessions`. [`SessionsLayer`] does this for every request;
    /// other integrations can too.
    pub fn new(sessions: Sessions) -> RequestSessions {
        RequestSessions(Arc::new(sessions))
    }

    /// The handle [`SessionsLayer`] put in these request extensions, if any.
    pub fn from_extensions(extensions: &http::Extensions) -> Option<&RequestSessions> {
        extensions.get()
    }
}

impl Deref for RequestSessions {
    type Target = Sessions;

    fn deref(&self) -> &Sessions {
        &self.0
    }
}

impl fmt::Debug for RequestSessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RequestSessions").field(&*self.0).finish()
    }
}

type OnRequest = Arc<dyn Fn(&http::request::Parts, &mut Sessions) + Send + Sync>;

/// The default name of both causal-token headers (see
/// [`SessionsLayer::causal_headers`]): the same name in and out, so that a
/// service can pass on what it received.
#[cfg(feature = "causal")]
pub const CAUSAL_TOKEN_HEADER: &str = "x-pgassist-causal";

/// In a request's extensions when its causal-token header was refused and
/// ignored (see the [module docs](self#causal-tokens-in-headers)).
#[cfg(feature = "causal")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CausalTokenRejected(pub crate::CausalTokenError);

/// The header pair of [`SessionsLayer::causal_headers`].
#[cfg(feature = "causal")]
#[derive(Clone, Debug)]
struct CausalHeaders {
    request: http::HeaderName,
    response: http::HeaderName,
}

/// The [`Layer`]: wraps a service in [`SessionsService`].
#[derive(Clone)]
pub struct SessionsLayer {
    registry: Registry,
    per_request_tx: Option<TxOptions>,
    on_request: Option<OnRequest>,
    #[cfg(feature = "causal")]
    causal: Option<CausalHeaders>,
}

impl fmt::Debug for SessionsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionsLayer")
            .field("registry", &self.registry)
            .field("per_request_tx", &self.per_request_tx)
            .field("on_request", &self.on_request.is_some())
            .finish()
    }
}

impl SessionsLayer {
    /// Autocommit sessions per request ([`Registry::sessions`]).
    pub fn new(registry: Registry) -> SessionsLayer {
        SessionsLayer {
            registry,
            per_request_tx: None,
            on_request: None,
            #[cfg(feature = "causal")]
            causal: None,
        }
    }

    /// Transaction-per-request mode ([`Registry::sessions_in_transaction`],
    /// like Django's ATOMIC_REQUESTS or pyramid_tm): every engine the request
    /// touches runs in one transaction with `options`, begun on first use.
    /// When the inner service returns, the layer commits them on a 1xx–3xx
    /// status and rolls them back on a 4xx / 5xx status or an error. A
    /// commit that fails turns the response into a 500 (text body saying
    /// why, header [`COMMIT_FAILED_HEADER`]); it is never reported as
    /// success. The engines are committed one after another, not atomically
    /// across databases.
    pub fn per_request_transaction(registry: Registry, options: TxOptions) -> SessionsLayer {
        SessionsLayer {
            registry,
            per_request_tx: Some(options),
            on_request: None,
            #[cfg(feature = "causal")]
            causal: None,
        }
    }

    /// Runs `f` on every new container before the request goes on, with the
    /// request's head: to stash a request id in the info stash
    /// ([`Sessions::info_mut`]), for example.
    pub fn on_request(
        mut self,
        f: impl Fn(&http::request::Parts, &mut Sessions) + Send + Sync + 'static,
    ) -> SessionsLayer {
        self.on_request = Some(Arc::new(f));
        self
    }

    /// Causal tokens in headers (see the
    /// [module docs](self#causal-tokens-in-headers)): a token in the
    /// `request` header is observed before the handler runs; a request that
    /// wrote gets its token in the `response` header. Use
    /// [`CAUSAL_TOKEN_HEADER`] for both unless a client expects other names.
    ///
    /// [`crate::Error::CausalToken`] when the registry has no key
    /// ([`crate::RegistryBuilder::causal_key`]): found when the layer is
    /// built, not on every request.
    #[cfg(feature = "causal")]
    pub fn causal_headers(
        mut self,
        request: http::HeaderName,
        response: http::HeaderName,
    ) -> crate::Result<SessionsLayer> {
        // A container that wrote nothing asks nothing of the keys but this.
        self.registry.sessions().causal_token()?;
        self.causal = Some(CausalHeaders { request, response });
        Ok(self)
    }
}

impl<S> Layer<S> for SessionsLayer {
    type Service = SessionsService<S>;

    fn layer(&self, inner: S) -> SessionsService<S> {
        SessionsService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`SessionsLayer`] produces; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct SessionsService<S> {
    inner: S,
    layer: SessionsLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionsService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let layer = &self.layer;
        let mut sessions = match &layer.per_request_tx {
            Some(options) => layer.registry.sessions_in_transaction(options.clone()),
            None => layer.registry.sessions(),
        };
        let mut req = req;
        #[cfg(feature = "causal")]
        if let Some(headers) = &layer.causal {
            observe_tokens(&headers.request, &mut req, &sessions);
        }
        if let Some(on_request) = &layer.on_request {
            let (parts, body) = req.into_parts();
            on_request(&parts, &mut sessions);
            req = Request::from_parts(parts, body);
        }
        let shared = RequestSessions::new(sessions);
        req.extensions_mut().insert(shared.clone());
        let transactional = layer.per_request_tx.is_some();
        #[cfg(feature = "causal")]
        let causal_response = layer.causal.as_ref().map(|h| h.response.clone());
        // The handler's future owns the request and so its handle: when it
        // completes, that handle is gone; when it is dropped (the client went
        // away), this future is dropped with it and the container rolls back.
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            // Commit on 1xx-3xx only (not on a nonstandard status >= 600).
            let commit = transactional && matches!(&result, Ok(r) if r.status().as_u16() < 400);
            match (shared.finish(commit).await, result) {
                (Ok(report), Ok(mut response)) => {
                    response.extensions_mut().insert(report);
                    #[cfg(feature = "causal")]
                    if let Some(name) = causal_response {
                        hand_on_token(&shared, name, &mut response);
                    }
                    Ok(response)
                }
                (Err(e), Ok(_)) if commit => Ok(commit_failed(&e)),
                // A rollback that failed: the response already reports a
                // failure, and a connection whose rollback is in doubt is
                // discarded, which makes the server roll back.
                (Err(_), result) => result,
                (Ok(_), Err(e)) => Err(e),
            }
        })
    }
}

/// The most tokens one request's header may bring: each costs a check of
/// its signature under every key, and a client could send thousands.
#[cfg(feature = "causal")]
const MAX_TOKENS_PER_REQUEST: usize = 8;

/// Observes the tokens of header `name`: every value (a proxy may have
/// added one), and in each every comma-separated item — a proxy may also
/// have folded two header lines into one (RFC 9110, 5.3), and a token
/// never holds a comma. A refused one is noted in the request's
/// extensions; past [`MAX_TOKENS_PER_REQUEST`], the rest are refused
/// unread.
#[cfg(feature = "causal")]
fn observe_tokens<B>(name: &http::HeaderName, req: &mut Request<B>, sessions: &Sessions) {
    use crate::{CausalTokenError, Error};
    let mut rejected = None;
    let mut seen = 0;
    for value in req.headers().get_all(name) {
        let Ok(value) = value.to_str() else {
            rejected.get_or_insert(CausalTokenError::Malformed(
                "header value is not visible ASCII",
            ));
            continue;
        };
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            seen += 1;
            let refusal = if seen > MAX_TOKENS_PER_REQUEST {
                CausalTokenError::Malformed("too many tokens in one request")
            } else {
                match sessions.observe_causal_token(token) {
                    Ok(_) => continue,
                    Err(Error::CausalToken(e)) => e,
                    Err(_) => CausalTokenError::Malformed("unreadable"),
                }
            };
            rejected.get_or_insert(refusal);
        }
    }
    if let Some(e) = rejected {
        req.extensions_mut().insert(CausalTokenRejected(e));
    }
}

/// Puts the request's causal token in header `name` when it wrote.
#[cfg(feature = "causal")]
fn hand_on_token<B>(sessions: &Sessions, name: http::HeaderName, response: &mut Response<B>) {
    if !sessions.wrote() {
        return;
    }
    // The key was checked when the layer was built; a token is ASCII.
    if let Ok(Some(token)) = sessions.causal_token() {
        if let Ok(value) = HeaderValue::from_str(&token) {
            response.headers_mut().insert(name, value);
        }
    }
}

/// The 500 that replaces a response whose request transaction did not commit.
fn commit_failed<B: From<String>>(error: &crate::Error) -> Response<B> {
    let mut body = String::from(
        "500 Internal Server Error: the request's database transaction failed to commit, \
         so nothing it wrote was saved: ",
    );
    // The error and its causes (the server's message is in a source), each
    // once: a wrapper's text often ends with its source's.
    body.push_str(&error.to_string());
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if !body.ends_with(&text) {
            body.push_str(": ");
            body.push_str(&text);
        }
        cause = e.source();
    }
    body.push('\n');
    let mut response = Response::new(B::from(body));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(COMMIT_FAILED_HEADER, HeaderValue::from_static("failed"));
    response
}
