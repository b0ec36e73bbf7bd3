//! `ca serve --kubernetes`: which node runs which identity, from the Pods
//! the API server lists.
//!
//! Node N may get the certificate of `spiffe://<td>/ns/<ns>/sa/<sa>` while a
//! Pod of namespace `<ns>` and service account `<sa>` is scheduled to N
//! (`spec.nodeName`), is not on the host's network and has not finished.
//! That is where the rule's trust rests: on the scheduler's binding, which
//! a node cannot write. With the NodeRestriction admission plugin a node
//! can create only mirror pods (of its static pods) bound to itself; those
//! are refused here, so a compromised node cannot make up a pod to claim an
//! identity.
//!
//! The rule is deliberately about where pods run, not about what the agent
//! meshes: a pod without an IP yet, or opted out with
//! `mesh.dev/dataplane-mode: none`, still runs with its identity there.
//!
//! The Pods are followed with a watcher; only one (node, identity) pair per
//! pod is kept. A relist fills a second map that replaces the first once
//! complete (as the agent's mirrors do), and until the first list is
//! complete every request is refused.
use std::collections::HashMap;
use std::sync::Mutex;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Authorizer, refusal};

/// The annotation the API server requires on the mirror pods a node
/// creates for its static pods.
const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What a pod grants: its node may get its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub node: String,
    pub spiffe_id: String,
}

/// The grant of a Pod, if it makes one (see the module's comment).
pub fn pod_grant(pod: &Pod, trust_domain: &str) -> Option<Grant> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION));
    if spec.host_network == Some(true) || matches!(phase, Some("Succeeded" | "Failed")) || mirror {
        return None;
    }
    // As the agent names a pod's identity: `default` when unset.
    let service_account = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    Some(Grant {
        node: node.to_owned(),
        spiffe_id: mesh_policy::spiffe_id(
            trust_domain,
            pod.metadata.namespace.as_deref()?,
            service_account,
        ),
    })
}

/// Authorises from the cluster's Pods; fed by [`PodAuthorizer::follow`].
pub struct PodAuthorizer {
    trust_domain: String,
    state: Mutex<State>,
    /// Becomes true once the Pods have been listed.
    listed: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    listed: bool,
    /// namespace/name → its grant.
    pods: HashMap<String, Grant>,
    /// The pods of a relist in progress.
    relist: Option<HashMap<String, Grant>>,
    /// SPIFFE ID → node → how many of its pods run there.
    hosted: HashMap<String, HashMap<String, usize>>,
}

impl State {
    fn add(&mut self, g: &Grant) {
        *self
            .hosted
            .entry(g.spiffe_id.clone())
            .or_default()
            .entry(g.node.clone())
            .or_default() += 1;
    }

    fn remove(&mut self, g: &Grant) {
        if let Some(nodes) = self.hosted.get_mut(&g.spiffe_id) {
            if let Some(n) = nodes.get_mut(&g.node) {
                *n -= 1;
                if *n == 0 {
                    nodes.remove(&g.node);
                }
            }
            if nodes.is_empty() {
                self.hosted.remove(&g.spiffe_id);
            }
        }
    }

    fn set(&mut self, key: String, grant: Option<Grant>) {
        let old = match grant {
            Some(g) => {
                self.add(&g);
                self.pods.insert(key, g)
            }
            None => self.pods.remove(&key),
        };
        if let Some(old) = old {
            self.remove(&old);
        }
    }
}

impl PodAuthorizer {
    pub fn new(trust_domain: &str) -> Self {
        PodAuthorizer {
            trust_domain: trust_domain.to_owned(),
            state: Mutex::new(State::default()),
            listed: watch::Sender::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one event of a Pod watcher.
    pub fn apply(&self, event: watcher::Event<Pod>) {
        let key = |pod: &Pod| {
            format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default()
            )
        };
        let mut state = self.state();
        match event {
            watcher::Event::Apply(pod) => {
                let grant = pod_grant(&pod, &self.trust_domain);
                state.set(key(&pod), grant);
            }
            watcher::Event::Delete(pod) => state.set(key(&pod), None),
            watcher::Event::Init => state.relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(grant) = pod_grant(&pod, &self.trust_domain) {
                    state
                        .relist
                        .get_or_insert_default()
                        .insert(key(&pod), grant);
                }
            }
            watcher::Event::InitDone => {
                let pods = state.relist.take().unwrap_or_default();
                state.hosted.clear();
                for g in pods.values() {
                    state.add(g);
                }
                state.pods = pods;
                if !state.listed {
                    state.listed = true;
                    info!(pods = state.pods.len(), "pods listed");
                    self.listed.send_replace(true);
                }
            }
        }
    }

    /// Returns once the Pods have been listed.
    pub async fn wait_listed(&self) {
        let mut listed = self.listed.subscribe();
        let _ = listed.wait_for(|l| *l).await;
    }

