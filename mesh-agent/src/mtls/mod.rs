//! Mutual TLS between nodes: the agent's side of the tunnels the kernel
//! steers connections into (docs/mtls.md).
//!
//! ```text
//! workload ──connect(B)──► kernel steers to 127.0.0.1:15001 in the workload's netns
//!   └─► outbound listener ─► HBONE (HTTP/2 CONNECT B, mTLS as the workload's SPIFFE ID)
//!         ─► peer agent :15008 ─► checks policy for (certificate identity → B, port)
//!            ─► connects to B ─► splices both ways
//! ```
pub mod admission;
pub mod inbound;
pub mod judge;
pub mod listeners;
pub mod metrics;
pub mod outbound;
pub mod view;

use std::{
    collections::HashSet,
    net::{Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    config::{CaSource, Config},
    flows::FlowHub,
    mtls::metrics::TunnelMetrics,
    tunnel::{
        TunnelSettings,
        ktls::{self, KernelTls},
        pool::Pool,
    },
};
use mesh_datapath::maps::PinnedMaps;
use mesh_pki::{self as pki, CertManager, SvidStore};
use mesh_policy::state::NodeState;

use listeners::{OrigTable, OutboundListeners};
use view::MeshView;

/// The agent's mutual-TLS machinery, kept in step with each applied
/// configuration.
pub struct Mtls {
    /// The in-agent CA's record of which node runs which identity.
    hosted: Option<Arc<pki::AppliedAuthorizer>>,
    view: Arc<RwLock<Arc<MeshView>>>,
    listeners: OutboundListeners,
    certs: CertManager,
    maps: PinnedMaps,
    outbound_port: u16,
    steering: bool,
    shutdown: watch::Sender<bool>,
    inbound: tokio::task::JoinHandle<()>,
    /// Outbound connections being carried through tunnels.
    carrying: tokio_util::task::TaskTracker,
}

impl Mtls {
    /// Starts certificate management and the tunnel listener. Nothing is
    /// steered to the agent until the first configuration is applied and
    /// the outbound listeners exist.
    /// The tunnels (listeners, their connections and tasks) run on
    /// `tunnels`, a runtime of their own; certificates stay on the caller's.
    /// `kernel_tls`: the kernel has TLS, for bulk tunnels.
    pub async fn start(
        config: &Config,
        flows: FlowHub,
        metrics: TunnelMetrics,
        tunnels: tokio::runtime::Handle,
        kernel_tls: bool,
    ) -> anyhow::Result<Self> {
        let m = config.mtls.as_ref().expect("mTLS is configured");
        let td = &config.mesh.trust_domain;
        let mut hosted = None;
        let issuer: Arc<dyn pki::Issuer> = match &m.ca {
            CaSource::Local { ca_dir } => {
                let ca = pki::CaHandle::load(ca_dir)
                    .with_context(|| format!("loading the CA in {}", ca_dir.display()))?;
                let authorizer = Arc::new(pki::AppliedAuthorizer::default());
                hosted = Some(authorizer.clone());
                Arc::new(pki::LocalIssuer::new(
                    ca,
                    config.mesh.node.clone(),
                    authorizer,
                ))
            }
            CaSource::Remote {
                address,
                node_credentials,
            } => {
                let credentials = pki::NodeCredentials::load(node_credentials)
                    .with_context(|| format!("loading {}", node_credentials.display()))?;
                Arc::new(pki::CaClient::connect(address, credentials, td).await?)
            }
        };
        let store = Arc::new(SvidStore::new(
            td,
            pki::TrustBundle::new(issuer.trust_bundle())?,
        ));
        let certs = CertManager::start(
            issuer,
            store.clone(),
            pki::CertManagerConfig {
                lifetime: m.svid_lifetime,
                renew_fraction: m.renew_fraction,
                state_dir: config.state_dir.clone(),
            },
        );

        // New TLS sessions pick up renewed certificates: a pooled
        // connection lives no longer than a certificate before renewal.
        let settings = TunnelSettings {
            max_connection_age: TunnelSettings::default()
                .max_connection_age
                .min(m.svid_lifetime.mul_f64(m.renew_fraction)),
            ..TunnelSettings::default()
        };
        let maps = PinnedMaps::open(&config.bpffs)?;
        let view = Arc::new(RwLock::new(Arc::new(MeshView::default())));
        let (shutdown, _) = watch::channel(false);
        let kernel_tls = Arc::new(KernelTls::new(kernel_tls));
        ktls::announce(&m.bulk_ports, &kernel_tls);

        let inbound = Arc::new(inbound::Inbound {
            admission: admission::Admission::new(admission::Limits::default()),
            store: store.clone(),
            lookup: Arc::new(judge::PolicyLookup::open(&maps)?),
            settings: settings.clone(),
            flows: flows.clone(),
            metrics: metrics.clone(),
            kernel_tls: kernel_tls.clone(),
        });
        allow_time_wait_reuse();
        // The listener's socket is driven by the tunnels' runtime, which
        // its accepted connections then belong to.
        let listener = {
            let _tunnels = tunnels.enter();
            tunnel_listener(m.tunnel_port)?
        };
        let inbound = tunnels.spawn(inbound.run(listener, shutdown.subscribe()));

        let carrying = tokio_util::task::TaskTracker::new();
        let pool = Pool::new(settings.clone());
        tunnels.spawn(sweep_now_and_then(pool.clone()));
        let outbound = Arc::new(outbound::Outbound {
            view: view.clone(),
            store,
            pool,
            tunnel_port: m.tunnel_port,
            flows,
            metrics,
            carrying: carrying.clone(),
            bulk_ports: m.bulk_ports.clone(),
            kernel_tls,
            handshake_timeout: settings.handshake_timeout,
        });
        let orig = Arc::new(OrigTable::new(maps.tunnel_orig()?));
        let listeners = OutboundListeners::new(
            tunnels,
            m.outbound_port,
            orig,
            Arc::new(move |accepted| outbound.handle(accepted)),
        );
        info!(
            tunnel_port = m.tunnel_port,
            outbound_port = m.outbound_port,
            "mutual TLS between nodes on"
        );
        Ok(Self {
            hosted,
            view,
            listeners,
            certs,
            maps,
            outbound_port: m.outbound_port,
            steering: false,
            shutdown,
            inbound,
            carrying,
        })
    }

    /// Follows an applied configuration: listeners for new local workloads
    /// (before anything is steered to them), certificates for their
    /// identities, and the view the tunnels route by.
    pub fn applied(&mut self, names: &NodeState) {
        if let Some(hosted) = &self.hosted {
            hosted.update(names);
        }
        let view = Arc::new(MeshView::new(names));
        for (netns, e) in self.listeners.sync(&view.local) {
            let src = view.local.get(&netns).map(|w| w.spiffe_id.as_str());
            error!(src, netns = %netns.display(), error = %e, "no outbound listener: this workload's connections to other nodes are refused");
        }
        let wanted: HashSet<String> = view.local.values().map(|w| w.spiffe_id.clone()).collect();
        self.certs.set_wanted(wanted);
        *self.view.write().unwrap() = view;
        if !self.steering {
            match self.maps.set_tunnel_port(self.outbound_port) {
                Ok(()) => self.steering = true,
                Err(e) => error!(error = %e, "cannot turn on steering to the agent"),
            }
        }
    }

    /// The local workloads' identities that have no certificate yet.
    pub fn missing_certificates(&self) -> watch::Receiver<Vec<String>> {
        self.certs.missing()
    }

    /// Stops accepting tunnels and lets open ones, both ways, finish within
    /// `grace`. Steering stays on: the next agent takes over the same ports.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        drop(self.listeners);
        self.carrying.close();
        let drained = async {
            let _ = self.inbound.await;
            self.carrying.wait().await;
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            warn!(
                ?grace,
                "open tunnels outlived the grace period; they are cut"
            );
        }
    }
}

