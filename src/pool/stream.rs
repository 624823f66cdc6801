//! Rows and COPY data streamed as the server sends them, for every layer
//! that hands out a stream: pinned connections and autocommit sessions
//! (front), transactions (tx). Lives in the pool layer so that both can
//! return the same type.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio_postgres::Row;

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

/// The data of a `COPY … TO STDOUT` run in a transaction
/// (`Transaction::copy_out`), in chunks as
/// the server sends them. An error met while streaming aborts the
/// transaction (the next statement reports
/// [`Error::TransactionAborted`]); dropping the stream early is safe (the
/// rest is discarded, the transaction goes on).
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
