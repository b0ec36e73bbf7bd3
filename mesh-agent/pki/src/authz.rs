//! Which node may get which identity's certificate.
//!
//! A node may only obtain the SVIDs of workloads that run on it: a
//! compromised node can then impersonate its own workloads, never the
//! others. The same rule applies whether the CA is remote (gRPC service)
//! or runs inside the agent (standalone mode): see [`authorize`]. Where
//! the CA learns which node runs what:
//!
//! - [`AppliedAuthorizer`]: the CA inside the agent (`run --ca-dir`), from
//!   the workloads the agent applied, in either mode;
//! - [`ConfigDirAuthorizer`]: `ca serve --config-dir`, from Workload
//!   documents;
//! - [`PodAuthorizer`]: `ca serve --kubernetes`, from the cluster's Pods.

// `ConfigError` (file, document, field) is the policy module's documented
// error, built only on the cold path of a refused configuration.
#![allow(clippy::result_large_err)]

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tracing::{info, warn};

use super::spiffe;
use mesh_policy::ConfigError;

mod pods;
pub use pods::PodAuthorizer;

pub trait Authorizer: Send + Sync {
    /// `Ok` when `node` may get a certificate for `spiffe_id`; otherwise
    /// why not, for the refusal sent to the node.
    fn may_issue(&self, node: &str, spiffe_id: &str) -> Result<(), String>;
}

/// Any function of (node, SPIFFE ID) is an authorizer (tests, fixed sets).
impl<F> Authorizer for F
where
    F: Fn(&str, &str) -> Result<(), String> + Send + Sync,
{
    fn may_issue(&self, node: &str, spiffe_id: &str) -> Result<(), String> {
        self(node, spiffe_id)
    }
}

/// The CA's rule: only workload identities of the trust domain, and only
/// those the authorizer grants to the node. Returns the refusal message
/// (naming node and identity) otherwise.
pub fn authorize(
    authorizer: &dyn Authorizer,
    trust_domain: &str,
    node: &str,
    spiffe_id: &str,
) -> Result<(), String> {
    let reason = if !spiffe::is_workload_id(spiffe_id, trust_domain) {
        format!(
            "it is not a workload identity of trust domain {trust_domain} \
             (spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>)"
        )
    } else {
        match authorizer.may_issue(node, spiffe_id) {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        }
    };
    Err(format!(
        "node {node} may not get a certificate for {spiffe_id}: {reason}"
    ))
}

/// The authorizer of the CA inside the agent (`--ca-dir`), in either mode:
/// the workloads the agent has applied (from its directory or from the
/// API server) say which node runs which identity.
#[derive(Default)]
pub struct AppliedAuthorizer {
    /// node → the SPIFFE IDs of its workloads.
    hosted: Mutex<Arc<HashMap<String, BTreeSet<String>>>>,
}

impl AppliedAuthorizer {
    pub fn update(&self, names: &mesh_policy::state::NodeState) {
        let mut hosted: HashMap<String, BTreeSet<String>> = HashMap::new();
        for w in names.workloads.iter() {
            hosted
                .entry(w.node.clone())
                .or_default()
                .insert(w.spiffe_id.clone());
        }
        *self.hosted.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(hosted);
    }
}

impl Authorizer for AppliedAuthorizer {
    fn may_issue(&self, node: &str, spiffe_id: &str) -> Result<(), String> {
        let hosted = self
            .hosted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        hosted_on(&hosted, node, spiffe_id)
    }
}

/// `Ok` when `node` runs a workload of `spiffe_id`; otherwise where such
/// workloads run, if anywhere.
fn hosted_on(
    hosted: &HashMap<String, BTreeSet<String>>,
    node: &str,
    spiffe_id: &str,
) -> Result<(), String> {
    if hosted.get(node).is_some_and(|ids| ids.contains(spiffe_id)) {
        return Ok(());
    }
    let elsewhere = hosted
        .iter()
        .filter(|(_, ids)| ids.contains(spiffe_id))
        .map(|(n, _)| n);
    Err(refusal(elsewhere, "workload"))
}

/// Why a node may not have an identity, given the nodes where the
/// identity's `what`s (workloads, pods) run.
fn refusal<'a>(elsewhere: impl IntoIterator<Item = &'a String>, what: &str) -> String {
    let mut elsewhere: Vec<&str> = elsewhere.into_iter().map(String::as_str).collect();
    if elsewhere.is_empty() {
        return format!("no {what} has this identity");
    }
    elsewhere.sort_unstable();
    format!(
        "no {what} of this identity runs on the node (they run on {})",
        elsewhere.join(", ")
    )
}

