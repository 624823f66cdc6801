//! Rows and COPY data streamed as the server sends them, and the COPY IN
//! sink, for every layer that hands them out: pinned connections and
//! autocommit sessions (front), transactions (tx). Lives in the pool layer
//! so that all of them return the same types.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Sink, Stream};
use tokio_postgres::{CopyInSink, Row};

use super::Conn;
use crate::error::{Error, Result};

/// What a stream tells its owner about an error met after its statement
/// returned: a transaction moves its state machine (a server error aborts
/// it), a connection is vetted (an error that leaves the protocol out of
/// step marks it broken).
pub(crate) type OnError<'a> = Box<dyn Fn(&tokio_postgres::Error) + Send + Sync + 'a>;

/// Rows streamed as the server sends them (`Pinned::query_raw`,
/// `Session::query_raw`, `Transaction::query_raw`), so a result of
/// any size runs in bounded memory. Holds its connection — borrowed from a
/// pinned connection or a transaction, or checked out for the stream alone
/// — until it ends or is dropped. Dropping it early is safe. On a
/// connection checked out for the stream alone (`Session::query_raw`), the
/// statement is cancelled and the connection replaced: otherwise the
/// connection's next user, someone else, would wait behind the rest of the
/// result, which may take minutes (a request cancelled mid-download). On a
/// borrowed connection (a pinned connection, a transaction) the rest of the
/// rows is read and discarded before the connection runs anything else: its
/// holder alone waits, and a cancel would abort its transaction.
pub struct RowStream<'a> {
    /// Boxed, so that the stream is `Unpin` (`next()` works on it as is).
    rows: Pin<Box<tokio_postgres::RowStream>>,
    /// The connection the stream checked out for itself, returned when it
    /// ends or is dropped.
    conn: Option<Conn>,
    engine: Arc<str>,
    on_error: Option<OnError<'a>>,
    borrow: PhantomData<&'a ()>,
}

impl std::fmt::Debug for RowStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowStream")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl<'a> RowStream<'a> {
    /// A stream on a connection borrowed for `'a`; `on_error` hears of the
    /// errors met while streaming.
    pub(crate) fn borrowed(
        rows: tokio_postgres::RowStream,
        engine: &str,
        on_error: OnError<'a>,
    ) -> RowStream<'a> {
        RowStream {
            rows: Box::pin(rows),
            conn: None,
            engine: engine.into(),
            on_error: Some(on_error),
            borrow: PhantomData,
        }
    }

    /// A stream that owns the connection it runs on.
    pub(crate) fn owning(
        rows: tokio_postgres::RowStream,
        conn: Conn,
        engine: &str,
    ) -> RowStream<'static> {
        RowStream {
            rows: Box::pin(rows),
            conn: Some(conn),
            engine: engine.into(),
            on_error: None,
            borrow: PhantomData,
        }
    }

    /// The number of rows the statement affected, once the stream has ended.
    pub fn rows_affected(&self) -> Option<u64> {
        self.rows.rows_affected()
    }
}

impl Drop for RowStream<'_> {
    fn drop(&mut self) {
        // Not ended: the server may still be sending rows (see above).
        if let Some(conn) = self.conn.take() {
            conn.send_cancel();
        }
    }
}

impl Stream for RowStream<'_> {
    type Item = Result<Row>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Row>>> {
        let this = self.get_mut();
        match this.rows.as_mut().poll_next(cx) {
            Poll::Ready(Some(Err(e))) => {
                if let Some(conn) = this.conn.as_ref() {
                    conn.vet(&e);
                }
                if let Some(on_error) = &this.on_error {
                    on_error(&e);
                }
                Poll::Ready(Some(Err(Error::from_pg(&this.engine, e))))
            }
            Poll::Ready(None) => {
                // Ended: the connection goes back at once, not when the
                // caller gets round to dropping the stream.
                this.conn.take();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(row))) => Poll::Ready(Some(Ok(row))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The data of a `COPY … TO STDOUT`, in chunks as the server sends them:
/// from a transaction ([`Transaction::copy_out`](crate::Transaction::copy_out))
/// or a pinned connection ([`Pinned::copy_out`](crate::Pinned::copy_out)).
/// It borrows its owner mutably, as the connection answers nothing else
/// until the data is read. Dropping the stream early is safe: the rest is
/// discarded before the connection runs anything else (a transaction goes
/// on). An error met while streaming aborts a transaction (its next
/// statement reports [`Error::TransactionAborted`]).
pub struct CopyOut<'a> {
    data: Pin<Box<tokio_postgres::CopyOutStream>>,
    engine: Arc<str>,
    on_error: OnError<'a>,
}

impl std::fmt::Debug for CopyOut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOut")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl<'a> CopyOut<'a> {
    pub(crate) fn new(
        data: tokio_postgres::CopyOutStream,
        engine: &str,
        on_error: OnError<'a>,
    ) -> CopyOut<'a> {
        CopyOut {
            data: Box::pin(data),
            engine: engine.into(),
            on_error,
        }
    }
}

