//! Services (docs/services.md): the `v1/Service` document exactly as a
//! Kubernetes manifest writes it, its backends as the endpoints controller
//! would choose them among the Workloads, and the kernel's `SERVICES` and
//! `SERVICE_BACKENDS` entries, with the revision scheme that lets a
//! Service's backend set change in one map update.
//!
//! What the mesh translates is the ClusterIP (every address of
//! `clusterIPs`); node ports, load balancers and topology stay with
//! kube-proxy. Fields that would change what the ClusterIP does and that
//! the mesh does not implement are refused, naming the field; fields the
//! API server writes (`status`, `metadata.uid`, …) are accepted and
//! ignored, so a manifest exported from a cluster reads as it is.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use mesh_common::{
    policy::IpKey,
    service::{
        BackendKey, DEFAULT_AFFINITY_TIMEOUT_S, MAX_SLOTS, MemberKey, ServiceEntry, ServiceKey,
        SockAddr,
    },
};
use serde::{Deserialize, de::IgnoredAny};

use super::documents::{ConfigError, FieldError, ObjectMeta, Origin, Protocol, Workload};
use super::identity::is_dns_label;

/// Services are Kubernetes' own kind: `apiVersion: v1`.
pub const SERVICE_API_VERSION: &str = "v1";
pub const KIND_SERVICE: &str = "Service";

/// A Kubernetes Service, as `kubectl get service -o yaml` writes it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    pub metadata: ServiceMeta,
    pub spec: ServiceSpec,
    /// Written by the API server: ignored.
    #[serde(default)]
    pub status: Option<IgnoredAny>,
    #[serde(skip)]
    pub origin: Origin,
}

/// A Service's metadata: what standalone documents need, plus what the API
/// server writes (accepted and ignored).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceMeta {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<IgnoredAny>,
    #[serde(default)]
    pub uid: Option<IgnoredAny>,
    #[serde(default)]
    pub resource_version: Option<IgnoredAny>,
    #[serde(default)]
    pub generation: Option<IgnoredAny>,
    #[serde(default)]
    pub creation_timestamp: Option<IgnoredAny>,
    #[serde(default)]
    pub managed_fields: Option<IgnoredAny>,
    #[serde(default)]
    pub self_link: Option<IgnoredAny>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// `None` (the string) makes the Service headless: nothing to translate.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Option<Vec<String>>,
    /// Derived from `clusterIPs` by the API server: ignored.
    #[serde(default)]
    pub ip_families: Option<IgnoredAny>,
    #[serde(default)]
    pub ip_family_policy: Option<IgnoredAny>,
    #[serde(default)]
    pub ports: Option<Vec<ServicePort>>,
    /// Omitted: backends come from elsewhere (EndpointSlices in a cluster);
    /// in a directory, such a Service has none.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    #[serde(default)]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    /// Only the node-port and load-balancer paths, which stay with
    /// kube-proxy, read these.
    #[serde(default)]
    pub external_traffic_policy: Option<IgnoredAny>,
    #[serde(default)]
    pub health_check_node_port: Option<IgnoredAny>,
    #[serde(default, rename = "loadBalancerIP")]
    pub load_balancer_ip: Option<IgnoredAny>,
    #[serde(default)]
    pub load_balancer_source_ranges: Option<IgnoredAny>,
    #[serde(default)]
    pub load_balancer_class: Option<IgnoredAny>,
    #[serde(default)]
    pub allocate_load_balancer_node_ports: Option<IgnoredAny>,
    /// A preference among endpoints (topology): not applied yet.
    #[serde(default)]
    pub traffic_distribution: Option<IgnoredAny>,
    /// Standalone workloads have no readiness: every one is ready.
    #[serde(default)]
    pub publish_not_ready_addresses: Option<bool>,
    #[serde(default, rename = "externalIPs")]
    pub external_ips: Option<Vec<String>>,
    #[serde(default)]
    pub external_name: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    /// The ClusterIP part is translated; node ports stay with kube-proxy.
    NodePort,
    /// The ClusterIP part is translated; the rest stays with kube-proxy.
    LoadBalancer,
    ExternalName,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SessionAffinity {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SessionAffinityConfig {
    #[serde(default, rename = "clientIP")]
    pub client_ip: Option<ClientIpConfig>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientIpConfig {
    #[serde(default)]
    pub timeout_seconds: Option<i64>,
}

impl ServiceSpec {
    /// Seconds a client keeps its backend; 0 without session affinity.
    /// Checked by [`validate_service`].
    pub fn affinity_timeout_s(&self) -> u32 {
        match self.session_affinity {
            SessionAffinity::None => 0,
            SessionAffinity::ClientIp => self
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S),
        }
    }
}

/// `internalTrafficPolicy`: `Local` sends a node's clients only to the
/// backends of their own node, with no fallback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(deserialize_with = "super::documents::port_number")]
    pub port: u16,
    /// Omitted: the same as `port`.
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub protocol: ServiceProtocol,
    /// Node ports stay with kube-proxy.
    #[serde(default)]
    pub node_port: Option<IgnoredAny>,
    #[serde(default)]
    pub app_protocol: Option<IgnoredAny>,
}

