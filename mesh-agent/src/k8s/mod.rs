//! Kubernetes mode: workloads from Pods, policy from the mesh's custom
//! resources, all read through the API server's list/watch.
//!
//! ```text
//! watchers (Pods, Namespaces, Nodes, MeshPolicies, PeerAuthentications,
//!           TrafficSplits, Services, EndpointSlices)
//!   └─► mirrors (what the agent keeps of each object; relists swap whole)
//!         └─► documents (translate) ─► compile ─► map diff (Control)
//!                                         └─► statuses (lease holder writes them)
//! ```
//!
//! Until every watcher has listed once, nothing is applied: a restarted
//! agent keeps enforcing what its predecessor left in the maps. When the
//! API server cannot be reached the maps keep their content (nothing is
//! cleared, nothing opened), the agent reports not ready, and the watchers
//! reconnect with backoff; a relist then converges by diff.
pub mod crds;
pub mod metrics;
mod mirror;
mod podns;
mod status;
/// From Kubernetes objects to the mesh's documents (public for the fuzz
/// targets, which feed it what a tenant could write).
pub mod translate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Resource, ResourceExt as _};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    config::{Config, KubernetesConfig},
    control::{self, Control},
    flows::FlowHub,
    health::Health,
    k8s::metrics::KubernetesMetrics,
    mtls::Mtls,
};
use mesh_policy::{
    self as policy, Condition, Documents, MeshPolicyResource, MeshSettings,
    PeerAuthenticationResource, TrafficSplitResource,
};
use mirror::Mirror;
use translate::{DocumentEntry, NodeInfo, PodInfo};

/// Changes that arrive together (a Deployment's pods, a relist) are
/// applied together; an event waits at most this long for company.
const SETTLE: Duration = Duration::from_millis(5);

/// How often a local pod whose network namespace was not found yet (its
/// sandbox is still starting) is looked for again.
const NETNS_RETRY: Duration = Duration::from_millis(500);

/// The host's /proc (the agent runs with `hostPID`).
const PROC: &str = "/proc";

/// The API server's watch events of every kind the agent follows (boxed:
/// a Pod is a few KiB, a Namespace much less).
enum Change {
    Pod(Box<WatchResult<Pod>>),
    Namespace(Box<WatchResult<Namespace>>),
    Node(Box<WatchResult<Node>>),
    Policy(Box<WatchResult<DynamicObject>>),
    PeerAuthentication(Box<WatchResult<DynamicObject>>),
    TrafficSplit(Box<WatchResult<DynamicObject>>),
    Service(Box<WatchResult<Service>>),
    EndpointSlice(Box<WatchResult<EndpointSlice>>),
}

type WatchResult<K> = Result<watcher::Event<K>, watcher::Error>;

