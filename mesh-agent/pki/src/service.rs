//! The CA as a gRPC service, `mesh.ca.v1.CertificateAuthority/Sign`, over
//! mutual TLS 1.3: nodes authenticate with their node certificate
//! (`spiffe://<td>/mesh/node/<name>`, from `mesh-agent ca issue-node`) and
//! may only get the identities of the workloads they run.
//!
//! The server accepts TLS itself and hands tonic the verified connections,
//! so the handler knows which node is asking ([`NodePeer`], a request
//! extension). Requested lifetimes beyond the configured maximum are
//! clamped to it (see [`granted_lifetime`]).
//!
//! The client speaks HTTP/2 (h2) over its own mutual-TLS connection and
//! frames the one unary call itself: tonic's channel can only take a custom
//! TLS connector through hyper-util's I/O adapter, which this crate does
//! not depend on.
//!
//! [`granted_lifetime`]: super::issuer::granted_lifetime

use std::{
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use prost::Message as _;
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tonic::{Code, Request, Response, Status, transport::server::Connected};
use tracing::{debug, info, warn};

use super::{
    authz::Authorizer,
    ca::{CaHandle, NODE_BUNDLE, NODE_CERT, NODE_KEY, SERVING_LIFETIME},
    cert::spiffe_id_of,
    files::{self, FileError},
    issuer::{self, BoxFuture, IssueError, Issuer, Refusal},
    spiffe::{self, CA_SERVER_NAME},
    store::{self, Svid},
    verify::{SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle, peer_identity},
};

/// The messages, written by hand (no protoc), and the generated server.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    /// `mesh.ca.v1.SignRequest`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SignRequest {
        /// PKCS#10 certificate signing request, DER.
        #[prost(bytes = "vec", tag = "1")]
        pub csr: Vec<u8>,
        #[prost(string, tag = "2")]
        pub spiffe_id: String,
        /// 0: the CA's maximum.
        #[prost(uint64, tag = "3")]
        pub lifetime_seconds: u64,
    }

    /// `mesh.ca.v1.SignResponse`
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SignResponse {
        /// DER, leaf first, without the root.
        #[prost(bytes = "vec", repeated, tag = "1")]
        pub cert_chain: Vec<Vec<u8>>,
        /// DER roots the mesh trusts.
        #[prost(bytes = "vec", repeated, tag = "2")]
        pub trust_bundle: Vec<Vec<u8>>,
    }

    include!(concat!(
        env!("OUT_DIR"),
        "/mesh.ca.v1.CertificateAuthority.rs"
    ));
}

use proto::{
    SignRequest, SignResponse,
    certificate_authority_server::{CertificateAuthority, CertificateAuthorityServer},
};

/// The path of the one method.
const SIGN_PATH: &str = "/mesh.ca.v1.CertificateAuthority/Sign";
/// How long a TLS handshake or a call may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Larger answers are not a CA's.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Ca(#[from] super::ca::CaError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The node on the other end of a verified connection (request extension).
#[derive(Debug, Clone)]
pub struct NodePeer {
    pub node: String,
    pub addr: SocketAddr,
}

/// A mutual-TLS connection whose client is a verified node.
struct NodeConn {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: NodePeer,
}

impl Connected for NodeConn {
    type ConnectInfo = NodePeer;

    fn connect_info(&self) -> NodePeer {
        self.peer.clone()
    }
}

impl AsyncRead for NodeConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodeConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// The certificate the service presents (`spiffe://<td>/mesh/ca`), issued
/// by the CA itself with a key held in memory only, and re-issued at half
/// its lifetime or when the CA directory changed (rotation).
struct ServingCert {
    ca: CaHandle,
    current: Mutex<Option<(u64, SystemTime, Arc<CertifiedKey>)>>,
}

impl ServingCert {
    fn get(&self) -> Result<Arc<CertifiedKey>, super::ca::CaError> {
        let (ca, generation) = self.ca.current_with_generation();
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, renew_at, key)) = &*current
            && *g == generation
            && SystemTime::now() < *renew_at
        {
            return Ok(key.clone());
        }
        match ca.serving_svid(SERVING_LIFETIME) {
            Ok(svid) => {
                let renew_at = SystemTime::now() + SERVING_LIFETIME / 2;
                *current = Some((generation, renew_at, svid.key.clone()));
                Ok(svid.key)
            }
            // Keep presenting the last one while it lasts.
            Err(e) => match &*current {
                Some((_, _, key)) => {
                    warn!(error = %e, "cannot renew the CA's serving certificate");
                    Ok(key.clone())
                }
                None => Err(e),
            },
        }
    }
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
            .inspect_err(|e| warn!(error = %e, "no serving certificate"))
            .ok()
    }
}

