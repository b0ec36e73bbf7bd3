//! Services (docs/services.md): their backends as the endpoints controller
//! (standalone: Workloads a selector matches) or kube-proxy (Kubernetes:
//! EndpointSlices) would choose them, traffic splits, and the kernel's
//! `SERVICES`, `SERVICE_BACKENDS` and `SERVICE_MEMBERS` entries, with the
//! revision scheme that lets a Service's backend set change in one map
//! update.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use mesh_common::{
    policy::IpKey,
    service::{BackendKey, MAX_SLOTS, MemberKey, ServiceEntry, ServiceKey, SockAddr},
};

use crate::WorkloadInfo;
pub use crate::documents::service::{
    ClientIpConfig, EndpointSliceDoc, KIND_SERVICE, KIND_TRAFFIC_SPLIT, SERVICE_API_VERSION,
    Service, ServiceMeta, ServicePort, ServiceProtocol, ServiceSpec, ServiceType, SessionAffinity,
    SessionAffinityConfig, SliceEndpoint, SlicePort, SplitBackend, TargetPort, TrafficPolicy,
    TrafficSplit, TrafficSplitResource, TrafficSplitSpec, WorkloadPort, is_port_name,
};
use crate::documents::{ConfigError, Origin, Protocol, Workload};

/// Slots for backends of weights `weights` among `slots` slots, by largest
/// remainder (Hamilton's method): each gets its exact share rounded down,
/// and the slots left over go to the largest remainders (earlier backends
/// first on ties). Zero weights get no slot; all zero: no slots at all.
pub fn apportion(weights: &[f64], slots: u16) -> Vec<u16> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights
        .iter()
        .map(|w| w / total * f64::from(slots))
        .collect();
    let mut out: Vec<u16> = exact.iter().map(|e| e.floor() as u16).collect();
    let given: u16 = out.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().cycle().take(usize::from(slots - given)) {
        out[i] += 1;
    }
    out
}

/// One backend of one Service port, with the names behind it.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
pub struct BackendInfo {
    pub address: IpAddr,
    pub port: u16,
    /// `namespace/name` of the Workload.
    pub workload: String,
    pub node: String,
    pub identity: u64,
    /// Slots of the backend set this backend holds.
    pub weight: u32,
}

/// One Service address (`address:port/protocol`) and its backends.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub internal_traffic_policy: TrafficPolicy,
    /// ClientIP session affinity: seconds a client keeps its backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_timeout_s: Option<u32>,
    pub backends: Vec<BackendInfo>,
}

impl ServiceInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The kernel's key of this Service address.
    pub fn service_key(&self) -> ServiceKey {
        let proto = match self.protocol.as_str() {
            "UDP" => Protocol::Udp,
            _ => Protocol::Tcp,
        };
        ServiceKey::new(IpKey::from(self.address).ip, self.port, proto.number())
    }
}

/// What one Service address should translate to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceBackends {
    /// What `SERVICE_BACKENDS` should hold for it, in slot order.
    pub slots: Vec<SockAddr>,
    /// ClientIP session affinity: seconds; 0: none.
    pub affinity_timeout_s: u32,
}

/// Every Service address → its backends.
pub type ServiceSlots = BTreeMap<ServiceKey, ServiceBackends>;

/// Who is at an address a Service may send to: what a backend is named
/// by, in `inspect services` and `explain`.
pub(crate) struct Owner<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub identity: u64,
    /// Where the workload was defined, for errors; unknown when only its
    /// compiled form is at hand.
    pub origin: Option<&'a Origin>,
}

/// Every workload address → its owner.
pub(crate) type Owners<'a> = HashMap<IpKey, Owner<'a>>;

/// The owners of the addresses of `workloads` (documents).
pub(crate) fn owners_of(
    workloads: &[Workload],
    identity_of: impl Fn(&Workload) -> u64,
) -> Owners<'_> {
    let mut owners = Owners::with_capacity(workloads.len());
    for w in workloads {
        let identity = identity_of(w);
        for ip in &w.spec.ips {
            owners.insert(
                IpKey::from(*ip),
                Owner {
                    namespace: &w.metadata.namespace,
                    name: &w.metadata.name,
                    node: &w.spec.node,
                    identity,
                    origin: Some(&w.origin),
                },
            );
        }
    }
    owners
}

/// The owners of the addresses of `workloads` (as last compiled).
pub(crate) fn owners_compiled(workloads: &[WorkloadInfo]) -> Owners<'_> {
    let mut owners = Owners::with_capacity(workloads.len());
    for w in workloads {
        for ip in &w.ips {
            owners.insert(
                IpKey::from(*ip),
                Owner {
                    namespace: &w.namespace,
                    name: &w.name,
                    node: &w.node,
                    identity: w.identity,
                    origin: None,
                },
            );
        }
    }
    owners
}

