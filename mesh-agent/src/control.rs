//! The control loop of standalone mode: documents in, map diffs out.
//!
//! Each reload reads the whole directory, compiles it, and applies only the
//! difference between what the kernel holds and what it should hold. Order
//! matters, so that no instant lets through traffic that both the old and
//! the new policy deny (docs/architecture.md proves it):
//!
//! 1. policy entries added or changed (new subjects are not referenced yet);
//! 2. endpoints and namespaces added or changed (switching to new subjects);
//! 3. Service backend slots added (a new revision beside the live one) and
//!    members of sticky Services added, Service entries added or switched
//!    to their new revision, Service
//!    entries removed, old slots and members removed: a Service only ever
//!    points at backends whose endpoints are already known, so a backend
//!    is never judged as "not a mesh workload";
//! 4. endpoints and namespaces removed;
//! 5. policy entries removed;
//! 6. the policy generation bumped, so cached verdicts are checked again.
//!
//! Any failure before step 6 undoes the steps taken, in reverse; a refused
//! configuration never reaches the maps at all.
pub mod metrics;
mod stranded;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use aya::maps::{HashMap, MapData};
use mesh_common::{
    map_names,
    policy::{Endpoint, IpKey, PROTO_UDP, PolicyKey, Verdict},
    service::{BackendKey, MemberKey, ServiceEntry, ServiceKey, SockAddr},
};
use tracing::{info, warn};

use crate::config::Config;
use mesh_datapath::maps::{MapsError, PinnedMaps, PolicyMaps};
use mesh_datapath::{Datapath, netns};
use mesh_policy::state::NodeState;
use mesh_policy::{Compiled, ConfigError, MeshSettings, ServiceTables};
use metrics::ReconcileMetrics;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(Box<ConfigError>),
    #[error(
        "map {map} would need {needed} entries during the update but holds {max} (raise {flag})"
    )]
    Capacity {
        map: &'static str,
        needed: usize,
        max: u32,
        flag: &'static str,
    },
    #[error("updating map {map} failed; every change of this update was undone")]
    Apply {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("writing {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ReloadError {
    /// Why the change was refused, as `mesh_reconcile_failures_total`'s
    /// `reason` label names it.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Config(_) => "invalid_config",
            Self::Capacity { .. } => "capacity",
            Self::Apply { .. } => "map_update",
            Self::Maps(_) => "maps",
            Self::State { .. } => "state_file",
        }
    }
}

impl From<ConfigError> for ReloadError {
    fn from(e: ConfigError) -> Self {
        Self::Config(Box::new(e))
    }
}

/// What the kernel's policy maps hold (the agent is their only writer, so
/// after adoption this copy is the truth and diffs need no map walks).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MapState {
    pub endpoints: BTreeMap<IpKey, Endpoint>,
    pub local_netns: BTreeMap<u64, u64>,
    pub policy: BTreeMap<PolicyKey, Verdict>,
    pub services: ServiceTables,
}

/// Which of the maps a change may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Everything,
    /// Only the Service maps: the policy, endpoint and namespace maps stay
    /// as applied, and are neither diffed nor written.
    Services,
}

/// What one reload changed.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub upserted: usize,
    pub deleted: usize,
    pub generation: u32,
    /// Backends that left a UDP Service: connected sockets sent to them
    /// are stranded there.
    pub departed_udp: BTreeSet<MemberKey>,
}