impl Stream for CopyOut<'_> {
    type Item = Result<bytes::Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.data.as_mut().poll_next(cx) {
            Poll::Ready(Some(Err(e))) => {
                (this.on_error)(&e);
                Poll::Ready(Some(Err(Error::from_pg(&this.engine, e))))
            }
            Poll::Ready(Some(Ok(chunk))) => Poll::Ready(Some(Ok(chunk))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What a COPY IN sink does when dropped before its COPY ended.
pub(crate) type OnAbandon<'a> = Box<dyn FnOnce() + Send + Sync + 'a>;

/// The sink of a `COPY … FROM STDIN`, from a transaction
/// ([`Transaction::copy_in`](crate::Transaction::copy_in)) or a pinned
/// connection ([`Pinned::copy_in`](crate::Pinned::copy_in)): write the data
/// with `futures::SinkExt` (`send`, `feed`, `send_all`), then
/// [`CopyIn::finish`] it for the number of rows. It is `Unpin`: no pinning
/// needed.
///
/// It borrows its owner mutably: while the COPY runs, the server takes
/// nothing else on the connection, so a statement awaited beside an open
/// sink would wait for ever — the borrow makes that a compile error, and
/// the owner (and with it the connection) cannot go back to the pool while
/// the COPY runs:
///
/// ```compile_fail,E0502
/// # async fn demo(mut tx: pgassist::Transaction<'static>) -> Result<(), pgassist::Error> {
/// let sink = tx.copy_in::<bytes::Bytes>("COPY items (name) FROM STDIN").await?;
/// tx.execute("SELECT 1", &[]).await?; // error: `tx` is borrowed by the sink
/// sink.finish().await?;
/// # Ok(()) }
/// ```
///
/// ```compile_fail,E0502
/// # async fn demo(mut pinned: pgassist::Pinned) -> Result<(), pgassist::Error> {
/// let sink = pinned.copy_in::<bytes::Bytes>("COPY items (name) FROM STDIN").await?;
/// pinned.execute("SELECT 1", &[]).await?; // error: `pinned` is borrowed by the sink
/// sink.finish().await?;
/// # Ok(()) }
/// ```
///
/// Dropped without `finish()` (an early return, a cancelled future), the
/// COPY is aborted: the driver sends `CopyFail` and `Sync` ahead of
/// anything queued after it, so the server fails the COPY and nothing of
/// its data is kept. On a pinned connection (autocommit) the connection is
/// idle again and serves the next statement. In a transaction, that
/// aborts the transaction on the server: the next statement, or
/// `commit()`, returns [`Error::TransactionAborted`] and the transaction
/// can only roll back. A failed COPY (bad data) does the same.
pub struct CopyIn<'a, T>
where
    T: bytes::Buf + 'static + Send,
{
    /// Boxed, so that the sink is `Unpin` (`SinkExt` methods work as is).
    sink: Pin<Box<CopyInSink<T>>>,
    engine: Arc<str>,
    on_error: OnError<'a>,
    /// `Some` until the COPY ended (finished, closed, or failed).
    on_abandon: Option<OnAbandon<'a>>,
}

impl<T> std::fmt::Debug for CopyIn<'_, T>
where
    T: bytes::Buf + 'static + Send,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyIn")
            .field("engine", &self.engine)
            .field("ended", &self.on_abandon.is_none())
            .finish_non_exhaustive()
    }
}

impl<'a, T> CopyIn<'a, T>
where
    T: bytes::Buf + 'static + Send,
{
    /// A sink whose owner hears of errors through `on_error` and of a drop
    /// before the COPY ended through `on_abandon`.
    pub(crate) fn new(
        sink: CopyInSink<T>,
        engine: &str,
        on_error: OnError<'a>,
        on_abandon: OnAbandon<'a>,
    ) -> CopyIn<'a, T> {
        CopyIn {
            sink: Box::pin(sink),
            engine: engine.into(),
            on_error,
            on_abandon: Some(on_abandon),
        }
    }

    /// Ends the COPY and returns the number of rows copied. A server error
    /// (bad data, a constraint) fails the COPY (and aborts a transaction).
    pub async fn finish(mut self) -> Result<u64> {
        let r = self.sink.as_mut().finish().await;
        self.on_abandon = None;
        self.checked(r)
    }

    fn checked<R>(&mut self, r: std::result::Result<R, tokio_postgres::Error>) -> Result<R> {
        r.map_err(|e| {
            self.on_abandon = None;
            (self.on_error)(&e);
            Error::from_pg(&self.engine, e)
        })
    }
}

impl<T> Sink<T> for CopyIn<'_, T>
where
    T: bytes::Buf + 'static + Send,
{
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let r = futures::ready!(this.sink.as_mut().poll_ready(cx));
        Poll::Ready(this.checked(r))
    }

    fn start_send(self: Pin<&mut Self>, item: T) -> Result<()> {
        let this = self.get_mut();
        let r = this.sink.as_mut().start_send(item);
        this.checked(r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let r = futures::ready!(this.sink.as_mut().poll_flush(cx));
        Poll::Ready(this.checked(r))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let r = futures::ready!(this.sink.as_mut().poll_close(cx));
        this.on_abandon = None;
        Poll::Ready(this.checked(r))
    }
}

impl<T> Drop for CopyIn<'_, T>
where
    T: bytes::Buf + 'static + Send,
{
    fn drop(&mut self) {
        if let Some(on_abandon) = self.on_abandon.take() {
            on_abandon();
        }
    }
}