/// Compiles the Services into their slots and the names behind them.
/// Backends are the EndpointSlices' (`slices`, in a cluster) or, in a
/// directory, the `selectable` Workloads that a Service's selector matches;
/// `owners` names whoever is at a backend's address. `node` is this agent's
/// node (for `internalTrafficPolicy: Local`).
pub(crate) fn compile_services(
    services: &[Service],
    splits: &[TrafficSplit],
    slices: Option<&[EndpointSliceDoc]>,
    selectable: &[Workload],
    owners: &Owners<'_>,
    node: &str,
) -> Result<(ServiceSlots, Vec<ServiceInfo>), ConfigError> {
    let mut by_namespace: HashMap<&str, Vec<&Workload>> = HashMap::new();
    for w in selectable {
        by_namespace
            .entry(w.metadata.namespace.as_str())
            .or_default()
            .push(w);
    }
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSliceDoc>> = HashMap::new();
    for slice in slices.into_iter().flatten() {
        slices_of
            .entry((slice.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    let mut slots = ServiceSlots::new();
    let mut port_owners: HashMap<ServiceKey, (&Service, usize)> = HashMap::new();
    let mut infos = Vec::new();
    for s in services {
        let selector = s.spec.selector.clone().unwrap_or_default();
        // Selectors choose backends only in a directory: in a cluster the
        // EndpointSlices say.
        let selected: Vec<&Workload> = if s.spec.selector.is_some() && slices.is_none() {
            by_namespace
                .get(s.metadata.namespace.as_str())
                .into_iter()
                .flatten()
                .copied()
                .filter(|w| {
                    selector
                        .iter()
                        .all(|(k, v)| w.metadata.labels.get(k) == Some(v))
                        && (s.spec.internal_traffic_policy == TrafficPolicy::Cluster
                            || w.spec.node == node)
                })
                .collect()
        } else {
            Vec::new()
        };
        let addresses = s.cluster_ips();
        for (a, vip) in addresses.iter().enumerate() {
            if let Some(w) = owners.get(&IpKey::from(*vip)) {
                let field = match &s.spec.cluster_ips {
                    Some(_) => format!("spec.clusterIPs[{a}]"),
                    None => "spec.clusterIP".into(),
                };
                let origin = w.origin.map(|o| format!(" ({o})")).unwrap_or_default();
                return Err(s.error(
                    field,
                    format!(
                        "{vip} is the address of Workload {}/{}{origin}; a Service address must be its own",
                        w.namespace, w.name
                    ),
                ));
            }
            for (i, port) in s.spec.ports.iter().flatten().enumerate() {
                let protocol = match port.protocol {
                    ServiceProtocol::Tcp => Protocol::Tcp,
                    ServiceProtocol::Udp => Protocol::Udp,
                    ServiceProtocol::Sctp => unreachable!("refused by validate_service"),
                };
                let key = ServiceKey::new(IpKey::from(*vip).ip, port.port, protocol.number());
                if let Some((first, j)) = port_owners.insert(key, (s, i)) {
                    return Err(s.error(
                        format!("spec.ports[{i}]"),
                        format!(
                            "{vip} port {} {} is already Service {} spec.ports[{j}] ({})",
                            port.port,
                            protocol.name(),
                            first.key(),
                            first.origin
                        ),
                    ));
                }
                let found: Vec<(SockAddr, BackendInfo)> = match slices {
                    None => selected
                        .iter()
                        .filter_map(|w| Some((w, target_port(port, protocol, w)?)))
                        .flat_map(|(w, target)| {
                            w.spec
                                .ips
                                .iter()
                                .filter(|ip| ip.is_ipv4() == vip.is_ipv4())
                                .map(move |ip| (*ip, target))
                        })
                        .map(|(ip, target)| backend(ip, target, owners, None))
                        .collect(),
                    Some(_) => {
                        let key = (s.metadata.namespace.as_str(), s.metadata.name.as_str());
                        let own = slices_of.get(&key).map_or(&[][..], Vec::as_slice);
                        slice_backends(s, port, protocol, vip, own, node)
                    }
                    .into_iter()
                    .map(|(ip, target, node)| backend(ip, target, owners, node))
                    .collect(),
                };
                let (mut backends, mut backend_infos): (Vec<_>, Vec<_>) = found.into_iter().unzip();
                if backends.len() > MAX_SLOTS as usize {
                    return Err(s.error(
                        format!("spec.ports[{i}]"),
                        format!(
                            "{} backends; a Service port can have at most {MAX_SLOTS}",
                            backends.len()
                        ),
                    ));
                }
                backends.sort();
                backend_infos.sort_by_key(|b| (b.address, b.port));
                slots.insert(
                    key,
                    ServiceBackends {
                        slots: backends,
                        affinity_timeout_s: s.spec.affinity_timeout_s(),
                    },
                );
                infos.push(ServiceInfo {
                    namespace: s.metadata.namespace.clone(),
                    name: s.metadata.name.clone(),
                    port_name: port.name.clone(),
                    address: *vip,
                    port: port.port,
                    protocol: protocol.name().into(),
                    internal_traffic_policy: s.spec.internal_traffic_policy,
                    session_affinity_timeout_s: Some(s.spec.affinity_timeout_s())
                        .filter(|t| *t != 0),
                    backends: backend_infos,
                });
            }
        }
    }
    apply_splits(services, splits, slices.is_some(), &mut slots, &mut infos)?;
    infos.sort_by(|a, b| {
        (&a.namespace, &a.name, a.address, a.port, &a.protocol).cmp(&(
            &b.namespace,
            &b.name,
            b.address,
            b.port,
            &b.protocol,
        ))
    });
    Ok((slots, infos))
}

/// Replaces the backends of each split root Service by its backend
/// Services' backends, weighted: for each address and port of the root,
/// the port of the same name (or, unnamed, the same number) of each
/// backend Service. A backend Service without backends gives its share to
/// the others (it has nothing to serve it with). In a directory, a split
/// naming a Service that does not exist is refused; in a cluster
/// (`cluster`), where objects arrive in any order, it waits: a missing root
/// leaves the split without effect, a missing backend Service has no
/// backends.
fn apply_splits(
    services: &[Service],
    splits: &[TrafficSplit],
    cluster: bool,
    slots: &mut ServiceSlots,
    infos: &mut [ServiceInfo],
) -> Result<(), ConfigError> {
    let find = |ns: &str, name: &str| {
        services
            .iter()
            .find(|s| s.metadata.namespace == ns && s.metadata.name == name)
    };
    let mut roots: HashMap<(&str, &str), &TrafficSplit> = HashMap::new();
    for split in splits {
        let ns = split.metadata.namespace.as_str();
        if cluster {
            // References resolve against whatever the cluster holds now.
        } else if find(ns, &split.spec.service).is_none() {
            return Err(split.error(
                "spec.service",
                format!("no Service {ns}/{}", split.spec.service),
            ));
        }
        for (i, b) in split.spec.backends.iter().enumerate() {
            if !cluster && find(ns, &b.service).is_none() {
                return Err(split.error(
                    format!("spec.backends[{i}].service"),
                    format!("no Service {ns}/{}", b.service),
                ));
            }
        }
        if let Some(first) = roots.insert((ns, split.spec.service.as_str()), split) {
            return Err(split.error(
                "spec.service",
                format!(
                    "Service {ns}/{} is already split by {} ({})",
                    split.spec.service,
                    first.key(),
                    first.origin
                ),
            ));
        }
    }
    // Each root address and port, and what its backend Services offer.
    let snapshot: Vec<ServiceInfo> = infos.to_vec();
    for info in infos.iter_mut() {
        let Some(split) = roots.get(&(info.namespace.as_str(), info.name.as_str())) else {
            continue;
        };
        let mut weights = Vec::new();
        let mut members: Vec<BackendInfo> = Vec::new();
        for b in &split.spec.backends {
            let offered = snapshot.iter().find(|o| {
                o.namespace == info.namespace
                    && o.name == b.service
                    && o.protocol == info.protocol
                    && o.address.is_ipv4() == info.address.is_ipv4()
                    && match &info.port_name {
                        Some(name) => o.port_name.as_deref() == Some(name),
                        None => o.port == info.port,
                    }
            });
            let Some(offered) = offered.filter(|o| !o.backends.is_empty()) else {
                continue;
            };
            let each = f64::from(b.weight) / offered.backends.len() as f64;
            for backend in &offered.backends {
                weights.push(each);
                members.push(backend.clone());
            }
        }
        let counts = apportion(&weights, mesh_common::service::WEIGHTED_SLOTS);
        let key = info.service_key();
        let mut expanded = Vec::new();
        info.backends.clear();
        for (member, count) in members.into_iter().zip(counts) {
            if count == 0 {
                continue;
            }
            let addr = SockAddr::new(IpKey::from(member.address).ip, member.port);
            expanded.extend(std::iter::repeat_n(addr, usize::from(count)));
            info.backends.push(BackendInfo {
                weight: u32::from(count),
                ..member
            });
        }
        let affinity_timeout_s = slots.get(&key).map_or(0, |b| b.affinity_timeout_s);
        slots.insert(
            key,
            ServiceBackends {
                slots: expanded,
                affinity_timeout_s,
            },
        );
    }
    Ok(())
}

/// One backend and the names behind it.
fn backend(
    ip: IpAddr,
    port: u16,
    owners: &Owners<'_>,
    node: Option<String>,
) -> (SockAddr, BackendInfo) {
    let key = IpKey::from(ip);
    let owner = owners.get(&key);
    let info = BackendInfo {
        address: ip,
        port,
        workload: owner
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .unwrap_or_default(),
        // The slice's word for the node first, else the workload's.
        node: node
            .or_else(|| owner.map(|w| w.node.to_owned()))
            .unwrap_or_default(),
        identity: owner.map_or(mesh_common::policy::WORLD_IDENTITY, |w| w.identity),
        weight: 1,
    };
    (SockAddr::new(key.ip, port), info)
}

/// A Service port's backends from its EndpointSlices of `vip`'s family, as
/// kube-proxy chooses them: the slice port of the Service port's name and
/// protocol (named target ports are resolved per slice); ready endpoints,
/// or, when none is ready, the serving and terminating ones (KEP-1669);
/// only this node's with `internalTrafficPolicy: Local`; every one with
/// `publishNotReadyAddresses`. Address, port, and node.
fn slice_backends(
    s: &Service,
    port: &ServicePort,
    protocol: Protocol,
    vip: &IpAddr,
    slices: &[&EndpointSliceDoc],
    node: &str,
) -> Vec<(IpAddr, u16, Option<String>)> {
    let local_only = s.spec.internal_traffic_policy == TrafficPolicy::Local;
    let all_ready = s.spec.publish_not_ready_addresses == Some(true);
    let mut candidates = Vec::new();
    for slice in slices.iter().filter(|sl| {
        sl.namespace == s.metadata.namespace
            && sl.service == s.metadata.name
            && sl.ipv6 == vip.is_ipv6()
    }) {
        let Some(sp) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == protocol)
        else {
            continue;
        };
        for e in &slice.endpoints {
            if local_only && e.node.as_deref() != Some(node) {
                continue;
            }
            for ip in &e.addresses {
                candidates.push((e, *ip, sp.port));
            }
        }
    }
    let ready = |e: &SliceEndpoint| all_ready || e.ready;
    let any_ready = candidates.iter().any(|(e, _, _)| ready(e));
    let mut out: Vec<(IpAddr, u16, Option<String>)> = candidates
        .into_iter()
        .filter(|(e, _, _)| {
            if any_ready {
                ready(e)
            } else {
                e.serving && e.terminating
            }
        })
        .map(|(e, ip, p)| (ip, p, e.node.clone()))
        .collect();
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    out
}

/// The port a Workload serves a Service port on, if it serves it at all.
fn target_port(port: &ServicePort, protocol: Protocol, w: &Workload) -> Option<u16> {
    match &port.target_port {
        None => Some(port.port),
        Some(TargetPort::Number(n)) => u16::try_from(*n).ok(),
        Some(TargetPort::Name(name)) => w
            .spec
            .ports
            .iter()
            .flatten()
            .find(|p| &p.name == name && p.protocol == protocol)
            .map(|p| p.port),
    }
}

/// What `SERVICES`, `SERVICE_BACKENDS` and `SERVICE_MEMBERS` hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceTables {
    pub services: BTreeMap<ServiceKey, ServiceEntry>,
    pub backends: BTreeMap<BackendKey, SockAddr>,
    /// The backends of Services with session affinity.
    pub members: BTreeMap<MemberKey, u32>,
}

/// The tables that serve `desired`, given what the maps hold now. A
/// Service whose slots are unchanged keeps its revision and entries; one
/// whose slots changed gets the next revision, so that the new slots are
/// written beside the live ones and the entry switches to them in one
/// update (the caller writes backends and members before services and
/// deletes in the reverse order: `diff` of each table gives exactly that).
pub fn service_tables(applied: &ServiceTables, desired: &ServiceSlots) -> ServiceTables {
    let mut out = ServiceTables::default();
    for (service, wanted) in desired {
        let slots = &wanted.slots;
        let live = applied.services.get(service);
        let unchanged = live.is_some_and(|entry| {
            usize::from(entry.slots) == slots.len()
                && slots.iter().enumerate().all(|(i, backend)| {
                    applied.backends.get(&BackendKey {
                        service: *service,
                        revision: entry.revision,
                        slot: i as u16,
                    }) == Some(backend)
                })
        });
        let revision = match live {
            Some(entry) if unchanged => entry.revision,
            Some(entry) => entry.revision.wrapping_add(1),
            None => 0,
        };
        out.services.insert(
            *service,
            ServiceEntry {
                revision,
                slots: slots.len() as u16,
                affinity_timeout_s: wanted.affinity_timeout_s,
            },
        );
        for (slot, backend) in slots.iter().enumerate() {
            let key = BackendKey {
                service: *service,
                revision,
                slot: slot as u16,
            };
            out.backends.insert(key, *backend);
            if wanted.affinity_timeout_s != 0 {
                let member = MemberKey {
                    service: *service,
                    _pad: 0,
                    backend: *backend,
                };
                out.members.insert(member, 1);
            }
        }
    }
    out
}

impl ServiceTables {
    /// The backends in the live revision of `service`'s slots.
    fn live_backends(&self, service: &ServiceKey) -> BTreeSet<SockAddr> {
        let Some(entry) = self.services.get(service) else {
            return BTreeSet::new();
        };
        let slot = |slot| BackendKey {
            service: *service,
            revision: entry.revision,
            slot,
        };
        self.backends
            .range(slot(0)..=slot(u16::MAX))
            .map(|(_, backend)| *backend)
            .collect()
    }
}

/// Each backend that leaves a Service of protocol `proto` when `new`
/// replaces `old`: it was in the Service's live slots and is in none of
/// them now (the Service gone, or the backend dropped from it).
pub fn departed_backends(
    old: &ServiceTables,
    new: &ServiceTables,
    proto: u8,
) -> BTreeSet<MemberKey> {
    let mut departed = BTreeSet::new();
    for (service, entry) in old.services.iter().filter(|(s, _)| s.proto == proto) {
        // The same revision is the same slots.
        if new.services.get(service) == Some(entry) {
            continue;
        }
        let stays = new.live_backends(service);
        for backend in old.live_backends(service) {
            if !stays.contains(&backend) {
                departed.insert(MemberKey {
                    service: *service,
                    _pad: 0,
                    backend,
                });
            }
        }
    }
    departed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::documents::parse_str;
    use mesh_common::policy::{PROTO_TCP, PROTO_UDP};

    fn addr(last: u8, port: u16) -> SockAddr {
        SockAddr::new(IpKey::from(IpAddr::from([10, 0, 0, last])).ip, port)
    }

    fn set(slots: Vec<SockAddr>) -> ServiceBackends {
        ServiceBackends {
            slots,
            affinity_timeout_s: 0,
        }
    }

    #[test]
    fn a_backend_departs_when_no_live_slot_of_its_service_holds_it() {
        let udp = ServiceKey::new(addr(10, 0).ip, 53, PROTO_UDP);
        let tcp = ServiceKey::new(addr(10, 0).ip, 53, PROTO_TCP);
        let (a, b, c) = (addr(1, 5353), addr(2, 5353), addr(3, 5353));
        let both =
            |slots: Vec<SockAddr>| BTreeMap::from([(udp, set(slots.clone())), (tcp, set(slots))]);
        let old = service_tables(&ServiceTables::default(), &both(vec![a, b, b]));
        let member = |backend| MemberKey {
            service: udp,
            _pad: 0,
            backend,
        };
        // b keeps a slot (fewer of them): only a departs, and only from the
        // UDP Service when UDP is asked.
        let new = service_tables(&old, &both(vec![b, c]));
        assert_eq!(
            departed_backends(&old, &new, PROTO_UDP),
            BTreeSet::from([member(a)])
        );
        // Unchanged: nobody departs.
        let same = service_tables(&old, &both(vec![a, b, b]));
        assert!(departed_backends(&old, &same, PROTO_UDP).is_empty());
        // The Service removed: all its backends depart.
        let gone = service_tables(&old, &BTreeMap::new());
        assert_eq!(
            departed_backends(&old, &gone, PROTO_UDP),
            BTreeSet::from([member(a), member(b)])
        );
    }

    #[test]
    fn affinity_services_list_their_members_once() {
        let sticky = ServiceBackends {
            slots: vec![addr(1, 80), addr(1, 80), addr(2, 80)],
            affinity_timeout_s: 30,
        };
        let t = service_tables(
            &ServiceTables::default(),
            &BTreeMap::from([(key(), sticky)]),
        );
        assert_eq!(t.services[&key()].affinity_timeout_s, 30);
        assert_eq!(t.members.len(), 2);
        let plain = service_tables(&t, &BTreeMap::from([(key(), set(vec![addr(1, 80)]))]));
        assert!(plain.members.is_empty());
    }

    fn key() -> ServiceKey {
        ServiceKey::new(
            IpKey::from(IpAddr::from([10, 96, 0, 10])).ip,
            80,
            mesh_common::policy::PROTO_TCP,
        )
    }

    #[test]
    fn an_unchanged_service_keeps_its_revision_and_a_changed_one_moves_on() {
        let first = service_tables(
            &ServiceTables::default(),
            &BTreeMap::from([(key(), set(vec![addr(1, 8080), addr(2, 8080)]))]),
        );
        assert_eq!(first.services[&key()].revision, 0);
        assert_eq!(first.services[&key()].slots, 2);
        assert_eq!(first.backends.len(), 2);

        let same = service_tables(
            &first,
            &BTreeMap::from([(key(), set(vec![addr(1, 8080), addr(2, 8080)]))]),
        );
        assert_eq!(same, first);

        let scaled = service_tables(&first, &BTreeMap::from([(key(), set(vec![addr(3, 8080)]))]));
        let entry = scaled.services[&key()];
        assert_eq!((entry.revision, entry.slots), (1, 1));
        // Only the new revision's slots are wanted: the diff deletes the
        // old ones after the entry has switched.
        assert_eq!(
            scaled
                .backends
                .keys()
                .map(|k| k.revision)
                .collect::<Vec<_>>(),
            vec![1]
        );
        let diff_backends = crate::diff(&first.backends, &scaled.backends);
        assert_eq!(diff_backends.upserts.len(), 1);
        assert_eq!(diff_backends.deletes.len(), 2);

        let empty = service_tables(&scaled, &BTreeMap::from([(key(), set(vec![]))]));
        assert_eq!(empty.services[&key()].slots, 0);
        assert!(empty.backends.is_empty());
        assert!(service_tables(&empty, &BTreeMap::new()).services.is_empty());
    }

    #[test]
    fn revisions_wrap() {
        let mut applied = ServiceTables::default();
        applied.services.insert(
            key(),
            ServiceEntry {
                revision: u16::MAX,
                slots: 0,
                affinity_timeout_s: 0,
            },
        );
        let next = service_tables(&applied, &BTreeMap::from([(key(), set(vec![addr(1, 1)]))]));
        assert_eq!(next.services[&key()].revision, 0);
    }

    const WORKLOADS: &str = r#"
apiVersion: mesh.dev/v1alpha1
kind: Workload
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec:
  serviceAccount: db
  ips: [10.0.0.1, "fd00::1"]
  node: node-a
  ports: [{name: sql, port: 5432}]
---
apiVersion: mesh.dev/v1alpha1
kind: Workload
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec:
  serviceAccount: db
  ips: [10.0.0.2]
  node: node-b
  ports: [{name: sql, port: 6432}]
---
apiVersion: mesh.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccount: web, ips: [10.0.0.3], node: node-a}
"#;

    fn compile_with(service: &str, node: &str) -> Result<Vec<ServiceInfo>, ConfigError> {
        let docs = parse_str("test.yaml", &format!("{WORKLOADS}---\n{service}"))?;
        compile_services(
            &docs.services,
            &docs.traffic_splits,
            None,
            &docs.workloads,
            &owners_of(&docs.workloads, |_| 7),
            node,
        )
        .map(|(_, infos)| infos)
    }

    #[test]
    fn backends_are_the_selected_workloads_of_the_address_family() {
        let infos = compile_with(
            r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop, uid: 1234, resourceVersion: "9"}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ipFamilies: [IPv4, IPv6]
  selector: {app: db}
  ports: [{name: sql, port: 5432, targetPort: sql}, {name: admin, port: 80, targetPort: 8080}]
status: {loadBalancer: {}}
"#,
            "node-a",
        )
        .unwrap();
        let summary: Vec<_> = infos
            .iter()
            .map(|s| {
                (
                    format!("{}:{}", s.address, s.port),
                    s.backends
                        .iter()
                        .map(|b| format!("{}:{}", b.address, b.port))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "10.96.0.10:80".into(),
                    vec!["10.0.0.1:8080".into(), "10.0.0.2:8080".into()]
                ),
                (
                    "10.96.0.10:5432".into(),
                    // Named target ports differ between the backends.
                    vec!["10.0.0.1:5432".into(), "10.0.0.2:6432".into()]
                ),
                ("fd00:96::10:80".into(), vec!["fd00::1:8080".into()]),
                ("fd00:96::10:5432".into(), vec!["fd00::1:5432".into()]),
            ]
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_only_this_nodes_backends() {
        let service = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: db}, internalTrafficPolicy: Local, ports: [{port: 5432}]}
"#;
        let on_b = compile_with(service, "node-b").unwrap();
        assert_eq!(on_b[0].backends.len(), 1);
        assert_eq!(on_b[0].backends[0].workload, "shop/db-1");
        let nowhere = compile_with(service, "node-c").unwrap();
        assert!(nowhere[0].backends.is_empty());
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                "spec: {clusterIP: 10.96.0.10, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ),
            (
                "spec: {clusterIP: 10.96.0.10, externalIPs: [1.2.3.4], ports: [{port: 80}]}",
                "spec.externalIPs",
            ),
            (
                "spec: {type: ExternalName, externalName: example.org}",
                "spec.type",
            ),
            (
                "spec: {clusterIP: 10.96.0.10, ports: [{port: 80, protocol: SCTP}]}",
                "spec.ports[0].protocol",
            ),
            (
                "spec: {clusterIP: 10.96.0.10, ports: [{port: 80}, {port: 81}]}",
                "spec.ports[0].name",
            ),
            (
                "spec: {clusterIP: 10.96.0.10, ports: [{name: a, port: 80}, {name: b, port: 80}]}",
                "spec.ports[1].port",
            ),
            (
                "spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 70000}]}",
                "spec.ports[0].targetPort",
            ),
            (
                "spec: {clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: Not_A_Name}]}",
                "spec.ports[0].targetPort",
            ),
            (
                "spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}",
                "spec.clusterIP",
            ),
            ("spec: {ports: [{port: 80}]}", "spec.clusterIP"),
            (
                "spec: {clusterIPs: [10.96.0.1, 10.96.0.2], ports: [{port: 80}]}",
                "spec.clusterIPs[1]",
            ),
            (
                "spec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2], ports: [{port: 80}]}",
                "spec.clusterIP",
            ),
            ("spec: {clusterIP: 10.96.0.10}", "spec.ports"),
            (
                "spec: {clusterIP: 10.96.0.10, ports: [{port: 80}], topologyKeys: [x]}",
                "spec.topologyKeys",
            ),
            (
                "spec: {clusterIP: 10.0.0.3, ports: [{port: 80}]}",
                "spec.clusterIP",
            ),
            (
                "spec: {clusterIP: 10.96.0.10, sessionAffinity: Sticky, ports: [{port: 80}]}",
                "spec.sessionAffinity",
            ),
        ];
        for (spec, field) in cases {
            let doc = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: shop}}\n{spec}\n"
            );
            let err = compile_with(&doc, "node-a").expect_err(spec);
            assert_eq!(err.field.as_deref(), Some(field), "{spec}: {err}");
            assert_eq!(err.kind.as_deref(), Some(KIND_SERVICE), "{spec}: {err}");
            assert_eq!(err.document, Some(4), "{spec}: {err}");
        }
    }

    #[test]
    fn two_services_cannot_share_an_address_and_port() {
        let two = r#"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
"#;
        let err = compile_with(two, "node-a").unwrap_err();
        assert_eq!(err.name.as_deref(), Some("shop/b"));
        assert!(err.message.contains("already Service shop/a"), "{err}");
    }

    #[test]
    fn apportion_is_exact_to_a_slot() {
        assert_eq!(apportion(&[90.0, 10.0], 1000), vec![900, 100]);
        assert_eq!(apportion(&[1.0, 1.0, 1.0], 1000), vec![334, 333, 333]);
        assert_eq!(apportion(&[45.0, 45.0, 10.0], 1000), vec![450, 450, 100]);
        assert_eq!(apportion(&[0.0, 5.0], 1000), vec![0, 1000]);
        assert_eq!(apportion(&[0.0, 0.0], 1000), vec![0, 0]);
        let odd = apportion(&[1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 2.0], 1000);
        assert_eq!(odd.iter().sum::<u16>(), 1000);
    }

    const SPLIT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: db}, ports: [{name: sql, port: 5432, targetPort: sql}]}