pub struct Control {
    config: Config,
    /// The data path, which puts its checks on local workloads' interfaces
    /// after each applied change.
    datapath: Option<Arc<Mutex<Datapath>>>,
    /// Each local workload's interfaces, by network namespace: looked up
    /// once per namespace.
    interfaces_by_netns: BTreeMap<PathBuf, Vec<u32>>,
    /// The names written with the last applied change, which a change of
    /// Services alone updates (shared with the flow hub, not copied).
    names: Option<Arc<NodeState>>,
    pins: PinnedMaps,
    maps: PolicyMaps,
    applied: MapState,
    capacity: Capacity,
    metrics: ReconcileMetrics,
    /// What the last applied change left out, as logged.
    refused: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct Capacity {
    endpoints: u32,
    local_netns: u32,
    policy: u32,
    services: u32,
    service_backends: u32,
}

impl Control {
    /// Takes over the pinned maps as they are: a restarted agent converges
    /// from what the previous one left, never from empty maps.
    pub fn adopt(mut config: Config, metrics: ReconcileMetrics) -> Result<Self, MapsError> {
        let pins = PinnedMaps::open(&config.bpffs)?;
        let applied = MapState {
            endpoints: pins.endpoints()?.into_iter().collect(),
            local_netns: pins.local_netns()?.into_iter().collect(),
            policy: pins.policy()?.into_iter().collect(),
            services: ServiceTables {
                services: pins.services()?.into_iter().collect(),
                backends: pins.service_backends()?.into_iter().collect(),
                members: pins.service_members()?.into_iter().collect(),
            },
        };
        let capacity = Capacity {
            endpoints: pins.max_entries(map_names::ENDPOINTS)?,
            local_netns: pins.max_entries(map_names::LOCAL_NETNS)?,
            policy: pins.max_entries(map_names::POLICY)?,
            services: pins.max_entries(map_names::SERVICES)?,
            service_backends: pins.max_entries(map_names::SERVICE_BACKENDS)?,
        };
        config.mesh.policy_budget = Some(capacity.policy as usize / 2);
        let maps = pins.policy_maps()?;
        Ok(Self {
            config,
            datapath: None,
            interfaces_by_netns: BTreeMap::new(),
            names: None,
            pins,
            maps,
            applied,
            capacity,
            metrics,
            refused: Vec::new(),
        })
    }

    /// Writes the names behind the maps' numbers to `state.json`.
    fn write_names(&self, names: &NodeState) -> Result<(), ReloadError> {
        names
            .write(&self.config.state_dir)
            .map_err(|source| ReloadError::State {
                path: NodeState::path(&self.config.state_dir),
                source,
            })
    }

    /// After each applied change, `datapath` puts its checks on the local
    /// workloads' interfaces.
    pub fn guard_workloads_with(&mut self, datapath: Arc<Mutex<Datapath>>) {
        self.datapath = Some(datapath);
    }

    /// The node's side of each local workload's interfaces, from inside
    /// each workload's network namespace (the peer of each veth there). A
    /// namespace that cannot be read is left out and logged: the workload
    /// keeps its connect-time checks; only packet sockets go unchecked.
    fn guard_workloads(&mut self, local_netns: &BTreeMap<PathBuf, u64>) {
        let Some(datapath) = self.datapath.clone() else {
            return;
        };
        self.interfaces_by_netns
            .retain(|path, _| local_netns.contains_key(path));
        let mut table = BTreeMap::new();
        for (path, identity) in local_netns {
            if !self.interfaces_by_netns.contains_key(path) {
                match netns::inside(path, mesh_datapath::netlink::peer_interfaces) {
                    Ok(found) => {
                        self.interfaces_by_netns.insert(path.clone(), found);
                    }
                    Err(e) => {
                        warn!(netns = %path.display(), error = %e, "cannot list the workload's interfaces");
                        continue;
                    }
                }
            }
            for &ifindex in &self.interfaces_by_netns[path] {
                table.insert(ifindex, *identity);
            }
        }
        let result = datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_workload_interfaces(table);
        if let Err(e) = result {
            warn!(
                error = format!("{e:#}"),
                "checks on workload interfaces failed; retrying"
            );
        }
    }

    /// Reads, compiles and applies the configuration directory; returns the
    /// names behind the numbers now in the maps (also written to disk).
    pub fn reload(&mut self) -> Result<Arc<NodeState>, ReloadError> {
        let result = self.try_reload();
        self.count_failure(&result);
        result
    }

    fn try_reload(&mut self) -> Result<Arc<NodeState>, ReloadError> {
        let started = Instant::now();
        let dir = self
            .config
            .config_dir
            .clone()
            .expect("reload is only called in standalone mode");
        let docs = mesh_policy::load_dir(&dir)?;
        mesh_policy::require_local_netns(&docs, &self.config.mesh.node)?;
        let compiled = mesh_policy::compile(&docs, &self.config.mesh)?;
        let local_netns = resolve_netns(&docs, &compiled)?;
        self.try_apply_compiled(compiled, local_netns, started)
    }

