//! `mesh-bench control-plane`: the agent's Kubernetes mode at cluster
//! scale, against the same state read from a directory (standalone mode),
//! in one run.
//!
//! An in-test API server holds a cluster's worth of objects: Pods (on
//! twenty other nodes, so the agent of node 0 has no local pod to find a
//! network namespace for), Namespaces, Nodes and MeshPolicies. The agent
//! (`run --kubernetes`) lists and watches them; measured are the initial
//! sync (its `initial sync applied` log line: from client creation to the
//! first apply of the full listed state), its memory, and how long a change
//! made in the API server (a new Pod, an edited MeshPolicy) takes to reach
//! the maps. The baseline is the same state as Workload, MeshNode and
//! MeshPolicy documents in a config directory, read by a standalone agent
//! (its first `policy applied`: read, compile and apply). Rounds alternate
//! between the two, each on a fresh bed (pins, state, agent).
//!
//! Run it as root, like the other benchmarks (the agents load their kernel
//! programs): `cargo xtask bench control-plane` builds release binaries
//! first; after `cargo build --release -p mesh-agent -p mesh-tests --bins`,
//! `target/release/mesh-bench control-plane` runs it directly. The agent is
//! the `mesh-agent` next to `mesh-bench` (`sibling_binary`; `MESH_AGENT_BIN`
//! overrides it), so figures are of a release build.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Args;
use mesh_tests::{
    agent::{self, Agent},
    cluster::Cluster,
    topology::TestBed,
};
use serde_json::{Value, json};

use super::{log_field, log_tail, machine, median, times};
use crate::cross_node::{CpuTicks, commit, loadavg};

#[derive(Args)]
pub struct ControlPlane {
    /// Pods in the cluster (all Running, one IPv4 address each, on nodes
    /// node-1 … node-N, none on the agent's node).
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// MeshPolicies, spread over the namespaces.
    #[arg(long, default_value_t = 1_000)]
    policies: usize,
    /// Namespaces the pods and policies are spread over.
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Service accounts per namespace (identities = namespaces × this).
    #[arg(long, default_value_t = 50)]
    service_accounts: usize,
    /// Remote nodes the pods run on.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Alternating rounds of each mode (Kubernetes, standalone).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// New pods created one at a time after the sync, per Kubernetes round.
    #[arg(long, default_value_t = 50)]
    events: usize,
    /// MeshPolicy edits made one at a time after the pod events, per
    /// Kubernetes round.
    #[arg(long, default_value_t = 5)]
    policy_events: usize,
    /// Services (Kubernetes mode), one per (namespace, service account)
    /// in turn, each with an EndpointSlice of that service account's pods.
    #[arg(long, default_value_t = 2_000)]
    services: usize,
    /// EndpointSlice changes (an endpoint turning not ready, then ready
    /// again) made one at a time after the policy edits, per Kubernetes
    /// round.
    #[arg(long, default_value_t = 20)]
    slice_events: usize,
    /// The agent's `--max-endpoints`.
    #[arg(long, default_value_t = 1 << 17)]
    max_endpoints: u32,
    /// The agent's `--max-policy`.
    #[arg(long, default_value_t = 1 << 20)]
    max_policy: u32,
}

const TRUST_DOMAIN: &str = "cluster.local";
const MESH_API: &str = "mesh.dev/v1alpha1";

/// What the issue asks of Kubernetes mode.
const TARGET_SYNC_MS: f64 = 2_000.0;
const TARGET_RSS_MIB: f64 = 100.0;
const TARGET_EVENT_MS: f64 = 100.0;

/// How long the agent may take for the initial sync before the run fails.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// … and for one event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One pod of the synthetic cluster.
struct PodSpec {
    namespace: String,
    name: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    node: String,
    ip: Ipv4Addr,
}

impl PodSpec {
    /// Pod `i`: namespace `i mod N`, then service account, so every
    /// (namespace, service account) gets its pods in turn; two versions
    /// (labels) per service account once each has two pods; the nodes
    /// round-robin in runs of seven; addresses 10.64.0.1 onwards.
    fn new(i: usize, cli: &ControlPlane) -> Self {
        let ns = i % cli.namespaces;
        let sa = (i / cli.namespaces) % cli.service_accounts;
        let version = (i / (cli.namespaces * cli.service_accounts)) % 2 + 1;
        let service_account = format!("sa-{sa:02}");
        Self {
            namespace: namespace_name(ns),
            name: format!("{service_account}-{i:05}"),
            labels: BTreeMap::from([
                ("app".to_owned(), service_account.clone()),
                ("version".to_owned(), format!("v{version}")),
            ]),
            service_account,
            node: format!("node-{}", (i / 7) % cli.nodes + 1),
            ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i as u32 + 1),
        }
    }

    /// The Pod as kubelet leaves it once running (the fields the agent
    /// reads, and the containers a real Pod has).
    fn pod(&self) -> Value {
        let ip = self.ip.to_string();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": {
                "nodeName": self.node,
                "serviceAccountName": self.service_account,
                "containers": [{"name": "app", "image": format!("registry.example/{}:1", self.service_account)}],
            },
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        })
    }

    /// The same pod as the standalone mode's Workload document.
    fn workload(&self) -> Value {
        json!({
            "apiVersion": MESH_API, "kind": "Workload",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": {
                "serviceAccount": self.service_account,
                "ips": [self.ip.to_string()],
                "node": self.node,
            },
        })
    }
}

fn namespace_name(ns: usize) -> String {
    format!("ns-{ns:03}")
}

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

fn node_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, (n / 250) as u8, (n % 250 + 1) as u8)
}

/// The cluster both modes are given.
struct State {
    namespaces: Vec<String>,
    /// Remote node names and addresses.
    nodes: Vec<(String, Ipv4Addr)>,
    pods: Vec<PodSpec>,
    /// MeshPolicy objects, valid as both a custom resource and a document.
    policies: Vec<Value>,
    /// Services and their EndpointSlices (Kubernetes mode only).
    services: Vec<(Value, Value)>,
}

