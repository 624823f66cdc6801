//! `COPY … FROM STDIN` inside a transaction: the sink that keeps the
//! transaction's state machine told.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Sink;
use tokio_postgres::CopyInSink;

use super::transaction::TxCore;
use crate::error::{Error, Result};
use crate::pool::state::Event;

/// The sink of a `COPY … FROM STDIN` run in a transaction
/// ([`Transaction::copy_in`](crate::Transaction::copy_in)): write the data
/// with `futures::SinkExt` (`send`, `feed`, `send_all`), then
/// [`CopyIn::finish`] it for the number of rows.
///
/// It borrows the transaction mutably: while the COPY runs, the server
/// takes nothing else on the connection, so a statement awaited beside an
/// open sink would wait for ever — the borrow makes that a compile error:
///
/// ```compile_fail,E0502
/// # async fn demo(mut tx: pgassist::Transaction<'static>) -> Result<(), pgassist::Error> {
/// let sink = tx.copy_in::<bytes::Bytes>("COPY items (name) FROM STDIN").await?;
/// tx.execute("SELECT 1", &[]).await?; // error: `tx` is borrowed by the sink
/// sink.finish().await?;
/// # Ok(()) }
/// ```
///
/// Dropped without `finish()` (an early return, a cancelled future), the
/// COPY is aborted (the driver sends `CopyFail`), which aborts the
/// transaction on the server: the next statement, or `commit()`, returns
/// [`Error::TransactionAborted`] and the transaction can only roll back. A
/// failed COPY (bad data) does the same.
pub struct CopyIn<'a, T>
where
    T: bytes::Buf + 'static + Send,
{
    /// Boxed, so that the sink is `Unpin` (`SinkExt` methods work as is).
    sink: Pin<Box<CopyInSink<T>>>,
    core: &'a TxCore,
    /// The COPY ended (finished, closed, or failed): nothing to abort.
    ended: bool,
}

impl<T> std::fmt::Debug for CopyIn<'_, T>
where
    T: bytes::Buf + 'static + Send,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyIn")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<'a, T> CopyIn<'a, T>
where
    T: bytes::Buf + 'static + Send,
{
    pub(crate) fn new(sink: CopyInSink<T>, core: &'a TxCore) -> CopyIn<'a, T> {
        CopyIn {
            sink: Box::pin(sink),
            core,
            ended: false,
        }
    }

    /// Ends the COPY and returns the number of rows copied. A server error
    /// (bad data, a constraint) aborts the transaction.
    pub async fn finish(mut self) -> Result<u64> {
        let r = self.sink.as_mut().finish().await;
        self.ended = true;
        r.map_err(|e| self.error(e))
    }

    fn error(&mut self, e: tokio_postgres::Error) -> Error {
        self.ended = true;
        self.core.statement_error(e)
    }

    fn checked<R>(&mut self, r: std::result::Result<R, tokio_postgres::Error>) -> Result<R> {
        r.map_err(|e| self.error(e))
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
        this.ended = true;
        Poll::Ready(this.checked(r))
    }
}

impl<T> Drop for CopyIn<'_, T>
where
    T: bytes::Buf + 'static + Send,
{
    fn drop(&mut self) {
        if !self.ended {
            // The driver answers the dropped sink with CopyFail: the server
            // fails the COPY, and with it the transaction.
            let _ = self.core.conn_state().apply(Event::Failed);
        }
    }
}
