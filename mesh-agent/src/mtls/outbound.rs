//! The source side of a tunnel: a local workload's connection, steered by
//! the kernel, carried to the destination's node over HBONE with the
//! workload's own certificate.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use rustls_pki_types::ServerName;

use http::HeaderMap;
use mesh_common::policy::IpKey;
use tokio::net::{TcpSocket, TcpStream};
use tracing::{Instrument as _, debug, error_span, warn};

use super::{
    listeners::Accepted,
    view::{MeshView, Peer},
};
use crate::{
    flows::{FlowHub, TunnelFlow},
    mtls::metrics::{Direction, TunnelMetrics},
    tunnel::{
        bulk::{self, BulkError, RecordReader},
        client::{OpenError, Tunnel},
        ktls::{self, KernelTls},
        pool::{Pool, PoolError},
    },
};
use mesh_pki::{SvidStore, require_peer, sni_for};

/// One pooled HTTP/2 connection per (source identity, destination
/// identity, peer agent): the client certificate is the source's and the
/// server must prove the destination's, so neither can be shared wider.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: u64,
    pub dst: u64,
    pub peer: SocketAddr,
}

pub struct Outbound {
    pub view: Arc<RwLock<Arc<MeshView>>>,
    pub store: Arc<SvidStore>,
    pub pool: Pool<PoolKey>,
    pub tunnel_port: u16,
    pub flows: FlowHub,
    pub metrics: TunnelMetrics,
    /// The connections being carried, which a SIGTERM lets finish.
    pub carrying: tokio_util::task::TaskTracker,
    /// Destination ports carried by bulk tunnels (sorted).
    pub bulk_ports: Vec<u16>,
    pub kernel_tls: Arc<KernelTls>,
    /// For a bulk tunnel's TLS handshake and its `CONNECT`'s answer.
    pub handshake_timeout: Duration,
}

impl Outbound {
    pub fn handle(self: &Arc<Self>, accepted: Accepted) {
        self.carrying.spawn(self.clone().carry(accepted));
    }

    /// Opens the tunnel, then splices. Opening (lookups, the pool, perhaps
    /// a handshake) runs boxed and is freed once done, and this is no
    /// `async fn`, which would keep `a` for the connection's life: a held
    /// connection's task keeps only the splice.
    fn carry(self: Arc<Self>, a: Accepted) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        let opening = Box::pin(async move { this.open(a).await });
        async move {
            let (tunnel, stream, ends) = match opening.await {
                Some(Opened::Hbone(tunnel, stream, ends)) => (tunnel, stream, ends),
                Some(Opened::Bulk(tls, rest, stream, ends)) => {
                    let _open = self.metrics.open(Direction::Outbound);
                    let metrics = self.metrics.clone();
                    let started = move |records| metrics.bulk(Direction::Outbound, records);
                    // Accepted on the workload's loopback, which the short-circuit
                    // may feed.
                    let reads = ktls::WorkloadReads::Read;
                    if let Err(e) = ktls::carry(*tls, rest, stream, reads, started).await {
                        self.ended_with_reset(ends, &e);
                    }
                    return;
                }
                None => return,
            };
            let _open = self.metrics.open(Direction::Outbound);
            // No span while the bytes flow: a subscriber keeps each span's
            // formatted fields, which would cost every held connection more
            // than its splice does. The names are looked up if it fails.
            if let Err(e) = tunnel.splice(stream).await {
                self.ended_with_reset(ends, &e);
            }
        }
    }

    fn ended_with_reset(&self, (src, dst, dst_addr): Ends, error: &dyn std::fmt::Display) {
        debug!(
            src = %self.flows.identity_name(src),
            dst = %self.flows.identity_name(dst),
            %dst_addr,
            %error,
            "tunnel ended with a reset"
        );
    }

    /// The tunnel for `a`, with its socket and its ends; `None` once
    /// refused (the socket reset, the refusal reported).
    async fn open(&self, mut a: Accepted) -> Option<Opened> {
        let dst = SocketAddr::new(IpKey { ip: a.orig.ip }.into(), a.orig.port);
        let src = &a.source;
        let refuse = |stream: TcpStream, dst_identity: u64, reason: String| {
            // An abortive close: the application sees a reset, never a
            // clean end that could pass for an empty answer.
            let _ = stream.set_zero_linger();
            drop(stream);
            warn!(
                src = %src.spiffe_id,
                dst = %self.flows.identity_name(dst_identity),
                dst_addr = %dst,
                %reason,
                "tunnel not opened"
            );
            self.flows.tunnel(TunnelFlow {
                hook: "tunnel-out",
                allowed: false,
                src_identity: src.identity,
                dst_identity,
                dst,
                rule: None,
                reason: Some(reason),
                mtls: None,
            });
        };
        let view = self.view.read().unwrap().clone();
        let Some(peer) = view.peer(dst.ip()) else {
            refuse(
                a.stream,
                a.orig.dst_identity,
                "the destination is not a mesh workload any more".into(),
            );
            return None;
        };
        let Some(peer_addr) = view.tunnel_address(&peer.node, self.tunnel_port) else {
            refuse(
                a.stream,
                peer.identity,
                format!(
                    "no tunnel address for node {:?} (no MeshNode document)",
                    peer.node
                ),
            );
            return None;
        };
        let Some(config) = self.store.client_config(&src.spiffe_id) else {
            refuse(
                a.stream,
                peer.identity,
                format!("no certificate yet for {}", src.spiffe_id),
            );
            return None;
        };
        let key = PoolKey {
            src: src.identity,
            dst: peer.identity,
            peer: peer_addr,
        };
        let server_name = sni_for(peer.identity);
        let ends = (src.identity, peer.identity, dst);
        if self.bulk_ports.binary_search(&dst.port()).is_ok() {
            let bulk = self.open_bulk(src.spiffe_id.as_str(), peer, peer_addr, dst, &server_name);
            match bulk.await {
                Ok((tls, rest)) => {
                    debug!(src = %src.spiffe_id, dst = %peer.spiffe_id, dst_addr = %dst, "bulk tunnel open");
                    return Some(Opened::Bulk(Box::new(tls), rest, a.stream, ends));
                }
                // The peer agent speaks HBONE only (an older version):
                // this connection takes the pooled path below.
                Err(BulkOpenError::NotSpoken) => {
                    debug!(peer = %peer.node, "the peer agent has no bulk tunnels: HBONE instead");
                }
                Err(BulkOpenError::Failed(BulkError::Refused { status, reason })) => {
                    refuse(
                        a.stream,
                        peer.identity,
                        format!("refused by {} ({status}): {reason}", peer.node),
                    );
                    return None;
                }
                Err(BulkOpenError::Failed(e)) => {
                    refuse(a.stream, peer.identity, format!("{e}"));
                    return None;
                }
            }
        }
        let metrics = self.metrics.clone();
        let expected = Arc::new(peer.spiffe_id.clone());
        let connect = move || {
            let config = config.clone();
            let server_name = server_name.clone();
            let metrics = metrics.clone();
            let expected = expected.clone();
            async move {
                let tcp = connect_marked(peer_addr).await?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(server_name, tcp)
                    .await
                    .and_then(|tls| {
                        require_peer(tls.get_ref().1, &expected).map_err(io::Error::other)?;
                        Ok(tls)
                    });
                metrics.handshake(Direction::Outbound, tls.is_ok());
                tls
            }
        };
        // The pool and the tunnel know no identities: their events carry
        // them from this span (at ERROR level so that no filter leaves them
        // out). A pooled connection serves one (source, destination) pair.
        let span = error_span!("tunnel", src = %src.spiffe_id, dst = %peer.spiffe_id);
        let opened = self
            .pool
            .open(&key, connect, dst, HeaderMap::new(), &mut a.stream)
            .instrument(span.clone())
            .await;
        match opened {
            Ok(tunnel) => {
                debug!(src = %src.spiffe_id, dst = %peer.spiffe_id, dst_addr = %dst, "tunnel open");
                Some(Opened::Hbone(tunnel, a.stream, ends))
            }
            Err(PoolError::Open(OpenError::Refused { status, reason })) => {
                refuse(
                    a.stream,
                    peer.identity,
                    format!("refused by {} ({status}): {reason}", peer.node),
                );
                None
            }
            Err(e) => {
                refuse(a.stream, peer.identity, format!("{e}"));
                None
            }
        }
    }
}