    /// Applies a compiled configuration whose local network namespaces have
    /// been resolved to cookies; returns the names behind the numbers now
    /// in the maps (also written to disk).
    pub fn apply_compiled(
        &mut self,
        compiled: Compiled,
        local_netns: BTreeMap<u64, u64>,
        started: Instant,
    ) -> Result<Arc<NodeState>, ReloadError> {
        let result = self.try_apply_compiled(compiled, local_netns, started);
        self.count_failure(&result);
        result
    }

    /// `standalone` or `kubernetes`, as the reconcile metrics name it.
    fn mode(&self) -> &'static str {
        if self.config.kubernetes.is_some() {
            "kubernetes"
        } else {
            "standalone"
        }
    }

    fn count_failure<T>(&self, result: &Result<T, ReloadError>) {
        if let Err(error) = result {
            self.metrics.failed(self.mode(), error.reason());
        }
    }

    fn try_apply_compiled(
        &mut self,
        mut compiled: Compiled,
        local_netns: BTreeMap<u64, u64>,
        started: Instant,
    ) -> Result<Arc<NodeState>, ReloadError> {
        let desired = MapState {
            local_netns,
            // The maps' entries move out; the names stay for NodeState.
            endpoints: std::mem::take(&mut compiled.endpoints),
            policy: std::mem::take(&mut compiled.policy),
            services: mesh_policy::service_tables(
                &self.applied.services,
                &std::mem::take(&mut compiled.service_slots),
            ),
        };
        self.check_capacity(&desired)?;
        let policy_entries = desired.policy.len();
        let changes = self.apply(desired, Scope::Everything)?;
        self.tell_refused(&compiled.refused);
        let names = Arc::new(NodeState::from_compiled(&compiled, changes.generation));
        self.write_names(&names)?;
        // After the endpoints: the check on what a workload sends knows its
        // addresses from its first packet.
        self.guard_workloads(&compiled.local_netns);
        self.release_stranded(&names, changes.departed_udp);
        self.names = Some(names.clone());
        let elapsed = started.elapsed();
        self.metrics.observe(self.mode(), elapsed);
        info!(
            upserted = changes.upserted,
            deleted = changes.deleted,
            generation = changes.generation,
            workloads = compiled.workloads.len(),
            policy_entries,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "policy applied"
        );
        drop_elsewhere_and_trim(compiled);
        Ok(names)
    }

    /// The mesh's settings, with the policy budget of the map adopted.
    pub fn settings(&self) -> &MeshSettings {
        &self.config.mesh
    }

    /// Logs the documents an applied change left out, once while they are.
    fn tell_refused(&mut self, refused: &[ConfigError]) {
        let now: Vec<String> = refused.iter().map(ToString::to_string).collect();
        if now == self.refused {
            return;
        }
        for error in now.iter().filter(|e| !self.refused.contains(e)) {
            warn!(%error, "document refused on its own; the rest applied");
        }
        if now.is_empty() {
            info!("no document is refused any more");
        }
        self.metrics.refused(now.len());
        self.refused = now;
    }

    /// The names written with the last applied change; `None` before the
    /// first.
    pub fn names(&self) -> Option<Arc<NodeState>> {
        self.names.clone()
    }

