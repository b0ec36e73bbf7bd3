//! The `Workload` and `MeshPolicy` documents (docs/policy.md): parsing and
//! the checks that need nothing but the documents themselves. Checks that
//! need the agent's settings (trust domain, node) are the compiler's.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use mesh_common::policy::IpKey;
use std::path::{Path, PathBuf};

use kube::CustomResource;
use serde::{Deserialize, Deserializer};
use serde_yaml::Value;

use super::identity::{IdentityPattern, is_dns_label, is_dns_subdomain};
pub mod service;

use service::{
    EndpointSliceDoc, KIND_SERVICE, KIND_TRAFFIC_SPLIT, SERVICE_API_VERSION, Service, TrafficSplit,
    WorkloadPort, validate_service, validate_traffic_split, validate_workload_ports,
};

/// The only `apiVersion` this build reads.
pub const API_VERSION: &str = "mesh.dev/v1alpha1";
pub const KIND_WORKLOAD: &str = "Workload";
pub const KIND_MESH_POLICY: &str = "MeshPolicy";
pub const KIND_PEER_AUTHENTICATION: &str = "PeerAuthentication";
pub const KIND_MESH_NODE: &str = "MeshNode";
const KINDS: [&str; 5] = [
    KIND_WORKLOAD,
    KIND_MESH_POLICY,
    KIND_PEER_AUTHENTICATION,
    KIND_MESH_NODE,
    KIND_TRAFFIC_SPLIT,
];

/// A configuration that is refused, and where.
///
/// Displays as `{file}: document {index} ({kind} {namespace}/{name}):
/// {field}: {message}`; the parts that are not known are left out (no
/// parenthesis before the kind is known, no field for a YAML syntax error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based index of the document within the file.
    pub document: Option<usize>,
    pub kind: Option<String>,
    /// `namespace/name` (or just the name when the namespace is unknown).
    pub name: Option<String>,
    /// Path of the offending field, e.g. `spec.rules[0].ports[1].port`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(document) = self.document {
            write!(f, ": document {document}")?;
            match (&self.kind, &self.name) {
                (Some(kind), Some(name)) => write!(f, " ({kind} {name})")?,
                (Some(kind), None) => write!(f, " ({kind})")?,
                (None, Some(name)) => write!(f, " ({name})")?,
                (None, None) => {}
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about a whole file (unreadable, …).
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            document: None,
            kind: None,
            name: None,
            field: None,
            message: message.into(),
        }
    }

    /// An error about one field of a parsed document.
    pub fn at(
        origin: &Origin,
        kind: &str,
        meta: &ObjectMeta,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: origin.file.clone(),
            document: Some(origin.document),
            kind: Some(kind.to_owned()),
            name: Some(format!("{}/{}", meta.namespace, meta.name)),
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

/// Where a document came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    /// 1-based index of the document within the file.
    pub document: usize,
    /// When the document last changed, as the API server recorded it
    /// (Kubernetes mode; Unix seconds). Of the documents that do not fit
    /// the maps together, the most recently changed are refused.
    pub changed: Option<i64>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file, self.document)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    /// Required: standalone documents have no "current namespace".
    pub namespace: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
}

/// A pod, as a CNI plugin knows it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: WorkloadSpec,
    #[serde(skip)]
    pub origin: Origin,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Required for workloads on the agent's node (checked by the compiler).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Named ports, which Services' `targetPort` can refer to.
    #[serde(default)]
    pub ports: Option<Vec<WorkloadPort>>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: MeshPolicySpec,
    #[serde(skip)]
    pub origin: Origin,
}

impl MeshPolicy {
    /// `namespace/name`: how policies are named in errors, rule info and
    /// subjects, and the order in which they are considered.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }
}

impl Workload {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }
}

/// Which connections a workload accepts, as Istio's PeerAuthentication:
/// STRICT = mutual TLS from the mesh only (and workloads of its own node,
/// whose identity the kernel knows); PERMISSIVE = plaintext too.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerAuthentication {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: PeerAuthenticationSpec,
    #[serde(skip)]
    pub origin: Origin,
}

impl PeerAuthentication {
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }
}

// The same spec is the `PeerAuthentication` custom resource's in
// Kubernetes mode (`cargo xtask gen-crds` writes its CRD).
/// Whether the selected workloads accept plaintext (PERMISSIVE) or only
/// mutual TLS from the mesh (STRICT).
#[derive(
    Clone, Debug, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema, CustomResource,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    root = "PeerAuthenticationResource",
    doc = "Mutual TLS mode of a namespace's workloads (docs/policy.md).",
    namespaced,
    status = "DocumentStatus",
    shortname = "mpa",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct PeerAuthenticationSpec {
    /// Omitted: every workload of the namespace (of the mesh, in the root
    /// namespace).
    #[serde(default)]
    pub selector: Option<Selector>,
    pub mtls: MtlsSetting,
}

#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MtlsSetting {
    pub mode: MtlsMode,
}

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
pub enum MtlsMode {
    #[default]
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    #[serde(rename = "STRICT")]
    Strict,
}

