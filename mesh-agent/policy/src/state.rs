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
    sync::OnceLock,
};

use serde::{Deserialize, Serialize};

use crate::{Compiled, RuleInfo, ServiceInfo, SubjectInfo, WorkloadInfo};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeState {
    /// The policy generation these names belong to.
    pub generation: u32,
    /// Numeric identity (as a decimal string: JSON numbers lose u64
    /// precision in many tools) → SPIFFE ID.
    pub identities: BTreeMap<String, String>,
    pub rules: BTreeMap<u32, RuleInfo>,
    pub subjects: BTreeMap<String, SubjectInfo>,
    pub workloads: Vec<WorkloadInfo>,
    /// Node name → tunnel addresses of its agent.
    #[serde(default)]
    pub nodes: BTreeMap<String, Vec<std::net::IpAddr>>,
    /// Every Service address and its backends (set with
    /// [`NodeState::set_services`], which keeps the index in step).
    #[serde(default)]
    pub services: Vec<ServiceInfo>,
    /// `services` by kernel key, built on first use: the flow reader looks
    /// a Service up for every event, and a scan of 10,000 Services per
    /// event took a core of a 2-vCPU node.
    #[serde(skip)]
    service_index: OnceLock<HashMap<mesh_common::service::ServiceKey, usize>>,
}

impl NodeState {
    pub fn from_compiled(compiled: &Compiled, generation: u32) -> Self {
        Self {
            generation,
            identities: compiled
                .identities
                .iter()
                .map(|(id, name)| (id.to_string(), name.clone()))
                .collect(),
            rules: compiled.rules.clone(),
            subjects: compiled
                .subjects
                .iter()
                .map(|(id, s)| (id.to_string(), s.clone()))
                .collect(),
            workloads: compiled.workloads.clone(),
            nodes: compiled.nodes.clone(),
            services: compiled.services.clone(),
            service_index: OnceLock::new(),
        }
    }

    /// Replaces the Services (and forgets the index of the old ones).
    pub fn set_services(&mut self, services: Vec<ServiceInfo>) {
        self.services = services;
        self.service_index = OnceLock::new();
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    pub fn write(&self, state_dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let tmp = state_dir.join(".state.json.tmp");
        // Compact: with thousands of workloads it is rewritten on every
        // change, and only the CLI reads it.
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(&tmp, Self::path(state_dir))
    }

    /// The names, or an empty state when no agent has written any yet.
    pub fn read(state_dir: &Path) -> io::Result<Self> {
        match std::fs::read(Self::path(state_dir)) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
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
