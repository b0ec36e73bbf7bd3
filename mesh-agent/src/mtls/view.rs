//! What the tunnel code needs to know about the mesh, rebuilt after each
//! applied configuration: who owns an address, where each node's agent
//! listens, and which local workloads need listeners and certificates.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use mesh_policy::MtlsMode;
use mesh_policy::state::NodeState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub spiffe_id: String,
    pub identity: u64,
    pub node: String,
    pub mtls: MtlsMode,
}

/// A local workload the agent tunnels for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalWorkload {
    pub netns: PathBuf,
    pub spiffe_id: String,
    pub identity: u64,
}

#[derive(Debug, Clone, Default)]
pub struct MeshView {
    by_ip: HashMap<IpAddr, Peer>,
    nodes: BTreeMap<String, Vec<IpAddr>>,
    /// One entry per network namespace (workloads sharing one share its
    /// listeners; the compiler refuses two identities in one namespace).
    pub local: BTreeMap<PathBuf, LocalWorkload>,
    pub spiffe_ids: BTreeMap<u64, String>,
}

impl MeshView {
    pub fn new(state: &NodeState) -> Self {
        let mut view = MeshView {
            nodes: state.nodes.as_ref().clone(),
            ..Default::default()
        };
        for w in state.workloads.iter() {
            let peer = Peer {
                spiffe_id: w.spiffe_id.clone(),
                identity: w.identity,
                node: w.node.clone(),
                mtls: w.mtls,
            };
            for ip in &w.ips {
                view.by_ip.insert(canonical(*ip), peer.clone());
            }
            if let Some(netns) = w.netns.clone().filter(|_| w.local) {
                view.local.insert(
                    netns.clone(),
                    LocalWorkload {
                        netns,
                        spiffe_id: w.spiffe_id.clone(),
                        identity: w.identity,
                    },
                );
            }
            view.spiffe_ids.insert(w.identity, w.spiffe_id.clone());
        }
        view
    }

    pub fn peer(&self, ip: IpAddr) -> Option<&Peer> {
        self.by_ip.get(&canonical(ip))
    }

    /// Where the agent of `node` accepts tunnels: its first address.
    pub fn tunnel_address(&self, node: &str, port: u16) -> Option<SocketAddr> {
        let ip = *self.nodes.get(node)?.first()?;
        Some(SocketAddr::new(ip, port))
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_policy::MeshSettings;

    #[test]
    fn view_knows_owners_nodes_and_local_namespaces() {
        let docs = mesh_policy::parse_str(
            "t.yaml",
            r#"
apiVersion: mesh.dev/v1alpha1
kind: Workload
metadata: {name: a, namespace: shop}
spec: {serviceAccount: web, ips: [10.0.0.1, "fd00::1"], node: n1, netns: /run/netns/a}
---
apiVersion: mesh.dev/v1alpha1
kind: Workload
metadata: {name: b, namespace: shop}
spec: {serviceAccount: db, ips: [10.0.1.1], node: n2}
---
apiVersion: mesh.dev/v1alpha1
kind: MeshNode
metadata: {name: n2}
spec: {addresses: [192.0.2.2]}
---
apiVersion: mesh.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {selector: {serviceAccount: db}, mtls: {mode: STRICT}}
"#,
        )
        .unwrap();
        let settings = MeshSettings {
            node: "n1".into(),
            ..Default::default()
        };
        let compiled = mesh_policy::compile(&docs, &settings).unwrap();
        let view = MeshView::new(&NodeState::from_compiled(&compiled, 1));
        let b = view.peer("10.0.1.1".parse().unwrap()).unwrap();
        assert_eq!(b.node, "n2");
        assert_eq!(b.mtls, MtlsMode::Strict);
        assert_eq!(b.spiffe_id, "spiffe://cluster.local/ns/shop/sa/db");
        let a = view.peer("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(a.mtls, MtlsMode::Permissive);
        assert_eq!(
            view.tunnel_address("n2", 15008),
            Some("192.0.2.2:15008".parse().unwrap())
        );
        assert_eq!(view.tunnel_address("n1", 15008), None);
        assert_eq!(view.local.len(), 1);
        assert_eq!(
            view.local[&PathBuf::from("/run/netns/a")].spiffe_id,
            "spiffe://cluster.local/ns/shop/sa/web"
        );
    }
}
