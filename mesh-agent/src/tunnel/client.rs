//! The source side: an HTTP/2 connection to a peer agent, on which each
//! tunnel is one `CONNECT` stream.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt as _;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::splice::{self, FirstRead, Socket, SpliceError, SpliceStats};
use super::{REASON_HEADER, TunnelSettings};

#[derive(Debug, thiserror::Error)]
#[error("HTTP/2 handshake with the peer agent failed: {0}")]
pub struct HandshakeError(#[from] pub h2::Error);

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The peer answered, and said no.
    #[error("the peer agent refused the tunnel ({status}): {reason}")]
    Refused { status: StatusCode, reason: String },
    /// The connection cannot carry new streams (closed, GOAWAY received,
    /// the stream refused before processing), and sending the request
    /// again on another connection cannot duplicate what the destination
    /// receives (see `from_h2`).
    #[error("the tunnel connection is unavailable: {0}")]
    Unavailable(#[source] h2::Error),
    /// The peer reset the stream before answering.
    #[error("the tunnel stream failed before the peer answered: {0}")]
    Failed(#[source] h2::Error),
}

impl OpenError {
    /// True when another connection may succeed without the destination
    /// seeing anything twice: the peer did not act on the request.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// `sent_bytes`: the workload's first bytes went out behind the
    /// request. Then only a stream the peer says it did not process is
    /// retried (refused, or beyond a graceful GOAWAY's last stream): after
    /// a broken connection the peer may have connected to the destination
    /// and written them, and sending them again would duplicate them.
    fn from_h2(error: h2::Error, sent_bytes: bool) -> Self {
        let refused = error.is_reset() && error.reason() == Some(Reason::REFUSED_STREAM);
        // h2 gives a stream a remote NO_ERROR GOAWAY only when it is
        // beyond the GOAWAY's last stream id; a connection that ends on an
        // error GOAWAY gives every stream its error reason.
        let beyond_goaway =
            error.is_go_away() && error.is_remote() && error.reason() == Some(Reason::NO_ERROR);
        let unprocessed = refused || beyond_goaway;
        if unprocessed || !(sent_bytes || error.is_reset()) {
            Self::Unavailable(error)
        } else {
            Self::Failed(error)
        }
    }
}

/// A client HTTP/2 connection to a peer agent. Cheap to clone: clones share
/// the connection, which closes when the last clone and its last tunnel are
/// gone.
#[derive(Clone)]
pub struct Connection {
    send_request: SendRequest<Bytes>,
    state: Arc<State>,
}

struct State {
    created: Instant,
    /// Tunnels opened and not yet dropped (including ones being opened).
    streams: AtomicUsize,
    /// The task driving the connection has ended.
    closed: AtomicBool,
    max_streams: usize,
    splice_buffer: usize,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("age", &self.age())
            .field("streams", &self.streams())
            .field("usable", &self.is_usable())
            .finish()
    }
}

/// Starts HTTP/2 on `io` (the mutual-TLS stream to the peer agent) and
/// spawns the task that drives the connection.
pub async fn handshake<IO>(io: IO, settings: &TunnelSettings) -> Result<Connection, HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send_request, connection) = settings.h2_client().handshake(io).await?;
    let state = Arc::new(State {
        created: Instant::now(),
        streams: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        max_streams: settings.max_concurrent_streams.max(1) as usize,
        splice_buffer: settings.splice_buffer(),
    });
    let task_state = state.clone();
    // In the caller's span, which names the identities the connection serves.
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "tunnel connection ended");
        }
        task_state.closed.store(true, Ordering::Release);
    }));
    Ok(Connection {
        send_request,
        state,
    })
}

/// `CONNECT ip:port` in authority form: h2 then sends `:method` and
/// `:authority` only, no `:scheme` or `:path` (RFC 9113 §8.5), as HBONE
/// does.
fn connect_request(target: SocketAddr, headers: HeaderMap) -> Request<()> {
    // Without an IPv6 scope id, which an authority cannot carry (and a
    // workload's address never has).
    let target = SocketAddr::new(target.ip(), target.port());
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .expect("ip:port is a valid authority");
    *request.headers_mut() = headers;
    request
}

impl Connection {
    /// Opens a tunnel to `target` (the original destination `ip:port`)
    /// for the workload's `socket`, sending `headers` with the `CONNECT`,
    /// and waits for the peer's answer.
    #[cfg(test)]
    pub async fn open<S: Socket>(
        &self,
        target: SocketAddr,
        headers: HeaderMap,
        socket: &mut S,
    ) -> Result<Tunnel, OpenError> {
        self.state.streams.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot(self.state.clone());
        self.open_in(slot, target, headers, socket, &mut FirstRead::Unread)
            .await
    }