impl MtlsMode {
    pub fn name(self) -> &'static str {
        match self {
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

/// A node's tunnel addresses: where other nodes' agents reach its agent
/// (standalone stand-in for the Kubernetes Node's InternalIP).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshNode {
    pub api_version: String,
    pub kind: String,
    pub metadata: NodeMeta,
    pub spec: MeshNodeSpec,
    #[serde(skip)]
    pub origin: Origin,
}

/// Nodes belong to no namespace.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeMeta {
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshNodeSpec {
    /// The first address of the family of a destination is used.
    pub addresses: Vec<IpAddr>,
}

// The same spec is the `MeshPolicy` custom resource's in Kubernetes mode
// (`cargo xtask gen-crds` writes its CRD): one type, so a document that
// works in a directory works with `kubectl apply` and the other way round.
/// Which sources may connect to the selected workloads, on which ports.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
    CustomResource,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "MeshPolicy",
    root = "MeshPolicyResource",
    doc = "Identity-based allow/deny/audit policy for workloads (docs/policy.md).",
    namespaced,
    status = "DocumentStatus",
    shortname = "mp",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct MeshPolicySpec {
    /// Omitted: every workload of the namespace (of every namespace for a
    /// policy of the root namespace).
    #[serde(default)]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: PolicyAction,
    /// A connection matches the policy if any rule matches. An ALLOW policy
    /// without rules allows nothing (its workloads become default-deny); a
    /// DENY or AUDIT policy without rules matches nothing.
    #[serde(default, deserialize_with = "null_as_default")]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
pub enum PolicyAction {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    #[serde(rename = "AUDIT")]
    Audit,
}

impl PolicyAction {
    pub fn name(self) -> &'static str {
        match self {
            PolicyAction::Allow => "ALLOW",
            PolicyAction::Deny => "DENY",
            PolicyAction::Audit => "AUDIT",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Rule {
    /// Empty or omitted: any source, mesh workload or not.
    #[serde(default, deserialize_with = "null_as_default")]
    pub from: Vec<FromEntry>,
    /// Empty or omitted: every port, TCP and UDP.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<PortEntry>,
}

/// Exactly one of the two is set (checked after parsing).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FromEntry {
    /// A SPIFFE ID, a SPIFFE ID prefix ending in `*`, or `*`.
    #[serde(default)]
    pub identity: Option<String>,
    /// A namespace, or `*` (any mesh identity).
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortEntry {
    #[serde(deserialize_with = "port_number")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => mesh_common::policy::PROTO_TCP,
            Protocol::Udp => mesh_common::policy::PROTO_UDP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// `null` (a key with nothing after it) means the same as an omitted field.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A port, read wide enough to say what is wrong with 70000 or -1.
pub(crate) fn port_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
    struct PortVisitor;

    impl PortVisitor {
        fn check<E: serde::de::Error>(
            n: impl TryInto<u16> + fmt::Display + Copy,
        ) -> Result<u16, E> {
            match n.try_into() {
                Ok(port) if port != 0 => Ok(port),
                _ => Err(E::custom(format!("{n} is not a port (1-65535)"))),
            }
        }
    }

    impl serde::de::Visitor<'_> for PortVisitor {
        type Value = u16;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a port number (1-65535)")
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u16, E> {
            Self::check(n)
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u16, E> {
            Self::check(n)
        }

        fn visit_i128<E: serde::de::Error>(self, n: i128) -> Result<u16, E> {
            Self::check(n)
        }

        fn visit_u128<E: serde::de::Error>(self, n: u128) -> Result<u16, E> {
            Self::check(n)
        }

        fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<u16, E> {
            Err(E::custom(format!("{n} is not a port (1-65535)")))
        }
    }

    deserializer.deserialize_any(PortVisitor)
}

/// What the agent says about a document it read from the API server: one
/// `Accepted` condition, `True`, or `False` with reason `Invalid` and a
/// message naming the field and what is wrong with it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DocumentStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A status condition, with the fields of Kubernetes' `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// The `metadata.generation` this condition was computed for.
    #[serde(default)]
    pub observed_generation: i64,
    /// RFC 3339: when `status` last changed.
    pub last_transition_time: String,
}

/// All documents of a configuration, parsed and checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Documents {
    pub workloads: Vec<Workload>,
    pub policies: Vec<MeshPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub nodes: Vec<MeshNode>,
    pub services: Vec<Service>,
    pub traffic_splits: Vec<TrafficSplit>,
    /// Kubernetes mode: Services' backends come from these, not from
    /// their selectors (`None`: standalone, selectors).
    pub endpoint_slices: Option<Vec<EndpointSliceDoc>>,
}

impl Documents {
    fn extend(&mut self, other: Documents) {
        self.workloads.extend(other.workloads);
        self.policies.extend(other.policies);
        self.peer_authentications.extend(other.peer_authentications);
        self.nodes.extend(other.nodes);
        self.services.extend(other.services);
        self.traffic_splits.extend(other.traffic_splits);
    }

    /// An error at the `spec.netns` of the (first) workload whose network
    /// namespace is `path`, for problems found when the agent opens it;
    /// the caller fills in `message`.
    pub fn netns_error(&self, path: &Path) -> ConfigError {
        match self
            .workloads
            .iter()
            .find(|w| w.spec.netns.as_deref() == Some(path))
        {
            Some(w) => ConfigError::at(
                &w.origin,
                KIND_WORKLOAD,
                &w.metadata,
                "spec.netns",
                format!("{} cannot be opened", path.display()),
            ),
            None => ConfigError::file(
                path.display().to_string(),
                "network namespace cannot be opened",
            ),
        }
    }
}

/// Reads every `*.yaml` / `*.yml` file directly in `dir` (not in
/// subdirectories; names starting with `.` are skipped, so editors' lock
/// files and the `..data` links of a mounted ConfigMap are), in name order.
pub fn load_dir(dir: &Path) -> Result<Documents, ConfigError> {
    let display = dir.display().to_string();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ConfigError::file(&display, format!("cannot read the directory: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry
            .map_err(|e| ConfigError::file(&display, format!("cannot read the directory: {e}")))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let path = entry.path();
        if path.is_file() {
            files.push((name.to_owned(), path));
        }
    }
    files.sort();
    let mut docs = Documents::default();
    for (_, path) in files {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::file(&file, format!("cannot read: {e}")))?;
        docs.extend(parse_documents(&file, &text)?);
    }
    check_duplicates(&docs)?;
    Ok(docs)
}

/// Parses the content of one file, named `file` in errors.
pub fn parse_str(file: &str, text: &str) -> Result<Documents, ConfigError> {
    let docs = parse_documents(file, text)?;
    check_duplicates(&docs)?;
    Ok(docs)
}

/// Parses one document that is already a tree (an object read from the
/// API server), with every check a document from a file gets.
pub fn parse_value(file: &str, value: Value) -> Result<Documents, ConfigError> {
    let mut docs = Documents::default();
    parse_document(file, 1, value, &mut docs)?;
    Ok(docs)
}

fn parse_documents(file: &str, text: &str) -> Result<Documents, ConfigError> {
    let mut docs = Documents::default();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(document).map_err(|e| ConfigError {
            file: file.to_owned(),
            document: Some(index),
            kind: None,
            name: None,
            field: None,
            message: e.to_string(),
        })?;
        parse_document(file, index, value, &mut docs)?;
    }
    Ok(docs)
}

fn parse_document(
    file: &str,
    index: usize,
    value: Value,
    docs: &mut Documents,
) -> Result<(), ConfigError> {
    let str_at = |v: &Value, path: &[&str]| -> Option<String> {
        let mut v = v;
        for key in path {
            v = v.get(*key)?;
        }
        v.as_str().map(str::to_owned)
    };
    let kind = str_at(&value, &["kind"]);
    let name = match (
        str_at(&value, &["metadata", "namespace"]),
        str_at(&value, &["metadata", "name"]),
    ) {
        (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
        (None, Some(name)) => Some(name),
        _ => None,
    };
    let error = |field: Option<String>, message: String| ConfigError {
        file: file.to_owned(),
        document: Some(index),
        kind: kind.clone(),
        name: name.clone(),
        field,
        message,
    };
    match &value {
        Value::Null => return Ok(()),
        Value::Mapping(_) => {}
        _ => {
            return Err(error(
                None,
                "a document must be a mapping (apiVersion, kind, metadata, spec)".into(),
            ));
        }
    }
    let Some(kind_str) = kind.as_deref() else {
        let message = if value.get("kind").is_some() {
            "must be a string"
        } else {
            "missing field `kind`"
        };
        return Err(error(Some("kind".into()), message.into()));
    };
    let expected_version = if kind_str == KIND_SERVICE {
        SERVICE_API_VERSION
    } else if KINDS.contains(&kind_str) {
        API_VERSION
    } else {
        return Err(error(
            Some("kind".into()),
            format!(
                "unknown kind {kind_str:?} (expected one of {}, {KIND_SERVICE})",
                KINDS.join(", ")
            ),
        ));
    };
    match str_at(&value, &["apiVersion"]) {
        Some(v) if v == expected_version => {}
        Some(v) => {
            return Err(error(
                Some("apiVersion".into()),
                format!("unknown apiVersion {v:?} (expected {expected_version})"),
            ));
        }
        None => {
            return Err(error(
                Some("apiVersion".into()),
                format!("missing (expected {expected_version})"),
            ));
        }
    }
    let origin = Origin {
        file: file.to_owned(),
        document: index,
        changed: None,
    };
    let serde_error = |e: serde_path_to_error::Error<serde_yaml::Error>| {
        let path = e.path().to_string();
        let field = (!path.is_empty() && path != ".").then_some(path);
        error(field, e.into_inner().to_string())
    };
    if kind_str == KIND_TRAFFIC_SPLIT {
        let mut t: TrafficSplit = serde_path_to_error::deserialize(value).map_err(serde_error)?;
        t.origin = origin;
        validate_meta(&t.metadata)
            .and_then(|()| validate_traffic_split(&t))
            .map_err(|(field, msg)| {
                ConfigError::at(&t.origin, KIND_TRAFFIC_SPLIT, &t.metadata, field, msg)
            })?;
        docs.traffic_splits.push(t);
    } else if kind_str == KIND_SERVICE {
        let mut s: Service = serde_path_to_error::deserialize(value).map_err(serde_error)?;
        s.origin = origin;
        validate_service(&s).map_err(|(field, msg)| {
            ConfigError::at(&s.origin, KIND_SERVICE, &s.object_meta(), field, msg)
        })?;
        docs.services.push(s);
    } else if kind_str == KIND_WORKLOAD {
        let mut w: Workload = serde_path_to_error::deserialize(value).map_err(serde_error)?;
        w.origin = origin;
        validate_workload(&w).map_err(|(field, msg)| {
            ConfigError::at(&w.origin, KIND_WORKLOAD, &w.metadata, field, msg)
        })?;
        docs.workloads.push(w);
    } else if kind_str == KIND_MESH_POLICY {
        let mut p: MeshPolicy = serde_path_to_error::deserialize(value).map_err(serde_error)?;
        p.origin = origin;
        validate_policy(&p).map_err(|(field, msg)| {
            ConfigError::at(&p.origin, KIND_MESH_POLICY, &p.metadata, field, msg)
        })?;
        docs.policies.push(p);
    } else if kind_str == KIND_PEER_AUTHENTICATION {
        let mut p: PeerAuthentication =
            serde_path_to_error::deserialize(value).map_err(serde_error)?;
        p.origin = origin;
        validate_peer_authentication(&p).map_err(|(field, msg)| {
            ConfigError::at(&p.origin, KIND_PEER_AUTHENTICATION, &p.metadata, field, msg)
        })?;
        docs.peer_authentications.push(p);
    } else {
        let mut n: MeshNode = serde_path_to_error::deserialize(value).map_err(serde_error)?;
        n.origin = origin;
        validate_node(&n).map_err(|(field, msg)| ConfigError {
            file: n.origin.file.clone(),
            document: Some(n.origin.document),
            kind: Some(KIND_MESH_NODE.into()),
            name: Some(n.metadata.name.clone()),
            field: Some(field),
            message: msg,
        })?;
        docs.nodes.push(n);
    }
    Ok(())
}

pub(crate) type FieldError = (String, String);

/// What a value of the `mesh.dev/short-circuit` label says: opted in,
/// opted out, or nothing this agent knows (`None`).
pub fn short_circuit_opt_in(value: &str) -> Option<bool> {
    match value {
        "enabled" => Some(true),
        "disabled" => Some(false),
        _ => None,
    }
}

impl Workload {
    /// Whether the workload opted in to the same-node short-circuit. From
    /// the API server a Pod's label is not checked beforehand: a value
    /// other than `enabled` leaves it out.
    pub fn short_circuit(&self) -> bool {
        self.metadata
            .labels
            .get(mesh_common::SHORT_CIRCUIT_LABEL)
            .and_then(|v| short_circuit_opt_in(v))
            .unwrap_or(false)
    }
}

fn validate_meta(meta: &ObjectMeta) -> Result<(), FieldError> {
    if !is_dns_subdomain(&meta.name) {
        return Err((
            "metadata.name".into(),
            format!(
                "{:?} is not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', at most 253)",
                meta.name
            ),
        ));
    }
    check_label("metadata.namespace", &meta.namespace)?;
    check_labels("metadata.labels", &meta.labels)
}

/// A namespace or service account name: a DNS-1123 label.
fn check_label(field: &str, value: &str) -> Result<(), FieldError> {
    if is_dns_label(value) {
        Ok(())
    } else {
        Err((
            field.into(),
            format!(
                "{value:?} is not a DNS-1123 label (lowercase letters, digits and '-', at most 63)"
            ),
        ))
    }
}

/// A qualified label key: `[prefix/]name`.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

/// A label value: at most 63 of `[A-Za-z0-9_.-]`, starting and ending with
/// an alphanumeric; may be empty.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value.as_bytes()[0].is_ascii_alphanumeric()
            && value.as_bytes()[value.len() - 1].is_ascii_alphanumeric())
}

fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Result<(), FieldError> {
    for (key, value) in labels {
        if !is_label_key(key) {
            return Err((
                field.into(),
                format!(
                    "label key {key:?} is not a qualified name ([prefix/]name: name at most 63 of [A-Za-z0-9_.-] starting and ending with an alphanumeric, prefix a DNS subdomain)"
                ),
            ));
        }
        if !is_label_value(value) {
            return Err((
                format!("{field}.{key}"),
                format!(
                    "{value:?} is not a label value (at most 63 of [A-Za-z0-9_.-] starting and ending with an alphanumeric)"
                ),
            ));
        }
    }
    Ok(())
}

fn validate_workload(w: &Workload) -> Result<(), FieldError> {
    validate_meta(&w.metadata)?;
    if let Some(value) = w.metadata.labels.get(mesh_common::SHORT_CIRCUIT_LABEL)
        && short_circuit_opt_in(value).is_none()
    {
        return Err((
            format!("metadata.labels.{}", mesh_common::SHORT_CIRCUIT_LABEL),
            format!("`{value}`: the short-circuit is `enabled` or `disabled`"),
        ));
    }
    check_label("spec.serviceAccount", &w.spec.service_account)?;
    if w.spec.ips.is_empty() {
        return Err(("spec.ips".into(), "at least one address is required".into()));
    }
    for (i, ip) in w.spec.ips.iter().enumerate() {
        let unusable = ip.is_unspecified() || ip.is_multicast() || ip.is_loopback();
        if unusable {
            return Err((
                format!("spec.ips[{i}]"),
                format!("{ip} is not a workload address"),
            ));
        }
        if let Some(j) = w.spec.ips[..i]
            .iter()
            .position(|other| IpKey::from(*other) == IpKey::from(*ip))
        {
            return Err((
                format!("spec.ips[{i}]"),
                format!("{ip} is already listed as spec.ips[{j}]"),
            ));
        }
    }
    if !is_dns_subdomain(&w.spec.node) {
        return Err((
            "spec.node".into(),
            format!(
                "{:?} is not a node name (a DNS-1123 subdomain)",
                w.spec.node
            ),
        ));
    }
    if let Some(netns) = &w.spec.netns
        && !netns.is_absolute()
    {
        return Err((
            "spec.netns".into(),
            format!("{} is not an absolute path", netns.display()),
        ));
    }
    validate_workload_ports(w.spec.ports.as_deref().unwrap_or_default())
}

