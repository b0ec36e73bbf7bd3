//! The destination side of a tunnel: the agent's HBONE listener. It proves
//! the destination's identity with its certificate, learns the source's
//! from the verified client certificate, checks policy with the same
//! entries the kernel uses, and carries allowed tunnels to the workload.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::StatusCode;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{Instrument as _, debug, error_span, info, warn};

use super::{
    admission::Admission,
    judge::{PolicyLookup, Refused},
    outbound::connect_marked,
};
use crate::{
    flows::{FlowHub, TunnelFlow},
    mtls::metrics::{Direction, OpenTunnel, TunnelMetrics},
    tunnel::{
        TunnelSettings,
        bulk::{self, BulkError, RecordReader, TcpSocket},
        ktls::KernelTls,
        server::{ConnectRequest, Refusal, serve},
        splice::Socket,
    },
};
use mesh_pki::{SvidStore, identity_from_sni, peer_identity};
use mesh_policy::numeric_identity;

/// How long a peer may take to finish its TLS handshake.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    pub admission: Admission,
    pub store: Arc<SvidStore>,
    pub lookup: Arc<PolicyLookup>,
    pub settings: TunnelSettings,
    pub flows: FlowHub,
    pub metrics: TunnelMetrics,
    pub kernel_tls: Arc<KernelTls>,
}

impl Inbound {
    /// Accepts tunnels until `shutdown` turns true; then closes the listener
    /// and returns once the open tunnels have drained (each connection says
    /// GOAWAY and ends with its last tunnel). The caller bounds the drain.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
        let mut stop = shutdown.clone();
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "tunnel accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                // Reap finished connections as they end.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            };
            let handshake = match self.admission.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(bound) => {
                    // Closed at once: holding it is what the bound prevents.
                    self.metrics.refused(bound.name());
                    debug!(%peer, bound = bound.name(), "tunnel connection refused at accept");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let shutdown = shutdown.clone();
            connections.spawn(async move { this.connection(tcp, peer, handshake, shutdown).await });
        }
        drop(listener);
        info!(
            connections = connections.len(),
            "tunnel listener closed; open tunnels drain"
        );
        while connections.join_next().await.is_some() {}
        info!("open tunnels drained");
    }

    async fn connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        handshake: super::admission::Handshake,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.store.server_config());
        // Record by record until the protocol is known: a bulk tunnel may
        // hand the connection to the kernel mid-stream.
        let tcp = RecordReader::new(tcp);
        let mut tls = match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                // Another trust domain, an expired or missing client
                // certificate, an identity this node does not host…
                self.metrics.handshake(Direction::Inbound, false);
                warn!(%peer, error = %e, "tunnel handshake refused");
                return;
            }
            Err(_) => {
                self.metrics.handshake(Direction::Inbound, false);
                warn!(%peer, "tunnel handshake timed out");
                return;
            }
        };
        let conn = tls.get_ref().1;
        let (Some(source), Some(expected)) = (
            peer_identity(conn),
            conn.server_name().and_then(identity_from_sni),
        ) else {
            self.metrics.handshake(Direction::Inbound, false);
            warn!(%peer, "tunnel without a verified identity or server name");
            return;
        };
        self.metrics.handshake(Direction::Inbound, true);
        // Held until the connection closes.
        let _connection = handshake.done();
        let src_identity = numeric_identity(&source);
        let dst = self.flows.identity_name(expected);
        debug!(%peer, src = %source, %dst, "tunnel connection accepted");
        // The tunnel code knows no identities: its events carry them from
        // this span (at ERROR level so that no filter leaves them out).
        let src = source.clone();
        let span = error_span!("tunnel", %src, %dst);
        let this = self.clone();
        let handler = move |request: ConnectRequest| {
            let this = this.clone();
            let source = source.clone();
            async move { this.admit(request, &source, src_identity, expected).await }
        };
        if tls.get_ref().1.alpn_protocol() == Some(bulk::ALPN) {
            // One tunnel, carried to its end even through a shutdown, as
            // open HBONE tunnels are.
            let metrics = self.metrics.clone();
            let started = move |records| metrics.bulk(Direction::Inbound, records);
            let served = bulk::serve(
                tls,
                self.settings.handshake_timeout,
                handler,
                &self.kernel_tls,
                started,
            )
            .instrument(span)
            .await;
            match served {
                // Reported by `admit`.
                Ok(()) | Err(BulkError::Refused { .. }) => {}
                Err(e) => debug!(%peer, %src, %dst, error = %e, "bulk tunnel ended"),
            }
            return;
        }
        tls.get_mut().0.unbound();
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = serve(tls, &self.settings, handler, stop)
            .instrument(span)
            .await
        {
            debug!(%peer, %src, %dst, error = %e, "tunnel connection ended");
        }
    }

    /// Policy for one tunnel; on success the connection to the workload.
    async fn admit(
        &self,
        request: ConnectRequest,
        source: &str,
        src_identity: u64,
        expected_dst: u64,
    ) -> Result<Counted, Refusal> {
        let target = request.target;
        let report =
            |allowed: bool, dst_identity: u64, rule: Option<u32>, reason: Option<String>| {
                self.flows.tunnel(TunnelFlow {
                    hook: "tunnel-in",
                    allowed,
                    src_identity,
                    dst_identity,
                    dst: target,
                    rule,
                    reason,
                    mtls: Some(source.to_owned()),
                })
            };
        let (dst, verdict) = match self.lookup.judge(src_identity, target) {
            Ok(found) => found,
            Err(Refused::NotLocal) => {
                let reason = format!("{target} is not a workload of this node");
                report(false, expected_dst, None, Some(reason.clone()));
                return Err(Refusal::new(StatusCode::NOT_FOUND, reason));
            }
            Err(Refused::Denied(verdict)) => {
                let reason = self.flows.rule_name(verdict.rule);
                report(false, expected_dst, Some(verdict.rule), None);
                return Err(Refusal::new(StatusCode::FORBIDDEN, reason));
            }
        };
        if dst.identity != expected_dst {
            // The client authenticated the server as another workload.
            let reason = format!("{target} is not the workload this tunnel was opened for");
            report(false, dst.identity, None, Some(reason.clone()));
            return Err(Refusal::new(StatusCode::MISDIRECTED_REQUEST, reason));
        }
        match connect_marked(target).await {
            Ok(stream) => {
                report(true, dst.identity, Some(verdict.rule), None);
                Ok(Counted {
                    stream,
                    _open: self.metrics.open(Direction::Inbound),
                })
            }
            Err(e) => {
                let reason = format!("connecting to {target}: {e}");
                report(false, dst.identity, None, Some(reason.clone()));
                Err(Refusal::new(StatusCode::BAD_GATEWAY, reason))
            }
        }
    }
}

/// The connection to the local workload, counted as an open tunnel until
/// the splice drops it.
pub struct Counted {
    stream: TcpStream,
    _open: OpenTunnel,
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl TcpSocket for Counted {
    fn tcp(&self) -> &TcpStream {
        &self.stream
    }
}

impl Socket for Counted {
    fn reset_on_close(&self) -> io::Result<()> {
        self.stream.reset_on_close()
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_read_ready(cx)
    }
}