impl State {
    fn generate(cli: &ControlPlane) -> Self {
        let namespaces: Vec<String> = (0..cli.namespaces).map(namespace_name).collect();
        let nodes = (1..=cli.nodes)
            .map(|n| (format!("node-{n}"), node_ip(n)))
            .collect();
        let pods: Vec<PodSpec> = (0..cli.pods).map(|i| PodSpec::new(i, cli)).collect();
        let mut in_namespace: Vec<Vec<&PodSpec>> = vec![Vec::new(); cli.namespaces];
        for (i, p) in pods.iter().enumerate() {
            in_namespace[i % cli.namespaces].push(p);
        }
        let policies = (0..cli.policies)
            .map(|k| policy(k, cli, &namespaces, &in_namespace))
            .collect();
        let services = (0..cli.services)
            .map(|k| service(k, cli, &pods, true))
            .collect();
        Self {
            namespaces,
            nodes,
            pods,
            policies,
            services,
        }
    }

    /// Distinct SPIFFE identities among the pods.
    fn identities(&self) -> usize {
        self.pods
            .iter()
            .map(|p| (&p.namespace, &p.service_account))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    fn count_actions(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for p in &self.policies {
            *counts
                .entry(p["spec"]["action"].as_str().unwrap_or("ALLOW").to_owned())
                .or_default() += 1;
        }
        counts
    }

    /// Everything into the API server: Namespaces, Nodes, Pods, policies.
    fn populate(&self, cluster: &Cluster) {
        for ns in &self.namespaces {
            cluster.namespace(ns, json!({"team": ns}));
        }
        for (name, ip) in &self.nodes {
            cluster.api.apply(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name},
                "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]},
            }));
        }
        for p in &self.pods {
            cluster.api.apply(p.pod());
        }
        for policy in &self.policies {
            cluster.api.apply(policy.clone());
        }
        for (service, slice) in &self.services {
            cluster.api.apply(service.clone());
            cluster.api.apply(slice.clone());
        }
    }

    /// The same state as files: one of Workloads and one of MeshPolicies
    /// per namespace, and one of MeshNodes.
    fn write_config(&self, bed: &TestBed) -> anyhow::Result<u64> {
        let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let yaml = |v: &Value| serde_yaml::to_string(v).expect("JSON is YAML");
        for p in &self.pods {
            files
                .entry(format!("workloads-{}.yaml", p.namespace))
                .or_default()
                .push(yaml(&p.workload()));
        }
        for policy in &self.policies {
            let ns = policy["metadata"]["namespace"].as_str().unwrap_or_default();
            files
                .entry(format!("policies-{ns}.yaml"))
                .or_default()
                .push(yaml(policy));
        }
        for (name, ip) in &self.nodes {
            files
                .entry("nodes.yaml".into())
                .or_default()
                .push(yaml(&json!({
                    "apiVersion": MESH_API, "kind": "MeshNode",
                    "metadata": {"name": name},
                    "spec": {"addresses": [ip.to_string()]},
                })));
        }
        let mut bytes = 0;
        for (file, docs) in files {
            let text = docs.join("---\n");
            bytes += text.len() as u64;
            bed.write_config(&file, &text)?;
        }
        Ok(bytes)
    }
}

/// Service `k` and its EndpointSlice: the pods of the `k`-th (namespace,
/// service account) pair, at 10.96.0.0/16 addresses; the slice's first
/// endpoint `ready` or not.
fn service(k: usize, cli: &ControlPlane, pods: &[PodSpec], ready: bool) -> (Value, Value) {
    let ns = namespace_name(k % cli.namespaces);
    let sa = format!("sa-{:02}", (k / cli.namespaces) % cli.service_accounts);
    let name = format!("svc-{k:05}");
    let vip = format!("10.96.{}.{}", (k + 1) / 256, (k + 1) % 256);
    let endpoints: Vec<Value> = pods
        .iter()
        .filter(|p| p.namespace == ns && p.service_account == sa)
        .enumerate()
        .map(|(i, p)| {
            json!({
                "addresses": [p.ip.to_string()],
                "conditions": {"ready": ready || i > 0},
                "nodeName": p.node,
            })
        })
        .collect();
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "selector": {"app": sa},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    });
    (service, slice)
}