/// The gRPC handler.
struct CaService {
    ca: CaHandle,
    authorizer: Arc<dyn Authorizer>,
    max_lifetime: Duration,
}

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let peer = request
            .extensions()
            .get::<NodePeer>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified node identity"))?;
        let request = request.into_inner();
        let ca = self.ca.current();
        let result = issuer::sign_for_node(
            &ca,
            &*self.authorizer,
            &peer.node,
            &request.csr,
            &request.spiffe_id,
            Duration::from_secs(request.lifetime_seconds),
            self.max_lifetime,
        );
        match result {
            Ok(chain) => {
                info!(node = %peer.node, peer = %peer.addr, identity = %request.spiffe_id, "certificate issued");
                Ok(Response::new(SignResponse {
                    cert_chain: chain.into_iter().map(|c| c.to_vec()).collect(),
                    trust_bundle: ca.bundle().iter().map(|c| c.to_vec()).collect(),
                }))
            }
            Err(refusal) => {
                let status = match refusal {
                    Refusal::Denied(m) => Status::permission_denied(m),
                    Refusal::Invalid(m) => Status::invalid_argument(m),
                    Refusal::Failed(m) => Status::failed_precondition(m),
                };
                warn!(node = %peer.node, peer = %peer.addr, identity = %request.spiffe_id, error = status.message(), "certificate refused");
                Err(status)
            }
        }
    }
}

/// The CA service, ready to serve.
pub struct CaServer {
    ca: CaHandle,
    authorizer: Arc<dyn Authorizer>,
    max_lifetime: Duration,
    tls: Arc<rustls::ServerConfig>,
}

impl CaServer {
    /// Builds the TLS configuration and issues the serving certificate now,
    /// so that a CA that cannot sign (expired) fails at start.
    pub fn new(
        ca: CaHandle,
        authorizer: Arc<dyn Authorizer>,
        max_lifetime: Duration,
    ) -> Result<CaServer, ServiceError> {
        let serving = ServingCert {
            ca: ca.clone(),
            current: Mutex::new(None),
        };
        serving.get()?;
        let clients = SpiffeClientVerifier::new(ca.trust_bundle(), &ca.trust_domain()).nodes_only();
        let tls = store::server_tls_config(Arc::new(serving), Arc::new(clients));
        Ok(CaServer {
            ca,
            authorizer,
            max_lifetime,
            tls,
        })
    }

    /// Serves until `shutdown` completes, then lets open calls finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServiceError> {
        let (tx, mut rx) = mpsc::channel::<std::io::Result<NodeConn>>(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.clone());
        let trust_domain = self.ca.trust_domain();
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: do not spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Handshakes run on their own, so a slow client cannot hold
                // up the others.
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let trust_domain = trust_domain.clone();
                tokio::spawn(async move {
                    let tls = match tokio::time::timeout(TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            info!(peer = %addr, error = %e, "connection refused");
                            return;
                        }
                        Err(_) => {
                            info!(peer = %addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    // The verifier accepted only node identities.
                    let Some(spiffe_id) = peer_identity(tls.get_ref().1) else {
                        return;
                    };
                    let Some(node) = spiffe::node_name(&spiffe_id, &trust_domain) else {
                        return;
                    };
                    debug!(peer = %addr, node, "node connected");
                    let peer = NodePeer {
                        node: node.to_owned(),
                        addr,
                    };
                    let _ = tx.send(Ok(NodeConn { tls, peer })).await;
                });
            }
        });
        let incoming = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let service = CaService {
            ca: self.ca,
            authorizer: self.authorizer,
            max_lifetime: self.max_lifetime,
        };
        let result = tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                CertificateAuthorityServer::new(service),
                incoming,
                shutdown,
            )
            .await;
        accept.abort();
        Ok(result?)
    }
}

/// A node's credentials for the CA service: `cert.pem` (chain, leaf first),
/// `key.pem` and `bundle.pem` as `mesh-agent ca issue-node` writes them.
pub struct NodeCredentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub bundle: Vec<CertificateDer<'static>>,
}

