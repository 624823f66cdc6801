//! A small TCP proxy in front of the test server, for cutting connections on
//! command: all at once ([`Proxy::cut_all`]), by refusing new ones
//! ([`Proxy::set_accepting`]), or exactly while a COMMIT is in flight
//! ([`Proxy::set_commit_mode`]).
//!
//! It understands just enough of the PostgreSQL wire protocol to find
//! message boundaries: the client's startup packet (no type byte; an
//! SSLRequest / GSSENCRequest is followed by a one-byte answer and a second
//! startup packet), then `type byte + int32 length` frames both ways. A
//! simple-protocol Query (`Q`) whose text contains `COMMIT` is what pgassist
//! sends to commit (`SELECT 1; COMMIT`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// What the proxy does with a COMMIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CommitMode {
    /// Forward it like everything else.
    Forward = 0,
    /// Close the connection (both sides) instead of forwarding the COMMIT:
    /// the server never sees it and rolls back.
    DropBeforeServer = 1,
    /// Forward the COMMIT, wait for the server's complete answer (up to its
    /// ReadyForQuery), swallow it and close both sides: committed on the
    /// server, unknown to the client.
    DropReply = 2,
    /// Forward the COMMIT and its answer, but in place of the final
    /// ReadyForQuery send `FATAL 57P01 terminating connection due to
    /// administrator command` and close: what PostgreSQL sends when
    /// `pg_terminate_backend` lands after the commit record was written
    /// (at the CHECK_FOR_INTERRUPTS of a LOG line such as
    /// `log_min_duration_statement`'s), a race too narrow to time for real.
    FatalAfterCommit = 3,
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

struct Shared {
    target: SocketAddr,
    accepting: AtomicBool,
    commit_mode: AtomicU8,
    conns: Mutex<Vec<AbortHandle>>,
    accepted: AtomicU64,
    commits_dropped: AtomicU64,
    replies_dropped: AtomicU64,
}

impl Shared {
    fn commit_mode(&self) -> CommitMode {
        match self.commit_mode.load(Ordering::Acquire) {
            1 => CommitMode::DropBeforeServer,
            2 => CommitMode::DropReply,
            3 => CommitMode::FatalAfterCommit,
            _ => CommitMode::Forward,
        }
    }
}

