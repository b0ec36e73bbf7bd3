//! Connected UDP sockets stranded on a backend that left its Service.
//!
//! A connected UDP socket is translated once, when it connects: every later
//! datagram goes to the backend chosen then, and no hook runs again to
//! choose another. When that backend leaves the Service (its pod deleted or
//! no longer ready), the socket would keep talking to it. So after each
//! applied change that removed UDP backends, the agent aborts the sockets
//! that reached one of them *through the Service* (`SERVICE_PEERS`), as
//! Cilium does: the application sees `ECONNABORTED` once, connects again,
//! and is sent to a live backend. Sockets that dialled a backend's own
//! address are left alone, and TCP connections keep their backend (a
//! backend that leaves finishes what it serves, as with kube-proxy).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use mesh_common::{
    policy::PROTO_UDP,
    service::{MemberKey, ServiceKey, ServicePeerKey, SockAddr},
};
use mesh_datapath::{maps::PinnedMaps, netlink, netns};
use mesh_policy::state::NodeState;
use tracing::{info, warn};

/// The cookies of the sockets that reached a `departed` backend through
/// its Service, from `SERVICE_PEERS` (socket and backend → the Service
/// address dialled).
pub fn stranded_sockets(
    peers: &[(ServicePeerKey, SockAddr)],
    departed: &BTreeSet<MemberKey>,
) -> BTreeSet<u64> {
    peers
        .iter()
        .filter(|(peer, service)| {
            departed.contains(&MemberKey {
                service: ServiceKey::new(service.ip, service.port, PROTO_UDP),
                _pad: 0,
                backend: peer.backend,
            })
        })
        .map(|(peer, _)| peer.cookie)
        .collect()
}

/// Aborts, in each local workload's network namespace (as `names`, the
/// names of the change just applied, list them), the connected UDP sockets
/// stranded on `departed` (UDP members removed by that change, so a socket
/// that connects again is never sent back to them). Runs on its own
/// thread: the change is not held up.
pub fn release(bpffs: &Path, names: &NodeState, departed: BTreeSet<MemberKey>) {
    if departed.is_empty() {
        return;
    }
    let workload_netns: Vec<PathBuf> = names
        .workloads
        .iter()
        .filter_map(|w| w.netns.clone())
        .collect();
    let bpffs = bpffs.to_owned();
    std::thread::spawn(move || {
        let peers = match PinnedMaps::open(&bpffs).and_then(|pins| pins.service_peers()) {
            Ok(peers) => peers,
            Err(e) => {
                warn!(error = %e, "cannot read which sockets use departed backends");
                return;
            }
        };
        let cookies = stranded_sockets(&peers, &departed);
        if cookies.is_empty() {
            return;
        }
        let mut aborted = 0;
        for path in &workload_netns {
            match netns::inside(path, || netlink::abort_udp_sockets(&cookies)) {
                Ok(n) => aborted += n,
                Err(e) => warn!(
                    netns = %path.display(),
                    error = %e,
                    "cannot abort UDP sockets connected to departed backends; they keep them"
                ),
            }
        }
        info!(
            aborted,
            backends = departed.len(),
            "aborted connected UDP sockets of departed backends"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::policy::PROTO_TCP;

    fn addr(last: u8, port: u16) -> SockAddr {
        SockAddr::new(
            [
                0,
                0,
                u32::from_be(0xffff),
                u32::from_be(0x0a00_0000 | u32::from(last)),
            ],
            port,
        )
    }

    #[test]
    fn only_sockets_sent_to_a_departed_backend_of_that_udp_service_are_stranded() {
        let dns = addr(10, 53);
        let (gone, live) = (addr(1, 5353), addr(2, 5353));
        let departed = BTreeSet::from([MemberKey {
            service: ServiceKey::new(dns.ip, dns.port, PROTO_UDP),
            _pad: 0,
            backend: gone,
        }]);
        let peer = |cookie, backend| ServicePeerKey { cookie, backend };
        let peers = [
            (peer(1, gone), dns),
            (peer(2, live), dns),
            // The same backend, reached through another Service that keeps it.
            (peer(3, gone), addr(11, 53)),
        ];
        assert_eq!(stranded_sockets(&peers, &departed), BTreeSet::from([1]));
        // A TCP Service losing the backend strands no socket.
        let tcp = BTreeSet::from([MemberKey {
            service: ServiceKey::new(dns.ip, dns.port, PROTO_TCP),
            ..*departed.first().unwrap()
        }]);
        assert!(stranded_sockets(&peers, &tcp).is_empty());
    }
}