/// `TCP`, `UDP`, or `SCTP`, which the mesh refuses (the kernel's SCTP has
/// no hook to translate at).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
pub enum ServiceProtocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

/// A backend port: a number, or the name of a port the backend declares
/// (a Workload's `spec.ports[].name`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(i64),
    Name(String),
}

/// A named port a Workload declares, for Services' named `targetPort`s.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadPort {
    pub name: String,
    #[serde(deserialize_with = "super::documents::port_number")]
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

pub const KIND_TRAFFIC_SPLIT: &str = "TrafficSplit";

/// Weighted backends for a Service, as SMI's `TrafficSplit` writes them:
/// clients keep dialling `spec.service`, and its new connections go to the
/// backends of `spec.backends[].service` (Services of the same namespace
/// that select subsets, say `version: v1` and `version: v2`) in proportion
/// to their weights.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficSplit {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: TrafficSplitSpec,
    #[serde(skip)]
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficSplitSpec {
    /// The Service clients dial (the root, or apex, Service).
    pub service: String,
    pub backends: Vec<SplitBackend>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SplitBackend {
    /// A Service of the same namespace; its backends take this share.
    pub service: String,
    /// Relative weight; 0 takes no new connections.
    pub weight: u32,
}

impl TrafficSplit {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    fn error(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::at(
            &self.origin,
            KIND_TRAFFIC_SPLIT,
            &self.metadata,
            field,
            message,
        )
    }
}

/// The checks a TrafficSplit needs nothing else for.
pub(crate) fn validate_traffic_split(t: &TrafficSplit) -> Result<(), FieldError> {
    if !is_dns_label(&t.spec.service) {
        return Err((
            "spec.service".into(),
            format!("{:?} is not a Service name", t.spec.service),
        ));
    }
    if t.spec.backends.is_empty() {
        return Err((
            "spec.backends".into(),
            "at least one backend is required".into(),
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, b) in t.spec.backends.iter().enumerate() {
        if !is_dns_label(&b.service) {
            return Err((
                format!("spec.backends[{i}].service"),
                format!("{:?} is not a Service name", b.service),
            ));
        }
        if b.service == t.spec.service {
            return Err((
                format!("spec.backends[{i}].service"),
                "the root Service cannot be one of its own backends".into(),
            ));
        }
        if let Some(j) = seen.insert(&b.service, i) {
            return Err((
                format!("spec.backends[{i}].service"),
                format!("{:?} is already spec.backends[{j}]", b.service),
            ));
        }
        if b.weight > 1_000_000 {
            return Err((
                format!("spec.backends[{i}].weight"),
                format!("{} is more than 1000000", b.weight),
            ));
        }
    }
    Ok(())
}

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

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// The metadata errors name the Service by.
    pub fn object_meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: self.metadata.name.clone(),
            namespace: self.metadata.namespace.clone(),
            labels: self.metadata.labels.clone().unwrap_or_default(),
        }
    }

    /// The virtual addresses: `clusterIPs`, or `clusterIP` alone; none for
    /// a headless Service. Checked by [`validate_service`].
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let listed = match (&self.spec.cluster_ips, &self.spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => ips.clone(),
            (_, Some(ip)) => vec![ip.clone()],
            _ => Vec::new(),
        };
        listed.iter().filter_map(|ip| ip.parse().ok()).collect()
    }

    fn error(&self, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::at(
            &self.origin,
            KIND_SERVICE,
            &self.object_meta(),
            field,
            message,
        )
    }
}

