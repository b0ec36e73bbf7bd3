//! Bulk tunnels: one mutual-TLS connection per tunnel, for the destination
//! ports an operator names (`--bulk-ports`), so that the kernel can carry
//! the TLS records ([`super::ktls`]) and `splice(2)` can move the bytes
//! without copies through the agent. HBONE (HTTP/2 `CONNECT`, many tunnels
//! per connection) stays the default and the interoperable protocol:
//! HTTP/2 frames cannot be spliced.
//!
//! The protocol is HTTP/1.1 `CONNECT` over TLS 1.3, chosen by ALPN
//! `http/1.1` (a peer that only speaks HBONE refuses the handshake, and the
//! source falls back to HBONE):
//!
//! ```text
//! client: CONNECT 10.0.1.5:5201 HTTP/1.1 / Host: 10.0.1.5:5201
//! server: HTTP/1.1 200 OK                       then the raw byte stream
//!     or: HTTP/1.1 403 Forbidden / x-mesh-reason: …, then close_notify
//! ```
//!
//! After the answer each direction carries the workload's bytes and ends
//! with a TLS close_notify (the workload's half-close). A TCP end without
//! one is a truncation, and a TCP reset is a reset: either way the workload
//! on the other side is reset, never handed a clean end it did not get.
//! Which end encrypts in the kernel and which in rustls is each agent's own
//! choice: the bytes on the wire are the same.
use std::{
    io::{self, Read as _},
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::StatusCode;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf},
    net::TcpStream,
};

use super::{
    REASON_HEADER, ktls,
    server::{ConnectRequest, Refusal},
    splice::Socket,
};

/// ALPN of bulk tunnels.
pub const ALPN: &[u8] = b"http/1.1";

/// Longest request or answer head accepted: a CONNECT and a refusal's
/// reason fit many times over.
const MAX_HEAD: usize = 8 * 1024;

/// TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;

/// A TCP stream that, while `bounded`, never hands rustls more than the rest
/// of the TLS record it is in. When the connection switches to kernel TLS,
/// rustls then holds no part of a record the kernel should decrypt: every
/// byte read so far belongs to records rustls has processed.
#[derive(Debug)]
pub struct RecordReader {
    tcp: TcpStream,
    bounded: bool,
    records: RecordBoundary,
    /// `TCP_ULP tls` is set: the kernel can take the records over.
    kernel_ready: bool,
    /// [`ktls::KernelTls`]'s lower record limit, if it has one.
    record_limit: Option<u64>,
}

impl RecordReader {
    pub fn new(tcp: TcpStream) -> Self {
        Self {
            tcp,
            bounded: true,
            records: RecordBoundary::default(),
            kernel_ready: false,
            record_limit: None,
        }
    }

    /// Readies the socket for kernel TLS, if `kernel` has it: done while
    /// the connection is surely established (the peer waits for this end),
    /// as the kernel takes the `tls` protocol only then; until the keys are
    /// set, bytes pass through unchanged.
    pub fn ready_kernel_tls(&mut self, kernel: &ktls::KernelTls) {
        self.kernel_ready = kernel.attach(&self.tcp);
        self.record_limit = kernel.record_limit();
    }