/// A client for the cluster of `kubeconfig`, or when `None`, the pod's
/// service account (elsewhere $KUBECONFIG or ~/.kube/config).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding the cluster (in-cluster service account or kubeconfig)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Follows the cluster until the agent stops; returns only on an error that
/// no retry can mend.
pub async fn follow_cluster(
    mut control: Control,
    config: &Config,
    k: &KubernetesConfig,
    hub: &FlowHub,
    mtls: &mut Option<Mtls>,
    health: &Health,
    metrics: &KubernetesMetrics,
) -> anyhow::Result<()> {
    let client = client(k.kubeconfig.as_deref()).await?;
    let watching_since = Instant::now();
    let policies = ApiResource::erase::<MeshPolicyResource>(&());
    let peer_authentications = ApiResource::erase::<PeerAuthenticationResource>(&());
    let traffic_splits = ApiResource::erase::<TrafficSplitResource>(&());
    let mut changes = futures::stream::select_all([
        watch_all(Api::<Pod>::all(client.clone()))
            .map(|e| Change::Pod(Box::new(e)))
            .boxed(),
        watch_all(Api::<Namespace>::all(client.clone()))
            .map(|e| Change::Namespace(Box::new(e)))
            .boxed(),
        watch_all(Api::<Node>::all(client.clone()))
            .map(|e| Change::Node(Box::new(e)))
            .boxed(),
        watch_all(Api::<DynamicObject>::all_with(client.clone(), &policies))
            .map(|e| Change::Policy(Box::new(e)))
            .boxed(),
        watch_all(Api::<DynamicObject>::all_with(
            client.clone(),
            &peer_authentications,
        ))
        .map(|e| Change::PeerAuthentication(Box::new(e)))
        .boxed(),
        watch_all(Api::<DynamicObject>::all_with(
            client.clone(),
            &traffic_splits,
        ))
        .map(|e| Change::TrafficSplit(Box::new(e)))
        .boxed(),
        watch_all(Api::<Service>::all(client.clone()))
            .map(|e| Change::Service(Box::new(e)))
            .boxed(),
        watch_all(Api::<EndpointSlice>::all(client.clone()))
            .map(|e| Change::EndpointSlice(Box::new(e)))
            .boxed(),
    ]);

    let (statuses, wanted) = watch::channel(Vec::new());
    tokio::spawn(status::write_statuses(
        client.clone(),
        k.lease_namespace.clone(),
        config.mesh.node.clone(),
        wanted,
    ));

    let mut cluster = Cluster::new(
        control.settings().clone(),
        k.enforce_pod_cidrs,
        [policies, peer_authentications, traffic_splits],
    );
    let mut reachable = Reachability::new(client);
    let mut apply_at: Option<tokio::time::Instant> = None;
    let mut applied_once = false;
    let mut apply_error: Option<String> = None;
    health.not_ready("listing the cluster's objects");
    loop {
        let retry_netns = cluster.missing_netns && applied_once;
        tokio::select! {
            Some(change) = changes.next() => match cluster.apply(change) {
                Ok(changed) => {
                    if changed.state {
                        apply_at.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
                    } else if changed.statuses && applied_once {
                        statuses.send_replace(cluster.wanted_statuses());
                    }
                }
                Err(e) => reachable.lost(e),
            },
            () = sleep_until(apply_at), if apply_at.is_some() && cluster.synced() => {
                apply_at = None;
                let started = Instant::now();
                match cluster.reconcile(&mut control) {
                    Ok(names) => {
                        apply_error = None;
                        if let Some(mtls) = mtls.as_mut() {
                            mtls.applied(&names);
                        }
                        hub.set_names(names);
                        if !applied_once {
                            applied_once = true;
                            info!(
                                elapsed_ms = watching_since.elapsed().as_secs_f64() * 1e3,
                                pods = cluster.pods.objects().len(),
                                policies = cluster.policies.objects().len(),
                                "initial sync applied"
                            );
                        }
                    }
                    Err(e) => {
                        error!(error = format!("{e:#}"), elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                               "cluster state refused; the policy in force stays in force");
                        apply_error = Some(format!("{e:#}"));
                    }
                }
                statuses.send_replace(cluster.wanted_statuses());
            }
            () = tokio::time::sleep(NETNS_RETRY), if retry_netns => {
                // Only a namespace found is worth compiling the cluster again.
                if cluster.find_local_netns(Path::new(PROC)) {
                    apply_at.get_or_insert_with(tokio::time::Instant::now);
                }
            }
            Some(()) = reachable.recovered.recv() => reachable.up(),
        }
        metrics.set_connected(reachable.down.is_none() && cluster.synced());
        match (&reachable.down, &apply_error) {
            (Some(why), _) => health.not_ready(format!("API server unreachable: {why}")),
            (None, Some(why)) => health.not_ready(format!("cluster state refused: {why}")),
            (None, None) if applied_once => health.ready(),
            (None, None) => health.not_ready("listing the cluster's objects"),
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Lists then watches every object of a kind, reconnecting with backoff.
fn watch_all<K>(api: Api<K>) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    // resourceVersion=0: the first list (and relists) come from the API
    // server's watch cache, not etcd: N agents starting together cost the
    // cluster little.
    watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .boxed()
}

/// Whether the API server answers. The watchers reconnect on their own,
/// silently; after a failure a probe says when the server is back.
struct Reachability {
    client: kube::Client,
    down: Option<String>,
    probing: bool,
    tx: mpsc::Sender<()>,
    recovered: mpsc::Receiver<()>,
}

impl Reachability {
    fn new(client: kube::Client) -> Self {
        let (tx, recovered) = mpsc::channel(1);
        Self {
            client,
            down: None,
            probing: false,
            tx,
            recovered,
        }
    }

    fn lost(&mut self, e: watcher::Error) {
        if self.down.is_none() {
            warn!(error = %e, "lost the API server; enforcing the last known state, reconnecting");
        }
        self.down = Some(e.to_string());
        if !self.probing {
            self.probing = true;
            let (client, tx) = (self.client.clone(), self.tx.clone());
            tokio::spawn(async move {
                let mut wait = Duration::from_millis(200);
                loop {
                    tokio::time::sleep(wait).await;
                    let probe =
                        tokio::time::timeout(Duration::from_secs(2), client.apiserver_version());
                    if let Ok(Ok(_)) = probe.await {
                        let _ = tx.send(()).await;
                        return;
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            });
        }
    }

    fn up(&mut self) {
        self.probing = false;
        if self.down.take().is_some() {
            info!("the API server answers again");
        }
    }
}

/// What a watch event changed.
struct Changed {
    /// What the maps are compiled from.
    state: bool,
    /// Only what documents' statuses say.
    statuses: bool,
}

/// What the agent knows of the cluster.
struct Cluster {
    settings: MeshSettings,
    policy_resource: ApiResource,
    peer_authentication_resource: ApiResource,
    traffic_split_resource: ApiResource,
    pods: Mirror<PodInfo>,
    namespaces: Mirror<translate::NamespaceInfo>,
    nodes: Mirror<NodeInfo>,
    /// Nodes' podCIDRs bound their pods' addresses.
    enforce_pod_cidrs: bool,
    /// Pod addresses outside their node's podCIDRs, as last compiled.
    refused_pod_ips: BTreeSet<(String, IpAddr)>,
    /// Valid policies the last compile left out (over the policy budget):
    /// `namespace/name` → why.
    refused_policies: BTreeMap<String, String>,
    policies: Mirror<DocumentEntry>,
    peer_authentications: Mirror<DocumentEntry>,
    traffic_splits: Mirror<DocumentEntry>,
    services: Mirror<mesh_policy::services::Service>,
    endpoint_slices: Mirror<mesh_policy::services::EndpointSliceDoc>,
    /// The `Accepted` condition each document's status has now (apart:
    /// the agent's own status writes come back as events, and must not
    /// make it compile the cluster again).
    policy_statuses: Mirror<Option<Condition>>,
    peer_authentication_statuses: Mirror<Option<Condition>>,
    traffic_split_statuses: Mirror<Option<Condition>>,
    last_valid_policies: BTreeMap<String, Documents>,
    last_valid_peer_authentications: BTreeMap<String, Documents>,
    last_valid_traffic_splits: BTreeMap<String, Documents>,
    /// Local pod uid → its network namespace.
    netns: podns::PodNamespaces,
    /// A local pod's network namespace is not known yet.
    missing_netns: bool,
    /// Something besides Services and EndpointSlices changed since the
    /// last applied compile (or nothing was applied yet).
    beyond_services: bool,
}

impl Cluster {
    fn new(settings: MeshSettings, enforce_pod_cidrs: bool, resources: [ApiResource; 3]) -> Self {
        let [policies, peer_auths, splits] = resources;
        Self {
            settings,
            policy_resource: policies,
            peer_authentication_resource: peer_auths,
            traffic_split_resource: splits,
            pods: Mirror::default(),
            namespaces: Mirror::default(),
            nodes: Mirror::default(),
            enforce_pod_cidrs,
            refused_pod_ips: BTreeSet::new(),
            refused_policies: BTreeMap::new(),
            policies: Mirror::default(),
            peer_authentications: Mirror::default(),
            traffic_splits: Mirror::default(),
            services: Mirror::default(),
            endpoint_slices: Mirror::default(),
            policy_statuses: Mirror::default(),
            peer_authentication_statuses: Mirror::default(),
            traffic_split_statuses: Mirror::default(),
            last_valid_policies: BTreeMap::new(),
            last_valid_peer_authentications: BTreeMap::new(),
            last_valid_traffic_splits: BTreeMap::new(),
            netns: podns::PodNamespaces::default(),
            missing_netns: false,
            beyond_services: true,
        }
    }

    fn synced(&self) -> bool {
        self.pods.synced()
            && self.namespaces.synced()
            && self.nodes.synced()
            && self.policies.synced()
            && self.peer_authentications.synced()
            && self.traffic_splits.synced()
            && self.services.synced()
            && self.endpoint_slices.synced()
    }

    /// What a watch event changed: the state the maps are compiled from,
    /// or only what documents' statuses say.
    fn apply(&mut self, change: Change) -> Result<Changed, watcher::Error> {
        let services_only = matches!(change, Change::Service(_) | Change::EndpointSlice(_));
        let changed = self.apply_change(change)?;
        if changed.state && !services_only {
            self.beyond_services = true;
        }
        Ok(changed)
    }

    fn apply_change(&mut self, change: Change) -> Result<Changed, watcher::Error> {
        fn key<K: Resource>(o: &K) -> String {
            translate::object_key(o.meta().namespace.as_deref(), &o.name_any())
        }
        let settings = &self.settings;
        let status = |o: &DynamicObject| Some(translate::accepted_condition(o));
        let state = |state| Changed {
            state,
            statuses: false,
        };
        Ok(match change {
            Change::Pod(e) => state(self.pods.apply((*e)?, key, translate::pod_info)),
            Change::Namespace(e) => {
                state(self.namespaces.apply((*e)?, key, translate::namespace_info))
            }
            Change::Node(e) => {
                let enforce = self.enforce_pod_cidrs;
                state(
                    self.nodes
                        .apply((*e)?, key, |n| translate::node_info(n, enforce)),
                )
            }
            Change::TrafficSplit(e) => {
                let e = (*e)?;
                Changed {
                    statuses: self.traffic_split_statuses.apply(e.clone(), key, status),
                    state: self
                        .traffic_splits
                        .apply(e, key, |o| translate::document_entry(o, settings)),
                }
            }
            Change::Service(e) => state(self.services.apply((*e)?, key, translate::service)),
            Change::EndpointSlice(e) => state(self.endpoint_slices.apply(
                (*e)?,
                key,
                translate::endpoint_slice,
            )),
            Change::Policy(e) => {
                let e = (*e)?;
                Changed {
                    statuses: self.policy_statuses.apply(e.clone(), key, status),
                    state: self
                        .policies
                        .apply(e, key, |o| translate::document_entry(o, settings)),
                }
            }
            Change::PeerAuthentication(e) => {
                let e = (*e)?;
                Changed {
                    statuses: self
                        .peer_authentication_statuses
                        .apply(e.clone(), key, status),
                    state: self
                        .peer_authentications
                        .apply(e, key, |o| translate::document_entry(o, settings)),
                }
            }
        })
    }

    /// The cluster as documents, policies and peer authentications aside:
    /// workloads, nodes, traffic splits, Services and EndpointSlices.
    fn documents_but_policy(&mut self) -> Documents {
        let services = self.service_documents();
        Documents {
            traffic_splits: services.traffic_splits,
            services: services.services,
            endpoint_slices: services.endpoint_slices,
            ..translate::cluster_documents(
                self.pods.objects(),
                self.namespaces.objects(),
                self.nodes.objects(),
                &self.netns,
                &self.settings.node,
                &mut self.refused_pod_ips,
            )
        }
    }

    /// The cluster's traffic splits, Services and EndpointSlices alone.
    fn service_documents(&mut self) -> Documents {
        Documents {
            traffic_splits: translate::in_force(
                self.traffic_splits.objects(),
                &mut self.last_valid_traffic_splits,
            )
            .traffic_splits,
            services: self.services.objects().values().cloned().collect(),
            endpoint_slices: Some(self.endpoint_slices.objects().values().cloned().collect()),
            ..Documents::default()
        }
    }

    /// Compiles the cluster's state and applies the difference to the maps.
    /// When only Services and EndpointSlices changed since the last applied
    /// compile, only they are compiled (against the Workloads of that
    /// compile) and only the Service maps are diffed.
    fn reconcile(
        &mut self,
        control: &mut Control,
    ) -> anyhow::Result<std::sync::Arc<mesh_policy::state::NodeState>> {
        let started = Instant::now();
        if !self.beyond_services
            && !self.missing_netns
            && let Some(names) = control.names()
        {
            // The workloads are those of the last applied compile (nothing
            // but Services and EndpointSlices changed since): the pods need
            // no translating again.
            let docs = self.service_documents();
            let (slots, infos) =
                policy::compile_cluster_services(&docs, &names.workloads, &self.settings)?;
            control::drop_elsewhere(docs);
            return Ok(control.apply_services(&names, &slots, infos, started)?);
        }
        self.find_local_netns(Path::new(PROC));
        let mut docs = self.documents_but_policy();
        let policies = translate::in_force(self.policies.objects(), &mut self.last_valid_policies);
        let peer_auths = translate::in_force(
            self.peer_authentications.objects(),
            &mut self.last_valid_peer_authentications,
        );
        docs.policies = policies.policies;
        docs.peer_authentications = peer_auths.peer_authentications;
        let compiled = policy::compile(&docs, &self.settings)?;
        self.refused_policies = translate::refused_policies(&compiled.refused);
        let (cookies, gone) = control::resolve_netns_available(&compiled);
        if !gone.is_empty() {
            // The process found has exited: look again next time.
            self.netns.retain(|_, path| !gone.iter().any(|g| g == path));
            self.missing_netns = true;
        }
        control::drop_elsewhere(docs);
        let names = control.apply_compiled(compiled, cookies, started)?;
        self.beyond_services = false;
        Ok(names)
    }

    /// Looks up the network namespace of local pods that have none yet;
    /// whether it found any.
    fn find_local_netns(&mut self, proc: &Path) -> bool {
        let node = &self.settings.node;
        let local: BTreeSet<String> = self
            .pods
            .objects()
            .values()
            .filter(|p| &p.node == node && !p.uid.is_empty())
            .map(|p| p.uid.clone())
            .collect();
        self.netns.retain(|uid, _| local.contains(uid));
        let wanted: BTreeSet<String> = local
            .iter()
            .filter(|uid| !self.netns.contains(uid))
            .cloned()
            .collect();
        let found = if wanted.is_empty() {
            HashMap::new()
        } else {
            podns::find(proc, &wanted)
        };
        let any = !found.is_empty();
        self.netns.extend(found);
        self.missing_netns = self.netns.len() < local.len();
        any
    }

    /// What each document's status should say.
    fn wanted_statuses(&self) -> Vec<status::Wanted> {
        let kinds = [
            (&self.policy_resource, &self.policies, &self.policy_statuses),
            (
                &self.peer_authentication_resource,
                &self.peer_authentications,
                &self.peer_authentication_statuses,
            ),
            (
                &self.traffic_split_resource,
                &self.traffic_splits,
                &self.traffic_split_statuses,
            ),
        ];
        kinds
            .into_iter()
            .flat_map(|(resource, mirror, statuses)| {
                mirror.objects().values().map(move |e| status::Wanted {
                    resource: resource.clone(),
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                    generation: e.generation,
                    verdict: match &e.parsed {
                        Err(why) => Err((status::INVALID, why.clone())),
                        Ok(_) if resource == &self.policy_resource => {
                            let key = translate::object_key(Some(&e.namespace), &e.name);
                            match self.refused_policies.get(&key) {
                                Some(why) => Err((status::OVER_BUDGET, why.clone())),
                                None => Ok(()),
                            }
                        }
                        Ok(_) => Ok(()),
                    },
                    current: statuses
                        .objects()
                        .get(&translate::object_key(Some(&e.namespace), &e.name))
                        .cloned()
                        .flatten(),
                })
            })
            .collect()
    }
}
