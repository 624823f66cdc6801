//! LISTEN / NOTIFY: a listener on a dedicated connection outside the pool.
//!
//! A pooled connection cannot listen (`LISTEN` is session state, refused in
//! autocommit), and should not: notifications arrive between statements,
//! while nobody holds the connection. [`Engine::listener`] opens a
//! connection of its own, runs `LISTEN` for each channel, and yields the
//! notifications as a [`Stream`]. When that connection is lost (server
//! restart, `pg_terminate_backend`, network), the listener reconnects by
//! itself — at once, then after 50 ms, backing off to one attempt a second
//! — and runs `LISTEN` again. Each of its connections gets what a pooled
//! connection gets: the engine's connect-time settings
//! ([`EngineConfig::setting`](crate::EngineConfig::setting), TLS,
//! `application_name`) and its
//! [`after_connect`](crate::EngineConfig::after_connect) hook, run before
//! `LISTEN` (a hook that fails counts as a failed connect).
//!
//! What can be missed: PostgreSQL keeps no notification for a session that
//! is not listening, so a notification committed between the loss of the
//! old connection and the `LISTEN` on the new one is never delivered. Code
//! that must not miss work should treat a reconnect
//! ([`Listener::reconnects`] going up) as "re-read the state", e.g. poll the
//! jobs table once. Notifications received before the loss are delivered,
//! in order; each one is delivered at most once.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};

use super::engine::Engine;
use crate::config::EngineConfig;
use crate::error::{Error, Result};

/// The messages of a listener's connection (notifications, notices), read
/// by the listener's task; the stream ends when the connection does.
type Messages = BoxStream<'static, std::result::Result<AsyncMessage, tokio_postgres::Error>>;

/// The first wait before reconnecting, and the longest.
const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

impl Engine {
    /// Listens on `channels` on a dedicated connection (outside the pool),
    /// reconnecting and listening again by itself after the connection is
    /// lost. `LISTEN` has run on the server when this returns, so a
    /// notification committed after that is delivered. Channel names are
    /// identifiers, quoted as given (`"Jobs"` and `"jobs"` differ).
    ///
    /// ```no_run
    /// # async fn demo(registry: pgassist::Registry) -> Result<(), pgassist::Error> {
    /// use futures::StreamExt;
    /// let mut listener = registry.engine("writer")?.listener(&["jobs"]).await?;
    /// registry.session("writer")?.notify("jobs", "42").await?;
    /// while let Some(n) = listener.next().await {
    ///     println!("{}: {}", n.channel(), n.payload());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn listener(&self, channels: &[&str]) -> Result<Listener> {
        let sql = channels
            .iter()
            .map(|c| crate::sql::helpers::quote_ident(c).map(|q| format!("LISTEN {q}")))
            .collect::<Result<Vec<_>>>()?
            .join("; ");
        if sql.is_empty() {
            return Err(Error::Usage("a listener needs at least one channel".into()));
        }
        let name: Arc<str> = self.name().into();
        let config = self.config().clone();
        let (client, messages, early) = establish(&name, &config, &sql).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        for n in early {
            let _ = tx.send(n);
        }
        let reconnects = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            name,
            config,
            sql,
            tx,
            client,
            messages,
            reconnects.clone(),
        ));
        Ok(Listener {
            rx,
            reconnects,
            task,
        })
    }
}

/// Notifications on the channels a listener was made for, in the order the
/// server sent them. Dropping it closes its connection.
#[derive(Debug)]
pub struct Listener {
    rx: mpsc::UnboundedReceiver<Notification>,
    reconnects: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// How many times the connection was lost and made again (with
    /// `LISTEN` run again). Notifications sent while it was down are lost.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

impl Stream for Listener {
    type Item = Notification;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects with the engine's connect-time settings, runs its
/// `after_connect` hook and the LISTEN statements while reading the
/// connection, and returns the client, its messages and any notification that came in
/// before `LISTEN` was answered.
async fn establish(
    engine: &str,
    config: &EngineConfig,
    sql: &str,
) -> Result<(Client, Messages, Vec<Notification>)> {
    let (client, mut messages) = connect(engine, config).await?;
    let mut early = Vec::new();
    {
        // The engine's hook runs first, as on every pooled connection (the
        // connect-time settings came with the startup packet). The
        // connection's messages are read meanwhile: nothing moves without.
        let listen = async {
            if let Some(hook) = &config.after_connect {
                hook(&client).await?;
            }
            client.batch_execute(sql).await
        };
        tokio::pin!(listen);
        loop {
            tokio::select! {
                done = &mut listen => {
                    done.map_err(|e| Error::from_pg(engine, e))?;
                    break;
                }
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => early.push(n),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(Error::from_pg(engine, e)),
                    None => {
                        return Err(Error::Closed {
                            engine: engine.to_owned(),
                            reason: "the listener's connection closed during LISTEN".into(),
                        });
                    }
                },
            }
        }
    }
    Ok((client, messages, early))
}

async fn connect(engine: &str, config: &EngineConfig) -> Result<(Client, Messages)> {
    let pg = config.connect_config();
    let connect_error =
        |e: tokio_postgres::Error| crate::error::ConnectFailure::new(&e).to_error(engine);
    #[cfg(feature = "rustls")]
    if config.tls.mode != crate::config::tls::SslMode::Disable {
        let tls = crate::config::tls::connector(engine, &config.tls)?;
        let (client, mut conn) = pg.connect(tls).await.map_err(connect_error)?;
        let messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        return Ok((client, Box::pin(messages)));
    }
    let (client, mut conn) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(connect_error)?;
    let messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    Ok((client, Box::pin(messages)))
}

/// The listener's task: forwards notifications until its connection ends,
/// then reconnects (backing off) and listens again; ends when the
/// [`Listener`] is dropped.
async fn run(
    engine: Arc<str>,
    config: EngineConfig,
    sql: String,
    tx: mpsc::UnboundedSender<Notification>,
    mut client: Client,
    mut messages: Messages,
    reconnects: Arc<AtomicU64>,
) {
    loop {
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                },
            }
        }
        drop(client);
        let mut wait = FIRST_RETRY;
        let early = loop {
            tokio::select! {
                _ = tx.closed() => return,
                made = establish(&engine, &config, &sql) => match made {
                    Ok((c, m, early)) => {
                        client = c;
                        messages = m;
                        break early;
                    }
                    Err(_) => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(MAX_RETRY);
                    }
                },
            }
        };
        reconnects.fetch_add(1, Ordering::Relaxed);
        for n in early {
            if tx.send(n).is_err() {
                return;
            }
        }
    }
}
