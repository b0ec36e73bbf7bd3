//! The names behind the kernel's numbers, for the operator commands.
//!
//! The maps hold only numbers (identities, subjects, rule ids). After each
//! applied configuration the agent writes what they stand for to
//! `<state-dir>/state.json`, replacing it atomically, so `inspect`,
//! `explain` and `flows` can name identities and policies, also while the
//! agent is down.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use serde::{Deserialize, Serialize};

use crate::{Compiled, RuleInfo, ServiceInfo, SubjectInfo, WorkloadInfo};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeState {
    /// The policy generation these names belong to.
    pub generation: u32,
    /// Numeric identity (as a decimal string: JSON numbers lose u64
    /// precision in many tools) → SPIFFE ID.
    ///
    /// The names of the policy side are shared, not copied, between the
    /// states of successive changes of Services alone.
    pub identities: Arc<BTreeMap<String, String>>,
    pub rules: Arc<BTreeMap<u32, RuleInfo>>,
    pub subjects: Arc<BTreeMap<String, SubjectInfo>>,
    pub workloads: Arc<Vec<WorkloadInfo>>,
    /// Node name → tunnel addresses of its agent.
    #[serde(default)]
    pub nodes: Arc<BTreeMap<String, Vec<std::net::IpAddr>>>,
    /// Every Service address and its backends. Kept in `services.json`
    /// beside `state.json`: a change of Services alone rewrites only that.
    #[serde(skip)]
    pub services: Vec<ServiceInfo>,
    /// `services` by kernel key, built on first use: the flow reader looks
    /// a Service up for every event, and a scan of 10,000 Services per
    /// event took a core of a 2-vCPU node.
    #[serde(skip)]
    service_index: OnceLock<HashMap<mesh_common::service::ServiceKey, usize>>,
    /// `workloads` by address, built on first use, for the same reason.
    #[serde(skip)]
    workload_index: OnceLock<HashMap<std::net::IpAddr, usize>>,
}

/// `services.json`: the Services and the generation they were applied with.
#[derive(Serialize, Deserialize)]
struct ServicesFile<'a> {
    generation: u32,
    services: std::borrow::Cow<'a, [ServiceInfo]>,
}