/// MeshPolicy `k`: namespace `k mod N`; one in ten a DENY (everything from
/// a prefix of another namespace's service accounts), the others ALLOWs
/// selecting a service account or an (app, version) label pair of a pod of
/// their namespace, with rules from exact identities (two of the namespace,
/// one of another), from a whole neighbouring namespace, and from a prefix
/// pattern, on TCP and UDP ports.
fn policy(
    k: usize,
    cli: &ControlPlane,
    namespaces: &[String],
    in_namespace: &[Vec<&PodSpec>],
) -> Value {
    let n = k % cli.namespaces;
    let j = k / cli.namespaces;
    let ns = &namespaces[n];
    let other = &namespaces[(n + 1 + j % (cli.namespaces - 1).max(1)) % cli.namespaces];
    let neighbour = &namespaces[(n + 1) % cli.namespaces];
    let sa = |i: usize| format!("sa-{:02}", i % cli.service_accounts);
    // A pod of the namespace to select (a service account of it when the
    // namespace has no pod).
    let target = in_namespace[n]
        .get((j * 7 + 3) % in_namespace[n].len().max(1))
        .copied();
    let target_sa = target.map_or_else(|| sa(j), |p| p.service_account.clone());
    let deny = j % 10 == 9;
    let selector = match target {
        Some(p) if j % 2 == 1 => {
            json!({"matchLabels": {"app": p.labels["app"], "version": p.labels["version"]}})
        }
        _ => json!({"serviceAccount": target_sa}),
    };
    let (name, spec) = if deny {
        (
            format!("deny-{target_sa}-{j}"),
            json!({
                "selector": selector,
                "action": "DENY",
                "rules": [{"from": [{"identity": format!("{}*", spiffe(other, "sa-4"))}]}],
            }),
        )
    } else {
        let mut rules = vec![json!({
            "from": [
                {"identity": spiffe(ns, &sa(j + 1))},
                {"identity": spiffe(ns, &sa(j + 2))},
                {"identity": spiffe(other, &sa(j + 3))},
            ],
            "ports": [{"port": 8080}, {"port": 8443, "protocol": "TCP"}],
        })];
        if !j.is_multiple_of(3) {
            rules.push(json!({"from": [{"namespace": neighbour}], "ports": [{"port": 9090}]}));
        }
        if j % 4 == 1 {
            rules.push(json!({
                "from": [{"identity": format!("{}*", spiffe(ns, "sa-1"))}],
                "ports": [{"port": 53, "protocol": "UDP"}, {"port": 5432}],
            }));
        }
        (
            format!("allow-{target_sa}-{j}"),
            json!({"selector": selector, "action": "ALLOW", "rules": rules}),
        )
    };
    json!({
        "apiVersion": MESH_API, "kind": "MeshPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
}

// ------------------------------------------------------------ the agent

/// Memory of a process, from /proc/<pid>/status.
#[derive(Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let [rss_kib, hwm_kib] = super::status_kibs(pid, ["VmRSS", "VmHWM"])?;
        Ok(Self { rss_kib, hwm_kib })
    }

    fn json(&self) -> Value {
        json!({ "rss_mib": mib(self.rss_kib), "hwm_mib": mib(self.hwm_kib) })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// User + system CPU time of a process so far, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1e3 / hz
}

/// Whether the process has exited (a zombie, as nobody waited for it yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

/// CPU time of every thread of a process so far, in nanoseconds
/// (`/proc/<pid>/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until the agent has used less than 1 ms of CPU in 20 ms (it has
/// finished with the previous change: dropping the old state, telling the
/// status writer), so that each event meets an idle agent; returns how
/// long that took (at most `timeout`, then the event goes ahead anyway).
fn wait_idle(pid: u32, timeout: Duration) -> f64 {
    let started = Instant::now();
    let mut before = cpu_ns(pid);
    while started.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(20));
        let now = cpu_ns(pid);
        if now.saturating_sub(before) < 1_000_000 {
            break;
        }
        before = now;
    }
    started.elapsed().as_secs_f64() * 1e3
}

/// A line of the agent's log, and when the bench saw it.
struct Found {
    line: String,
    /// Byte offset just past the line.
    end: usize,
    at: Instant,
}

impl Found {
    fn field(&self, key: &str) -> anyhow::Result<f64> {
        log_field(&self.line, key).with_context(|| format!("no {key}= in {:?}", self.line))
    }
}