    /// Applies a change of Services or EndpointSlices alone (Kubernetes
    /// mode), after a change that applied everything and left `applied`
    /// ([`Control::names`]): the Service maps get `slots`, the names
    /// `services`; policy, endpoints and namespaces are as that change left
    /// them, so nothing else is compiled, diffed or written.
    pub fn apply_services(
        &mut self,
        applied: &NodeState,
        slots: &mesh_policy::ServiceSlots,
        services: Vec<mesh_policy::ServiceInfo>,
        started: Instant,
    ) -> Result<Arc<NodeState>, ReloadError> {
        let result = (|| {
            let desired = MapState {
                services: mesh_policy::service_tables(&self.applied.services, slots),
                ..MapState::default()
            };
            // The other maps are empty here: their union with what is
            // applied is what is applied.
            self.check_capacity(&desired)?;
            let changes = self.apply(desired, Scope::Services)?;
            let names = applied.with_services(changes.generation, services);
            names
                .write_services(&self.config.state_dir)
                .map_err(|source| ReloadError::State {
                    path: NodeState::services_path(&self.config.state_dir),
                    source,
                })?;
            self.release_stranded(&names, changes.departed_udp);
            let elapsed = started.elapsed();
            self.metrics.observe(self.mode(), elapsed);
            info!(
                upserted = changes.upserted,
                deleted = changes.deleted,
                generation = changes.generation,
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                "services applied"
            );
            let names = Arc::new(names);
            self.names = Some(names.clone());
            Ok(names)
        })();
        self.count_failure(&result);
        result
    }

    /// Connected UDP sockets sent to backends that have just left their
    /// Service are aborted, so their applications connect again to a live
    /// one. They live in the local workloads' namespaces, as `names` (the
    /// names just applied) lists them.
    fn release_stranded(&self, names: &NodeState, departed: BTreeSet<MemberKey>) {
        stranded::release(&self.config.bpffs, names, departed);
    }

    /// The maps must hold the union of old and new entries while the update
    /// runs (additions come before removals).
    fn check_capacity(&self, desired: &MapState) -> Result<(), ReloadError> {
        fn union<K: Ord, V>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> usize {
            a.len() + b.keys().filter(|k| !a.contains_key(k)).count()
        }
        let checks = [
            (
                map_names::ENDPOINTS,
                union(&self.applied.endpoints, &desired.endpoints),
                self.capacity.endpoints,
                "--max-endpoints",
            ),
            (
                map_names::LOCAL_NETNS,
                union(&self.applied.local_netns, &desired.local_netns),
                self.capacity.local_netns,
                "the local network namespace limit",
            ),
            (
                map_names::POLICY,
                union(&self.applied.policy, &desired.policy),
                self.capacity.policy,
                "--max-policy",
            ),
            (
                map_names::SERVICES,
                union(&self.applied.services.services, &desired.services.services),
                self.capacity.services,
                "the Service limit",
            ),
            (
                map_names::SERVICE_BACKENDS,
                union(&self.applied.services.backends, &desired.services.backends),
                self.capacity.service_backends,
                "the Service backend limit",
            ),
            (
                map_names::SERVICE_MEMBERS,
                union(&self.applied.services.members, &desired.services.members),
                self.capacity.service_backends,
                "the Service backend limit",
            ),
        ];
        for (map, needed, max, flag) in checks {
            if needed > max as usize {
                return Err(ReloadError::Capacity {
                    map,
                    needed,
                    max,
                    flag,
                });
            }
        }
        Ok(())
    }