/// An IANA service name, what Kubernetes allows as a port name a
/// `targetPort` can refer to: at most 15 of `[a-z0-9-]`, at least one
/// letter, no leading, trailing or doubled `-`.
pub fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// The checks a Service needs nothing else for.
pub(crate) fn validate_service(s: &Service) -> Result<(), FieldError> {
    let meta = &s.metadata;
    if !is_dns_label(&meta.name) {
        return Err((
            "metadata.name".into(),
            format!(
                "{:?} is not a Service name (a DNS-1123 label: lowercase letters, digits and '-', at most 63)",
                meta.name
            ),
        ));
    }
    if !is_dns_label(&meta.namespace) {
        return Err((
            "metadata.namespace".into(),
            format!("{:?} is not a DNS-1123 label", meta.namespace),
        ));
    }
    let spec = &s.spec;
    if spec.type_ == ServiceType::ExternalName || spec.external_name.is_some() {
        return Err((
            "spec.type".into(),
            "ExternalName Services are DNS aliases with no address to translate; the mesh does not take them".into(),
        ));
    }
    if spec
        .external_ips
        .as_ref()
        .is_some_and(|ips| !ips.is_empty())
    {
        return Err((
            "spec.externalIPs".into(),
            "not supported yet: leave externalIPs to kube-proxy (docs/services.md)".into(),
        ));
    }
    if let Some(t) = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        && !(1..=86_400).contains(&t)
    {
        // Kubernetes' own bounds.
        return Err((
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
            format!("{t} is not between 1 and 86400"),
        ));
    }
    check_cluster_ips(spec)?;
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() && !headless {
        return Err(("spec.ports".into(), "at least one port is required".into()));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut seen: HashMap<(u16, ServiceProtocol), usize> = HashMap::new();
    for (i, p) in ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        if p.protocol == ServiceProtocol::Sctp {
            return Err((
                format!("{field}.protocol"),
                "SCTP is not supported (TCP or UDP)".into(),
            ));
        }
        match &p.name {
            Some(name) => {
                if !is_dns_label(name) {
                    return Err((
                        format!("{field}.name"),
                        format!("{name:?} is not a port name (a DNS-1123 label)"),
                    ));
                }
                if let Some(j) = names.insert(name, i) {
                    return Err((
                        format!("{field}.name"),
                        format!("{name:?} is already the name of spec.ports[{j}]"),
                    ));
                }
            }
            None if ports.len() > 1 => {
                return Err((
                    format!("{field}.name"),
                    "required when a Service has more than one port".into(),
                ));
            }
            None => {}
        }
        if let Some(j) = seen.insert((p.port, p.protocol), i) {
            return Err((
                format!("{field}.port"),
                format!(
                    "port {} {:?} is already spec.ports[{j}]",
                    p.port, p.protocol
                ),
            ));
        }
        match &p.target_port {
            Some(TargetPort::Number(n)) if !(1..=65535).contains(n) => {
                return Err((
                    format!("{field}.targetPort"),
                    format!("{n} is not a port (1-65535)"),
                ));
            }
            Some(TargetPort::Name(name)) if !is_port_name(name) => {
                return Err((
                    format!("{field}.targetPort"),
                    format!(
                        "{name:?} is neither a port number nor a port name (at most 15 of a-z, 0-9 and '-', with a letter)"
                    ),
                ));
            }
            _ => {}
        }
    }
    if let Some(selector) = &spec.selector {
        for (key, value) in selector {
            if !super::documents::is_label_key(key) || !super::documents::is_label_value(value) {
                return Err((
                    format!("spec.selector.{key}"),
                    format!("{key}: {value:?} is not a label selector entry"),
                ));
            }
        }
    }
    Ok(())
}

fn check_cluster_ips(spec: &ServiceSpec) -> Result<(), FieldError> {
    if let Some(ip) = &spec.cluster_ip
        && ip != "None"
        && ip.parse::<IpAddr>().is_err()
    {
        return Err((
            "spec.clusterIP".into(),
            format!("{ip:?} is not an IP address (or \"None\" for a headless Service)"),
        ));
    }
    let Some(ips) = &spec.cluster_ips else {
        if spec.cluster_ip.is_none() {
            return Err((
                "spec.clusterIP".into(),
                "required: in a directory there is no API server to allocate one".into(),
            ));
        }
        return Ok(());
    };
    if ips.len() > 2 {
        return Err((
            "spec.clusterIPs".into(),
            "at most two addresses, one per family".into(),
        ));
    }
    let mut families = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        if ip == "None" && ips.len() == 1 {
            continue;
        }
        let parsed: IpAddr = ip.parse().map_err(|_| {
            (
                format!("spec.clusterIPs[{i}]"),
                format!("{ip:?} is not an IP address"),
            )
        })?;
        if parsed.is_unspecified() || parsed.is_multicast() || parsed.is_loopback() {
            return Err((
                format!("spec.clusterIPs[{i}]"),
                format!("{ip} cannot be a Service address"),
            ));
        }
        if families.contains(&parsed.is_ipv4()) {
            return Err((
                format!("spec.clusterIPs[{i}]"),
                "a second address of the same family (dual-stack Services have one of each)".into(),
            ));
        }
        families.push(parsed.is_ipv4());
    }
    if let (Some(ip), Some(first)) = (&spec.cluster_ip, ips.first())
        && ip != first
    {
        return Err((
            "spec.clusterIP".into(),
            format!("{ip:?} must be the first of spec.clusterIPs ({first:?})"),
        ));
    }
    Ok(())
}