---
apiVersion: v1
kind: Service
metadata: {name: db-0, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: db, zone: a}, ports: [{name: sql, port: 5432, targetPort: sql}]}
---
apiVersion: v1
kind: Service
metadata: {name: db-1, namespace: shop}
spec: {clusterIP: 10.96.0.12, selector: {app: db, zone: b}, ports: [{name: sql, port: 5432, targetPort: sql}]}
---
apiVersion: mesh.dev/v1alpha1
kind: TrafficSplit
metadata: {name: canary, namespace: shop}
spec:
  service: db
  backends: [{service: db-0, weight: 90}, {service: db-1, weight: 10}]
"#;

    #[test]
    fn a_split_weights_the_root_services_slots() {
        let workloads = WORKLOADS
            .replace(
                "labels: {app: db}}
spec:
  serviceAccount: db
  ips: [10.0.0.1",
                "labels: {app: db, zone: a}}
spec:
  serviceAccount: db
  ips: [10.0.0.1",
            )
            .replace(
                "labels: {app: db}}
spec:
  serviceAccount: db
  ips: [10.0.0.2",
                "labels: {app: db, zone: b}}
spec:
  serviceAccount: db
  ips: [10.0.0.2",
            );
        let docs = parse_str(
            "t.yaml",
            &format!(
                "{workloads}---
{SPLIT}"
            ),
        )
        .unwrap();
        let (slots, infos) = compile_services(
            &docs.services,
            &docs.traffic_splits,
            None,
            &docs.workloads,
            &owners_of(&docs.workloads, |_| 7),
            "n",
        )
        .unwrap();
        let root = ServiceKey::new(
            IpKey::from(IpAddr::from([10, 96, 0, 10])).ip,
            5432,
            mesh_common::policy::PROTO_TCP,
        );
        let set = &slots[&root].slots;
        assert_eq!(set.len(), 1000);
        let to_a = set.iter().filter(|b| **b == addr(1, 5432)).count();
        let to_b = set.iter().filter(|b| **b == addr(2, 6432)).count();
        assert_eq!((to_a, to_b), (900, 100));
        let info = infos.iter().find(|i| i.name == "db").unwrap();
        let weights: Vec<u32> = info.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, vec![900, 100]);
    }

    #[test]
    fn a_split_must_name_services_that_exist() {
        let bad = SPLIT.replace("{service: db-1, weight: 10}", "{service: db-9, weight: 10}");
        let err = parse_str("t.yaml", &bad)
            .and_then(|d| {
                compile_services(
                    &d.services,
                    &d.traffic_splits,
                    None,
                    &d.workloads,
                    &owners_of(&d.workloads, |_| 7),
                    "n",
                )
            })
            .unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("spec.backends[1].service"),
            "{err}"
        );
        assert_eq!(err.kind.as_deref(), Some(KIND_TRAFFIC_SPLIT));
        let itself = SPLIT.replace("{service: db-1, weight: 10}", "{service: db, weight: 10}");
        let err = parse_str("t.yaml", &itself).unwrap_err();
        assert_eq!(
            err.field.as_deref(),
            Some("spec.backends[1].service"),
            "{err}"
        );
    }

    fn endpoint(ip: [u8; 4], ready: bool, terminating: bool, node: &str) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![IpAddr::from(ip)],
            ready,
            serving: ready || terminating,
            terminating,
            node: Some(node.into()),
        }
    }

    fn slice(name: &str, port: u16, endpoints: Vec<SliceEndpoint>) -> EndpointSliceDoc {
        EndpointSliceDoc {
            namespace: "shop".into(),
            name: name.into(),
            service: "db".into(),
            ipv6: false,
            ports: vec![SlicePort {
                name: Some("sql".into()),
                port,
                protocol: Protocol::Tcp,
            }],
            endpoints,
        }
    }

    fn from_slices(extra: &str, slices: &[EndpointSliceDoc], node: &str) -> Vec<String> {
        let doc = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: shop}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{name: sql, port: 5432, targetPort: sql}}]{extra}}}\n"
        );
        let docs = parse_str("k8s", &doc).unwrap();
        let (_, infos) =
            compile_services(&docs.services, &[], Some(slices), &[], &Owners::new(), node).unwrap();
        infos[0]
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.address, b.port))
            .collect()
    }

    #[test]
    fn endpoint_slices_are_read_as_kube_proxy_reads_them() {
        let slices = [
            // Named target ports resolve per slice.
            slice("a", 5432, vec![endpoint([10, 0, 0, 1], true, false, "n1")]),
            slice(
                "b",
                6432,
                vec![
                    endpoint([10, 0, 0, 2], true, false, "n2"),
                    endpoint([10, 0, 0, 3], false, true, "n1"),
                    endpoint([10, 0, 0, 4], false, false, "n1"),
                ],
            ),
        ];
        assert_eq!(
            from_slices("", &slices, "n1"),
            ["10.0.0.1:5432", "10.0.0.2:6432"]
        );
        // Local: this node's only, and none ready there means the serving
        // and terminating ones (KEP-1669).
        assert_eq!(
            from_slices(", internalTrafficPolicy: Local", &slices, "n1"),
            ["10.0.0.1:5432"]
        );
        let terminating = [slice(
            "c",
            5432,
            vec![
                endpoint([10, 0, 0, 3], false, true, "n1"),
                endpoint([10, 0, 0, 4], false, false, "n1"),
            ],
        )];
        assert_eq!(from_slices("", &terminating, "n1"), ["10.0.0.3:5432"]);
        assert_eq!(
            from_slices(", publishNotReadyAddresses: true", &terminating, "n1"),
            ["10.0.0.3:5432", "10.0.0.4:5432"]
        );
        assert!(from_slices(", internalTrafficPolicy: Local", &terminating, "n9").is_empty());
        // A slice of the other family, or of another Service, is not used.
        let mut v6 = slice("d", 5432, vec![endpoint([10, 0, 0, 5], true, false, "n1")]);
        v6.ipv6 = true;
        let mut other = slice("e", 5432, vec![endpoint([10, 0, 0, 6], true, false, "n1")]);
        other.service = "web".into();
        assert!(from_slices("", &[v6, other], "n1").is_empty());
    }

    #[test]
    fn port_names() {
        assert!(is_port_name("http"));
        assert!(is_port_name("h2c-8080"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("-http"));
        assert!(!is_port_name("a--b"));
        assert!(!is_port_name("averyveryverylongname"));
    }
}