    /// Takes one of the connection's stream slots if it has a free one
    /// (the pool's admission check).
    pub(super) fn try_reserve(&self) -> Option<StreamSlot> {
        let limit = self.max_streams();
        self.state
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.state.clone()))
    }

    /// Sends the `CONNECT`, then the workload's first read as soon as it
    /// has one (`first`, kept across the pool's retries: a retry sends
    /// the same bytes again), and waits for the peer's answer.
    pub(super) async fn open_in<S: Socket>(
        &self,
        slot: StreamSlot,
        target: SocketAddr,
        headers: HeaderMap,
        socket: &mut S,
        first: &mut FirstRead,
    ) -> Result<Tunnel, OpenError> {
        // A clone has no stream of its own pending, so readiness only
        // checks that the connection still takes streams.
        let mut send_request = self
            .send_request
            .clone()
            .ready()
            .await
            .map_err(OpenError::Unavailable)?;
        let (response, mut send) = send_request
            .send_request(connect_request(target, headers), false)
            .map_err(|error| OpenError::from_h2(error, false))?;
        if let FirstRead::Sent(bytes) = first {
            send.send_data(bytes.clone(), false)
                .map_err(|error| OpenError::from_h2(error, false))?;
        }
        let mut response = pin!(response);
        let answer = poll_fn(|cx| {
            if let Poll::Ready(answer) = response.as_mut().poll(cx) {
                return Poll::Ready(answer);
            }
            if matches!(first, FirstRead::Unread)
                && let Poll::Ready(read) = FirstRead::poll_read(socket, cx)
            {
                *first = read;
                if let FirstRead::Sent(bytes) = first {
                    // Should the stream have failed meanwhile, the answer
                    // says so.
                    let _ = send.send_data(bytes.clone(), false);
                }
            }
            Poll::Pending
        })
        .await;
        let sent_bytes = matches!(first, FirstRead::Sent(_));
        let (parts, recv) = answer
            .map_err(|error| OpenError::from_h2(error, sent_bytes))?
            .into_parts();
        if !parts.status.is_success() {
            let reason = parts
                .headers
                .get(REASON_HEADER)
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .unwrap_or_default();
            return Err(OpenError::Refused {
                status: parts.status,
                reason,
            });
        }
        Ok(Tunnel {
            send,
            recv,
            splice_buffer: self.state.splice_buffer,
            first: std::mem::take(first),
            _slot: slot,
        })
    }

    /// Whether new tunnels may be opened here: the connection is up and
    /// has not been told GOAWAY (a graceful shutdown of the peer, or an
    /// error). Open tunnels may still be running either way.
    pub fn is_usable(&self) -> bool {
        if self.state.closed.load(Ordering::Acquire) {
            return false;
        }
        // h2 reports a received GOAWAY, or any connection error, as an
        // error of readiness; a fresh clone never waits, so a no-op waker
        // is enough.
        let mut probe = self.send_request.clone();
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        !matches!(probe.poll_ready(&mut cx), Poll::Ready(Err(_)))
    }

    /// Tunnels open (or being opened) on this connection.
    pub fn streams(&self) -> usize {
        self.state.streams.load(Ordering::Acquire)
    }

    /// Most tunnels this connection should carry: our limit, or the peer's
    /// if it advertised a smaller one.
    pub fn max_streams(&self) -> usize {
        self.state
            .max_streams
            .min(self.send_request.current_max_send_streams())
    }

    pub fn age(&self) -> Duration {
        self.state.created.elapsed()
    }
}

/// Counts a tunnel against its connection until dropped.
pub(super) struct StreamSlot(Arc<State>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open tunnel: the peer answered 2xx and connected to the destination.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    splice_buffer: usize,
    first: FirstRead,
    _slot: StreamSlot,
}

impl Tunnel {
    /// Copies bytes between `socket` (the application's connection) and
    /// the tunnel until both directions end; see [`splice::splice`].
    /// The stream's pool slot is given back when the splice ends. (Not an
    /// `async fn`, which would keep `self` and `socket` beside the splice
    /// they are moved into.)
    pub fn splice<S: Socket>(
        self,
        socket: S,
    ) -> impl Future<Output = Result<SpliceStats, SpliceError>> + Send {
        let Self {
            send,
            recv,
            splice_buffer,
            first,
            _slot,
        } = self;
        splice::splice(socket, send, recv, splice_buffer, first).map(move |ended| {
            drop(_slot);
            ended
        })
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests_name_the_destination_in_authority_form() {
        for (target, authority) in [
            ("10.1.2.3:8080", "10.1.2.3:8080"),
            ("[fd00::1]:443", "[fd00::1]:443"),
            ("[fe80::1%7]:80", "[fe80::1]:80"),
        ] {
            let request = connect_request(target.parse().unwrap(), HeaderMap::new());
            assert_eq!(request.method(), Method::CONNECT);
            assert_eq!(request.uri().authority().unwrap().as_str(), authority);
            assert_eq!(request.uri().scheme(), None);
            assert_eq!(request.uri().path_and_query(), None);
        }
    }

    // Stream resets and GOAWAYs as h2 reports them cannot be made outside
    // h2: the tunnel tests' scripted peer refuses a stream and crashes
    // after one (`a_refused_stream_carries_its_first_bytes_again_on_the_retry`,
    // `first_bytes_are_not_sent_again_after_the_peer_may_have_acted_on_them`),
    // and a peer writing its frames by hand goes away under one
    // (`a_stream_beyond_a_goaway_carries_its_first_bytes_again_on_a_new_connection`,
    // `first_bytes_are_not_sent_again_when_a_goaway_says_their_stream_was_processed`).
    #[test]
    fn a_refusal_is_not_retried() {
        let refused = OpenError::Refused {
            status: StatusCode::FORBIDDEN,
            reason: String::new(),
        };
        assert!(!refused.is_retryable());
    }
}
