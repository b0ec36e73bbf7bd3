//! From Kubernetes objects to the documents the standalone mode reads, so
//! that both modes compile the same way (pure functions, unit-tested).
//!
//! - A Pod is a `Workload`: its namespace, labels, service account, IPs and
//!   node. Pods that are not mesh workloads are left out: host-network pods
//!   (their IP is the node's), finished pods (Succeeded/Failed: their IPs
//!   are free for reuse), pods without IPs yet, and pods opted out with
//!   the label `mesh.dev/dataplane-mode: none` on the pod or its namespace.
//!   Mirror pods are left out too: a node's kubelet writes them whole, so a
//!   compromised node could make one claim any address.
//! - A pod's addresses are the status its node's kubelet reports: where the
//!   node has `spec.podCIDRs` (set by the control plane, not the node), an
//!   address outside them is not believed. A compromised node cannot take
//!   another node's pod's address and receive its tunnels.
//! - A Node is a `MeshNode`: its InternalIP addresses (ExternalIP if none).
//! - `MeshPolicy` and `PeerAuthentication` objects go through the very
//!   parser and checks a file's documents go through.
//! - A Service is the same `v1/Service` document a directory takes, with
//!   kube-proxy's conventions: Services of another proxy
//!   (`service.kubernetes.io/service-proxy-name`), headless and
//!   ExternalName ones are left to others; SCTP ports and externalIPs are
//!   left to kube-proxy. Its backends come from its EndpointSlices.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use mesh_policy::services::{EndpointSliceDoc, Service, SliceEndpoint, SlicePort};
use tracing::warn;

use super::podns::PodNamespaces;
use mesh_datapath::cidr::Cidr;

use mesh_policy::{
    self, API_VERSION, Condition, ConfigError, Documents, KIND_MESH_NODE, KIND_WORKLOAD, MeshNode,
    MeshNodeSpec, MeshSettings, NodeMeta, ObjectMeta, Origin, Workload, WorkloadSpec,
};

/// The annotation the kubelet puts on the API's copy of a static pod.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The label that keeps a pod, or every pod of a namespace, out of the mesh.
pub const DATAPLANE_MODE_LABEL: &str = "mesh.dev/dataplane-mode";
pub const DATAPLANE_MODE_NONE: &str = "none";

/// Where documents read from the API server say they come from in errors
/// and in `inspect policy`.
pub const ORIGIN: &str = "api-server";

/// The condition the agent writes into a document's status.
pub const ACCEPTED: &str = "Accepted";

/// What the agent keeps of a Pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// Creation time (seconds): the newer of two pods claiming an IP has it.
    pub created: i64,
}

pub fn object_key(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

fn opted_out(labels: &BTreeMap<String, String>) -> bool {
    labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_NONE)
}

/// The mesh workload a Pod is, if it is one (see the module's comment).
pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION))
    {
        return None;
    }
    let labels = meta.labels.clone().unwrap_or_default();
    if opted_out(&labels) {
        return None;
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    let node = spec.node_name.clone().filter(|n| !n.is_empty())?;
    if ips.is_empty() {
        return None;
    }
    Some(PodInfo {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        uid: meta.uid.clone().unwrap_or_default(),
        labels,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node,
        ips,
        created: meta
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
    })
}

/// What the mesh keeps of a Namespace (every one, so that a label change
/// is seen).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Its pods are kept out of the mesh.
    pub opted_out: bool,
    /// Its `mesh.dev/short-circuit` label, for the pods that carry none of
    /// their own: `Some(true)` for `enabled`, `Some(false)` for `disabled`
    /// (another value: no say, as for a Pod's).
    pub short_circuit: Option<bool>,
}

pub fn namespace_info(ns: &Namespace) -> Option<NamespaceInfo> {
    let labels = ns.metadata.labels.as_ref();
    Some(NamespaceInfo {
        opted_out: opted_out(labels.unwrap_or(&BTreeMap::new())),
        short_circuit: labels
            .and_then(|l| l.get(mesh_common::SHORT_CIRCUIT_LABEL))
            .and_then(|v| mesh_policy::short_circuit_opt_in(v)),
    })
}