impl NodeCredentials {
    /// Reads and checks a credentials directory (valid now, key matches).
    pub fn load(dir: &Path) -> Result<NodeCredentials, FileError> {
        let (chain, key) =
            files::read_credentials(&dir.join(NODE_CERT), &dir.join(NODE_KEY), SystemTime::now())?;
        let bundle = files::read_certs(&dir.join(NODE_BUNDLE))?;
        Ok(NodeCredentials {
            chain,
            key: rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            bundle,
        })
    }
}

/// A node's client of the CA service. Keeps one HTTP/2 connection and
/// reconnects after a failure; trusts, for the CA, the bundle of the CA's
/// last answer (so a CA rotation reaches it).
pub struct CaClient {
    endpoint: String,
    node: String,
    tls: Arc<rustls::ClientConfig>,
    bundle: TrustBundle,
    conn: tokio::sync::Mutex<Option<h2::client::SendRequest<Bytes>>>,
}

impl CaClient {
    /// Connects to `endpoint` (`host:port`) as the node of `credentials`,
    /// which must be a node identity of `trust_domain`.
    pub async fn connect(
        endpoint: &str,
        credentials: NodeCredentials,
        trust_domain: &str,
    ) -> Result<CaClient, IssueError> {
        let unusable = |m: String| IssueError::Refused(format!("node credentials: {m}"));
        let leaf = credentials
            .chain
            .first()
            .ok_or_else(|| unusable("no certificate".into()))?;
        let id = spiffe_id_of(leaf).map_err(|e| unusable(format!("the certificate {e}")))?;
        let node = spiffe::node_name(&id, trust_domain)
            .ok_or_else(|| {
                unusable(format!(
                    "{id} is not a node identity of trust domain {trust_domain}"
                ))
            })?
            .to_owned();
        let svid =
            Svid::new(credentials.chain, credentials.key).map_err(|e| unusable(e.to_string()))?;
        let bundle = TrustBundle::new(credentials.bundle).map_err(|e| unusable(e.to_string()))?;
        let tls = store::client_tls_config(
            Some(svid.key),
            Arc::new(SpiffeServerVerifier::new(bundle.clone(), trust_domain)),
        );
        let client = CaClient {
            endpoint: endpoint.to_owned(),
            node,
            tls,
            bundle,
            conn: tokio::sync::Mutex::new(None),
        };
        let conn = client.open().await?;
        *client.conn.lock().await = Some(conn);
        Ok(client)
    }

    /// The node this client authenticates as.
    #[cfg(test)]
    pub fn node(&self) -> &str {
        &self.node
    }

    async fn open(&self) -> Result<h2::client::SendRequest<Bytes>, IssueError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            IssueError::Unavailable(format!(
                "{} (as node {}): {what}: {e}",
                self.endpoint, self.node
            ))
        };
        let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect(&self.endpoint))
            .await
            .map_err(|e| unavailable("connect", &e))?
            .map_err(|e| unavailable("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(CA_SERVER_NAME).expect("a DNS name");
        let tls = tokio::time::timeout(
            TIMEOUT,
            tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|e| unavailable("TLS handshake", &e))?
        .map_err(|e| unavailable("TLS handshake", &e))?;
        let (send, connection) = h2::client::handshake(tls)
            .await
            .map_err(|e| unavailable("HTTP/2 handshake", &e))?;
        let endpoint = self.endpoint.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(endpoint, error = %e, "CA connection closed");
            }
        });
        Ok(send)
    }

    /// A new SVID for `spiffe_id`: a fresh key and CSR made here, signed by
    /// the CA, checked before use.
    pub async fn sign(&self, spiffe_id: &str, lifetime: Duration) -> Result<Svid, IssueError> {
        let (key, csr) = issuer::new_key_and_csr()?;
        let request = SignRequest {
            csr,
            spiffe_id: spiffe_id.to_owned(),
            lifetime_seconds: lifetime.as_secs(),
        };
        let response = match tokio::time::timeout(TIMEOUT, self.call(&request)).await {
            Ok(result) => result?,
            Err(_) => {
                *self.conn.lock().await = None;
                return Err(IssueError::Unavailable(format!(
                    "{}: no answer within {TIMEOUT:?}",
                    self.endpoint
                )));
            }
        };
        let bundle: Vec<CertificateDer<'static>> = response
            .trust_bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let chain = response
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let svid = issuer::accept_issued(chain, key, spiffe_id, &bundle)?;
        if let Err(e) = self.bundle.replace(bundle) {
            warn!(error = %e, "the CA's trust bundle is unusable; keeping the previous one");
        }
        Ok(svid)
    }

    /// One call on the shared connection (h2 multiplexes concurrent
    /// calls). A cached connection that turns out dead (the CA restarted)
    /// is replaced and the call tried once more at once.
    async fn call(&self, request: &SignRequest) -> Result<SignResponse, IssueError> {
        for attempt in 0..2 {
            let (send, fresh) = {
                let mut conn = self.conn.lock().await;
                match &*conn {
                    Some(send) => (send.clone(), false),
                    None => {
                        let send = self.open().await?;
                        *conn = Some(send.clone());
                        (send, true)
                    }
                }
            };
            match unary(send, request).await {
                Ok(response) => return Ok(response),
                // The CA answered: the connection is fine.
                Err(CallError::Status(status)) => return Err(status_error(status)),
                Err(CallError::Transport(message)) => {
                    *self.conn.lock().await = None;
                    if fresh || attempt == 1 {
                        return Err(IssueError::Unavailable(format!(
                            "{}: {message}",
                            self.endpoint
                        )));
                    }
                    debug!(endpoint = %self.endpoint, error = %message, "CA connection lost; reconnecting");
                }
            }
        }
        unreachable!("the second attempt always returns")
    }
}