/// Polls the agent's log every millisecond for the first line after byte
/// `from` that contains `needle`; fails when the agent refuses its state,
/// exits, or says nothing within `timeout`.
fn wait_line(agent: &Agent, from: usize, needle: &str, timeout: Duration) -> anyhow::Result<Found> {
    let deadline = Instant::now() + timeout;
    let mut scanned = from;
    loop {
        let log = agent.log();
        let at = Instant::now();
        // Whole lines only: the log grows a line at a time.
        for line in log[scanned..].split_inclusive('\n') {
            let end = scanned + line.len();
            ensure!(
                !line.contains("configuration refused") && !line.contains("cluster state refused"),
                "the agent refused the state: {line}\n{}",
                log_tail(&log)
            );
            if line.contains(needle) {
                return Ok(Found {
                    line: line.trim_end().to_owned(),
                    end,
                    at,
                });
            }
            scanned = end;
        }
        ensure!(
            !exited(agent.pid()),
            "the agent exited while the bench waited for {needle:?}:\n{}",
            log_tail(&log)
        );
        ensure!(
            at < deadline,
            "no {needle:?} from the agent within {timeout:?}:\n{}",
            log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What the agent logs when a change reached the maps: `policy applied`
/// after a full compile, `services applied` after a change of Services or
/// EndpointSlices alone.
const APPLIED: &str = " applied upserted=";

/// Waits until the agent has logged no `policy applied` for `quiet`;
/// returns the offset of the log's end then and the lines seen meanwhile.
fn wait_quiet(
    agent: &Agent,
    from: usize,
    quiet: Duration,
    timeout: Duration,
) -> anyhow::Result<(usize, Vec<String>)> {
    let deadline = Instant::now() + timeout;
    let mut scanned = from;
    let mut lines = Vec::new();
    let mut last = Instant::now();
    loop {
        let log = agent.log();
        let now = Instant::now();
        for line in log[scanned..].split_inclusive('\n') {
            scanned += line.len();
            if line.contains(APPLIED) {
                lines.push(line.trim_end().to_owned());
                last = now;
            }
        }
        if now.duration_since(last) >= quiet {
            return Ok((scanned, lines));
        }
        ensure!(
            now < deadline,
            "the agent kept applying for {timeout:?} ({} applies):\n{}",
            lines.len(),
            log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn capacity_args(cli: &ControlPlane) -> [String; 4] {
    [
        "--max-endpoints".into(),
        cli.max_endpoints.to_string(),
        "--max-policy".into(),
        cli.max_policy.to_string(),
    ]
}

/// The maps hold what the agent said it applied: one endpoint per pod,
/// and `policy_entries` policy entries.
fn check_maps(bed: &TestBed, endpoints: usize, policy_entries: u64) -> anyhow::Result<Value> {
    let stats = agent::stats(&bed.pin_dir(0))?;
    let entries = |map: &str| stats["maps"][map]["entries"].as_u64().unwrap_or(0);
    ensure!(
        entries("ENDPOINTS") == endpoints as u64,
        "ENDPOINTS holds {} entries, expected {endpoints} (one per pod)",
        entries("ENDPOINTS")
    );
    ensure!(
        entries("POLICY") == policy_entries,
        "POLICY holds {} entries, the agent logged {policy_entries}",
        entries("POLICY")
    );
    Ok(json!({ "endpoints": entries("ENDPOINTS"), "policy": entries("POLICY") }))
}

fn save_log(agent: &Agent, out: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let path = out.join(format!("control-plane-{name}.log"));
    std::fs::write(&path, agent.log()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// How the agent came up with the full state.
#[derive(Clone, Copy, Default)]
struct Sync {
    /// Kubernetes: `initial sync applied`'s elapsed_ms (client creation to
    /// the first apply of the full listed state). Standalone: the first
    /// `policy applied`'s elapsed_ms (read, compile, apply).
    agent_ms: f64,
    /// From spawning the agent to that line (program loading included).
    wall_ms: f64,
    /// The first `policy applied`'s elapsed_ms: compiling and applying
    /// (standalone: reading the files too).
    apply_ms: f64,
    policy_entries: u64,
    upserted: u64,
    /// The agent's CPU time when the line appeared.
    cpu_ms: f64,
    memory: Memory,
}

impl Sync {
    fn json(&self) -> Value {
        json!({
            "agent_ms": self.agent_ms,
            "wall_ms": self.wall_ms,
            "apply_ms": self.apply_ms,
            "policy_entries": self.policy_entries,
            "upserted": self.upserted,
            "agent_cpu_ms": self.cpu_ms,
            "memory": self.memory.json(),
        })
    }
}

/// One change made in the API server and its way into the maps.
struct Event {
    /// From `apply` returning to the agent's `policy applied` line.
    latency_ms: f64,
    /// That apply's own elapsed_ms (compile and map diff).
    apply_ms: f64,
    upserted: u64,
    deleted: u64,
    /// Further `policy applied` lines it caused (status writes).
    followups: usize,
    /// How long the bench waited for the agent to be idle before it.
    idle_ms: f64,
}

impl Event {
    fn json(&self) -> Value {
        json!({
            "latency_ms": self.latency_ms,
            "apply_ms": self.apply_ms,
            "upserted": self.upserted,
            "deleted": self.deleted,
            "followup_applies": self.followups,
            "waited_for_idle_ms": self.idle_ms,
        })
    }
}

/// Applies `object` once the agent is idle and times it to the agent's
/// next `policy applied` line; `then` runs before waiting for the agent to
/// be quiet again (no new line for `quiet`). The event, and that line.
fn timed_apply(
    agent: &Agent,
    cluster: &Cluster,
    object: Value,
    offset: &mut usize,
    quiet: Duration,
    then: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(Event, Found)> {
    let idle_ms = wait_idle(agent.pid(), Duration::from_secs(5));
    cluster.api.apply(object);
    let applied = Instant::now();
    let found = wait_line(agent, *offset, APPLIED, EVENT_TIMEOUT)?;
    then()?;
    let (end, more) = wait_quiet(agent, found.end, quiet, EVENT_TIMEOUT)?;
    *offset = end;
    let event = Event {
        latency_ms: found.at.saturating_duration_since(applied).as_secs_f64() * 1e3,
        apply_ms: found.field("elapsed_ms")?,
        upserted: found.field("upserted")? as u64,
        deleted: found.field("deleted")? as u64,
        followups: more.len(),
        idle_ms,
    };
    Ok((event, found))
}

struct KubernetesRound {
    sync: Sync,
    populate_ms: f64,
    /// From the sync to the last status written and applied.
    settle: Value,
    memory_settled: Memory,
    pods: Vec<Event>,
    policies: Vec<Event>,
    slices: Vec<Event>,
    memory_after_events: Memory,
    maps: Value,
}

fn kubernetes_round(
    cli: &ControlPlane,
    state: &State,
    round: usize,
    out: &Path,
) -> anyhow::Result<KubernetesRound> {
    let bed = TestBed::new("cp-k8s")?;
    let cluster = Cluster::start(&bed)?;
    let populating = Instant::now();
    state.populate(&cluster);
    let populate_ms = populating.elapsed().as_secs_f64() * 1e3;
    progress!(
        "round {round} kubernetes: {} objects in the API server ({populate_ms:.0} ms); starting the agent",
        state.namespaces.len() + state.nodes.len() + state.pods.len() + state.policies.len()
    );
    let capacity = capacity_args(cli);
    let extra: Vec<&str> = capacity.iter().map(String::as_str).collect();
    let spawned = Instant::now();
    let agent = Agent::spawn_node_kubernetes(&bed, 0, &cluster.kubeconfig, &extra)?;
    let result = (|| {
        let synced = wait_line(&agent, 0, "initial sync applied", SYNC_TIMEOUT)?;
        let memory = Memory::of(agent.pid())?;
        let cpu = cpu_ms(agent.pid());
        let log = agent.log();
        let first_apply = log
            .lines()
            .find(|l| l.contains("policy applied"))
            .context("initial sync without a `policy applied` line")?;
        let apply_field = |key| {
            log_field(first_apply, key).with_context(|| format!("no {key}= in {first_apply:?}"))
        };
        let sync = Sync {
            agent_ms: synced.field("elapsed_ms")?,
            wall_ms: synced.at.duration_since(spawned).as_secs_f64() * 1e3,
            apply_ms: apply_field("elapsed_ms")?,
            policy_entries: apply_field("policy_entries")? as u64,
            upserted: apply_field("upserted")? as u64,
            cpu_ms: cpu,
            memory,
        };
        ensure!(
            synced.field("pods")? as usize == state.pods.len()
                && synced.field("policies")? as usize == state.policies.len(),
            "the agent synced a different state: {}",
            synced.line
        );
        progress!(
            "round {round} kubernetes: initial sync {:.0} ms (agent), {:.0} ms from spawn, apply {:.0} ms, {} policy entries, RSS {:.1} MiB (peak {:.1})",
            sync.agent_ms,
            sync.wall_ms,
            sync.apply_ms,
            sync.policy_entries,
            mib(memory.rss_kib),
            mib(memory.hwm_kib)
        );

        // The agent (lease holder) writes every policy's Accepted status;
        // each write comes back as a watch event. Measure that, then wait
        // until the agent is idle.
        let settling = Instant::now();
        let mut pending: Vec<&Value> = state.policies.iter().collect();
        while !pending.is_empty() {
            pending.retain(|p| {
                let ns = p["metadata"]["namespace"].as_str().unwrap_or_default();
                let name = p["metadata"]["name"].as_str().unwrap_or_default();
                let object = cluster.api.get(MESH_API, "MeshPolicy", Some(ns), name);
                !object.is_some_and(|o| {
                    o["status"]["conditions"].as_array().is_some_and(|c| {
                        c.iter().any(|c| {
                            c["type"] == "Accepted"
                                && c["status"] == "True"
                                && c["observedGeneration"] == o["metadata"]["generation"]
                        })
                    })
                })
            });
            ensure!(
                settling.elapsed() < SYNC_TIMEOUT,
                "{} policies still without an Accepted status {SYNC_TIMEOUT:?} after the sync (e.g. {})",
                pending.len(),
                pending[0]["metadata"]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let statuses_ms = settling.elapsed().as_secs_f64() * 1e3;
        let (mut offset, applies) = wait_quiet(
            &agent,
            synced.end,
            Duration::from_millis(1000),
            SYNC_TIMEOUT,
        )?;
        let settle_ms = settling.elapsed().as_secs_f64() * 1e3 - 1000.0;
        let apply_ms: Vec<f64> = applies
            .iter()
            .filter_map(|l| log_field(l, "elapsed_ms"))
            .collect();
        let settle = json!({
            "statuses_written_ms": statuses_ms,
            "idle_after_ms": settle_ms,
            "applies": applies.len(),
            "apply_ms_total": apply_ms.iter().sum::<f64>(),
            "apply_ms_median": (!apply_ms.is_empty()).then(|| median(apply_ms.clone())),
        });
        let memory_settled = Memory::of(agent.pid())?;
        progress!(
            "round {round} kubernetes: {} statuses written {statuses_ms:.0} ms after the sync; {} more applies meanwhile ({:.0} ms of applying); RSS {:.1} MiB",
            state.policies.len(),
            applies.len(),
            apply_ms.iter().sum::<f64>(),
            mib(memory_settled.rss_kib)
        );
        check_maps(&bed, state.pods.len(), sync.policy_entries)?;

        // New pods, one at a time.
        let mut pods = Vec::new();
        let mut policy_entries = sync.policy_entries;
        for e in 0..cli.events {
            let pod = PodSpec::new(state.pods.len() + e, cli);
            let quiet = Duration::from_millis(20);
            let (event, found) =
                timed_apply(&agent, &cluster, pod.pod(), &mut offset, quiet, || Ok(()))?;
            policy_entries = found.field("policy_entries")? as u64;
            ensure!(
                event.upserted >= 1,
                "the new pod {}/{} changed nothing in the maps: {}",
                pod.namespace,
                pod.name,
                found.line
            );
            pods.push(event);
        }
        if !pods.is_empty() {
            check_maps(&bed, state.pods.len() + pods.len(), policy_entries)?;
            let lat: Vec<f64> = pods.iter().map(|e| e.latency_ms).collect();
            progress!(
                "round {round} kubernetes: {} pod events, p50 {:.1} ms, max {:.1} ms",
                pods.len(),
                percentile(&lat, 0.5),
                percentile(&lat, 1.0)
            );
        }

        // MeshPolicy edits: one more port in an ALLOW policy's first rule,
        // as `kubectl apply` of an edited manifest (status kept).
        let allows: Vec<&Value> = state
            .policies
            .iter()
            .filter(|p| p["spec"]["action"] == "ALLOW")
            .collect();
        let mut policies = Vec::new();
        for e in 0..cli.policy_events.min(allows.len()) {
            let chosen = allows[(e * 97 + 13) % allows.len()];
            let ns = chosen["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = chosen["metadata"]["name"].as_str().unwrap_or_default();
            let mut object = cluster
                .api
                .get(MESH_API, "MeshPolicy", Some(ns), name)
                .with_context(|| format!("no MeshPolicy {ns}/{name}"))?;
            object["spec"]["rules"][0]["ports"]
                .as_array_mut()
                .context("rule 0 has ports")?
                .push(json!({"port": 7000 + e}));
            // Then the new generation's status, and whatever it causes.
            let accepted = || {
                cluster
                    .wait_accepted("MeshPolicy", ns, name, EVENT_TIMEOUT)
                    .map(drop)
            };
            let quiet = Duration::from_millis(300);
            let (event, found) =
                timed_apply(&agent, &cluster, object, &mut offset, quiet, accepted)?;
            ensure!(
                event.upserted + event.deleted >= 1,
                "the edit of MeshPolicy {ns}/{name} changed nothing in the maps: {}",
                found.line
            );
            policies.push(event);
        }
        if !policies.is_empty() {
            let lat: Vec<f64> = policies.iter().map(|e| e.latency_ms).collect();
            progress!(
                "round {round} kubernetes: {} policy edits, p50 {:.1} ms, max {:.1} ms",
                policies.len(),
                percentile(&lat, 0.5),
                percentile(&lat, 1.0)
            );
        }
        // EndpointSlice changes: an endpoint of a Service turns not ready
        // (it leaves the Service's backends), then ready again.
        let mut slices = Vec::new();
        for e in 0..cli.slice_events.min(state.services.len() * 2) {
            let k = (e / 2 * 37 + 5) % state.services.len();
            let (_, slice) = service(k, cli, &state.pods, e % 2 == 1);
            let quiet = Duration::from_millis(20);
            let (event, found) =
                timed_apply(&agent, &cluster, slice, &mut offset, quiet, || Ok(()))?;
            ensure!(
                event.upserted + event.deleted >= 1,
                "EndpointSlice change {e} changed nothing in the maps: {}",
                found.line
            );
            slices.push(event);
        }
        if !slices.is_empty() {
            let lat: Vec<f64> = slices.iter().map(|e| e.latency_ms).collect();
            progress!(
                "round {round} kubernetes: {} EndpointSlice changes ({} Services), p50 {:.1} ms, max {:.1} ms",
                slices.len(),
                state.services.len(),
                percentile(&lat, 0.5),
                percentile(&lat, 1.0)
            );
        }
        let memory_after_events = Memory::of(agent.pid())?;
        let stats = agent::stats(&bed.pin_dir(0))?;
        let maps = json!({
            "endpoints": stats["maps"]["ENDPOINTS"]["entries"],
            "policy": stats["maps"]["POLICY"]["entries"],
        });
        Ok(KubernetesRound {
            sync,
            populate_ms,
            settle,
            memory_settled,
            pods,
            policies,
            slices,
            memory_after_events,
            maps,
        })
    })();
    let log = save_log(&agent, out, &format!("kubernetes-round-{round}"))?;
    if result.is_err() {
        eprintln!("agent log: {}", log.display());
    }
    result
}

struct StandaloneRound {
    sync: Sync,
    config_bytes: u64,
    maps: Value,
}

fn standalone_round(
    cli: &ControlPlane,
    state: &State,
    round: usize,
    out: &Path,
) -> anyhow::Result<StandaloneRound> {
    let bed = TestBed::new("cp-standalone")?;
    let config_bytes = state.write_config(&bed)?;
    let capacity = capacity_args(cli);
    let extra: Vec<&str> = capacity.iter().map(String::as_str).collect();
    let spawned = Instant::now();
    let agent = Agent::spawn_node(&bed, 0, &extra)?;
    let result = (|| {
        let applied = wait_line(&agent, 0, "policy applied", SYNC_TIMEOUT)?;
        let memory = Memory::of(agent.pid())?;
        let cpu = cpu_ms(agent.pid());
        let sync = Sync {
            agent_ms: applied.field("elapsed_ms")?,
            wall_ms: applied.at.duration_since(spawned).as_secs_f64() * 1e3,
            apply_ms: applied.field("elapsed_ms")?,
            policy_entries: applied.field("policy_entries")? as u64,
            upserted: applied.field("upserted")? as u64,
            cpu_ms: cpu,
            memory,
        };
        ensure!(
            applied.field("workloads")? as usize == state.pods.len(),
            "the standalone agent applied another state: {}",
            applied.line
        );
        let maps = check_maps(&bed, state.pods.len(), sync.policy_entries)?;
        progress!(
            "round {round} standalone: {:.1} MB of YAML read, compiled and applied in {:.0} ms (agent), {:.0} ms from spawn, {} policy entries, RSS {:.1} MiB (peak {:.1})",
            config_bytes as f64 / 1e6,
            sync.agent_ms,
            sync.wall_ms,
            sync.policy_entries,
            mib(memory.rss_kib),
            mib(memory.hwm_kib)
        );
        Ok(StandaloneRound {
            sync,
            config_bytes,
            maps,
        })
    })();
    let log = save_log(&agent, out, &format!("standalone-round-{round}"))?;
    if result.is_err() {
        eprintln!("agent log: {}", log.display());
    }
    result
}

// ------------------------------------------------------------ the report

/// Nearest-rank percentile of unsorted values (`p` in 0..=1).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency_summary(events: &[&Event]) -> Value {
    if events.is_empty() {
        return Value::Null;
    }
    let lat: Vec<f64> = events.iter().map(|e| e.latency_ms).collect();
    let apply: Vec<f64> = events.iter().map(|e| e.apply_ms).collect();
    let outside: Vec<f64> = events.iter().map(|e| e.latency_ms - e.apply_ms).collect();
    json!({
        "events": events.len(),
        "p50_ms": percentile(&lat, 0.5),
        "p99_ms": percentile(&lat, 0.99),
        "max_ms": percentile(&lat, 1.0),
        "agent_apply_p50_ms": percentile(&apply, 0.5),
        "agent_apply_max_ms": percentile(&apply, 1.0),
        "outside_the_apply_p50_ms": percentile(&outside, 0.5),
        "followup_applies": events.iter().map(|e| e.followups).sum::<usize>(),
    })
}

pub fn run(cli: &ControlPlane, out: &Path) -> anyhow::Result<()> {
    ensure!(cli.rounds > 0, "--rounds must be at least 1");
    ensure!(
        cli.pods > 0 && cli.namespaces > 0 && cli.service_accounts > 0 && cli.nodes > 0,
        "--pods, --namespaces, --service-accounts and --nodes must be at least 1"
    );
    ensure!(cli.nodes < 250 * 250, "at most {} nodes", 250 * 250 - 1);
    ensure!(
        cli.pods + cli.events < (1 << 22),
        "pod addresses come from 10.64.0.0/10"
    );
    let run_started = *crate::STARTED.get_or_init(Instant::now);
    let (load_at_start, ticks_at_start) = (loadavg(), CpuTicks::now());
    let state = State::generate(cli);
    let identities = state.identities();
    progress!(
        "{} pods ({identities} identities in {} namespaces) on {} remote nodes, {} MeshPolicies {:?}",
        state.pods.len(),
        state.namespaces.len(),
        state.nodes.len(),
        state.policies.len(),
        state.count_actions()
    );

    let mut k8s = Vec::new();
    let mut standalone = Vec::new();
    for round in 0..cli.rounds {
        k8s.push(kubernetes_round(cli, &state, round, out)?);
        standalone.push(standalone_round(cli, &state, round, out)?);
    }
    // Both modes compiled the same state into the same entries.
    for (k, s) in k8s.iter().zip(&standalone) {
        ensure!(
            k.sync.policy_entries == s.sync.policy_entries,
            "Kubernetes mode compiled {} policy entries, standalone {} from the same state",
            k.sync.policy_entries,
            s.sync.policy_entries
        );
    }

    let med = |values: Vec<f64>| median(values);
    let k_sync = |f: fn(&Sync) -> f64| med(k8s.iter().map(|r| f(&r.sync)).collect());
    let s_sync = |f: fn(&Sync) -> f64| med(standalone.iter().map(|r| f(&r.sync)).collect());
    type Row = (&'static str, fn(&Sync) -> f64);
    let rows: [Row; 6] = [
        ("initial sync, agent (ms)", |s| s.agent_ms),
        ("spawn -> state applied (ms)", |s| s.wall_ms),
        ("first apply, std incl. read (ms)", |s| s.apply_ms),
        ("agent CPU until applied (ms)", |s| s.cpu_ms),
        ("RSS once applied (MiB)", |s| mib(s.memory.rss_kib)),
        ("peak RSS, VmHWM (MiB)", |s| mib(s.memory.hwm_kib)),
    ];
    let mut table = format!(
        "{:<36} {:>12} {:>12} {:>10}\n",
        "METRIC (medians)", "KUBERNETES", "STANDALONE", "K8S/STD"
    );
    let mut medians = serde_json::Map::new();
    for (name, f) in rows {
        let (k, s) = (k_sync(f), s_sync(f));
        table += &format!("{name:<36} {k:>12.1} {s:>12.1} {:>10}\n", times(k / s));
        medians.insert(
            name.into(),
            json!({ "kubernetes": k, "standalone": s, "ratio": k / s }),
        );
    }
    let settled_rss = med(k8s.iter().map(|r| mib(r.memory_settled.rss_kib)).collect());
    let after_rss = med(k8s
        .iter()
        .map(|r| mib(r.memory_after_events.rss_kib))
        .collect());
    let after_hwm = med(k8s
        .iter()
        .map(|r| mib(r.memory_after_events.hwm_kib))
        .collect());
    let statuses_ms = med(k8s
        .iter()
        .map(|r| r.settle["statuses_written_ms"].as_f64().unwrap_or(0.0))
        .collect());
    let settle_applies = med(k8s
        .iter()
        .map(|r| r.settle["applies"].as_f64().unwrap_or(0.0))
        .collect());
    let listing = k_sync(|s| s.agent_ms - s.apply_ms);
    table += &format!(
        "{:<36} {listing:>12.1}\n",
        "  k8s: sync before the first apply"
    );
    medians.insert(
        "kubernetes: initial sync before the first apply (ms)".into(),
        json!(listing),
    );
    table += &format!(
        "{:<36} {settled_rss:>12.1}\n{:<36} {after_rss:>12.1}\n{:<36} {after_hwm:>12.1}\n",
        "RSS, statuses written (MiB)", "RSS after the events (MiB)", "VmHWM after the events (MiB)"
    );
    table += &format!(
        "{:<36} {statuses_ms:>12.0}\n{:<36} {settle_applies:>12.0}\n",
        "sync -> all statuses written (ms)", "  full applies meanwhile"
    );

    let pod_events: Vec<&Event> = k8s.iter().flat_map(|r| &r.pods).collect();
    let policy_events: Vec<&Event> = k8s.iter().flat_map(|r| &r.policies).collect();
    let slice_events: Vec<&Event> = k8s.iter().flat_map(|r| &r.slices).collect();
    let pod_latency = latency_summary(&pod_events);
    let policy_latency = latency_summary(&policy_events);
    let slice_latency = latency_summary(&slice_events);
    let mut events_table = format!(
        "{:<26} {:>6} {:>8} {:>8} {:>8} {:>16} {:>14}\n",
        "EVENT -> MAP (Kubernetes)",
        "EVENTS",
        "p50 ms",
        "p99 ms",
        "max ms",
        "AGENT APPLY p50",
        "THE REST p50"
    );
    for (name, s) in [
        ("new pod", &pod_latency),
        ("MeshPolicy edit", &policy_latency),
        ("EndpointSlice change", &slice_latency),
    ] {
        if s.is_null() {
            continue;
        }
        events_table += &format!(
            "{name:<26} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>13.1} ms {:>11.1} ms\n",
            s["events"].as_u64().unwrap_or(0),
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0),
            s["max_ms"].as_f64().unwrap_or(0.0),
            s["agent_apply_p50_ms"].as_f64().unwrap_or(0.0),
            s["outside_the_apply_p50_ms"].as_f64().unwrap_or(0.0),
        );
    }

    // Targets: the sync from the agent's own figure, memory from the
    // highest steady RSS seen, events over every pod and policy event.
    let sync_ms = k_sync(|s| s.agent_ms);
    let max_rss = k8s
        .iter()
        .flat_map(|r| {
            [
                r.sync.memory.rss_kib,
                r.memory_settled.rss_kib,
                r.memory_after_events.rss_kib,
            ]
        })
        .max()
        .map_or(0.0, mib);
    let all_events: Vec<&Event> = pod_events.iter().chain(&policy_events).copied().collect();
    let event_p99 = (!all_events.is_empty()).then(|| {
        percentile(
            &all_events.iter().map(|e| e.latency_ms).collect::<Vec<_>>(),
            0.99,
        )
    });
    let targets = json!([
        {
            "target": format!("initial sync < {TARGET_SYNC_MS} ms"),
            "measured": sync_ms,
            "met": sync_ms < TARGET_SYNC_MS,
        },
        {
            "target": format!("agent RSS < {TARGET_RSS_MIB} MiB (highest VmRSS seen)"),
            "measured": max_rss,
            "met": max_rss < TARGET_RSS_MIB,
        },
        {
            "target": format!("event -> map <= {TARGET_EVENT_MS} ms (p99, pods and policies)"),
            "measured": event_p99,
            "met": event_p99.is_some_and(|p| p <= TARGET_EVENT_MS),
        },
        {
            "target": format!("EndpointSlice change -> map <= {TARGET_EVENT_MS} ms (p99)"),
            "measured": slice_latency["p99_ms"],
            "met": slice_latency["p99_ms"].as_f64().is_some_and(|p| p <= TARGET_EVENT_MS),
        },
    ]);
    let mut targets_table = String::new();
    for t in targets.as_array().into_iter().flatten() {
        let measured = t["measured"]
            .as_f64()
            .map_or("-".into(), |m| format!("{m:.1}"));
        targets_table += &format!(
            "{:<58} {measured:>10}  {}\n",
            t["target"].as_str().unwrap_or_default(),
            if t["met"] == true { "met" } else { "NOT MET" }
        );
    }

    let total = run_started.elapsed().as_secs_f64();
    let steal_pct = ticks_at_start.steal_pct();
    let report = json!({
        "benchmark": "control-plane",
        "machine": machine(),
        "commit": commit(),
        "cluster": {
            "pods": state.pods.len(),
            "namespaces": state.namespaces.len(),
            "service_accounts_per_namespace": cli.service_accounts,
            "identities": identities,
            "remote_nodes": state.nodes.len(),
            "policies": state.policies.len(),
            "policy_actions": state.count_actions(),
        },
        "agent_flags": capacity_args(cli),
        "modes": {
            "kubernetes": "mesh-agent run --kubernetes against the in-test API server (list/watch over HTTP on node 0's loopback); sync = its `initial sync applied` elapsed_ms, from client creation to the first apply of the full listed state",
            "standalone": "mesh-agent run --config-dir with the same state as Workload, MeshNode and MeshPolicy documents (one file of each kind per namespace); sync = its first `policy applied` elapsed_ms (read, compile, apply)",
        },
        "rounds": cli.rounds,
        "medians": medians,
        "kubernetes_memory_mib": {
            "statuses_written_rss": settled_rss,
            "after_events_rss": after_rss,
            "after_events_hwm": after_hwm,
        },
        "event_latency": {
            "measured": "from ApiServer::apply returning to the agent's `policy applied` line (log polled every 1 ms)",
            "pods": pod_latency,
            "policies": policy_latency,
            "endpoint_slices": slice_latency,
        },
        "targets": targets,
        "kubernetes_rounds": k8s.iter().map(|r| json!({
            "populate_ms": r.populate_ms,
            "sync": r.sync.json(),
            "after_sync": r.settle,
            "memory_statuses_written": r.memory_settled.json(),
            "memory_after_events": r.memory_after_events.json(),
            "maps_after_events": r.maps,
            "pod_events": r.pods.iter().map(Event::json).collect::<Vec<_>>(),
            "policy_events": r.policies.iter().map(Event::json).collect::<Vec<_>>(),
            "endpoint_slice_events": r.slices.iter().map(Event::json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "standalone_rounds": standalone.iter().map(|r| json!({
            "config_bytes": r.config_bytes,
            "sync": r.sync.json(),
            "maps": r.maps,
        })).collect::<Vec<_>>(),
        "total_seconds": total,
        // The machine is shared: how busy it was around the run.
        "loadavg": { "start": load_at_start, "end": loadavg() },
        "steal_pct": steal_pct,
    });

    println!(
        "\ncontrol-plane: {} pods ({identities} identities, {} namespaces, {} remote nodes) and {} MeshPolicies\n\
         ({} policy entries); Kubernetes mode against the in-test API server vs the same state as files\n\
         (standalone), {} alternating rounds, medians\n",
        state.pods.len(),
        state.namespaces.len(),
        state.nodes.len(),
        state.policies.len(),
        k8s[0].sync.policy_entries,
        cli.rounds
    );
    print!("{table}\n{events_table}");
    println!("\ntargets:");
    print!("{targets_table}");
    std::fs::create_dir_all(out)?;
    let path = out.join("control-plane.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    plot_rounds(&k8s, &standalone, &path)?;
    println!(
        "\ntotal {total:.0} s (load average {load_at_start} at the start, {} at the end; {steal_pct:.1}% of the CPU time stolen)\nJSON: {}",
        loadavg(),
        path.display()
    );
    Ok(())
}

/// Each round of both modes: time to the first full apply, the agent's
/// memory, and how long changes took to reach the maps.
fn plot_rounds(
    k8s: &[KubernetesRound],
    standalone: &[StandaloneRound],
    json: &Path,
) -> anyhow::Result<()> {
    let events_p50 = |events: &[Event]| {
        (!events.is_empty()).then(|| crate::median(events.iter().map(|e| e.latency_ms).collect()))
    };
    let mut rounds: Vec<Value> = k8s
        .iter()
        .enumerate()
        .map(|(round, r)| {
            json!({
                "variant": "kubernetes", "round": round,
                "sync_ms": r.sync.agent_ms,
                "rss_mib": mib(r.memory_after_events.rss_kib),
                "pods_ms": events_p50(&r.pods),
                "policies_ms": events_p50(&r.policies),
                "slices_ms": events_p50(&r.slices),
            })
        })
        .collect();
    rounds.extend(standalone.iter().enumerate().map(|(round, r)| {
        json!({
            "variant": "standalone", "round": round,
            "sync_ms": r.sync.agent_ms,
            "rss_mib": mib(r.sync.memory.rss_kib),
        })
    }));
    let both = ["kubernetes", "standalone"];
    let panel = |title: &str, unit, variants: &[&'static str], key: &str| {
        super::plot::Panel::of_rounds(title, unit, &rounds, variants, |_| true, key, 1.0)
    };
    super::plot::beside(
        json,
        "control-plane: Kubernetes mode against the in-test API server vs the same state as files",
        &[
            panel("first full apply", "ms", &both, "sync_ms"),
            panel(
                "agent RSS (Kubernetes: after the events)",
                "MiB",
                &both,
                "rss_mib",
            ),
            panel("pod event to maps, p50", "ms", &["kubernetes"], "pods_ms"),
            panel(
                "MeshPolicy event to maps, p50",
                "ms",
                &["kubernetes"],
                "policies_ms",
            ),
            panel(
                "EndpointSlice event to maps, p50",
                "ms",
                &["kubernetes"],
                "slices_ms",
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> ControlPlane {
        ControlPlane {
            pods: 10_000,
            policies: 1_000,
            namespaces: 100,
            service_accounts: 50,
            nodes: 20,
            rounds: 1,
            events: 0,
            policy_events: 0,
            services: 2_000,
            slice_events: 0,
            max_endpoints: 1,
            max_policy: 1,
        }
    }

    #[test]
    fn the_state_has_the_shape_asked_for() {
        let state = State::generate(&cli());
        assert_eq!(state.identities(), 5_000);
        let ips: std::collections::BTreeSet<_> = state.pods.iter().map(|p| p.ip).collect();
        assert_eq!(ips.len(), 10_000);
        assert!(state.pods.iter().all(|p| p.node != "node-0"));
        let names: std::collections::BTreeSet<String> = state
            .policies
            .iter()
            .map(|p| format!("{}/{}", p["metadata"]["namespace"], p["metadata"]["name"]))
            .collect();
        assert_eq!(names.len(), 1_000, "policy names are unique");
        assert_eq!(state.count_actions()["DENY"], 100);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
