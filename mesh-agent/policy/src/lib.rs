//! Identity-based policy: the `Workload` and `MeshPolicy` documents
//! (docs/policy.md), their compilation into the kernel's `ENDPOINTS`,
//! `LOCAL_NETNS` and `POLICY` entries, the reference semantics those
//! entries must reproduce, and the diffs applied to the maps on reload.
//!
//! ```text
//! load_dir / parse_str ──► Documents ──compile(settings)──► Compiled ──diff──► maps
//!                              └──────────evaluate (reference)───────┘
//! ```
//!
//! `state` keeps the names behind the kernel's numbers for the operator
//! commands. Pure logic: no I/O but reading documents and writing
//! `state.json`, no `unsafe`, nothing of the kernel but mesh-common's types.
#![forbid(unsafe_code)]
// `ConfigError` is the documented error type (file, document, kind, name,
// field, message); it is only ever built on the cold path of a refused
// configuration, so its size does not matter.
#![allow(clippy::result_large_err)]

mod compile;
mod diff;
mod documents;
mod identity;
pub mod services;
pub mod state;

pub use compile::{
    Compiled, DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN, DefaultAction, MeshSettings, RuleInfo,
    Source, SubjectInfo, WorkloadInfo, compile, compile_cluster_services, compile_services_only,
    evaluate, require_local_netns,
};
pub use diff::{MapDiff, diff};
pub use documents::{
    API_VERSION, Condition, ConfigError, DocumentStatus, Documents, FromEntry, KIND_MESH_NODE,
    KIND_MESH_POLICY, KIND_PEER_AUTHENTICATION, KIND_WORKLOAD, MeshNode, MeshNodeSpec, MeshPolicy,
    MeshPolicyResource, MeshPolicySpec, MtlsMode, NodeMeta, ObjectMeta, Origin, PeerAuthentication,
    PeerAuthenticationResource, PeerAuthenticationSpec, PolicyAction, PortEntry, Protocol, Rule,
    Selector, Workload, WorkloadSpec, load_dir, parse_str, parse_value, short_circuit_opt_in,
};
pub use identity::{COLLIDING_SERVICE_ACCOUNTS, IdentityPattern, numeric_identity, spiffe_id};
pub use services::{
    ServiceBackends, ServiceInfo, ServiceSlots, ServiceTables, TrafficSplitResource,
    departed_backends, service_tables,
};