/// A proxy on `127.0.0.1:<port>` that forwards to the test server.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl Proxy {
    /// Starts a proxy forwarding to `127.0.0.1:target_port`.
    pub async fn start(target_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            target: SocketAddr::from(([127, 0, 0, 1], target_port)),
            accepting: AtomicBool::new(true),
            commit_mode: AtomicU8::new(CommitMode::Forward as u8),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            commits_dropped: AtomicU64::new(0),
            replies_dropped: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        Proxy {
            port,
            shared,
            accept,
        }
    }

    /// The superuser URL of database `db_name` through this proxy.
    pub fn url(&self, db_name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db_name}", self.port)
    }

    /// Closes every proxied connection now, both sides.
    pub fn cut_all(&self) -> usize {
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        let n = conns.iter().filter(|h| !h.is_finished()).count();
        for h in conns {
            h.abort();
        }
        n
    }

    /// While false, new connections are accepted and closed at once.
    pub fn set_accepting(&self, yes: bool) {
        self.shared.accepting.store(yes, Ordering::Release);
    }

    pub fn set_commit_mode(&self, mode: CommitMode) {
        self.shared.commit_mode.store(mode as u8, Ordering::Release);
    }

    /// Connections accepted so far (including refused ones).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// COMMITs dropped before reaching the server.
    pub fn commits_dropped(&self) -> u64 {
        self.shared.commits_dropped.load(Ordering::Relaxed)
    }

    /// COMMIT answers swallowed after the server committed.
    pub fn replies_dropped(&self) -> u64 {
        self.shared.replies_dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if !shared.accepting.load(Ordering::Acquire) {
            drop(client);
            continue;
        }
        let task = tokio::spawn(serve(client, shared.clone()));
        let mut conns = shared.conns.lock().unwrap();
        conns.retain(|h| !h.is_finished());
        conns.push(task.abort_handle());
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(shared.target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let link = Link::default();
    let (startup_tx, startup_rx) = mpsc::unbounded_channel();
    // Whichever direction ends first ends the connection: both halves of
    // both sockets are dropped here, which closes them.
    tokio::select! {
        _ = upstream(cr, sw, &shared, &link, startup_tx) => {}
        _ = downstream(sr, cw, &shared, &link, startup_rx) => {}
    }
}

/// State the two directions of one connection share.
#[derive(Default)]
struct Link {
    /// A COMMIT went to the server whose answer must be tampered with
    /// (a [`CommitMode`] as u8; 0 for none).
    commit_sent: AtomicU8,
}

/// What the server answers to each startup packet the client sent.
enum Startup {
    /// One byte (`S` / `N` / `G`) for an SSLRequest or GSSENCRequest.
    OneByte,
    /// The real startup packet: typed frames from here on.
    Done,
}

/// Reads one frame `type + int32 len + body` (or, with `typed` false, a
/// startup packet `int32 len + body`); `None` at end of stream.
async fn read_frame(r: &mut OwnedReadHalf, typed: bool) -> Option<Vec<u8>> {
    let header = if typed { 5 } else { 4 };
    let mut frame = vec![0u8; header];
    r.read_exact(&mut frame).await.ok()?;
    let len_at = header - 4;
    let len = u32::from_be_bytes(frame[len_at..header].try_into().unwrap()) as usize;
    if !(4..=(1 << 30)).contains(&len) {
        return None;
    }
    frame.resize(header + len - 4, 0);
    r.read_exact(&mut frame[header..]).await.ok()?;
    Some(frame)
}

async fn upstream(
    mut cr: OwnedReadHalf,
    mut sw: OwnedWriteHalf,
    shared: &Shared,
    link: &Link,
    startup: mpsc::UnboundedSender<Startup>,
) {
    // Startup: possibly an SSL / GSS request first, answered with one byte.
    loop {
        let Some(frame) = read_frame(&mut cr, false).await else {
            return;
        };
        let code = frame
            .get(4..8)
            .map_or(0, |c| u32::from_be_bytes(c.try_into().unwrap()));
        let negotiation = code == SSL_REQUEST || code == GSSENC_REQUEST;
        let _ = startup.send(if negotiation {
            Startup::OneByte
        } else {
            Startup::Done
        });
        if sw.write_all(&frame).await.is_err() {
            return;
        }
        if !negotiation {
            break;
        }
    }
    while let Some(frame) = read_frame(&mut cr, true).await {
        if frame[0] == b'Q' && contains(&frame[5..], b"COMMIT") {
            match shared.commit_mode() {
                CommitMode::Forward => {}
                CommitMode::DropBeforeServer => {
                    shared.commits_dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                mode => link.commit_sent.store(mode as u8, Ordering::Release),
            }
        }
        if sw.write_all(&frame).await.is_err() {
            return;
        }
    }
    // The client closed: keep the server side until the other direction ends.
    std::future::pending::<()>().await;
}

async fn downstream(
    mut sr: OwnedReadHalf,
    mut cw: OwnedWriteHalf,
    shared: &Shared,
    link: &Link,
    mut startup: mpsc::UnboundedReceiver<Startup>,
) {
    // The server speaks only after each startup packet, so follow the client.
    loop {
        match startup.recv().await {
            Some(Startup::OneByte) => {
                let mut b = [0u8; 1];
                if sr.read_exact(&mut b).await.is_err() || cw.write_all(&b).await.is_err() {
                    return;
                }
            }
            Some(Startup::Done) => break,
            None => return,
        }
    }
    loop {
        let Some(frame) = read_frame(&mut sr, true).await else {
            return;
        };
        let tamper = link.commit_sent.load(Ordering::Acquire);
        if tamper == CommitMode::DropReply as u8 {
            if frame[0] == b'Z' {
                // The server has answered the COMMIT in full: drop it all.
                shared.replies_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            continue;
        }
        if tamper == CommitMode::FatalAfterCommit as u8 && frame[0] == b'Z' {
            shared.replies_dropped.fetch_add(1, Ordering::Relaxed);
            let _ = cw.write_all(&fatal_57p01()).await;
            return;
        }
        if cw.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// An ErrorResponse: FATAL 57P01, as sent by a terminated backend.
fn fatal_57p01() -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "57P01"),
        (b'M', "terminating connection due to administrator command"),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut frame = vec![b'E'];
    frame.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