/// How often the tunnel pool drops its failed and expired connections of
/// every peer (lookups do it for the peer they are for).
const POOL_SWEEP: Duration = Duration::from_secs(30);

/// Without it, a connection to a peer no workload talks to any more would
/// stay in the pool, and open, for as long as the agent runs.
async fn sweep_now_and_then(pool: Pool<outbound::PoolKey>) {
    let mut every = tokio::time::interval(POOL_SWEEP);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        pool.sweep();
    }
}

const TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";

/// The destination's agent passes the client's FIN on first, so each of its
/// connections to a local workload ends in TIME_WAIT, holding a port of the
/// node for a minute (the kernel keeps it in a separate timewait socket
/// whatever the agent does with its own). At thousands of connections a
/// second the node runs out of ports: the collapse other per-node proxies
/// show after some 20,000 connections. `tcp_tw_reuse=1` lets new outgoing
/// connections take over such ports when TCP timestamps prove it safe (the
/// kernel's default, 2, allows it on loopback only). Applies to the agent's
/// network namespace, the node's in a DaemonSet; said in the log.
fn allow_time_wait_reuse() {
    match std::fs::read_to_string(TW_REUSE) {
        Ok(v) if v.trim() == "1" => {}
        Ok(v) => match std::fs::write(TW_REUSE, "1") {
            Ok(()) => info!(
                was = v.trim(),
                "set net.ipv4.tcp_tw_reuse=1 so tunnels to local workloads can reuse ports in TIME_WAIT"
            ),
            Err(e) => {
                warn!(error = %e, "cannot set net.ipv4.tcp_tw_reuse=1: sustained connection rates will run out of ports")
            }
        },
        Err(e) => warn!(error = %e, "cannot read net.ipv4.tcp_tw_reuse"),
    }
}

/// The HBONE listener on every address of the node (dual-stack).
fn tunnel_listener(port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v6()?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .with_context(|| format!("binding the tunnel port {port}"))?;
    Ok(socket.listen(listeners::BACKLOG as u32)?)
}
