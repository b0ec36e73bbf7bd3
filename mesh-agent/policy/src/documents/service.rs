//! The `v1/Service` document exactly as a Kubernetes manifest writes it,
//! SMI's `TrafficSplit`, the named ports of Workloads, and the
//! EndpointSlices Kubernetes mode builds (docs/services.md): parsing and
//! the checks that need nothing but the documents themselves.
//!
//! What the mesh translates is the ClusterIP (every address of
//! `clusterIPs`); node ports, load balancers and topology stay with
//! kube-proxy. Fields that would change what the ClusterIP does and that
//! the mesh does not implement are refused, naming the field; fields the
//! API server writes (`status`, `metadata.uid`, …) are accepted and
//! ignored, so a manifest exported from a cluster reads as it is.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use kube::CustomResource;
use mesh_common::service::DEFAULT_AFFINITY_TIMEOUT_S;
use serde::{Deserialize, de::IgnoredAny};

use super::{ConfigError, DocumentStatus, FieldError, ObjectMeta, Origin, Protocol};
use crate::identity::is_dns_label;

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
    #[serde(deserialize_with = "super::port_number")]
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

/// An EndpointSlice, as the agent keeps it in Kubernetes mode (built from
/// the API object, never parsed from a file): where a Service's backends
/// come from there, instead of its selector.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSliceDoc {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    /// `addressType: IPv6` (else IPv4).
    pub ipv6: bool,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SlicePort {
    /// The Service port's name (`None` for a Service's only, unnamed port).
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
}

/// A named port a Workload declares, for Services' named `targetPort`s.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadPort {
    pub name: String,
    #[serde(deserialize_with = "super::port_number")]
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

// The same spec is the `TrafficSplit` custom resource's in Kubernetes
// mode (`cargo xtask gen-crds` writes its CRD).
/// Weighted backends of a Service: new connections to `service` go to the
/// backends of `backends[].service` in proportion to their weights.
#[derive(
    Clone, Debug, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema, CustomResource,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "TrafficSplit",
    root = "TrafficSplitResource",
    doc = "Weighted backends of a Service, for canary releases (docs/services.md).",
    namespaced,
    status = "DocumentStatus",
    shortname = "mts",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct TrafficSplitSpec {
    /// The Service clients dial (the root, or apex, Service).
    pub service: String,
    pub backends: Vec<SplitBackend>,
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema)]
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

    pub(crate) fn error(
        &self,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
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

    pub(crate) fn error(
        &self,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
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
            if !super::is_label_key(key) || !super::is_label_value(value) {
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
