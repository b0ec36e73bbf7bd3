//! Test harness on loopback: destinations, a server agent (port 15008's
//! role), a client agent (the outbound listener's role), applications, and
//! mutual TLS from throwaway certificates.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::broadcast;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::TunnelSettings;
use super::pool::Pool;
use super::server::{self, ConnectRequest, Refusal};
use super::splice::Socket;

/// A byte stream to a peer agent: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub const LOCALHOST: &str = "127.0.0.1:0";

/// Pseudo-random bytes (xorshift64*), made 8 at a time so that tens of
/// MiB take milliseconds even in a debug build.
pub fn random_bytes(len: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    let mut out = BytesMut::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out.freeze()
}

/// Reads to end of stream, checking every byte against `expected`.
pub async fn read_exact_stream<R: AsyncRead + Unpin>(
    reader: &mut R,
    expected: &[u8],
) -> io::Result<()> {
    let mut buf = vec![0; 256 * 1024];
    let mut at = 0;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if at + n > expected.len() || buf[..n] != expected[at..at + n] {
            return Err(io::Error::other(format!(
                "bytes differ from offset {at} (chunk of {n}, {} expected in all)",
                expected.len()
            )));
        }
        at += n;
    }
    if at != expected.len() {
        return Err(io::Error::other(format!(
            "stream ended after {at} of {} bytes",
            expected.len()
        )));
    }
    Ok(())
}

/// Writes `data` in big writes, then shuts down the write side.
pub async fn write_and_shut<W: AsyncWrite + Unpin>(writer: &mut W, data: &[u8]) -> io::Result<()> {
    writer.write_all(data).await?;
    writer.shutdown().await
}

/// Sends `up` and receives `down` at the same time on one socket, both
/// checked byte for byte.
pub async fn exchange(stream: TcpStream, up: Bytes, down: Bytes) -> io::Result<()> {
    let (mut reader, mut writer) = stream.into_split();
    let (sent, received) = tokio::join!(
        write_and_shut(&mut writer, &up),
        read_exact_stream(&mut reader, &down)
    );
    sent.and(received)
}

/// Kernel socket buffers small and fixed (no autotuning), so that what
/// a test sees buffered is mostly the tunnel's doing. Linux doubles it.
pub const SMALL_BUFFER: u32 = 128 * 1024;

fn small_buffer_socket() -> TcpSocket {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(SMALL_BUFFER).unwrap();
    socket.set_recv_buffer_size(SMALL_BUFFER).unwrap();
    socket
}

/// A listener whose accepted sockets have small buffers.
pub fn small_buffer_listener() -> TcpListener {
    let socket = small_buffer_socket();
    socket.bind(LOCALHOST.parse().unwrap()).unwrap();
    socket.listen(1024).unwrap()
}

/// A connection with small buffers.
pub async fn small_buffer_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    small_buffer_socket().connect(addr).await
}

/// A destination that runs `serve` on every connection it accepts and
/// reports each outcome.
pub async fn destination<F, Fut>(serve: F) -> (SocketAddr, Outcomes)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    destination_on(TcpListener::bind(LOCALHOST).await.unwrap(), serve)
}

/// [`destination`] on a listener of the caller's.
pub fn destination_on<F, Fut>(listener: TcpListener, serve: F) -> (SocketAddr, Outcomes)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (outcome, tx) = (serve(stream), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(outcome.await);
            });
        }
    });
    (addr, rx)
}

/// A destination that, on every connection, reads all of `expect` (to the
/// application's FIN), then sends `reply` and closes: the direction still
/// open must keep working after a half-close.
pub async fn answer_after_request(expect: Bytes, reply: Bytes) -> (SocketAddr, Outcomes) {
    destination(move |mut stream| {
        let (expect, reply) = (expect.clone(), reply.clone());
        async move {
            read_exact_stream(&mut stream, &expect).await?;
            write_and_shut(&mut stream, &reply).await
        }
    })
    .await
}

/// A destination that, on every connection, receives `expect` and sends
/// `reply` at the same time.
pub async fn exchange_destination(expect: Bytes, reply: Bytes) -> (SocketAddr, Outcomes) {
    destination(move |stream| exchange(stream, reply.clone(), expect.clone())).await
}

/// Two ends of a loopback TCP connection.
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(LOCALHOST).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

pub type Outcomes = tokio::sync::mpsc::UnboundedReceiver<io::Result<()>>;

/// A destination that sends back what it receives, then closes.
pub async fn echo_destination() -> SocketAddr {
    let listener = TcpListener::bind(LOCALHOST).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                    let _ = writer.shutdown().await;
                }
            });
        }
    });
    addr
}

/// The handler of a plain server agent: connect to the target, or refuse
/// with 502 saying why.
pub async fn connect_to_target(request: ConnectRequest) -> Result<TcpStream, Refusal> {
    TcpStream::connect(request.target).await.map_err(|error| {
        Refusal::new(
            StatusCode::BAD_GATEWAY,
            format!("cannot connect to {}: {error}", request.target),
        )
    })
}

/// A server agent: accepts connections (TLS when given an acceptor) and
/// serves tunnels on each with `handler`.
pub struct ServerAgent {
    pub addr: SocketAddr,
    shutdown: broadcast::Sender<()>,
    /// Connections whose `serve` has returned.
    pub served: Arc<AtomicUsize>,
    /// The accept loop, which owns every connection's task.
    accepting: tokio::task::JoinHandle<()>,
}