    fn apply(&mut self, desired: MapState, scope: Scope) -> Result<Changes, ReloadError> {
        fn unchanged<K, V>() -> mesh_policy::MapDiff<K, V> {
            mesh_policy::MapDiff {
                upserts: Vec::new(),
                deletes: Vec::new(),
            }
        }
        let (policy, endpoints, netns) = match scope {
            Scope::Everything => (
                mesh_policy::diff(&self.applied.policy, &desired.policy),
                mesh_policy::diff(&self.applied.endpoints, &desired.endpoints),
                mesh_policy::diff(&self.applied.local_netns, &desired.local_netns),
            ),
            Scope::Services => (unchanged(), unchanged(), unchanged()),
        };
        let services =
            mesh_policy::diff(&self.applied.services.services, &desired.services.services);
        let backends =
            mesh_policy::diff(&self.applied.services.backends, &desired.services.backends);
        let members = mesh_policy::diff(&self.applied.services.members, &desired.services.members);
        let upserted = policy.upserts.len()
            + endpoints.upserts.len()
            + netns.upserts.len()
            + services.upserts.len()
            + backends.upserts.len()
            + members.upserts.len();
        let deleted = policy.deletes.len()
            + endpoints.deletes.len()
            + netns.deletes.len()
            + services.deletes.len()
            + backends.deletes.len()
            + members.deletes.len();
        if upserted + deleted == 0 {
            return Ok(Changes {
                generation: self.pins.policy_generation()?,
                ..Changes::default()
            });
        }

        let mut undo = Undo::default();
        let result = (|| {
            let m = &mut self.maps;
            let old = &self.applied;
            for (k, v) in &policy.upserts {
                put(
                    &mut m.policy,
                    &mut undo.policy,
                    &old.policy,
                    *k,
                    *v,
                    map_names::POLICY,
                )?;
            }
            for (k, v) in &endpoints.upserts {
                put(
                    &mut m.endpoints,
                    &mut undo.endpoints,
                    &old.endpoints,
                    *k,
                    *v,
                    map_names::ENDPOINTS,
                )?;
            }
            for (k, v) in &netns.upserts {
                put(
                    &mut m.local_netns,
                    &mut undo.local_netns,
                    &old.local_netns,
                    *k,
                    *v,
                    map_names::LOCAL_NETNS,
                )?;
            }
            for (k, v) in &backends.upserts {
                put(
                    &mut m.service_backends,
                    &mut undo.service_backends,
                    &old.services.backends,
                    *k,
                    *v,
                    map_names::SERVICE_BACKENDS,
                )?;
            }
            for (k, v) in &members.upserts {
                put(
                    &mut m.service_members,
                    &mut undo.service_members,
                    &old.services.members,
                    *k,
                    *v,
                    map_names::SERVICE_MEMBERS,
                )?;
            }
            for (k, v) in &services.upserts {
                put(
                    &mut m.services,
                    &mut undo.services,
                    &old.services.services,
                    *k,
                    *v,
                    map_names::SERVICES,
                )?;
            }
            for k in &services.deletes {
                remove(
                    &mut m.services,
                    &mut undo.services,
                    &old.services.services,
                    *k,
                    map_names::SERVICES,
                )?;
            }
            for k in &backends.deletes {
                remove(
                    &mut m.service_backends,
                    &mut undo.service_backends,
                    &old.services.backends,
                    *k,
                    map_names::SERVICE_BACKENDS,
                )?;
            }
            for k in &members.deletes {
                remove(
                    &mut m.service_members,
                    &mut undo.service_members,
                    &old.services.members,
                    *k,
                    map_names::SERVICE_MEMBERS,
                )?;
            }
            for k in &netns.deletes {
                remove(
                    &mut m.local_netns,
                    &mut undo.local_netns,
                    &old.local_netns,
                    *k,
                    map_names::LOCAL_NETNS,
                )?;
            }
            for k in &endpoints.deletes {
                remove(
                    &mut m.endpoints,
                    &mut undo.endpoints,
                    &old.endpoints,
                    *k,
                    map_names::ENDPOINTS,
                )?;
            }
            for k in &policy.deletes {
                remove(
                    &mut m.policy,
                    &mut undo.policy,
                    &old.policy,
                    *k,
                    map_names::POLICY,
                )?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            undo.roll_back(&mut self.maps);
            return Err(e);
        }
        let departed_udp =
            mesh_policy::departed_backends(&self.applied.services, &desired.services, PROTO_UDP);
        match scope {
            Scope::Everything => drop_elsewhere(std::mem::replace(&mut self.applied, desired)),
            Scope::Services => self.applied.services = desired.services,
        }
        let generation = self.pins.bump_policy_generation()?;
        Ok(Changes {
            upserted,
            deleted,
            generation,
            departed_udp,
        })
    }
}

/// The cookies of the local workloads' network namespaces. A namespace
/// that cannot be opened refuses the configuration, naming the workload.
fn resolve_netns(
    docs: &mesh_policy::Documents,
    compiled: &Compiled,
) -> Result<BTreeMap<u64, u64>, ReloadError> {
    let mut cookies = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (path, identity) in &compiled.local_netns {
        let cookie = netns::cookie(path).map_err(|e| {
            let mut err = docs.netns_error(path);
            err.message = format!("{}: {e}", path.display());
            err
        })?;
        if !seen.insert(cookie) {
            warn!(netns = %path.display(), "two local workloads share a network namespace");
        }
        cookies.insert(cookie, *identity);
    }
    Ok(cookies)
}

/// Frees a large value on another thread: tens of thousands of map
/// entries take milliseconds to free, which the next change need not wait
/// for.
pub fn drop_elsewhere<T: Send + 'static>(value: T) {
    drop_then(value, || {});
}

/// [`drop_elsewhere`], then hands the allocator's free memory back to the
/// kernel: after a compile of the whole cluster, whose temporaries took
/// tens of megabytes (a trim walks the whole heap: not after every small
/// change).
fn drop_elsewhere_and_trim<T: Send + 'static>(value: T) {
    drop_then(value, mesh_datapath::sys::return_free_memory);
}

