//! Copying bytes between an application's socket and a tunnel stream.
//!
//! Both directions run in one future, which owns the socket: no split
//! halves, and on failure the socket is at hand to be reset.
//!
//! - Half-close: the socket's end of stream becomes END_STREAM on the
//!   tunnel; the peer's END_STREAM becomes `shutdown()` of the socket's
//!   write side; the other direction keeps flowing until it ends too.
//! - Back-pressure: a socket read is handed to HTTP/2 only as the peer's
//!   window and the send queue allow, and the socket is not read again
//!   until all of it went; received bytes are returned to the peer's
//!   window only once written to the socket. A slow reader at either end
//!   slows the writer at the other, and a tunnel holds at most one read,
//!   its send queue and its receive window.
//! - Failures: a socket error resets the tunnel stream (`CONNECT_ERROR`,
//!   as RFC 9113 §8.5 asks of a CONNECT proxy), and a stream reset or a
//!   connection failure closes the socket abortively (RST), so that the
//!   application sees a reset rather than an end of stream it could take
//!   for a complete response. Dropping the splice unfinished does the same.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

/// The application's end of a tunnel: a byte stream that can be closed
/// abortively.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send {
    /// Makes the coming close abortive: when dropped, the peer gets a reset
    /// instead of an end of stream.
    fn reset_on_close(&self) -> io::Result<()>;

    /// Ready when a read may find bytes (or the end): the splice takes a
    /// read buffer only then, so that an idle connection holds none.
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Socket for TcpStream {
    fn reset_on_close(&self) -> io::Result<()> {
        // SO_LINGER with a zero timeout: close() sends RST and drops any
        // unsent data, without blocking.
        self.set_zero_linger()
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

/// Bytes moved by a splice, counted when written to their destination
/// (the socket, or HTTP/2's send queue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceStats {
    pub socket_to_tunnel: u64,
    pub tunnel_to_socket: u64,
}

/// A splice that ended with a reset on both sides.
#[derive(Debug, thiserror::Error)]
#[error("{cause} ({} bytes to the tunnel, {} from it)", stats.socket_to_tunnel, stats.tunnel_to_socket)]
pub struct SpliceError {
    pub cause: SpliceFailure,
    pub stats: SpliceStats,
}

#[derive(Debug, thiserror::Error)]
pub enum SpliceFailure {
    #[error("socket failed: {0}")]
    Socket(#[source] io::Error),
    #[error("tunnel stream reset by the peer: {0}")]
    Reset(Reason),
    #[error("tunnel connection failed: {0}")]
    Tunnel(#[source] h2::Error),
}

impl SpliceFailure {
    fn from_h2(error: h2::Error) -> Self {
        match error.reason() {
            Some(reason) if error.is_reset() => Self::Reset(reason),
            _ => Self::Tunnel(error),
        }
    }
}

/// Socket reads or writes per direction before the splice yields, so one
/// busy direction cannot starve the other or the runtime's other tasks.
const BURST: usize = 16;

/// The first read of a connection, and of each one that has not filled a
/// read yet: requests and pings are small. A read that fills the buffer
/// doubles the next, up to the splice's `buffer_size` (a bulk transfer
/// reaches it within a few reads).
const FIRST_READ: usize = 16 * 1024;

/// The workload's first read, made while the `CONNECT` is in flight and
/// sent right behind it (optimistic CONNECT): a client that speaks first
/// does not wait for the peer agent's answer, one round trip between the
/// nodes, before its request leaves. One read at most goes out before the
/// answer; the splice reads the rest.
#[derive(Debug, Default)]
pub enum FirstRead {
    /// Nothing read before the answer came.
    #[default]
    Unread,
    /// Read, and sent before the answer. Kept until the answer comes, so
    /// that a stream the peer did not process can carry them again on
    /// another connection.
    Sent(Bytes),
    /// The workload closed its end before sending anything; the splice
    /// finds the end of stream again.
    Ended,
    /// The socket failed; the splice resets both ends as soon as it starts.
    Failed(io::Error),
}

impl FirstRead {
    /// Reads the socket once, if it has something (or its end) to read.
    /// Takes a buffer only once the socket is readable, as the splice
    /// does.
    pub fn poll_read<S: Socket>(socket: &mut S, cx: &mut Context<'_>) -> Poll<Self> {
        if let Err(error) = ready!(socket.poll_read_ready(cx)) {
            return Poll::Ready(Self::Failed(error));
        }
        let mut buffer = BytesMut::with_capacity(FIRST_READ);
        let read = {
            let mut limited = (&mut buffer).limit(FIRST_READ);
            let read = pin!(socket.read_buf(&mut limited));
            ready!(read.poll(cx))
        };
        Poll::Ready(match read {
            Ok(0) => Self::Ended,
            Ok(_) => Self::Sent(buffer.freeze()),
            Err(error) => Self::Failed(error),
        })
    }

    fn sent(&self) -> u64 {
        match self {
            Self::Sent(bytes) => bytes.len() as u64,
            _ => 0,
        }
    }
}

/// Copies bytes both ways between `socket` and a tunnel stream until both
/// directions have ended; `buffer_size` is the largest socket read, and
/// `first` what was read before the stream was answered. A
/// socket with nothing to read holds no buffer, so a held idle connection
/// costs its stream and its task, not a read buffer (`mesh-bench soak`).
///
/// Not an `async fn`: one would keep its arguments beside the `Splice`
/// they are moved into for the whole life of the connection. The future
/// holds the `Splice` alone.
pub fn splice<S: Socket>(
    socket: S,
    send: SendStream<Bytes>,
    recv: RecvStream,
    buffer_size: usize,
    first: FirstRead,
) -> impl Future<Output = Result<SpliceStats, SpliceError>> + Send {
    let stats = SpliceStats {
        socket_to_tunnel: first.sent(),
        tunnel_to_socket: 0,
    };
    let first_failure = match first {
        FirstRead::Failed(error) => Some(SpliceFailure::Socket(error)),
        _ => None,
    };
    let mut splice = Splice {
        socket,
        send,
        recv,
        buffer_size: buffer_size.max(1),
        read_size: FIRST_READ.min(buffer_size.max(1)),
        outgoing: Bytes::new(),
        up_done: false,
        down_done: false,
        incoming: Bytes::new(),
        unflushed: false,
        stats,
        finished: false,
    };
    async move {
        let result = match first_failure {
            Some(failure) => Err(failure),
            None => poll_fn(|cx| splice.poll(cx)).await,
        };
        let stats = splice.stats;
        match result {
            Ok(()) => {
                splice.finish();
                Ok(stats)
            }
            Err(cause) => {
                let reason = match cause {
                    SpliceFailure::Socket(_) => Reason::CONNECT_ERROR,
                    _ => Reason::CANCEL,
                };
                splice.abort(reason);
                Err(SpliceError { cause, stats })
            }
        }
    }
}

struct Splice<S: Socket> {
    socket: S,
    send: SendStream<Bytes>,
    recv: RecvStream,
    buffer_size: usize,
    /// The next read's size: grows while reads fill it.
    read_size: usize,
    /// Socket → tunnel: the last read's bytes not yet given to HTTP/2.
    outgoing: Bytes,
    up_done: bool,
    down_done: bool,
    /// Tunnel → socket: the rest of the DATA frame being written.
    incoming: Bytes,
    unflushed: bool,
    stats: SpliceStats,
    /// Ended cleanly, or already aborted: nothing for `Drop` to do.
    finished: bool,
}

impl<S: Socket> Splice<S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SpliceFailure>> {
        // A reset is reported on the stream's send side, which is the only
        // place it shows while both directions wait on the socket (or one
        // has ended).
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => return Poll::Ready(Err(SpliceFailure::Reset(reason))),
            Poll::Ready(Err(error)) => return Poll::Ready(Err(SpliceFailure::from_h2(error))),
            Poll::Pending => {}
        }
        if !self.up_done
            && let Poll::Ready(Err(failure)) = self.poll_up(cx)
        {
            return Poll::Ready(Err(failure));
        }
        if !self.down_done
            && let Poll::Ready(Err(failure)) = self.poll_down(cx)
        {
            return Poll::Ready(Err(failure));
        }
        if self.up_done && self.down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// Socket → tunnel. Ready(Ok) once END_STREAM is queued.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SpliceFailure>> {
        for _ in 0..BURST {
            if self.outgoing.is_empty() {
                // The buffer lives only for this read: taken once the socket
                // is readable, its bytes then split off and frozen, so they go
                // to HTTP/2 without a copy. A held connection keeps none (and
                // tokio reports a socket just accepted as readable, so a read
                // may still find nothing).
                ready!(self.socket.poll_read_ready(cx)).map_err(SpliceFailure::Socket)?;
                let mut buffer = BytesMut::with_capacity(self.read_size);
                let read = {
                    let mut limited = (&mut buffer).limit(self.read_size);
                    let read = pin!(self.socket.read_buf(&mut limited));
                    ready!(read.poll(cx))
                };
                match read {
                    Ok(0) => {
                        self.send
                            .send_data(Bytes::new(), true)
                            .map_err(SpliceFailure::from_h2)?;
                        self.up_done = true;
                        return Poll::Ready(Ok(()));
                    }
                    Ok(n) => {
                        if n == self.read_size {
                            self.read_size = (self.read_size * 2).min(self.buffer_size);
                        }
                        self.outgoing = buffer.freeze();
                    }
                    Err(error) => return Poll::Ready(Err(SpliceFailure::Socket(error))),
                }
            }
            // The next read waits until HTTP/2 has room for this one: the
            // peer's window, and at most `send_buffer` queued. Capacity is
            // asked for only for bytes in hand, so idle tunnels hold none
            // of the connection's window.
            self.send.reserve_capacity(self.outgoing.len());
            let mut capacity = self.send.capacity();
            if capacity == 0 {
                capacity = match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(capacity)) => capacity,
                    Some(Err(error)) => return Poll::Ready(Err(SpliceFailure::from_h2(error))),
                    // The send side closed under us: the stream was reset.
                    None => return Poll::Ready(Err(self.reset_cause(cx))),
                };
            }
            let part = self.outgoing.split_to(capacity.min(self.outgoing.len()));
            let len = part.len() as u64;
            self.send
                .send_data(part, false)
                .map_err(SpliceFailure::from_h2)?;
            self.stats.socket_to_tunnel += len;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Tunnel → socket. Ready(Ok) once the socket's write side is shut.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SpliceFailure>> {
        for _ in 0..BURST {
            if !self.incoming.is_empty() {
                let written = ready!(Pin::new(&mut self.socket).poll_write(cx, &self.incoming))
                    .map_err(SpliceFailure::Socket)?;
                if written == 0 {
                    return Poll::Ready(Err(SpliceFailure::Socket(
                        io::ErrorKind::WriteZero.into(),
                    )));
                }
                self.incoming.advance(written);
                self.stats.tunnel_to_socket += written as u64;
                self.unflushed = true;
                // Only bytes the socket took make room in the peer's window.
                self.recv
                    .flow_control()
                    .release_capacity(written)
                    .map_err(SpliceFailure::from_h2)?;
                continue;
            }
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => self.incoming = data,
                Poll::Ready(Some(Err(error))) => {
                    return Poll::Ready(Err(SpliceFailure::from_h2(error)));
                }
                Poll::Ready(None) => {
                    ready!(Pin::new(&mut self.socket).poll_shutdown(cx))
                        .map_err(SpliceFailure::Socket)?;
                    self.down_done = true;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => {
                    // Nothing more to write for now: push out what a
                    // buffering socket (TLS) may be holding.
                    if self.unflushed {
                        ready!(Pin::new(&mut self.socket).poll_flush(cx))
                            .map_err(SpliceFailure::Socket)?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn reset_cause(&mut self, cx: &mut Context<'_>) -> SpliceFailure {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => SpliceFailure::Reset(reason),
            Poll::Ready(Err(error)) => SpliceFailure::from_h2(error),
            Poll::Pending => SpliceFailure::Reset(Reason::CANCEL),
        }
    }

    /// Both directions ended cleanly: dropping the splice closes the
    /// socket gracefully.
    fn finish(&mut self) {
        self.finished = true;
    }

    /// Resets both sides: the stream with `reason`, the socket on drop.
    fn abort(&mut self, reason: Reason) {
        self.finished = true;
        if let Err(error) = self.socket.reset_on_close() {
            tracing::debug!(%error, "cannot arm an abortive close of the tunnel's socket");
        }
        self.send.send_reset(reason);
    }
}

impl<S: Socket> Drop for Splice<S> {
    fn drop(&mut self) {
        if !self.finished {
            self.abort(Reason::CANCEL);
        }
    }
}