    /// Lists then watches every Pod of the cluster, reconnecting with
    /// backoff, until the task is dropped. While the API server cannot be
    /// reached, the pods last seen keep their grants.
    pub async fn follow(&self, client: kube::Client) {
        // resourceVersion=0: lists come from the API server's watch cache.
        let config = watcher::Config::default().any_semantic();
        let mut events = watcher(Api::<Pod>::all(client), config)
            .default_backoff()
            .boxed();
        let mut down = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if std::mem::take(&mut down) {
                        info!("the API server answers again");
                    }
                    self.apply(event);
                }
                Err(e) => {
                    if !down {
                        warn!(error = %e, "lost the API server; authorising from the pods last seen, reconnecting");
                    }
                    down = true;
                }
            }
        }
    }
}

impl Authorizer for PodAuthorizer {
    fn may_issue(&self, node: &str, spiffe_id: &str) -> Result<(), String> {
        let state = self.state();
        if !state.listed {
            return Err("the CA has not listed the cluster's pods yet".into());
        }
        let nodes = state.hosted.get(spiffe_id);
        if nodes.is_some_and(|n| n.contains_key(node)) {
            return Ok(());
        }
        Err(refusal(nodes.into_iter().flat_map(|n| n.keys()), "pod"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::authorize;

    const TD: &str = "cluster.local";

    fn pod(name: &str, node: &str, sa: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
            "status": {"phase": "Running"},
        }))
        .unwrap()
    }

    fn id(sa: &str) -> String {
        mesh_policy::spiffe_id(TD, "shop", sa)
    }

    #[test]
    fn only_pods_that_run_on_a_node_grant_it_their_identity() {
        assert_eq!(
            pod_grant(&pod("a", "node-a", "cart"), TD),
            Some(Grant {
                node: "node-a".into(),
                spiffe_id: id("cart"),
            })
        );
        let mut p = pod("a", "node-a", "");
        assert_eq!(pod_grant(&p, TD).unwrap().spiffe_id, id("default"));
        p.spec.as_mut().unwrap().node_name = None;
        assert_eq!(pod_grant(&p, TD), None, "not scheduled");
        let mut p = pod("a", "node-a", "cart");
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(pod_grant(&p, TD), None, "host network");
        for phase in ["Succeeded", "Failed"] {
            let mut p = pod("a", "node-a", "cart");
            p.status.as_mut().unwrap().phase = Some(phase.into());
            assert_eq!(pod_grant(&p, TD), None, "{phase}");
        }
        let mut p = pod("a", "node-a", "cart");
        p.status.as_mut().unwrap().phase = Some("Pending".into());
        assert!(pod_grant(&p, TD).is_some(), "starting: it may need it soon");
        let mut p = pod("a", "node-a", "cart");
        p.metadata.annotations = Some([(MIRROR_POD_ANNOTATION.to_owned(), "x".to_owned())].into());
        assert_eq!(pod_grant(&p, TD), None, "a node's own mirror pod");
    }

    #[test]
    fn grants_follow_events_and_relists() {
        let authz = PodAuthorizer::new(TD);
        let ask = |node: &str, sa: &str| authorize(&authz, TD, node, &id(sa));
        authz.apply(watcher::Event::Init);
        authz.apply(watcher::Event::InitApply(pod("cart-1", "node-a", "cart")));
        let e = ask("node-a", "cart").unwrap_err();
        assert!(e.ends_with("has not listed the cluster's pods yet"), "{e}");
        authz.apply(watcher::Event::InitDone);
        ask("node-a", "cart").unwrap();
        assert_eq!(
            ask("node-b", "cart").unwrap_err(),
            format!(
                "node node-b may not get a certificate for {}: no pod of this identity runs on the node (they run on node-a)",
                id("cart")
            )
        );

        // Two pods of one identity on a node: it keeps it until both are gone.
        authz.apply(watcher::Event::Apply(pod("cart-2", "node-a", "cart")));
        authz.apply(watcher::Event::Delete(pod("cart-1", "node-a", "cart")));
        ask("node-a", "cart").unwrap();
        // A pod that finishes no longer grants anything.
        let mut done = pod("cart-2", "node-a", "cart");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        authz.apply(watcher::Event::Apply(done));
        let e = ask("node-a", "cart").unwrap_err();
        assert!(e.ends_with("no pod has this identity"), "{e}");

        // A relist: what was deleted meanwhile goes, only once it is complete.
        authz.apply(watcher::Event::Apply(pod("web-1", "node-b", "web")));
        authz.apply(watcher::Event::Init);
        authz.apply(watcher::Event::InitApply(pod("db-1", "node-a", "db")));
        ask("node-b", "web").unwrap();
        authz.apply(watcher::Event::InitDone);
        ask("node-b", "web").unwrap_err();
        ask("node-a", "db").unwrap();
    }
}