fn drop_then<T: Send + 'static>(value: T, then: impl FnOnce() + Send + 'static) {
    if std::thread::Builder::new()
        .name("drop".into())
        .spawn(move || {
            drop(value);
            then();
        })
        .is_err()
    {
        // No thread to be had: it was dropped here instead.
    }
}

/// Kubernetes mode: the cookies of the local workloads' network namespaces
/// that can be opened, and the paths that could not (a pod that exited
/// between the lookup and now; it is looked up again).
pub fn resolve_netns_available(compiled: &Compiled) -> (BTreeMap<u64, u64>, Vec<PathBuf>) {
    let mut cookies = BTreeMap::new();
    let mut missing = Vec::new();
    for (path, identity) in &compiled.local_netns {
        match netns::cookie(path) {
            Ok(cookie) => {
                cookies.insert(cookie, *identity);
            }
            Err(_) => missing.push(path.clone()),
        }
    }
    (cookies, missing)
}

/// What to restore, per map, if an update fails half-way: the previous
/// value of each key touched (`None`: the key was absent).
#[derive(Default)]
struct Undo {
    endpoints: Vec<(IpKey, Option<Endpoint>)>,
    local_netns: Vec<(u64, Option<u64>)>,
    policy: Vec<(PolicyKey, Option<Verdict>)>,
    services: Vec<(ServiceKey, Option<ServiceEntry>)>,
    service_backends: Vec<(BackendKey, Option<SockAddr>)>,
    service_members: Vec<(MemberKey, Option<u32>)>,
}

impl Undo {
    fn roll_back(self, maps: &mut PolicyMaps) {
        // Services first: until they are back, none may point at a backend
        // whose endpoint the restores below remove again. Then the reverse
        // of the apply order.
        restore(&mut maps.services, self.services);
        restore(&mut maps.service_backends, self.service_backends);
        restore(&mut maps.service_members, self.service_members);
        restore(&mut maps.policy, self.policy);
        restore(&mut maps.endpoints, self.endpoints);
        restore(&mut maps.local_netns, self.local_netns);
    }
}

fn restore<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, undo: Vec<(K, Option<V>)>) {
    for (k, previous) in undo.into_iter().rev() {
        let result = match previous {
            Some(v) => map.insert(k, v, 0),
            None => map.remove(&k),
        };
        if let Err(e) = result {
            warn!(error = %e, "could not undo a map change");
        }
    }
}

fn put<K: aya::Pod + Ord, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    undo: &mut Vec<(K, Option<V>)>,
    old: &BTreeMap<K, V>,
    k: K,
    v: V,
    name: &'static str,
) -> Result<(), ReloadError> {
    map.insert(k, v, 0)
        .map_err(|source| ReloadError::Apply { map: name, source })?;
    undo.push((k, old.get(&k).copied()));
    Ok(())
}

fn remove<K: aya::Pod + Ord, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    undo: &mut Vec<(K, Option<V>)>,
    old: &BTreeMap<K, V>,
    k: K,
    name: &'static str,
) -> Result<(), ReloadError> {
    match map.remove(&k) {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
        Err(source) => return Err(ReloadError::Apply { map: name, source }),
    }
    undo.push((k, old.get(&k).copied()));
    Ok(())
}