/// What the agent keeps of a Node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    /// Its tunnel addresses: InternalIP, or ExternalIP when it has none.
    pub addresses: Vec<IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`): the only addresses its pods
    /// may have. Empty: not set, or not enforced (`--pod-cidrs ignore`).
    pub pod_cidrs: Vec<Cidr>,
}

/// A node as the mesh sees it; its pod ranges only when `enforce_pod_cidrs`.
pub fn node_info(node: &Node, enforce_pod_cidrs: bool) -> Option<NodeInfo> {
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|addresses| {
            let of_type = |t: &str| -> Vec<IpAddr> {
                addresses
                    .iter()
                    .filter(|a| a.type_ == t)
                    .filter_map(|a| a.address.parse().ok())
                    .collect()
            };
            let internal = of_type("InternalIP");
            if internal.is_empty() {
                of_type("ExternalIP")
            } else {
                internal
            }
        })
        .unwrap_or_default();
    let spec = node.spec.as_ref();
    let pod_cidrs = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(all) if !all.is_empty() => all.clone(),
        _ => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
    };
    let pod_cidrs: Vec<Cidr> = pod_cidrs
        .iter()
        .filter(|_| enforce_pod_cidrs)
        .filter_map(|c| {
            Cidr::parse_loose(c)
                .map_err(|e| warn!(error = %e, "a node's podCIDR is malformed; ignored"))
                .ok()
        })
        .collect();
    // A node without addresses is kept for its pod ranges: its pods are
    // checked all the same.
    Some(NodeInfo {
        addresses,
        pod_cidrs,
    })
}

/// A `MeshPolicy`, `PeerAuthentication` or `TrafficSplit` object as the
/// agent keeps it:
/// parsed and checked, or the reason it is refused, and what its status
/// says now.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentEntry {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
    /// One parsed document, or why the object is invalid.
    pub parsed: Result<Documents, String>,
}

/// Parses a custom resource with the standalone parser (same fields, same
/// checks, same messages), then compiles it on its own to catch what only
/// the compiler checks (patterns outside the trust domain, …).
pub fn document_entry(object: &DynamicObject, settings: &MeshSettings) -> Option<DocumentEntry> {
    let meta = &object.metadata;
    let (namespace, name) = (meta.namespace.clone()?, meta.name.clone()?);
    let types = object.types.as_ref()?;
    let value = serde_json::json!({
        "apiVersion": types.api_version,
        "kind": types.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": meta.labels.clone().unwrap_or_default(),
        },
        "spec": object.data.get("spec").cloned().unwrap_or(serde_json::Value::Null),
    });
    let parsed = serde_yaml::to_value(&value)
        .map_err(|e| e.to_string())
        .and_then(|value| {
            let mut docs =
                mesh_policy::parse_value(ORIGIN, value).map_err(|e| status_message(&e))?;
            for p in &mut docs.policies {
                p.origin.changed = last_changed(meta);
            }
            // Compiled as in a cluster (a TrafficSplit's Services resolve
            // against the cluster, not this object alone).
            docs.endpoint_slices = Some(Vec::new());
            let compiled = mesh_policy::compile(&docs, settings).map_err(|e| status_message(&e))?;
            if let Some(refused) = compiled.refused.first() {
                return Err(status_message(refused));
            }
            docs.endpoint_slices = None;
            Ok(docs)
        });
    Some(DocumentEntry {
        namespace,
        name,
        generation: meta.generation.unwrap_or(0),
        parsed,
    })
}

/// The MeshPolicies a compile of the cluster left out: `namespace/name` →
/// the message their status gives.
pub fn refused_policies(refused: &[ConfigError]) -> BTreeMap<String, String> {
    refused
        .iter()
        .filter(|e| e.kind.as_deref() == Some(mesh_policy::KIND_MESH_POLICY))
        .filter_map(|e| Some((e.name.clone()?, status_message(e))))
        .collect()
}

/// When an object's spec or metadata last changed, in Unix seconds: the
/// latest write the API server recorded in `managedFields`, status writes
/// aside, or its creation.
fn last_changed(meta: &kube::api::ObjectMeta) -> Option<i64> {
    let written = meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.as_deref().unwrap_or_default().is_empty())
        .filter_map(|f| f.time.as_ref())
        .map(|t| t.0.as_second())
        .max();
    written.or_else(|| meta.creation_timestamp.as_ref().map(|t| t.0.as_second()))
}

/// The `Accepted` condition in a document's status now, if any.
pub fn accepted_condition(object: &DynamicObject) -> Option<Condition> {
    object
        .data
        .get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(|c| serde_json::from_value::<Vec<Condition>>(c.clone()).ok())
        .and_then(|c| c.into_iter().find(|c| c.type_ == ACCEPTED))
}

/// "spec.rules[0].ports[0].port: 0 is not a port (1-65535)": the field
/// and the problem, without the file and document a file's error names.
fn status_message(e: &ConfigError) -> String {
    match &e.field {
        Some(field) => format!("{field}: {}", e.message),
        None => e.message.clone(),
    }
}

/// The policy documents in force: each valid object as it is now, each
/// invalid one as it was when last valid (an invalid edit never changes
/// what is enforced); an object never valid has no say. `last_valid` is
/// updated, and forgets deleted objects.
pub fn in_force(
    entries: &BTreeMap<String, DocumentEntry>,
    last_valid: &mut BTreeMap<String, Documents>,
) -> Documents {
    last_valid.retain(|key, _| entries.contains_key(key));
    let mut docs = Documents::default();
    for (key, entry) in entries {
        if let Ok(parsed) = &entry.parsed {
            last_valid.insert(key.clone(), parsed.clone());
        }
        if let Some(valid) = last_valid.get(key) {
            docs.policies.extend(valid.policies.iter().cloned());
            docs.peer_authentications
                .extend(valid.peer_authentications.iter().cloned());
            docs.traffic_splits
                .extend(valid.traffic_splits.iter().cloned());
        }
    }
    docs
}

/// A pod's labels as its Workload's: the namespace's short-circuit label
/// where the pod has none (a pod's own, `disabled` included, wins).
fn workload_labels(pod: &PodInfo, namespace: Option<&NamespaceInfo>) -> BTreeMap<String, String> {
    let mut labels = pod.labels.clone();
    if let Some(enabled) = namespace.and_then(|n| n.short_circuit) {
        labels
            .entry(mesh_common::SHORT_CIRCUIT_LABEL.into())
            .or_insert_with(|| if enabled { "enabled" } else { "disabled" }.into());
    }
    labels
}

/// The Workload and MeshNode documents of a cluster's state. `netns` gives
/// the network namespace of the pods of `this_node` that have been found
/// (by pod uid). An IP claimed by two pods belongs to the newer one: the
/// older one's address was released before it could be reused, whatever
/// its object still says.
///
/// An address a pod claims outside its node's pod ranges is left out, and
/// added to `refused` (pod key → address), logged once while it lasts.
pub fn cluster_documents(
    pods: &BTreeMap<String, PodInfo>,
    namespaces: &BTreeMap<String, NamespaceInfo>,
    nodes: &BTreeMap<String, NodeInfo>,
    netns: &PodNamespaces,
    this_node: &str,
    refused: &mut BTreeSet<(String, IpAddr)>,
) -> Documents {
    let mut by_age: Vec<&PodInfo> = pods
        .values()
        .filter(|p| !namespaces.get(&p.namespace).is_some_and(|n| n.opted_out))
        .collect();
    // Newest first; ties broken by uid so every node decides alike.
    by_age.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.uid.cmp(&b.uid)));
    let mut claimed = BTreeSet::new();
    let origin = Origin {
        file: ORIGIN.into(),
        document: 1,
        changed: None,
    };
    let mut docs = Documents::default();
    let mut refused_now = BTreeSet::new();
    for pod in by_age {
        let ranges = nodes.get(&pod.node).map_or(&[][..], |n| &n.pod_cidrs);
        let ips: Vec<IpAddr> = pod
            .ips
            .iter()
            .copied()
            .filter(|ip| {
                let believed = ranges.is_empty() || ranges.iter().any(|r| r.contains(*ip));
                if !believed {
                    refused_now.insert((format!("{}/{}", pod.namespace, pod.name), *ip));
                }
                believed
            })
            .filter(|ip| claimed.insert(*ip))
            .collect();
        if ips.is_empty() {
            continue;
        }
        docs.workloads.push(Workload {
            api_version: API_VERSION.into(),
            kind: KIND_WORKLOAD.into(),
            metadata: ObjectMeta {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                labels: workload_labels(pod, namespaces.get(&pod.namespace)),
            },
            spec: WorkloadSpec {
                service_account: pod.service_account.clone(),
                ips,
                node: pod.node.clone(),
                netns: (pod.node == this_node)
                    .then(|| netns.path(&pod.uid).map(Path::to_owned))
                    .flatten(),
                // Kubernetes Services arrive with their EndpointSlices.
                ports: None,
            },
            origin: origin.clone(),
        });
    }
    docs.workloads.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    for (pod, ip) in refused_now.difference(refused) {
        warn!(pod, %ip, "a pod's address lies outside its node's podCIDRs; not believed");
    }
    *refused = refused_now;
    docs.nodes = nodes
        .iter()
        .filter(|(_, node)| !node.addresses.is_empty())
        .map(|(name, node)| MeshNode {
            api_version: API_VERSION.into(),
            kind: KIND_MESH_NODE.into(),
            metadata: NodeMeta {
                name: name.clone(),
                labels: BTreeMap::new(),
            },
            spec: MeshNodeSpec {
                addresses: node.addresses.clone(),
            },
            origin: origin.clone(),
        })
        .collect();
    docs
}

/// Services carrying this label belong to another proxy (kube-proxy skips
/// them too).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service document a Service object is, if the mesh translates it.
pub fn service(svc: &KubeService) -> Option<Service> {
    let meta = &svc.metadata;
    let spec = svc.spec.as_ref()?;
    let labels = meta.labels.clone().unwrap_or_default();
    let headless = spec
        .cluster_ip
        .as_deref()
        .is_none_or(|ip| ip == "None" || ip.is_empty());
    if labels.contains_key(SERVICE_PROXY_NAME_LABEL)
        || headless
        || spec.type_.as_deref() == Some("ExternalName")
    {
        return None;
    }
    let ports: Vec<serde_json::Value> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref() != Some("SCTP"))
        .map(|p| {
            // The target port is resolved per EndpointSlice: what the
            // slices say, not needed here.
            serde_json::json!({
                "name": p.name,
                "port": p.port,
                "protocol": p.protocol.as_deref().unwrap_or("TCP"),
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": meta.name,
            "namespace": meta.namespace,
            "labels": labels,
        },
        "spec": {
            "type": spec.type_.as_deref().unwrap_or("ClusterIP"),
            "clusterIP": spec.cluster_ip,
            "clusterIPs": spec.cluster_ips,
            "ports": ports,
            "sessionAffinity": spec.session_affinity.as_deref().unwrap_or("None"),
            "sessionAffinityConfig": spec.session_affinity_config.as_ref().map(|c| {
                serde_json::json!({"clientIP": {"timeoutSeconds": c.client_ip.as_ref().and_then(|c| c.timeout_seconds)}})
            }),
            "internalTrafficPolicy": spec.internal_traffic_policy.as_deref().unwrap_or("Cluster"),
            "publishNotReadyAddresses": spec.publish_not_ready_addresses,
        },
    });
    let parsed = serde_yaml::to_value(&value)
        .map_err(|e| e.to_string())
        .and_then(|v| mesh_policy::parse_value(ORIGIN, v).map_err(|e| e.to_string()));
    match parsed {
        Ok(mut docs) => docs.services.pop(),
        Err(e) => {
            // The API server accepted it; the mesh leaves it to kube-proxy.
            warn!(service = %object_key(meta.namespace.as_deref(), meta.name.as_deref().unwrap_or("")), error = %e,
                  "Service not translated by the mesh");
            None
        }
    }
}

/// What the agent keeps of an EndpointSlice (IPv4 and IPv6 ones; FQDN
/// slices have no address to translate to).
pub fn endpoint_slice(slice: &EndpointSlice) -> Option<EndpointSliceDoc> {
    let meta = &slice.metadata;
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => return None,
    };
    let service = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => mesh_policy::Protocol::Tcp,
                "UDP" => mesh_policy::Protocol::Udp,
                _ => return None,
            };
            Some(SlicePort {
                // The Service's only port may be unnamed: "" or absent.
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: u16::try_from(p.port?).ok().filter(|p| *p != 0)?,
                protocol,
            })
        })
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            let conditions = e.conditions.as_ref();
            // Unset `ready` means ready; unset `serving` follows `ready`.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            SliceEndpoint {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                node: e.node_name.clone(),
            }
        })
        .collect();
    Some(EndpointSliceDoc {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        service,
        ipv6,
        ports,
        endpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::podns::PodNamespaces;
    use serde_json::json;
    use std::collections::HashMap;

    fn pod(name: &str, ip: &str, created: &str, extra: serde_json::Value) -> Pod {
        let mut v = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                         "labels": {"app": name}, "creationTimestamp": created},
            "spec": {"serviceAccountName": "cart", "nodeName": "node-0", "containers": []},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        });
        merge(&mut v, extra);
        serde_json::from_value(v).unwrap()
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:01:00Z";

    #[test]
    fn pods_become_workloads_and_non_workloads_are_left_out() {
        let p = pod_info(&pod("cart", "10.0.0.5", T0, json!({}))).unwrap();
        assert_eq!(p.service_account, "cart");
        assert_eq!(p.node, "node-0");
        assert_eq!(p.ips, ["10.0.0.5".parse::<IpAddr>().unwrap()]);
        let none = |extra| pod_info(&pod("x", "10.0.0.6", T0, extra));
        assert!(none(json!({"spec": {"hostNetwork": true}})).is_none());
        assert!(none(json!({"status": {"phase": "Succeeded"}})).is_none());
        assert!(none(json!({"status": {"phase": "Failed"}})).is_none());
        assert!(none(json!({"status": {"podIP": null, "podIPs": null}})).is_none());
        assert!(none(json!({"spec": {"nodeName": null}})).is_none());
        assert!(none(json!({"metadata": {"labels": {DATAPLANE_MODE_LABEL: "none"}}})).is_none());
        // Pending with an IP (containers starting) is a workload already.
        assert!(none(json!({"status": {"phase": "Pending"}})).is_some());
        // No service account named: "default", as Kubernetes does.
        let d = none(json!({"spec": {"serviceAccountName": null}})).unwrap();
        assert_eq!(d.service_account, "default");
        // Dual-stack.
        let ds = none(json!({"status": {"podIPs": [{"ip": "10.0.0.6"}, {"ip": "fd00::6"}]}}));
        assert_eq!(ds.unwrap().ips.len(), 2);
    }

    #[test]
    fn a_reused_ip_belongs_to_the_newer_pod() {
        let old = pod_info(&pod("old", "10.0.0.9", T0, json!({}))).unwrap();
        let mut new = pod_info(&pod("new", "10.0.0.9", T1, json!({}))).unwrap();
        new.service_account = "db".into();
        let pods = BTreeMap::from([("shop/old".to_string(), old), ("shop/new".to_string(), new)]);
        let docs = cluster_documents(
            &pods,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &PodNamespaces::default(),
            "n",
            &mut BTreeSet::new(),
        );
        assert_eq!(docs.workloads.len(), 1);
        assert_eq!(docs.workloads[0].metadata.name, "new");
        assert_eq!(docs.workloads[0].spec.service_account, "db");
    }

    #[test]
    fn namespaces_opt_out_and_local_pods_get_their_netns() {
        let a = pod_info(&pod("a", "10.0.0.1", T0, json!({}))).unwrap();
        let pods = BTreeMap::from([("shop/a".to_string(), a)]);
        let mut netns = PodNamespaces::default();
        netns.extend(HashMap::from([(
            "uid-a".to_string(),
            std::fs::File::open("/proc/self/ns/net").unwrap(),
        )]));
        let held = netns.path("uid-a").unwrap().to_owned();
        let docs = cluster_documents(
            &pods,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &netns,
            "node-0",
            &mut BTreeSet::new(),
        );
        assert_eq!(docs.workloads[0].spec.netns, Some(held));
        // The same pod seen from another node has no netns there.
        let docs = cluster_documents(
            &pods,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &netns,
            "node-1",
            &mut BTreeSet::new(),
        );
        assert_eq!(docs.workloads[0].spec.netns, None);
        let opted = BTreeMap::from([(
            "shop".to_string(),
            NamespaceInfo {
                opted_out: true,
                short_circuit: None,
            },
        )]);
        let docs = cluster_documents(
            &pods,
            &opted,
            &BTreeMap::new(),
            &netns,
            "node-0",
            &mut BTreeSet::new(),
        );
        assert!(docs.workloads.is_empty());
    }

    #[test]
    fn a_namespace_opts_its_pods_in_to_the_short_circuit_unless_a_pod_says_otherwise() {
        let ns = |labels: serde_json::Value| -> Namespace {
            serde_json::from_value(json!({"metadata": {"name": "shop", "labels": labels}})).unwrap()
        };
        let enabled = namespace_info(&ns(json!({"mesh.dev/short-circuit": "enabled"}))).unwrap();
        assert_eq!(enabled.short_circuit, Some(true));
        assert!(!enabled.opted_out);
        let odd = namespace_info(&ns(json!({"mesh.dev/short-circuit": "yes"}))).unwrap();
        assert_eq!(odd.short_circuit, None, "an unknown value has no say");

        let plain = pod_info(&pod("plain", "10.0.0.1", T0, json!({}))).unwrap();
        let mut out = pod_info(&pod("out", "10.0.0.2", T0, json!({}))).unwrap();
        out.labels
            .insert("mesh.dev/short-circuit".into(), "disabled".into());
        let pods = BTreeMap::from([
            ("shop/plain".to_string(), plain),
            ("shop/out".to_string(), out),
        ]);
        let docs = cluster_documents(
            &pods,
            &BTreeMap::from([("shop".to_string(), enabled)]),
            &BTreeMap::new(),
            &PodNamespaces::default(),
            "n",
            &mut BTreeSet::new(),
        );
        let opted: BTreeMap<&str, bool> = docs
            .workloads
            .iter()
            .map(|w| (w.metadata.name.as_str(), w.short_circuit()))
            .collect();
        assert_eq!(opted, BTreeMap::from([("out", false), ("plain", true)]));
    }

    fn policy_object(generation: i64, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "mesh.dev/v1alpha1", "kind": "MeshPolicy",
            "metadata": {"name": "cart-allow", "namespace": "shop", "generation": generation,
                         "uid": "u1", "resourceVersion": "5", "managedFields": []},
            "spec": spec,
            "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                        "message": "", "observedGeneration": 1, "lastTransitionTime": T0}]},
        }))
        .unwrap()
    }

    #[test]
    fn custom_resources_are_checked_as_files_are_and_invalid_edits_keep_the_last_valid() {
        let settings = MeshSettings::default();
        let valid = document_entry(
            &policy_object(1, json!({"rules": [{"from": [{"namespace": "web"}]}]})),
            &settings,
        )
        .unwrap();
        assert!(valid.parsed.is_ok(), "{:?}", valid.parsed);
        let object = policy_object(1, json!({}));
        assert_eq!(accepted_condition(&object).unwrap().status, "True");

        let bad_port = document_entry(
            &policy_object(2, json!({"rules": [{"ports": [{"port": 0}]}]})),
            &settings,
        )
        .unwrap();
        assert_eq!(
            bad_port.parsed.as_ref().unwrap_err(),
            "spec.rules[0].ports[0].port: 0 is not a port (1-65535)"
        );
        // Only the compiler knows the trust domain.
        let other_td = document_entry(
            &policy_object(
                3,
                json!({"rules": [{"from": [{"identity": "spiffe://elsewhere/ns/a/sa/b"}]}]}),
            ),
            &settings,
        )
        .unwrap();
        assert!(
            other_td
                .parsed
                .as_ref()
                .unwrap_err()
                .contains("not in the mesh's trust domain"),
            "{:?}",
            other_td.parsed
        );
        let unknown = document_entry(&policy_object(4, json!({"rulez": []})), &settings).unwrap();
        assert!(unknown.parsed.as_ref().unwrap_err().contains("rulez"));

        let mut last_valid = BTreeMap::new();
        let key = "shop/cart-allow".to_string();
        let docs = in_force(
            &BTreeMap::from([(key.clone(), valid.clone())]),
            &mut last_valid,
        );
        assert_eq!(docs.policies.len(), 1);
        // An invalid edit: the valid version stays in force.
        let docs = in_force(
            &BTreeMap::from([(key.clone(), bad_port.clone())]),
            &mut last_valid,
        );
        assert_eq!(docs.policies.len(), 1);
        assert_eq!(
            docs.policies[0].spec.rules[0].from[0].namespace.as_deref(),
            Some("web")
        );
        // Deleted: gone, and its last valid version forgotten.
        let docs = in_force(&BTreeMap::new(), &mut last_valid);
        assert!(docs.policies.is_empty() && last_valid.is_empty());
        // Invalid from the start: no say.
        let docs = in_force(&BTreeMap::from([(key, bad_port)]), &mut last_valid);
        assert!(docs.policies.is_empty());
    }

    #[test]
    fn nodes_prefer_internal_addresses() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n"},
            "status": {"addresses": [
                {"type": "ExternalIP", "address": "203.0.113.1"},
                {"type": "InternalIP", "address": "10.1.0.1"},
                {"type": "Hostname", "address": "n"}]}
        }))
        .unwrap();
        assert_eq!(
            node_info(&node, true).unwrap().addresses,
            ["10.1.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn mirror_pods_are_no_workloads() {
        let mirror = json!({"metadata": {"annotations": {MIRROR_POD_ANNOTATION: "0123abcd"}}});
        assert!(pod_info(&pod("static", "10.244.1.5", T0, mirror)).is_none());
    }

    #[test]
    fn a_pod_address_outside_its_nodes_pod_cidrs_is_not_believed() {
        let node = |name: &str, cidrs: serde_json::Value| -> (String, NodeInfo) {
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": cidrs,
                "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}
            }))
            .unwrap();
            (name.to_owned(), node_info(&node, true).unwrap())
        };
        let nodes = BTreeMap::from([
            node(
                "node-0",
                json!({"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24", "fd00:244::/64"]}),
            ),
            node("node-1", json!({"podCIDR": "10.244.1.0/24"})),
            node("node-2", json!({})),
        ]);
        // node-1's kubelet claims node-0's pod's address, newer than it.
        let mut victim = pod_info(&pod("victim", "10.244.0.7", T0, json!({}))).unwrap();
        victim.ips.push("fd00:244::7".parse().unwrap());
        let thief = pod_info(&pod(
            "thief",
            "10.244.0.7",
            T1,
            json!({"spec": {"nodeName": "node-1"}}),
        ))
        .unwrap();
        // node-2 has no podCIDR: nothing to check its pods against.
        let free = pod_info(&pod(
            "free",
            "10.9.9.9",
            T0,
            json!({"spec": {"nodeName": "node-2"}}),
        ))
        .unwrap();
        let pods = BTreeMap::from([
            ("shop/victim".to_string(), victim),
            ("shop/thief".to_string(), thief),
            ("shop/free".to_string(), free),
        ]);
        let mut refused = BTreeSet::new();
        let docs = cluster_documents(
            &pods,
            &BTreeMap::new(),
            &nodes,
            &PodNamespaces::default(),
            "n",
            &mut refused,
        );
        let owners: Vec<(&str, Vec<String>)> = docs
            .workloads
            .iter()
            .map(|w| {
                (
                    w.metadata.name.as_str(),
                    w.spec.ips.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            owners,
            [
                ("free", vec!["10.9.9.9".to_string()]),
                (
                    "victim",
                    vec!["10.244.0.7".to_string(), "fd00:244::7".to_string()]
                ),
            ]
        );
        assert_eq!(
            refused,
            BTreeSet::from([("shop/thief".to_string(), "10.244.0.7".parse().unwrap())])
        );
        // `--pod-cidrs ignore`: the newer claim wins, as before.
        let ignoring: BTreeMap<String, NodeInfo> = nodes
            .into_iter()
            .map(|(name, n)| {
                (
                    name,
                    NodeInfo {
                        pod_cidrs: Vec::new(),
                        ..n
                    },
                )
            })
            .collect();
        let docs = cluster_documents(
            &pods,
            &BTreeMap::new(),
            &ignoring,
            &PodNamespaces::default(),
            "n",
            &mut refused,
        );
        assert!(docs.workloads.iter().any(|w| w.metadata.name == "thief"));
        assert!(refused.is_empty());
    }
}