/// Standalone mode's authorizer: the Workload documents of the
/// configuration directory (docs/policy.md) say which node runs which
/// workload. The directory is re-read whenever a file in it changed, so a
/// new workload is authorised without restarting the CA; a directory that
/// no longer loads keeps the last good configuration in force (as the
/// agent does with policy).
pub struct ConfigDirAuthorizer {
    dir: PathBuf,
    trust_domain: String,
    state: Mutex<State>,
}

struct State {
    stamp: Vec<(String, SystemTime, u64)>,
    /// node → the SPIFFE IDs of its workloads.
    hosted: Arc<HashMap<String, BTreeSet<String>>>,
}

impl ConfigDirAuthorizer {
    /// Reads the directory; a configuration that does not load is refused.
    pub fn new(dir: &Path, trust_domain: &str) -> Result<Self, ConfigError> {
        let stamp = stamp(dir);
        let hosted = load(dir, trust_domain)?;
        Ok(ConfigDirAuthorizer {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            state: Mutex::new(State {
                stamp,
                hosted: Arc::new(hosted),
            }),
        })
    }

    fn hosted(&self) -> Arc<HashMap<String, BTreeSet<String>>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.dir);
        if now != state.stamp {
            match load(&self.dir, &self.trust_domain) {
                Ok(hosted) => {
                    info!(dir = %self.dir.display(), "workloads re-read for authorisation");
                    state.hosted = Arc::new(hosted);
                }
                Err(e) => warn!(
                    error = %e,
                    "configuration refused; the authorisations in force stay in force"
                ),
            }
            state.stamp = now;
        }
        state.hosted.clone()
    }
}

impl Authorizer for ConfigDirAuthorizer {
    fn may_issue(&self, node: &str, spiffe_id: &str) -> Result<(), String> {
        hosted_on(&self.hosted(), node, spiffe_id)
    }
}

fn load(dir: &Path, trust_domain: &str) -> Result<HashMap<String, BTreeSet<String>>, ConfigError> {
    let docs = mesh_policy::load_dir(dir)?;
    let mut hosted: HashMap<String, BTreeSet<String>> = HashMap::new();
    for w in &docs.workloads {
        hosted
            .entry(w.spec.node.clone())
            .or_default()
            .insert(mesh_policy::spiffe_id(
                trust_domain,
                &w.metadata.namespace,
                &w.spec.service_account,
            ));
    }
    Ok(hosted)
}

/// Name, modification time and length of every entry of the directory,
/// sorted: any edit, addition, removal or rename changes it.
fn stamp(dir: &Path) -> Vec<(String, SystemTime, u64)> {
    let mut stamp: Vec<(String, SystemTime, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let meta = std::fs::metadata(entry.path()).ok()?;
            Some((
                entry.file_name().to_string_lossy().into_owned(),
                meta.modified().ok()?,
                meta.len(),
            ))
        })
        .collect();
    stamp.sort();
    stamp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TempDir, workload};

    const TD: &str = "cluster.local";

    #[test]
    fn nodes_get_only_their_workloads_and_changes_apply() {
        let dir = TempDir::new("authz");
        let file = dir.path().join("workloads.yaml");
        std::fs::write(&file, workload("cart-1", "cart", "node-a", "198.18.0.11")).unwrap();
        let authz = ConfigDirAuthorizer::new(dir.path(), TD).unwrap();
        let cart = mesh_policy::spiffe_id(TD, "shop", "cart");
        let frontend = mesh_policy::spiffe_id(TD, "shop", "frontend");
        authorize(&authz, TD, "node-a", &cart).unwrap();
        let e = authorize(&authz, TD, "node-b", &cart).unwrap_err();
        assert_eq!(
            e,
            format!(
                "node node-b may not get a certificate for {cart}: no workload of this identity runs on the node (they run on node-a)"
            )
        );
        let e = authorize(&authz, TD, "node-a", &frontend).unwrap_err();
        assert!(e.ends_with("no workload has this identity"), "{e}");
        let e = authorize(&authz, TD, "node-a", "spiffe://other/ns/shop/sa/cart").unwrap_err();
        assert!(
            e.contains("not a workload identity of trust domain cluster.local"),
            "{e}"
        );
        let node_id = spiffe::node_id(TD, "node-b");
        assert!(authorize(&authz, TD, "node-a", &node_id).is_err());

        // A new workload is authorised without a restart.
        let both = workload("cart-1", "cart", "node-a", "198.18.0.11")
            + &workload("frontend-1", "frontend", "node-b", "198.18.0.12");
        std::fs::write(&file, both).unwrap();
        authorize(&authz, TD, "node-b", &frontend).unwrap();

        // A broken configuration keeps the last good one.
        std::fs::write(dir.path().join("broken.yaml"), "kind: [").unwrap();
        authorize(&authz, TD, "node-b", &frontend).unwrap();
    }
}