impl ServerAgent {
    pub async fn start<H, F, U>(
        settings: TunnelSettings,
        tls: Option<TlsAcceptor>,
        handler: H,
    ) -> Self
    where
        H: Fn(ConnectRequest) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<U, Refusal>> + Send + 'static,
        U: Socket + 'static,
    {
        Self::start_at(LOCALHOST.parse().unwrap(), settings, tls, handler).await
    }

    /// Like [`ServerAgent::start`], listening on `addr` (a restarted
    /// agent takes its predecessor's port).
    pub async fn start_at<H, F, U>(
        addr: SocketAddr,
        settings: TunnelSettings,
        tls: Option<TlsAcceptor>,
        handler: H,
    ) -> Self
    where
        H: Fn(ConnectRequest) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<U, Refusal>> + Send + 'static,
        U: Socket + 'static,
    {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, _) = broadcast::channel(1);
        let subscribe = shutdown.clone();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let accepting = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let (settings, tls, handler) = (settings.clone(), tls.clone(), handler.clone());
                // Only the connections open at shutdown are told.
                let (mut stop, count) = (subscribe.subscribe(), count.clone());
                connections.spawn(async move {
                    let shutdown = async move {
                        let _ = stop.recv().await;
                    };
                    let result = match tls {
                        Some(tls) => {
                            let stream = tls.accept(stream).await.unwrap();
                            server::serve(stream, &settings, handler, shutdown).await
                        }
                        None => server::serve(stream, &settings, handler, shutdown).await,
                    };
                    if let Err(error) = result {
                        tracing::debug!(%error, "test server agent: connection ended");
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            shutdown,
            served,
            accepting,
        }
    }

    /// The agent dies without a word, as on SIGKILL: its listener and
    /// every connection close at once, no GOAWAY sent.
    pub async fn crash(self) {
        self.accepting.abort();
        let _ = self.accepting.await;
    }

    /// The graceful shutdown of every connection open now, as on SIGTERM
    /// (later connections are served as usual).
    pub fn shut_down(&self) {
        let _ = self.shutdown.send(());
    }
}

/// How a client agent reaches the server agent: a new TCP (and TLS)
/// stream per pooled connection.
pub fn connector(
    peer: SocketAddr,
    tls: Option<TlsConnector>,
) -> impl Fn() -> futures::future::BoxFuture<'static, io::Result<Box<dyn Io>>> + Clone + Send + Sync
{
    move || {
        let tls = tls.clone();
        Box::pin(async move {
            let stream = TcpStream::connect(peer).await?;
            stream.set_nodelay(true)?;
            Ok(match tls {
                Some(tls) => {
                    let name = ServerName::try_from("node-b.mesh.test").unwrap();
                    Box::new(tls.connect(name, stream).await?) as Box<dyn Io>
                }
                None => Box::new(stream) as Box<dyn Io>,
            })
        })
    }
}

/// A client agent: accepts application connections and tunnels each to
/// `target` through the pool.
pub async fn client_agent(
    pool: Pool<u8>,
    peer: SocketAddr,
    tls: Option<TlsConnector>,
    target: SocketAddr,
) -> SocketAddr {
    let listener = TcpListener::bind(LOCALHOST).await.unwrap();
    client_agent_on(listener, pool, peer, tls, target)
}

/// [`client_agent`] on a listener of the caller's.
pub fn client_agent_on(
    listener: TcpListener,
    pool: Pool<u8>,
    peer: SocketAddr,
    tls: Option<TlsConnector>,
    target: SocketAddr,
) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    let connect = connector(peer, tls);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (pool, connect) = (pool.clone(), connect.clone());
            tokio::spawn(async move {
                match pool
                    .open(&0, connect, target, HeaderMap::new(), &mut socket)
                    .await
                {
                    Ok(tunnel) => {
                        if let Err(error) = tunnel.splice(socket).await {
                            tracing::debug!(%error, "test client agent: tunnel reset");
                        }
                    }
                    Err(error) => {
                        tracing::debug!(%error, "test client agent: no tunnel");
                        let _ = socket.reset_on_close();
                    }
                }
            });
        }
    });
    addr
}

/// Mutual TLS as the agents use it (TLS 1.3, ALPN h2, both ends proving a
/// certificate of one CA), from throwaway certificates.
pub fn mutual_tls() -> (TlsAcceptor, TlsConnector) {
    mutual_tls_for(b"h2")
}

/// [`mutual_tls`] as bulk tunnels use it: ALPN `http/1.1`, the secrets
/// kept for the kernel.
pub fn bulk_mutual_tls() -> (TlsAcceptor, TlsConnector) {
    mutual_tls_for(super::bulk::ALPN)
}

fn mutual_tls_for(alpn: &[u8]) -> (TlsAcceptor, TlsConnector) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
    };
    let (server_chain, server_key) = leaf("node-b.mesh.test");
    let (client_chain, client_key) = leaf("node-a.mesh.test");
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let roots = Arc::new(roots);

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server_chain, server_key)
        .unwrap();
    server.alpn_protocols = vec![alpn.to_vec()];
    server.send_tls13_tickets = 0;
    server.enable_secret_extraction = true;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .unwrap();
    client.alpn_protocols = vec![alpn.to_vec()];
    client.enable_secret_extraction = true;
    (
        TlsAcceptor::from(Arc::new(server)),
        TlsConnector::from(Arc::new(client)),
    )
}
