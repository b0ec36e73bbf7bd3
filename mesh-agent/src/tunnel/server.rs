//! The destination side: serves one HTTP/2 connection from a peer agent.
//! Each `CONNECT` stream is handled in a task of its own, so a slow or
//! failing one never holds up the others.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt as _;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::splice::{self, Socket};
use super::{REASON_HEADER, TunnelSettings};

/// A tunnel asked for by the peer: the destination it wants and the
/// request's headers.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub target: SocketAddr,
    /// Carried as HBONE does; no handler of the agent reads them yet.
    pub headers: HeaderMap,
}

/// A handler's "no": sent to the peer as the status and the
/// `x-mesh-reason` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the peer agent did not start HTTP/2 within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("HTTP/2 connection with the peer agent failed: {0}")]
    Connection(#[from] h2::Error),
}

/// Serves tunnels on `io` (the accepted mutual-TLS stream) until the peer
/// closes the connection, or until `shutdown` completes and the tunnels
/// open then have finished.
///
/// For each `CONNECT`, `handler` decides (policy, with the verified peer
/// identity it captured) and connects to the destination; on `Ok` the peer
/// gets 200 and the bytes are spliced, on `Err` it gets the refusal.
///
/// Shutdown is graceful: a GOAWAY tells the peer to open new tunnels
/// elsewhere, while open ones run to their end. To bound the drain, drop
/// the future (or wrap it in a timeout): open tunnels are then reset.
pub async fn serve<IO, H, F, U>(
    io: IO,
    settings: &TunnelSettings,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(ConnectRequest) -> F + Send + Sync + 'static,
    F: Future<Output = Result<U, Refusal>> + Send + 'static,
    U: Socket + 'static,
{
    let handshake = settings.h2_server().handshake::<_, Bytes>(io);
    let mut connection = tokio::time::timeout(settings.handshake_timeout, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout(settings.handshake_timeout))??;
    let handler = Arc::new(handler);
    let splice_buffer = settings.splice_buffer();
    let mut shutdown = std::pin::pin!(shutdown.fuse());
    let mut draining = false;
    loop {
        tokio::select! {
            () = &mut shutdown, if !draining => {
                draining = true;
                connection.graceful_shutdown();
            }
            accepted = connection.accept() => match accepted {
                // Closed: by the peer, or drained after a shutdown.
                None => return Ok(()),
                Some(Err(error)) => return Err(error.into()),
                Some(Ok((request, respond))) => {
                    let handler = handler.clone();
                    // In the caller's span, which names the peer's identity.
                    tokio::spawn(tracing::Instrument::in_current_span(handle(
                        request,
                        respond,
                        handler,
                        splice_buffer,
                    )));
                }
            },
        }
    }
}

/// One stream: answered, then spliced. Answering (checks, the handler's
/// policy and connection) runs boxed and is freed once done, and this is
/// no `async fn`, which would keep the request beside it: a held tunnel's
/// task keeps only the splice.
fn handle<H, F, U>(
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    handler: Arc<H>,
    splice_buffer: usize,
) -> impl Future<Output = ()> + Send
where
    H: Fn(ConnectRequest) -> F + Send + Sync + 'static,
    F: Future<Output = Result<U, Refusal>> + Send + 'static,
    U: Socket + 'static,
{
    let answering = Box::pin(answer(request, respond, handler));
    async move {
        let Some((upstream, send, recv, target)) = answering.await else {
            return;
        };
        // Nothing read from the destination yet; what the source sent
        // early waits in the stream.
        let first = splice::FirstRead::Unread;
        match splice::splice(upstream, send, recv, splice_buffer, first).await {
            Ok(stats) => tracing::debug!(%target, ?stats, "tunnel closed"),
            Err(error) => tracing::debug!(%target, %error, "tunnel reset"),
        }
    }
}

/// The handler's decision on a CONNECT, answered: the destination's socket
/// and the stream's halves when the tunnel is up, `None` when refused.
async fn answer<H, F, U>(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    handler: Arc<H>,
) -> Option<(U, SendStream<Bytes>, RecvStream, SocketAddr)>
where
    H: Fn(ConnectRequest) -> F + Send + Sync + 'static,
    F: Future<Output = Result<U, Refusal>> + Send + 'static,
    U: Socket + 'static,
{
    let (parts, recv) = request.into_parts();
    let request = match connect_request(&parts) {
        Ok(request) => request,
        Err(refusal) => {
            refuse(respond, refusal);
            return None;
        }
    };
    let target = request.target;
    // The peer may give up while the handler connects: stop waiting then
    // (dropping the handler's future drops its half-made connection).
    let decided = tokio::select! {
        decided = AssertUnwindSafe(handler(request)).catch_unwind() => decided,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!(%target, "tunnel abandoned by the peer before it was connected");
            return None;
        }
    };
    let upstream = match decided {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(refusal)) => {
            refuse(respond, refusal);
            return None;
        }
        Err(_panic) => {
            tracing::error!(%target, "tunnel handler panicked");
            let refusal = Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "tunnel handler failed");
            refuse(respond, refusal);
            return None;
        }
    };
    match respond.send_response(Response::new(()), false) {
        Ok(send) => Some((upstream, send, recv, target)),
        Err(error) => {
            tracing::debug!(%target, %error, "tunnel stream gone before the answer");
            // The destination must not take the close for a complete
            // exchange either.
            let _ = upstream.reset_on_close();
            None
        }
    }
}

