//! The agent's outbound listeners, one pair (127.0.0.1 and ::1) inside each
//! local workload's network namespace, as ztunnel does in its in-pod mode.
//!
//! The kernel steers a workload's connections to other nodes to its own
//! loopback; the listener that accepts one knows which workload is calling
//! from the namespace it lives in, not from an address someone could claim.
//! The original destination comes from `TUNNEL_ORIG`, keyed by that
//! namespace and the client's port.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener as StdListener},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap as BpfHash, MapData};
use mesh_common::policy::{OrigDst, TunnelKey};
use tokio::{net::TcpStream, task::JoinHandle};
use tracing::{debug, info, warn};

use super::view::LocalWorkload;
use mesh_datapath::netns;

/// Where steered connections were going (`TUNNEL_ORIG`), each entry taken
/// once by the listener that accepts the connection.
pub struct OrigTable {
    map: Mutex<BpfHash<MapData, TunnelKey, OrigDst>>,
}

impl OrigTable {
    pub fn new(map: BpfHash<MapData, TunnelKey, OrigDst>) -> Self {
        Self {
            map: Mutex::new(map),
        }
    }

    pub fn take(&self, key: &TunnelKey) -> Option<OrigDst> {
        let mut map = self.map.lock().unwrap();
        let orig = map.get(key, 0).ok()?;
        let _ = map.remove(key);
        Some(orig)
    }
}

/// A connection a local workload opened towards another node.
pub struct Accepted {
    pub stream: TcpStream,
    pub orig: OrigDst,
    pub source: LocalWorkload,
}

pub type Handler = Arc<dyn Fn(Accepted) + Send + Sync>;

struct Running {
    workload: LocalWorkload,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub struct OutboundListeners {
    /// The tunnels' runtime: it drives the listeners and their connections.
    runtime: tokio::runtime::Handle,
    port: u16,
    orig: Arc<OrigTable>,
    handler: Handler,
    running: HashMap<PathBuf, Running>,
}

impl OutboundListeners {
    pub fn new(
        runtime: tokio::runtime::Handle,
        port: u16,
        orig: Arc<OrigTable>,
        handler: Handler,
    ) -> Self {
        Self {
            runtime,
            port,
            orig,
            handler,
            running: HashMap::new(),
        }
    }

    /// Opens listeners for new local workloads and closes those of workloads
    /// that left. Returns the namespaces that could not get one (their
    /// steered connections are refused: fail closed), with why.
    pub fn sync(&mut self, wanted: &BTreeMap<PathBuf, LocalWorkload>) -> Vec<(PathBuf, io::Error)> {
        self.running
            .retain(|netns, r| wanted.get(netns) == Some(&r.workload));
        let mut failed = Vec::new();
        for (netns, workload) in wanted {
            if self.running.contains_key(netns) {
                continue;
            }
            match self.open(workload) {
                Ok(running) => {
                    debug!(netns = %netns.display(), identity = %workload.spiffe_id, "outbound listener open");
                    self.running.insert(netns.clone(), running);
                }
                Err(e) => failed.push((netns.clone(), e)),
            }
        }
        failed
    }

    fn open(&self, workload: &LocalWorkload) -> io::Result<Running> {
        let port = self.port;
        let (netns_cookie, listeners) = netns::inside(&workload.netns, || {
            let cookie = netns::socket_netns_cookie()?;
            let mut listeners = vec![(4u16, bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?)];
            // A namespace without IPv6 has no ::1; its IPv6 connects cannot
            // be steered either, so there is nothing to listen for.
            match bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
                Ok(l) => listeners.push((6u16, l)),
                Err(e) => debug!(error = %e, "no IPv6 outbound listener"),
            }
            Ok((cookie, listeners))
        })?;
        let mut tasks = Vec::new();
        let _tunnels = self.runtime.enter();
        for (family, listener) in listeners {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks.push(self.runtime.spawn(accept_loop(
                listener,
                family,
                netns_cookie,
                workload.clone(),
                self.orig.clone(),
                self.handler.clone(),
            )));
        }
        Ok(Running {
            workload: workload.clone(),
            tasks,
        })
    }
}

/// Accept-queue length of the listeners. A burst of new connections beyond
/// it overflows the queue, and the kernel falls back to SYN cookies, one of
/// which can fail and reset a connection (seen with 1,000 concurrent
/// connects on std's default of 128). The kernel caps it at somaxconn.
pub const BACKLOG: i32 = 4096;

/// A non-blocking listener on `addr`, in the calling thread's namespace.
fn bind(addr: SocketAddr) -> io::Result<StdListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
        socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    // A restarted agent binds again while the last one's connections are
    // in TIME_WAIT.
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    listen(&fd, Backlog::new(BACKLOG).map_err(io::Error::from)?)?;
    Ok(StdListener::from(fd))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    family: u16,
    netns: u64,
    workload: LocalWorkload,
    orig: Arc<OrigTable>,
    handler: Handler,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, src = %workload.spiffe_id, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let key = TunnelKey {
            netns,
            port: peer.port(),
            family,
            _pad: 0,
        };
        match orig.take(&key) {
            Some(orig) => handler(Accepted {
                stream,
                orig,
                source: workload.clone(),
            }),
            None => {
                // Not steered by the kernel (someone connected to the port
                // directly): there is no destination to carry it to.
                info!(src = %workload.spiffe_id, %peer, "connection to the outbound port without a steered destination refused");
                let _ = stream.set_zero_linger();
            }
        }
    }
}