    pub fn kernel_ready(&self) -> bool {
        self.kernel_ready
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Reads as much as the socket has from now on (HBONE, or a bulk
    /// tunnel that stays in user space).
    pub fn unbound(&mut self) {
        self.bounded = false;
    }

    /// True when part of a record has been read and not the rest.
    pub fn mid_record(&self) -> bool {
        self.records.mid_record()
    }
}

/// Where a stream of TLS records stands: in a header, or in a body.
#[derive(Debug, Default)]
struct RecordBoundary {
    header: [u8; RECORD_HEADER],
    header_read: usize,
    body_left: usize,
}

impl RecordBoundary {
    fn mid_record(&self) -> bool {
        self.header_read > 0 || self.body_left > 0
    }

    /// How many bytes the next read may take without crossing into the
    /// next record.
    fn allowance(&self) -> usize {
        if self.body_left > 0 {
            self.body_left
        } else {
            RECORD_HEADER - self.header_read
        }
    }

    /// Accounts for `read`, what the last read (of at most the allowance)
    /// produced.
    fn advance(&mut self, read: &[u8]) {
        if self.body_left > 0 {
            self.body_left -= read.len();
            return;
        }
        self.header[self.header_read..self.header_read + read.len()].copy_from_slice(read);
        self.header_read += read.len();
        if self.header_read == RECORD_HEADER {
            self.header_read = 0;
            self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
        }
    }
}

impl AsyncRead for RecordReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.bounded {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        let want = this.records.allowance().min(buf.remaining());
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(want));
        ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        this.records.advance(&buf.initialize_unfilled_to(want)[..n]);
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Writes go straight to the socket, vectored as rustls writes its queued
/// records (one syscall for many).
impl AsyncWrite for RecordReader {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// A workload's TCP connection, as a bulk tunnel needs it: the socket
/// itself, for `splice(2)`.
pub trait TcpSocket: Socket {
    fn tcp(&self) -> &TcpStream;
}

impl TcpSocket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

/// Either end of a bulk tunnel's TLS connection.
pub trait BulkTls: AsyncRead + AsyncWrite + tokio::io::AsyncBufRead + Unpin + Send {
    fn io(&self) -> &RecordReader;
    fn io_mut(&mut self) -> &mut RecordReader;
    /// The plaintext rustls has decrypted and not handed out yet.
    fn plaintext(&mut self) -> rustls::Reader<'_>;
    /// The socket, and the secrets and sequence numbers of both directions
    /// for the kernel. Only once everything written is flushed and no
    /// record is half read.
    fn into_secrets(self) -> Result<(TcpStream, ktls::Secrets), rustls::Error>;
}

macro_rules! bulk_tls {
    ($stream:ty) => {
        impl BulkTls for $stream {
            fn io(&self) -> &RecordReader {
                self.get_ref().0
            }
            fn io_mut(&mut self) -> &mut RecordReader {
                self.get_mut().0
            }
            fn plaintext(&mut self) -> rustls::Reader<'_> {
                self.get_mut().1.reader()
            }
            fn into_secrets(self) -> Result<(TcpStream, ktls::Secrets), rustls::Error> {
                let (io, conn) = self.into_inner();
                // Mesh connections are TLS 1.3 only.
                let Some(rustls::SupportedCipherSuite::Tls13(suite)) =
                    conn.negotiated_cipher_suite()
                else {
                    return Err(rustls::Error::General("not a TLS 1.3 connection".into()));
                };
                let limit = suite.common.confidentiality_limit;
                let limit = io.record_limit.map_or(limit, |lower| lower.min(limit));
                let secrets = conn.dangerous_extract_secrets()?;
                Ok((io.tcp, ktls::Secrets::new(secrets, limit)?))
            }
        }
    };
}
bulk_tls!(tokio_rustls::client::TlsStream<RecordReader>);
bulk_tls!(tokio_rustls::server::TlsStream<RecordReader>);

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("the peer agent refused the tunnel ({status}): {reason}")]
    Refused { status: StatusCode, reason: String },
    #[error("bulk tunnel: {0}")]
    Protocol(String),
    #[error("bulk tunnel: {0}")]
    Io(#[from] io::Error),
}

/// Asks the peer for a tunnel to `target` on `tls`, a bulk connection
/// (ALPN [`ALPN`]) just established; on the peer's 200, the tunnel and the
/// bytes the destination already sent.
pub async fn open<T: BulkTls>(
    mut tls: T,
    target: SocketAddr,
    timeout: Duration,
    kernel: &ktls::KernelTls,
) -> Result<(T, Bytes), BulkError> {
    tls.io_mut().ready_kernel_tls(kernel);
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    tls.flush().await?;
    let (head, rest) = tokio::time::timeout(timeout, read_head(&mut tls))
        .await
        .map_err(|_| BulkError::Protocol(format!("no answer within {timeout:?}")))??;
    let (status, reason) = parse_response(&head).map_err(BulkError::Protocol)?;
    if status != StatusCode::OK {
        return Err(BulkError::Refused { status, reason });
    }
    Ok((tls, rest))
}

/// Serves one bulk connection: reads its `CONNECT`, asks `handler` (policy,
/// then the connection to the destination), answers, and carries the
/// tunnel until both directions end. `started` learns where its records
/// are encrypted.
pub async fn serve<T, H, F, U>(
    mut tls: T,
    timeout: Duration,
    handler: H,
    kernel: &ktls::KernelTls,
    started: impl FnOnce(ktls::Records),
) -> Result<(), BulkError>
where
    T: BulkTls,
    H: FnOnce(ConnectRequest) -> F,
    F: Future<Output = Result<U, Refusal>>,
    U: TcpSocket,
{
    tls.io_mut().ready_kernel_tls(kernel);
    let (head, rest) = tokio::time::timeout(timeout, read_head(&mut tls))
        .await
        .map_err(|_| BulkError::Protocol(format!("no request within {timeout:?}")))??;
    let target = parse_request(&head).map_err(BulkError::Protocol)?;
    let request = ConnectRequest {
        target,
        headers: http::HeaderMap::new(),
    };
    match handler(request).await {
        Ok(workload) => {
            tls.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
            tls.flush().await?;
            // The agent's own connection to the destination, from the node's
            // namespace: no short-circuit feeds it.
            let reads = ktls::WorkloadReads::Splice;
            Ok(ktls::carry(tls, rest, workload, reads, started).await?)
        }
        Err(refusal) => {
            tls.write_all(refusal_head(&refusal).as_bytes()).await?;
            // close_notify: the answer is the whole of it.
            tls.shutdown().await?;
            Err(BulkError::Refused {
                status: refusal.status,
                reason: refusal.reason,
            })
        }
    }
}

/// Reads an HTTP/1.1 head (up to the blank line) and any bytes after it
/// that rustls has decrypted, leaving no record half read.
async fn read_head<T: BulkTls>(tls: &mut T) -> io::Result<(Vec<u8>, Bytes)> {
    let mut read = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut ended = false;
        loop {
            match tls.plaintext().read(&mut chunk) {
                Ok(0) => {
                    ended = true;
                    break;
                }
                Ok(n) => read.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if let Some(end) = head_end(&read) {
            // rustls hands out plaintext only from whole records, so none
            // is half read here.
            debug_assert!(!tls.io().mid_record());
            let rest = Bytes::copy_from_slice(&read[end..]);
            read.truncate(end);
            return Ok((read, rest));
        }
        if read.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no end of the head within {MAX_HEAD} bytes"),
            ));
        }
        if ended {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed before the end of the head",
            ));
        }
        // Reads records until one yields plaintext, or the end (both
        // read above).
        tls.fill_buf().await?;
    }
}