impl Issuer for CaClient {
    fn issue<'a>(
        &'a self,
        spiffe_id: &'a str,
        lifetime: Duration,
    ) -> BoxFuture<'a, Result<Svid, IssueError>> {
        Box::pin(self.sign(spiffe_id, lifetime))
    }

    fn trust_bundle(&self) -> Vec<CertificateDer<'static>> {
        self.bundle.roots()
    }
}

enum CallError {
    Status(Status),
    Transport(String),
}

fn status_error(status: Status) -> IssueError {
    match status.code() {
        Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated => {
            IssueError::Refused(status.message().to_owned())
        }
        code => IssueError::Unavailable(format!("{code:?}: {}", status.message())),
    }
}

/// One unary gRPC call over HTTP/2: a length-prefixed message out, a
/// length-prefixed message and a `grpc-status` back.
async fn unary(
    send: h2::client::SendRequest<Bytes>,
    request: &SignRequest,
) -> Result<SignResponse, CallError> {
    let transport = |e: h2::Error| CallError::Transport(e.to_string());
    let mut send = send.ready().await.map_err(transport)?;
    let http_request = http::Request::post(format!("https://{CA_SERVER_NAME}{SIGN_PATH}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .expect("a valid request");
    let (response, mut stream) = send.send_request(http_request, false).map_err(transport)?;
    let message = request.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.put_u8(0);
    frame.put_u32(message.len() as u32);
    frame.put_slice(&message);
    stream.send_data(frame.freeze(), true).map_err(transport)?;

    let (parts, mut body) = response.await.map_err(transport)?.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(CallError::Transport(format!(
            "HTTP status {}",
            parts.status
        )));
    }
    // A refusal may come alone in the headers ("trailers-only").
    if let Some(status) = Status::from_header_map(&parts.headers)
        && status.code() != Code::Ok
    {
        return Err(CallError::Status(status));
    }
    let mut data = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(transport)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
        if data.len() > MAX_RESPONSE {
            return Err(CallError::Transport("answer too large".into()));
        }
    }
    let trailers = body.trailers().await.map_err(transport)?;
    match trailers.as_ref().and_then(Status::from_header_map) {
        Some(status) if status.code() == Code::Ok => {}
        Some(status) => return Err(CallError::Status(status)),
        None => return Err(CallError::Transport("no grpc-status in the answer".into())),
    }
    let mut data = data.freeze();
    if data.len() < 5 || data[0] != 0 {
        return Err(CallError::Transport("malformed gRPC message".into()));
    }
    data.advance(1);
    let len = data.get_u32() as usize;
    if data.len() != len {
        return Err(CallError::Transport("malformed gRPC message length".into()));
    }
    SignResponse::decode(data).map_err(|e| CallError::Transport(format!("undecodable answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        authz::ConfigDirAuthorizer,
        ca::{Ca, DEFAULT_CA_LIFETIME},
        testing::{TempDir, workload},
        verify::{Usage, verify_chain},
    };

    const TD: &str = "cluster.local";

    struct Running {
        addr: SocketAddr,
        dir: TempDir,
        ca: Ca,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), ServiceError>>,
    }

    impl Running {
        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            self.task.await.unwrap().unwrap();
        }

        fn node_credentials(&self, node: &str) -> NodeCredentials {
            let out = self.dir.path().join(format!("node-{node}"));
            self.ca
                .issue_node(node, Duration::from_secs(3600), &out)
                .unwrap();
            NodeCredentials::load(&out).unwrap()
        }
    }

    async fn start(workloads: &str) -> Running {
        let dir = TempDir::new("ca-service");
        let config_dir = dir.path().join("config");
        std::fs::create_dir(&config_dir).unwrap();
        std::fs::write(config_dir.join("workloads.yaml"), workloads).unwrap();
        let ca = Ca::init(TD, &dir.path().join("ca"), None, DEFAULT_CA_LIFETIME).unwrap();
        serve_at(dir, ca, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Serves the CA of `dir/ca` for the workloads of `dir/config`.
    async fn serve_at(dir: TempDir, ca: Ca, addr: SocketAddr) -> Running {
        let authorizer = ConfigDirAuthorizer::new(&dir.path().join("config"), TD).unwrap();
        let server = CaServer::new(
            CaHandle::load(&dir.path().join("ca")).unwrap(),
            Arc::new(authorizer),
            Duration::from_secs(3600),
        )
        .unwrap();
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            dir,
            ca,
            stop: Some(stop),
            task,
        }
    }

    #[tokio::test]
    async fn a_client_reconnects_after_the_ca_restarted() {
        let running = start(&workload("cart-1", "cart", "node-a", "198.18.0.11")).await;
        let client = CaClient::connect(
            &running.addr.to_string(),
            running.node_credentials("node-a"),
            TD,
        )
        .await
        .unwrap();
        let cart = mesh_policy::spiffe_id(TD, "shop", "cart");
        client.sign(&cart, Duration::from_secs(60)).await.unwrap();
        let ca = Ca::load(&running.dir.path().join("ca")).unwrap();
        let Running {
            addr,
            dir,
            stop,
            task,
            ..
        } = running;
        let _ = stop.unwrap().send(());
        task.await.unwrap().unwrap();
        let restarted = serve_at(dir, ca, addr).await;
        // The old connection is gone; the call goes through a new one.
        client.sign(&cart, Duration::from_secs(60)).await.unwrap();
        restarted.stop().await;
    }

    #[tokio::test]
    async fn nodes_get_the_identities_of_their_workloads_only() {
        let running = start(
            &(workload("cart-1", "cart", "node-a", "198.18.0.11")
                + &workload("ledger-1", "ledger", "node-b", "198.18.0.12")),
        )
        .await;
        let client = CaClient::connect(
            &running.addr.to_string(),
            running.node_credentials("node-a"),
            TD,
        )
        .await
        .unwrap();
        assert_eq!(client.node(), "node-a");

        let cart = mesh_policy::spiffe_id(TD, "shop", "cart");
        let svid = client.sign(&cart, Duration::from_secs(600)).await.unwrap();
        assert_eq!(svid.spiffe_id, cart);
        let granted = svid.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(granted <= Duration::from_secs(600) && granted > Duration::from_secs(590));
        // Beyond the maximum: clamped.
        let long = client
            .sign(&cart, Duration::from_secs(86_400))
            .await
            .unwrap();
        let granted = long.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(granted <= Duration::from_secs(3600), "{granted:?}");
        assert_eq!(client.trust_bundle(), running.ca.bundle());

        // Another node's workload: refused, naming node and identity.
        let ledger = mesh_policy::spiffe_id(TD, "shop", "ledger");
        let e = client
            .sign(&ledger, Duration::from_secs(600))
            .await
            .unwrap_err();
        assert_eq!(
            e,
            IssueError::Refused(format!(
                "node node-a may not get a certificate for {ledger}: \
                 no workload of this identity runs on the node (they run on node-b)"
            ))
        );
        // Another trust domain: refused.
        let e = client
            .sign(
                "spiffe://other.example/ns/shop/sa/cart",
                Duration::from_secs(600),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, IssueError::Refused(m) if m.contains("node node-a may not get a certificate for spiffe://other.example/ns/shop/sa/cart")),
            "{e}"
        );
        // The connection survives refusals.
        client.sign(&cart, Duration::from_secs(600)).await.unwrap();
        running.stop().await;
    }

    #[tokio::test]
    async fn refuses_clients_without_a_node_certificate() {
        let running = start(&workload("cart-1", "cart", "node-a", "198.18.0.11")).await;
        let addr = running.addr.to_string();
        // A workload certificate of the same CA is not a node certificate.
        let (chain, key) = running
            .ca
            .issue(
                &mesh_policy::spiffe_id(TD, "shop", "cart"),
                Duration::from_secs(600),
            )
            .unwrap();
        let workload_creds = NodeCredentials {
            chain: chain.clone(),
            key: rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            bundle: running.ca.bundle().to_vec(),
        };
        let e = CaClient::connect(&addr, workload_creds, TD)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(e, IssueError::Refused(ref m) if m.contains("not a node identity")),
            "{e}"
        );

        // Bypassing the client's own check, the server refuses the handshake.
        let svid = Svid::new(
            chain,
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
        let verifier = Arc::new(SpiffeServerVerifier::new(
            TrustBundle::new(running.ca.bundle().to_vec()).unwrap(),
            TD,
        ));
        for cert in [Some(svid.key), None] {
            let tls = store::client_tls_config(cert, verifier.clone());
            let tcp = TcpStream::connect(&addr).await.unwrap();
            let name = ServerName::try_from(CA_SERVER_NAME).unwrap();
            // TLS 1.3: the client may finish before the server refuses; the
            // refusal then arrives as an alert on the first read.
            let outcome = async {
                let tls = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                let (send, connection) = h2::client::handshake(tls)
                    .await
                    .map_err(std::io::Error::other)?;
                tokio::spawn(connection);
                let request = SignRequest::default();
                unary(send, &request)
                    .await
                    .map_err(|_| std::io::Error::other("call failed"))
            }
            .await;
            assert!(outcome.is_err());
        }
        // A node certificate of another CA is refused as well.
        let other_dir = TempDir::new("other-ca");
        let other = Ca::init(TD, other_dir.path(), None, DEFAULT_CA_LIFETIME).unwrap();
        other
            .issue_node(
                "node-a",
                Duration::from_secs(600),
                &other_dir.path().join("n"),
            )
            .unwrap();
        let mut creds = NodeCredentials::load(&other_dir.path().join("n")).unwrap();
        creds.bundle = running.ca.bundle().to_vec();
        // TLS 1.3: the client may finish its handshake before the server
        // refuses it; the refusal then comes with the first call.
        let cart = mesh_policy::spiffe_id(TD, "shop", "cart");
        let outcome = match CaClient::connect(&addr, creds, TD).await {
            Ok(client) => client
                .sign(&cart, Duration::from_secs(60))
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        assert!(
            matches!(outcome, Err(IssueError::Unavailable(_))),
            "{outcome:?}"
        );
        running.stop().await;
    }
    #[tokio::test]
    async fn a_rotation_reaches_a_running_ca_and_nodes_that_trust_the_old_root() {
        let running = start(&workload("cart-1", "cart", "node-a", "198.18.0.11")).await;
        let credentials = running.node_credentials("node-a");
        let old_bundle = credentials.bundle.clone();
        let ca_dir = running.dir.path().join("ca");
        let rotated = Ca::rotate(&ca_dir, None).unwrap();
        // The service re-reads its directory at most once a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // The node still trusts only the old root: the CA's new serving
        // certificate reaches it through the cross-signed root.
        let client = CaClient::connect(&running.addr.to_string(), credentials, TD)
            .await
            .unwrap();
        let cart = mesh_policy::spiffe_id(TD, "shop", "cart");
        let svid = client.sign(&cart, Duration::from_secs(600)).await.unwrap();
        assert_eq!(client.trust_bundle(), rotated.bundle());
        let now = SystemTime::now();
        verify_chain(&old_bundle, &svid.key.cert, now, Usage::Server).unwrap();
        verify_chain(
            std::slice::from_ref(rotated.cert()),
            &svid.key.cert,
            now,
            Usage::Server,
        )
        .unwrap();
        running.stop().await;
    }
}