/// Checks that a stream is a CONNECT to an `ip:port`: the destinations
/// are workloads, named by address.
pub fn connect_request(parts: &http::request::Parts) -> Result<ConnectRequest, Refusal> {
    if parts.method != Method::CONNECT {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("only CONNECT is served here, not {}", parts.method),
        ));
    }
    let authority = parts.uri.authority().map(|a| a.as_str()).unwrap_or("");
    let target = authority.parse::<SocketAddr>().map_err(|_| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the CONNECT authority {authority:?} is not an ip:port"),
        )
    })?;
    Ok(ConnectRequest {
        target,
        headers: parts.headers.clone(),
    })
}

fn refuse(mut respond: SendResponse<Bytes>, refusal: Refusal) {
    let mut response = Response::new(());
    *response.status_mut() = if refusal.status.is_success() {
        // A 2xx would tell the peer the tunnel is up.
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        refusal.status
    };
    response
        .headers_mut()
        .insert(REASON_HEADER, reason_header(&refusal.reason));
    if let Err(error) = respond.send_response(response, true) {
        tracing::debug!(%error, "tunnel stream gone before the refusal");
    }
}

/// A header value keeps visible ASCII and spaces; anything else (a
/// newline, non-ASCII from a policy name) becomes `?`, and length is
/// capped, so any reason can be sent.
pub fn reason_header(reason: &str) -> HeaderValue {
    const MAX: usize = 512;
    let clean: String = reason
        .chars()
        .take(MAX)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    HeaderValue::from_str(&clean).expect("visible ASCII is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, uri: &str) -> http::request::Parts {
        let request = Request::builder().method(method).uri(uri).body(()).unwrap();
        request.into_parts().0
    }

    #[test]
    fn connect_to_an_address_is_a_request() {
        for (uri, target) in [
            ("10.1.2.3:8080", "10.1.2.3:8080"),
            ("[fd00::1]:443", "[fd00::1]:443"),
        ] {
            let request = connect_request(&parts(Method::CONNECT, uri)).unwrap();
            assert_eq!(request.target, target.parse::<SocketAddr>().unwrap());
        }
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        let refusal = connect_request(&parts(Method::POST, "http://10.1.2.3/")).unwrap_err();
        assert_eq!(refusal.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(refusal.reason.contains("POST"), "{}", refusal.reason);
        for uri in ["example.com:80", "10.1.2.3", "/path"] {
            let refusal = connect_request(&parts(Method::CONNECT, uri)).unwrap_err();
            assert_eq!(refusal.status, StatusCode::BAD_REQUEST, "{uri}");
        }
    }

    #[test]
    fn any_reason_fits_in_the_header() {
        assert_eq!(
            reason_header("denied by ns-a/allow-web\r\nrule «2»")
                .to_str()
                .unwrap(),
            "denied by ns-a/allow-web??rule ?2?"
        );
        assert_eq!(reason_header(&"x".repeat(10_000)).len(), 512);
    }
}