impl Outbound {
    /// A bulk tunnel to `dst`: a TLS connection of its own to the peer
    /// agent, as `src`, and its `CONNECT` answered.
    async fn open_bulk(
        &self,
        src: &str,
        peer: &Peer,
        peer_addr: SocketAddr,
        dst: SocketAddr,
        server_name: &ServerName<'static>,
    ) -> Result<(BulkStream, Bytes), BulkOpenError> {
        let failed = |e: io::Error| BulkOpenError::Failed(BulkError::Io(e));
        let config = self.store.bulk_client_config(src).ok_or_else(|| {
            BulkOpenError::Failed(BulkError::Protocol(format!("no certificate yet for {src}")))
        })?;
        let handshake = async {
            let tcp = connect_marked(peer_addr).await?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name.clone(), RecordReader::new(tcp))
                .await?;
            require_peer(tls.get_ref().1, &peer.spiffe_id).map_err(io::Error::other)?;
            Ok::<_, io::Error>(tls)
        };
        let tls = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) if refused_protocol(&e) => {
                self.metrics.handshake(Direction::Outbound, false);
                return Err(BulkOpenError::NotSpoken);
            }
            Ok(Err(e)) => {
                self.metrics.handshake(Direction::Outbound, false);
                return Err(failed(e));
            }
            Err(_) => {
                self.metrics.handshake(Direction::Outbound, false);
                return Err(failed(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no TLS handshake within {:?}", self.handshake_timeout),
                )));
            }
        };
        self.metrics.handshake(Direction::Outbound, true);
        bulk::open(tls, dst, self.handshake_timeout, &self.kernel_tls)
            .await
            .map_err(BulkOpenError::Failed)
    }
}

type Ends = (u64, u64, SocketAddr);
type BulkStream = tokio_rustls::client::TlsStream<RecordReader>;

/// A workload's connection with the tunnel that carries it.
enum Opened {
    Hbone(Tunnel, TcpStream, Ends),
    /// With the bytes the destination sent behind the answer. Boxed: a
    /// TLS connection is a kilobyte, an HBONE tunnel a handle.
    Bulk(Box<BulkStream>, Bytes, TcpStream, Ends),
}

enum BulkOpenError {
    /// The peer agent does not offer bulk tunnels.
    NotSpoken,
    Failed(BulkError),
}

/// The peer refused the handshake for want of a common ALPN protocol.
fn refused_protocol(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
            )
        })
}

/// A TCP connection from the agent itself: marked, so the kernel's connect
/// hooks let it through unjudged and unsteered (the agent already checked).
pub async fn connect_marked(to: SocketAddr) -> io::Result<TcpStream> {
    let socket = if to.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::Mark,
        &mesh_common::AGENT_SOCKET_MARK,
    )
    .map_err(io::Error::from)?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