/// Where the head ends (after its blank line), if it has.
fn head_end(read: &[u8]) -> Option<usize> {
    read.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// The target of a `CONNECT ip:port HTTP/1.1` request.
fn parse_request(head: &[u8]) -> Result<SocketAddr, String> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request head".into()),
        Err(e) => return Err(format!("malformed request head: {e}")),
    }
    if request.method != Some("CONNECT") {
        return Err(format!(
            "expected CONNECT, got {}",
            request.method.unwrap_or("nothing")
        ));
    }
    let authority = request.path.unwrap_or_default();
    authority
        .parse()
        .map_err(|_| format!("CONNECT target {authority:?} is not an IP address and port"))
}

/// The status of an answer, and its `x-mesh-reason` (or the status's own
/// words when it has none).
fn parse_response(head: &[u8]) -> Result<(StatusCode, String), String> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete answer head".into()),
        Err(e) => return Err(format!("malformed answer head: {e}")),
    }
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("answer without a status")?;
    let reason = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(REASON_HEADER))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_owned());
    Ok((status, reason))
}

/// A refusal as an answer head; the reason kept to one header line.
fn refusal_head(refusal: &Refusal) -> String {
    let reason: String = refusal
        .reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect();
    format!(
        "HTTP/1.1 {} {}\r\n{REASON_HEADER}: {reason}\r\ncontent-length: 0\r\n\r\n",
        refusal.status.as_u16(),
        refusal.status.canonical_reason().unwrap_or("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_parse_as_written() {
        let target: SocketAddr = "[fd00::5]:5201".parse().unwrap();
        let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        assert_eq!(parse_request(head.as_bytes()), Ok(target));
        assert_eq!(head_end(head.as_bytes()), Some(head.len()));

        let refusal = Refusal::new(StatusCode::FORBIDDEN, "rule shop/deny-all\r\nx-evil: 1");
        let answer = refusal_head(&refusal);
        assert_eq!(
            parse_response(answer.as_bytes()),
            Ok((
                StatusCode::FORBIDDEN,
                "rule shop/deny-all  x-evil: 1".into()
            ))
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\n"),
            Ok((StatusCode::OK, "OK".into()))
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |h: &str| parse_request(h.as_bytes()).unwrap_err();
        assert!(err("GET / HTTP/1.1\r\n\r\n").contains("expected CONNECT"));
        assert!(err("CONNECT db:5432 HTTP/1.1\r\n\r\n").contains("not an IP address"));
        assert!(err("CONNECT\0 x\r\n\r\n").contains("malformed"));
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn the_record_reader_stops_at_each_record_boundary() {
        let mut r = RecordBoundary::default();
        assert_eq!(r.allowance(), 5);
        r.advance(&[23, 3, 3]);
        assert!(r.mid_record());
        assert_eq!(r.allowance(), 2);
        r.advance(&[0x01, 0x00]);
        assert_eq!(r.allowance(), 256);
        r.advance(&[0; 200]);
        assert_eq!(r.allowance(), 56);
        r.advance(&[0; 56]);
        assert!(!r.mid_record());
        assert_eq!(r.allowance(), 5);
    }
}