/// Limits of one MeshPolicy, far above what people write by hand (the
/// policy benchmark's generated rule has 1,000 sources and 100 ports):
/// they bound what one object costs to parse and compile. What the
/// compiled entries of all policies may fill is the policy budget's
/// business.
pub const MAX_RULES: usize = 1_024;
pub const MAX_FROM: usize = 4_096;
pub const MAX_PORTS: usize = 1_024;
pub const MAX_MATCH_LABELS: usize = 64;

fn at_most<T>(field: String, items: &[T], max: usize, what: &str) -> Result<(), FieldError> {
    if items.len() > max {
        return Err((
            field,
            format!(
                "{} {what}, more than the {max} one policy may have",
                items.len()
            ),
        ));
    }
    Ok(())
}

fn validate_policy(p: &MeshPolicy) -> Result<(), FieldError> {
    validate_meta(&p.metadata)?;
    validate_selector(&p.spec.selector)?;
    at_most("spec.rules".into(), &p.spec.rules, MAX_RULES, "rules")?;
    for (i, rule) in p.spec.rules.iter().enumerate() {
        at_most(
            format!("spec.rules[{i}].from"),
            &rule.from,
            MAX_FROM,
            "sources",
        )?;
        at_most(
            format!("spec.rules[{i}].ports"),
            &rule.ports,
            MAX_PORTS,
            "ports",
        )?;
        for (j, from) in rule.from.iter().enumerate() {
            let field = format!("spec.rules[{i}].from[{j}]");
            match (&from.identity, &from.namespace) {
                (Some(identity), None) => {
                    IdentityPattern::parse(identity)
                        .map_err(|m| (format!("{field}.identity"), m))?;
                }
                (None, Some(ns)) => {
                    if ns != "*" {
                        check_label(&format!("{field}.namespace"), ns)?;
                    }
                }
                _ => {
                    return Err((
                        field,
                        "exactly one of `identity` and `namespace` is required".into(),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn validate_selector(selector: &Option<Selector>) -> Result<(), FieldError> {
    if let Some(selector) = selector {
        if let Some(sa) = &selector.service_account {
            check_label("spec.selector.serviceAccount", sa)?;
        }
        check_labels("spec.selector.matchLabels", &selector.match_labels)?;
        if selector.match_labels.len() > MAX_MATCH_LABELS {
            return Err((
                "spec.selector.matchLabels".into(),
                format!(
                    "{} labels, more than the {MAX_MATCH_LABELS} a selector may have",
                    selector.match_labels.len()
                ),
            ));
        }
    }
    Ok(())
}

fn validate_peer_authentication(p: &PeerAuthentication) -> Result<(), FieldError> {
    validate_meta(&p.metadata)?;
    validate_selector(&p.spec.selector)
}

fn validate_node(n: &MeshNode) -> Result<(), FieldError> {
    if !is_dns_subdomain(&n.metadata.name) {
        return Err((
            "metadata.name".into(),
            format!(
                "{:?} is not a node name (a DNS-1123 subdomain)",
                n.metadata.name
            ),
        ));
    }
    check_labels("metadata.labels", &n.metadata.labels)?;
    if n.spec.addresses.is_empty() {
        return Err((
            "spec.addresses".into(),
            "at least one address is required".into(),
        ));
    }
    for (i, ip) in n.spec.addresses.iter().enumerate() {
        if ip.is_unspecified() || ip.is_multicast() {
            return Err((
                format!("spec.addresses[{i}]"),
                format!("{ip} is not a node address"),
            ));
        }
    }
    Ok(())
}

/// Refuses a `kind/namespace/name` defined twice and an address claimed
/// twice, naming the second occurrence and where the first one is.
fn check_duplicates(docs: &Documents) -> Result<(), ConfigError> {
    let mut names: HashMap<(&str, &str, &str), &Origin> = HashMap::new();
    let all = docs
        .workloads
        .iter()
        .map(|w| (KIND_WORKLOAD, &w.metadata, &w.origin))
        .chain(
            docs.policies
                .iter()
                .map(|p| (KIND_MESH_POLICY, &p.metadata, &p.origin)),
        )
        .chain(
            docs.peer_authentications
                .iter()
                .map(|p| (KIND_PEER_AUTHENTICATION, &p.metadata, &p.origin)),
        )
        .chain(
            docs.traffic_splits
                .iter()
                .map(|t| (KIND_TRAFFIC_SPLIT, &t.metadata, &t.origin)),
        );
    for (kind, meta, origin) in all {
        let key = (kind, meta.namespace.as_str(), meta.name.as_str());
        if let Some(first) = names.insert(key, origin) {
            return Err(ConfigError::at(
                origin,
                kind,
                meta,
                "metadata.name",
                format!(
                    "duplicate {kind} {}/{}: first defined in {first}",
                    meta.namespace, meta.name
                ),
            ));
        }
    }
    let mut services: HashMap<(&str, &str), &Origin> = HashMap::new();
    for svc in &docs.services {
        let key = (svc.metadata.namespace.as_str(), svc.metadata.name.as_str());
        if let Some(first) = services.insert(key, &svc.origin) {
            return Err(ConfigError::at(
                &svc.origin,
                KIND_SERVICE,
                &svc.object_meta(),
                "metadata.name",
                format!(
                    "duplicate {KIND_SERVICE} {}: first defined in {first}",
                    svc.key()
                ),
            ));
        }
    }
    let mut nodes: HashMap<&str, &Origin> = HashMap::new();
    for n in &docs.nodes {
        if let Some(first) = nodes.insert(n.metadata.name.as_str(), &n.origin) {
            return Err(ConfigError {
                file: n.origin.file.clone(),
                document: Some(n.origin.document),
                kind: Some(KIND_MESH_NODE.into()),
                name: Some(n.metadata.name.clone()),
                field: Some("metadata.name".into()),
                message: format!(
                    "duplicate {KIND_MESH_NODE} {}: first defined in {first}",
                    n.metadata.name
                ),
            });
        }
    }
    let mut ips: HashMap<_, &Workload> = HashMap::new();
    for w in &docs.workloads {
        for (i, ip) in w.spec.ips.iter().enumerate() {
            if let Some(first) = ips.insert(IpKey::from(*ip), w) {
                return Err(ConfigError::at(
                    &w.origin,
                    KIND_WORKLOAD,
                    &w.metadata,
                    format!("spec.ips[{i}]"),
                    format!(
                        "{ip} is already claimed by {KIND_WORKLOAD} {} ({})",
                        first.key(),
                        first.origin
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const EXAMPLE: &str = r#"
apiVersion: mesh.dev/v1alpha1
kind: Workload
metadata:
  name: cart-5d8f
  namespace: shop
  labels: {app: cart}
spec:
  serviceAccount: cart
  ips: [198.18.0.11, "fd00::11"]
  node: node-a
  netns: /run/netns/cart
---
apiVersion: mesh.dev/v1alpha1
kind: MeshPolicy
metadata:
  name: cart-from-frontend
  namespace: shop
spec:
  selector:
    serviceAccount: cart
    matchLabels: {app: cart}
  action: ALLOW
  rules:
    - from:
        - identity: spiffe://cluster.local/ns/shop/sa/frontend
        - identity: spiffe://cluster.local/ns/ops/sa/*
        - namespace: shop
      ports:
        - port: 8080
          protocol: TCP
        - port: 53
          protocol: UDP
---
apiVersion: mesh.dev/v1alpha1
kind: MeshPolicy
metadata: {name: deny-all, namespace: mesh-system}
spec:
  action: DENY
---
"#;

    fn err(text: &str) -> String {
        let e = parse_str("policies/shop.yaml", text).expect_err("must be refused");
        e.to_string()
    }

    /// A policy document whose `spec` is `spec` (indented YAML flow or block).
    fn policy(spec: &str) -> String {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}\n"
        )
    }

    fn workload(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}\n"
        )
    }

    const OK_WORKLOAD_SPEC: &str = "  serviceAccount: cart\n  ips: [198.18.0.11]\n  node: node-a";

    #[test]
    fn example_parses() {
        let docs = parse_str("x.yaml", EXAMPLE).unwrap();
        assert_eq!(docs.workloads.len(), 1);
        assert_eq!(docs.policies.len(), 2);
        let w = &docs.workloads[0];
        assert_eq!(w.metadata.labels["app"], "cart");
        assert_eq!(w.spec.ips.len(), 2);
        assert_eq!(
            w.origin,
            Origin {
                file: "x.yaml".into(),
                document: 1,
                changed: None,
            }
        );
        let p = &docs.policies[0];
        assert_eq!(p.origin.document, 2);
        assert_eq!(p.spec.rules[0].from.len(), 3);
        assert_eq!(p.spec.rules[0].ports[1].protocol, Protocol::Udp);
        assert_eq!(p.spec.rules[0].ports[1].port, 53);
        let deny = &docs.policies[1];
        assert_eq!(deny.spec.action, PolicyAction::Deny);
        assert!(deny.spec.rules.is_empty());
        assert!(deny.spec.selector.is_none());
    }

    #[test]
    fn defaults_and_empty_documents() {
        assert_eq!(parse_str("e.yaml", "").unwrap(), Documents::default());
        assert_eq!(
            parse_str("e.yaml", "---\n---\n# nothing\n").unwrap(),
            Documents::default()
        );
        let docs = parse_str(
            "d.yaml",
            &policy("  rules:\n    - ports: [{port: 80}]\n    - from:\n      ports:"),
        )
        .unwrap();
        let p = &docs.policies[0];
        assert_eq!(p.spec.action, PolicyAction::Allow);
        assert_eq!(p.spec.rules[0].ports[0].protocol, Protocol::Tcp);
        assert!(p.spec.rules[1].from.is_empty() && p.spec.rules[1].ports.is_empty());
    }

    #[test]
    fn bad_port_names_the_field() {
        let text = format!(
            "{}---\n{}",
            workload("w", OK_WORKLOAD_SPEC),
            "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: cart-from-frontend, namespace: shop}\nspec:\n  rules:\n    - ports: [{port: 8080}, {port: 70000}]\n"
        );
        assert_eq!(
            err(&text),
            "policies/shop.yaml: document 2 (MeshPolicy shop/cart-from-frontend): spec.rules[0].ports[1].port: 70000 is not a port (1-65535)"
        );
        for bad in ["0", "-1", "65536", "80.5"] {
            let e = err(&policy(&format!("  rules: [{{ports: [{{port: {bad}}}]}}]")));
            assert!(e.contains("spec.rules[0].ports[0].port: "), "{e}");
            assert!(e.contains(&format!("{bad} is not a port (1-65535)")), "{e}");
        }
        // Too wide for a YAML number: refused by the YAML reader, which
        // names the field and the line itself.
        let e = err(&policy(
            "  rules: [{ports: [{port: 99999999999999999999}]}]",
        ));
        assert!(e.contains("spec.rules[0].ports[0].port"), "{e}");
        let e = err(&policy("  rules: [{ports: [{port: http}]}]"));
        assert!(e.contains("spec.rules[0].ports[0].port: "), "{e}");
    }

    #[test]
    fn a_policy_over_the_per_object_limits_is_refused_with_the_field() {
        let list = |n: usize, item: &dyn Fn(usize) -> String| {
            (0..n).map(item).collect::<Vec<_>>().join(", ")
        };
        let ports = |n| list(n, &|i| format!("{{port: {}}}", 1 + i));
        let from = |n| list(n, &|i| format!("{{namespace: n{i}}}"));
        let cases = [
            (
                format!("  rules: [{}]", list(MAX_RULES + 1, &|_| "{}".into())),
                "spec.rules",
                "1025 rules, more than the 1024",
            ),
            (
                format!("  rules: [{{}}, {{from: [{}]}}]", from(MAX_FROM + 1)),
                "spec.rules[1].from",
                "4097 sources",
            ),
            (
                format!("  rules: [{{ports: [{}]}}]", ports(MAX_PORTS + 1)),
                "spec.rules[0].ports",
                "1025 ports",
            ),
            (
                format!(
                    "  selector: {{matchLabels: {{{}}}}}",
                    list(MAX_MATCH_LABELS + 1, &|i| format!("k{i}: v"))
                ),
                "spec.selector.matchLabels",
                "65 labels",
            ),
        ];
        for (spec, field, message) in cases {
            let e = parse_str("big.yaml", &policy(&spec)).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.message.contains(message), "{e}");
        }
        // At the limits, accepted.
        let spec = format!(
            "  rules: [{{from: [{}], ports: [{}]}}]",
            from(MAX_FROM),
            ports(MAX_PORTS)
        );
        parse_str("big.yaml", &policy(&spec)).unwrap();
    }

    #[test]
    fn refusals_name_file_document_and_field() {
        let cases: Vec<(String, &str, &str)> = vec![
            // (document, expected field, expected part of the message)
            (policy("  action: MAYBE"), "spec.action", "MAYBE"),
            (
                policy("  rules: [{ports: [{port: 80, protocol: SCTP}]}]"),
                "spec.rules[0].ports[0].protocol",
                "SCTP",
            ),
            (
                policy("  selectr: {}"),
                "spec.selectr",
                "unknown field `selectr`",
            ),
            (
                policy("  rules: [{from: [{identity: spiffe://cluster.local/ns/*/sa/x}]}]"),
                "spec.rules[0].from[0].identity",
                "last character",
            ),
            (
                policy("  rules: [{from: [{identity: frontend}]}]"),
                "spec.rules[0].from[0].identity",
                "not a SPIFFE ID",
            ),
            (
                policy("  rules: [{from: [{identity: '*', namespace: shop}]}]"),
                "spec.rules[0].from[0]",
                "exactly one",
            ),
            (
                policy("  rules: [{from: [{}]}]"),
                "spec.rules[0].from[0]",
                "exactly one",
            ),
            (
                policy("  rules: [{from: [{namespace: Shop}]}]"),
                "spec.rules[0].from[0].namespace",
                "DNS-1123 label",
            ),
            (
                policy("  selector: {matchLabels: {'bad key!': x}}"),
                "spec.selector.matchLabels",
                "label key",
            ),
            (
                policy("  selector: {matchLabels: {app: '-x'}}"),
                "spec.selector.matchLabels.app",
                "label value",
            ),
            (
                policy("  selector: {serviceAccount: Cart}"),
                "spec.selector.serviceAccount",
                "DNS-1123 label",
            ),
            (
                workload("w", "  ips: [198.18.0.1]\n  node: n"),
                "spec",
                "serviceAccount",
            ),
            (
                workload("w", "  serviceAccount: a\n  ips: []\n  node: n"),
                "spec.ips",
                "at least one",
            ),
            (
                workload(
                    "w",
                    "  serviceAccount: a\n  ips: [198.18.0.1, 300.1.1.1]\n  node: n",
                ),
                "spec.ips[1]",
                "invalid IP address",
            ),
            (
                workload(
                    "w",
                    "  serviceAccount: a\n  ips: [198.18.0.1, '::ffff:198.18.0.1']\n  node: n",
                ),
                "spec.ips[1]",
                "already listed",
            ),
            (
                workload(
                    "w",
                    "  serviceAccount: a\n  ips: [198.18.0.1]\n  node: n\n  netns: run/netns/x",
                ),
                "spec.netns",
                "absolute",
            ),
            (
                workload("Bad_Name", OK_WORKLOAD_SPEC),
                "metadata.name",
                "DNS-1123 subdomain",
            ),
            (
                workload(
                    "w",
                    "  serviceAccount: a\n  ips: [198.18.0.1]\n  node: n\n  color: red",
                ),
                "spec.color",
                "unknown field `color`",
            ),
        ];
        for (text, field, message) in cases {
            let e = err(&text);
            assert!(e.starts_with("policies/shop.yaml: document 1 ("), "{e}");
            assert!(e.contains(" shop/"), "{e}");
            assert!(e.contains(&format!("): {field}: ")), "{field}: {e}");
            assert!(e.contains(message), "{message}: {e}");
        }
    }

    #[test]
    fn unknown_api_version_kind_and_metadata() {
        let e = err(
            "apiVersion: mesh.dev/v2\nkind: Workload\nmetadata: {name: w, namespace: shop}\nspec: {}\n",
        );
        assert_eq!(
            e,
            "policies/shop.yaml: document 1 (Workload shop/w): apiVersion: unknown apiVersion \"mesh.dev/v2\" (expected mesh.dev/v1alpha1)"
        );
        let e =
            err("apiVersion: mesh.dev/v1alpha1\nkind: Pod\nmetadata: {name: w, namespace: shop}\n");
        assert!(
            e.contains("(Pod shop/w): kind: unknown kind \"Pod\""),
            "{e}"
        );
        let e = err("apiVersion: mesh.dev/v1alpha1\nmetadata: {name: w}\n");
        assert!(e.contains("document 1 (w): kind: missing"), "{e}");
        let e =
            err("apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata: {name: w}\nspec: {}\n");
        assert!(
            e.contains("(Workload w): metadata: missing field `namespace`"),
            "{e}"
        );
        let e = err("just a string\n");
        assert!(
            e.starts_with("policies/shop.yaml: document 1: a document must be a mapping"),
            "{e}"
        );
        let e = err(&format!(
            "{}status: {{}}\n",
            workload("w", OK_WORKLOAD_SPEC)
        ));
        assert!(
            e.contains("(Workload shop/w): status: unknown field `status`"),
            "{e}"
        );
        let e = err(&format!(
            "{}---\n{}",
            workload("w", OK_WORKLOAD_SPEC),
            policy("  bogus: 1")
        ));
        assert!(
            e.contains("document 2 (MeshPolicy shop/p): spec.bogus: unknown field `bogus`"),
            "{e}"
        );
    }

    #[test]
    fn malformed_yaml_names_file_and_line() {
        let text = format!(
            "{}---\napiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: p, namespace: shop\nspec: {{}}\n",
            workload("w", OK_WORKLOAD_SPEC)
        );
        let e = err(&text);
        assert!(e.starts_with("policies/shop.yaml: document 2: "), "{e}");
        assert!(e.contains("line "), "{e}");
        // A key given twice would silently drop one of the values.
        let e = err(&format!(
            "{}  serviceAccount: other\n",
            workload("w", OK_WORKLOAD_SPEC)
        ));
        assert!(
            e.contains("duplicate entry with key \"serviceAccount\""),
            "{e}"
        );
        let e = err("a: [1, 2\n");
        assert!(e.starts_with("policies/shop.yaml: document 1: "), "{e}");
        assert!(e.contains("line 1") || e.contains("line 2"), "{e}");
    }

    #[test]
    fn duplicate_names_across_files() {
        let dir = std::env::temp_dir().join(format!("mesh-policy-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.yaml"), workload("cart", OK_WORKLOAD_SPEC)).unwrap();
        std::fs::write(
            dir.join("b.yml"),
            format!(
                "{}---\n{}",
                policy("  action: DENY"),
                workload(
                    "cart",
                    "  serviceAccount: cart\n  ips: [198.18.0.12]\n  node: node-a"
                )
            ),
        )
        .unwrap();
        std::fs::write(dir.join("ignored.txt"), "not: yaml: at all: [").unwrap();
        std::fs::write(dir.join(".#lock.yaml"), "not: yaml: at all: [").unwrap();
        let e = load_dir(&dir).unwrap_err().to_string();
        let b = dir.join("b.yml").display().to_string();
        let a = dir.join("a.yaml").display().to_string();
        assert_eq!(
            e,
            format!(
                "{b}: document 2 (Workload shop/cart): metadata.name: duplicate Workload shop/cart: first defined in {a} document 1"
            )
        );
        // Same name, other kind: fine.
        std::fs::write(
            dir.join("b.yml"),
            policy("  action: DENY").replace("name: p", "name: cart"),
        )
        .unwrap();
        let docs = load_dir(&dir).unwrap();
        assert_eq!((docs.workloads.len(), docs.policies.len()), (1, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicate_ip_is_refused() {
        let text = format!(
            "{}---\n{}",
            workload(
                "a",
                "  serviceAccount: cart\n  ips: ['fd00::1', 198.18.0.11]\n  node: n"
            ),
            workload(
                "b",
                "  serviceAccount: cart\n  ips: [198.18.0.12, '::ffff:198.18.0.11']\n  node: n"
            )
        );
        let e = err(&text);
        assert_eq!(
            e,
            "policies/shop.yaml: document 2 (Workload shop/b): spec.ips[1]: ::ffff:198.18.0.11 is already claimed by Workload shop/a (policies/shop.yaml document 1)"
        );
    }

    #[test]
    fn label_rules() {
        for ok in ["app", "app.kubernetes.io/name", "a_b.c-d", "example.com/A9"] {
            assert!(is_label_key(ok), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "-a",
            "a b",
            "Example.com/a",
            "a/b/c",
            &"a".repeat(64),
        ] {
            assert!(!is_label_key(bad), "{bad}");
        }
        assert!(is_label_value(""));
        assert!(is_label_value("v1.2_3-A"));
        assert!(!is_label_value("v1-"));
        assert!(!is_label_value(&"a".repeat(64)));
    }
}