/// Replaces `path` (in `dir`) with `bytes` atomically.
fn replace(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

impl NodeState {
    pub fn from_compiled(compiled: &Compiled, generation: u32) -> Self {
        Self {
            generation,
            identities: Arc::new(
                compiled
                    .identities
                    .iter()
                    .map(|(id, name)| (id.to_string(), name.clone()))
                    .collect(),
            ),
            rules: Arc::new(compiled.rules.clone()),
            subjects: Arc::new(
                compiled
                    .subjects
                    .iter()
                    .map(|(id, s)| (id.to_string(), s.clone()))
                    .collect(),
            ),
            workloads: Arc::new(compiled.workloads.clone()),
            nodes: Arc::new(compiled.nodes.clone()),
            services: compiled.services.clone(),
            service_index: OnceLock::new(),
            workload_index: OnceLock::new(),
        }
    }

    /// These names with `services` instead of these Services, at
    /// `generation`: the names of the policy side are shared, not copied.
    pub fn with_services(&self, generation: u32, services: Vec<ServiceInfo>) -> Self {
        Self {
            generation,
            identities: self.identities.clone(),
            rules: self.rules.clone(),
            subjects: self.subjects.clone(),
            workloads: self.workloads.clone(),
            nodes: self.nodes.clone(),
            services,
            service_index: OnceLock::new(),
            workload_index: OnceLock::new(),
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    pub fn services_path(state_dir: &Path) -> PathBuf {
        state_dir.join("services.json")
    }

    /// Writes `services.json`, then `state.json`, each replaced atomically.
    pub fn write(&self, state_dir: &Path) -> io::Result<()> {
        self.write_services(state_dir)?;
        // Compact: with thousands of workloads it is rewritten on every
        // change, and only the CLI reads it.
        replace(
            state_dir,
            &Self::path(state_dir),
            &serde_json::to_vec(self)?,
        )
    }

    /// Writes `services.json` alone, after a change of Services alone.
    pub fn write_services(&self, state_dir: &Path) -> io::Result<()> {
        let services = ServicesFile {
            generation: self.generation,
            services: std::borrow::Cow::Borrowed(&self.services),
        };
        replace(
            state_dir,
            &Self::services_path(state_dir),
            &serde_json::to_vec(&services)?,
        )
    }

    /// The names, or an empty state when no agent has written any yet. The
    /// generation is the newer of the two files'.
    pub fn read(state_dir: &Path) -> io::Result<Self> {
        let mut state: Self = match std::fs::read(Self::path(state_dir)) {
            Ok(bytes) => serde_json::from_slice(&bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::default(),
            Err(e) => return Err(e),
        };
        match std::fs::read(Self::services_path(state_dir)) {
            Ok(bytes) => {
                let services: ServicesFile = serde_json::from_slice(&bytes)?;
                state.generation = state.generation.max(services.generation);
                state.services = services.services.into_owned();
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(state)
    }

    /// "spiffe://…" for a workload identity, "world", or the bare number.
    pub fn identity_name(&self, id: u64) -> String {
        match id {
            mesh_common::policy::WORLD_IDENTITY => "world".into(),
            mesh_common::policy::ANY_IDENTITY => "*".into(),
            _ => self
                .identities
                .get(&id.to_string())
                .cloned()
                .unwrap_or_else(|| id.to_string()),
        }
    }

    /// The names behind the kernel's Service entry `key`.
    pub fn service(&self, key: &mesh_common::service::ServiceKey) -> Option<&ServiceInfo> {
        let index = self.service_index.get_or_init(|| {
            // The first of two with one key, as a scan would find.
            let mut index = HashMap::with_capacity(self.services.len());
            for (i, s) in self.services.iter().enumerate() {
                index.entry(s.service_key()).or_insert(i);
            }
            index
        });
        index.get(key).map(|&i| &self.services[i])
    }

    /// The workload that has address `ip`.
    pub fn workload_at(&self, ip: std::net::IpAddr) -> Option<&WorkloadInfo> {
        let index = self.workload_index.get_or_init(|| {
            let mut index = HashMap::new();
            for (i, w) in self.workloads.iter().enumerate() {
                for ip in &w.ips {
                    index.entry(ip.to_canonical()).or_insert(i);
                }
            }
            index
        });
        index.get(&ip.to_canonical()).map(|&i| &self.workloads[i])
    }

    /// "shop/cart-allow rule 0 (ALLOW)" or the reserved rule's description.
    pub fn rule_name(&self, rule: u32) -> String {
        match self.rules.get(&rule) {
            Some(r) => match (&r.policy, r.rule) {
                (Some(p), Some(i)) => format!("{p} rule {i}"),
                (Some(p), None) => p.clone(),
                _ => r.description.clone(),
            },
            None => format!("rule {rule}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::TrafficPolicy;

    fn service(name: &str) -> ServiceInfo {
        ServiceInfo {
            namespace: "shop".into(),
            name: name.into(),
            port_name: None,
            address: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: "TCP".into(),
            internal_traffic_policy: TrafficPolicy::Cluster,
            session_affinity_timeout_s: None,
            backends: Vec::new(),
        }
    }

    #[test]
    fn a_change_of_services_alone_is_read_back_with_its_generation() {
        let dir = std::env::temp_dir().join(format!("mesh-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut full = NodeState {
            generation: 3,
            identities: Arc::new(BTreeMap::from([(
                "7".into(),
                "spiffe://td/ns/a/sa/b".into(),
            )])),
            services: vec![service("old")],
            ..NodeState::default()
        };
        full.write(&dir).unwrap();
        let read = NodeState::read(&dir).unwrap();
        assert_eq!((read.generation, read.services.len()), (3, 1));
        // Services alone: state.json stays as written, services.json moves on.
        let state_json = std::fs::read(NodeState::path(&dir)).unwrap();
        full = full.with_services(4, vec![service("new"), service("newer")]);
        full.write_services(&dir).unwrap();
        assert_eq!(std::fs::read(NodeState::path(&dir)).unwrap(), state_json);
        let read = NodeState::read(&dir).unwrap();
        assert_eq!(read.generation, 4);
        assert_eq!(read.services, full.services);
        assert_eq!(read.identities, full.identities);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