/// A Workload's named ports.
pub(crate) fn validate_workload_ports(ports: &[WorkloadPort]) -> Result<(), FieldError> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, p) in ports.iter().enumerate() {
        if !is_port_name(&p.name) {
            return Err((
                format!("spec.ports[{i}].name"),
                format!(
                    "{:?} is not a port name (at most 15 of a-z, 0-9 and '-', with a letter)",
                    p.name
                ),
            ));
        }
        if let Some(j) = names.insert(&p.name, i) {
            return Err((
                format!("spec.ports[{i}].name"),
                format!("{:?} is already the name of spec.ports[{j}]", p.name),
            ));
        }
    }
    Ok(())
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

/// Compiles the Services into their slots and the names behind them.
/// `identity_of` gives a Workload's numeric identity; `node` is this
/// agent's node (for `internalTrafficPolicy: Local`).
pub(crate) fn compile_services(
    services: &[Service],
    splits: &[TrafficSplit],
    workloads: &[Workload],
    identity_of: impl Fn(&Workload) -> u64,
    node: &str,
) -> Result<(ServiceSlots, Vec<ServiceInfo>), ConfigError> {
    let workload_ips: HashMap<IpKey, &Workload> = workloads
        .iter()
        .flat_map(|w| w.spec.ips.iter().map(move |ip| (IpKey::from(*ip), w)))
        .collect();
    let mut slots = ServiceSlots::new();
    let mut owners: HashMap<ServiceKey, (&Service, usize)> = HashMap::new();
    let mut infos = Vec::new();
    for s in services {
        let selector = s.spec.selector.clone().unwrap_or_default();
        let selected: Vec<&Workload> = if s.spec.selector.is_some() {
            workloads
                .iter()
                .filter(|w| {
                    w.metadata.namespace == s.metadata.namespace
                        && selector
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
            if let Some(w) = workload_ips.get(&IpKey::from(*vip)) {
                let field = match &s.spec.cluster_ips {
                    Some(_) => format!("spec.clusterIPs[{a}]"),
                    None => "spec.clusterIP".into(),
                };
                return Err(s.error(
                    field,
                    format!(
                        "{vip} is the address of Workload {} ({}); a Service address must be its own",
                        w.key(),
                        w.origin
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
                if let Some((first, j)) = owners.insert(key, (s, i)) {
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
                let mut backends = Vec::new();
                let mut backend_infos = Vec::new();
                for w in &selected {
                    let Some(target) = target_port(port, protocol, w) else {
                        continue; // the endpoints controller skips it too
                    };
                    for ip in w.spec.ips.iter().filter(|ip| ip.is_ipv4() == vip.is_ipv4()) {
                        backends.push(SockAddr::new(IpKey::from(*ip).ip, target));
                        backend_infos.push(BackendInfo {
                            address: *ip,
                            port: target,
                            workload: w.key(),
                            node: w.spec.node.clone(),
                            identity: identity_of(w),
                            weight: 1,
                        });
                    }
                }
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
    apply_splits(services, splits, &mut slots, &mut infos)?;
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
/// the others (it has nothing to serve it with).
fn apply_splits(
    services: &[Service],
    splits: &[TrafficSplit],
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
        if find(ns, &split.spec.service).is_none() {
            return Err(split.error(
                "spec.service",
                format!("no Service {ns}/{}", split.spec.service),
            ));
        }
        for (i, b) in split.spec.backends.iter().enumerate() {
            if find(ns, &b.service).is_none() {
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
        let proto = match info.protocol.as_str() {
            "UDP" => Protocol::Udp,
            _ => Protocol::Tcp,
        };
        let key = ServiceKey::new(IpKey::from(info.address).ip, info.port, proto.number());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::documents::parse_str;

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
            &docs.workloads,
            |_| 7,
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
            &docs.workloads,
            |_| 7,
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
                compile_services(&d.services, &d.traffic_splits, &d.workloads, |_| 7, "n")
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
