//! Flow events: the kernel's verdicts, named and served to `mesh-agent flows`.
//!
//! The kernel writes one [`FlowEvent`] per judged connection (or inbound
//! flow) into the `FLOWS` ring buffer. The agent is its only reader: it
//! names identities and rules, keeps the latest events, and streams them
//! to clients of its socket (`<state-dir>/agent.sock`), one JSON object per
//! line. A ring buffer has a single consumer position, so CLI processes
//! never read it themselves (they would steal each other's events).
use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aya::maps::{Map, MapData, RingBuf};
use mesh_common::service::ServiceKey;
use mesh_common::{
    map_names,
    policy::{
        FlowEvent, Hook, PROTO_TCP, PROTO_UDP, RULE_MESH_DEFAULT, RULE_NO_POLICY, RULE_NON_MESH,
        RULE_NOT_ALLOWED, RULE_REFUSED_IDENTITY, RULE_REFUSED_POLICY, RULE_STRICT_MTLS,
    },
};
use prometheus_client::{encoding::EncodeLabelSet, metrics::counter::Counter, registry::Registry};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast,
};
use tracing::{debug, warn};

use mesh_datapath::sys::{async_ring_buf, read_pod};
use series::BoundedFamily;

pub mod map;
mod series;
use mesh_policy::state::NodeState;

/// How many recent events the agent keeps for `flows` without `--follow`.
const HISTORY: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowEnd {
    pub identity: String,
    /// The numeric identity, as a decimal string.
    pub id: String,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowRecord {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub verdict: String,
    /// Where the kernel judged it: connect, sendmsg or ingress.
    pub hook: String,
    pub proto: String,
    pub src: FlowEnd,
    pub dst: FlowEnd,
    pub rule: u32,
    /// The policy rule (or the default) that decided.
    pub reason: String,
    /// Tunnels: the peer's SPIFFE ID that mutual TLS verified (the source's
    /// on the destination node, the destination's on the source node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<String>,
    /// The Service the client dialled, when `dst` is the backend the
    /// kernel chose for it: `namespace/name`, or its address when no name
    /// is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Events of the same source the kernel left out since its last
    /// reported one (over `--flow-events-per-source`), and how many of
    /// those were denials. Their verdicts were applied all the same.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed_denied: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The Service whose address `key` is: `namespace/name` when `names` knows
/// it, else the address.
fn service_name(names: &NodeState, key: &ServiceKey) -> String {
    names.service(key).map_or_else(
        || {
            let ip = std::net::IpAddr::from(mesh_common::policy::IpKey { ip: key.ip });
            std::net::SocketAddr::new(ip, key.port).to_string()
        },
        |s| s.key(),
    )
}

impl FlowRecord {
    pub fn from_event(ev: &FlowEvent, names: &NodeState, boot_offset: f64) -> Self {
        let end = |identity: u64, ip: &[u32; 4], port: u16| {
            let ip = (*ip != [0; 4])
                .then(|| std::net::IpAddr::from(mesh_common::policy::IpKey { ip: *ip }));
            FlowEnd {
                identity: names.identity_name(identity),
                id: identity.to_string(),
                ip,
                port: (port != 0).then_some(port),
            }
        };
        Self {
            time: boot_offset + ev.timestamp_ns as f64 / 1e9,
            verdict: ev.verdict.action().name().into(),
            hook: Hook::from_u8(ev.hook).map_or("?", Hook::name).into(),
            proto: match ev.proto {
                PROTO_TCP => "tcp".into(),
                PROTO_UDP => "udp".into(),
                p => p.to_string(),
            },
            src: end(ev.src_identity, &ev.src_ip, ev.src_port),
            dst: end(ev.dst_identity, &ev.dst_ip, ev.dst_port),
            rule: ev.verdict.rule,
            reason: names.rule_name(ev.verdict.rule),
            mtls: None,
            service: (ev.service_port != 0).then(|| {
                service_name(
                    names,
                    &ServiceKey::new(ev.service_ip, ev.service_port, ev.proto),
                )
            }),
            suppressed: ev.suppressed,
            suppressed_denied: ev.suppressed_denied,
        }
    }
}

/// A verdict the agent itself reached on a tunnel (`tunnel-in` on the
/// destination's node, `tunnel-out` when the peer refused or could not be
/// reached).
#[derive(Debug, Clone)]
pub struct TunnelFlow {
    pub hook: &'static str,
    pub allowed: bool,
    pub src_identity: u64,
    pub dst_identity: u64,
    pub dst: SocketAddr,
    /// The rule that decided, when policy did.
    pub rule: Option<u32>,
    /// Why, when it is not a rule (or the peer's own explanation).
    pub reason: Option<String>,
    pub mtls: Option<String>,
}

/// Now, since the Unix epoch.
fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Wall-clock seconds at CLOCK_MONOTONIC zero (the kernel stamps events
/// with bpf_ktime_get_ns, which is CLOCK_MONOTONIC).
fn monotonic_epoch() -> f64 {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0);
    wall_clock().as_secs_f64() - mono
}

/// The agent's side: the recent events, the live stream, and the verdicts
/// counted for `/metrics`.
#[derive(Clone)]
pub struct FlowHub {
    /// Records are shared between the history and the live stream: one
    /// allocation each, and the stream's ring holds pointers (a ring of
    /// records would take a megabyte and a half at start).
    history: Arc<Mutex<VecDeque<Arc<FlowRecord>>>>,
    live: broadcast::Sender<Arc<FlowRecord>>,
    /// What the control loop last applied (shared, so `/config_dump` takes
    /// it without a copy).
    names: Arc<Mutex<Arc<NodeState>>>,
    metrics: FlowMetrics,
    /// Who talks to whom, for `mesh-agent graph`.
    map: map::ServiceMap,
    /// Whether connections to other nodes' workloads go through tunnels.
    mtls: bool,
}

impl FlowHub {
    pub fn new(metrics: FlowMetrics, mtls: bool) -> Self {
        Self {
            history: Arc::default(),
            live: broadcast::channel(HISTORY).0,
            names: Arc::default(),
            metrics,
            map: map::ServiceMap::default(),
            mtls,
        }
    }

    /// New names after each applied configuration.
    pub fn set_names(&self, names: impl Into<Arc<NodeState>>) {
        let old = std::mem::replace(&mut *self.names.lock().unwrap(), names.into());
        // Freed outside the lock, which the ring buffer reader takes per event.
        drop(old);
    }

    /// The names in force: what the control loop last applied.
    pub fn names(&self) -> Arc<NodeState> {
        self.names.lock().unwrap().clone()
    }

    /// The SPIFFE ID of a numeric identity, from the names in force.
    pub fn identity_name(&self, identity: u64) -> String {
        self.names.lock().unwrap().identity_name(identity)
    }

    /// Reports a tunnel verdict alongside the kernel's.
    pub fn tunnel(&self, flow: TunnelFlow) {
        let names = self.names.lock().unwrap();
        let end = |identity: u64, ip: Option<IpAddr>, port: Option<u16>| FlowEnd {
            identity: names.identity_name(identity),
            id: identity.to_string(),
            ip,
            port,
        };
        let record = FlowRecord {
            time: wall_clock().as_secs_f64(),
            verdict: if flow.allowed { "ALLOW" } else { "DENY" }.into(),
            hook: flow.hook.into(),
            proto: "tcp".into(),
            src: end(flow.src_identity, None, None),
            dst: end(
                flow.dst_identity,
                Some(flow.dst.ip()),
                Some(flow.dst.port()),
            ),
            rule: flow.rule.unwrap_or(0),
            reason: match (flow.rule, flow.reason) {
                (_, Some(reason)) => reason,
                (Some(rule), None) => names.rule_name(rule),
                (None, None) => String::new(),
            },
            mtls: flow.mtls,
            service: None,
            suppressed: 0,
            suppressed_denied: 0,
        };
        let path = map::path_of(&record, &names, self.mtls);
        drop(names);
        self.publish(record, path);
    }

    /// The name of a rule, from the names in force.
    pub fn rule_name(&self, rule: u32) -> String {
        self.names.lock().unwrap().rule_name(rule)
    }

    /// Logs, counts and keeps `record`, which took `path` (found by the
    /// caller under the names lock it made the record under).
    fn publish(&self, record: FlowRecord, path: map::Path) {
        debug!(
            verdict = %record.verdict,
            hook = %record.hook,
            src = %record.src.identity,
            dst = %record.dst.identity,
            src_addr = record.src.ip.map(tracing::field::display),
            dst_addr = record.dst.ip.map(tracing::field::display),
            port = record.dst.port,
            proto = %record.proto,
            reason = %record.reason,
            "flow"
        );
        self.metrics.record(&record);
        if let Some(verdict) = map::Verdict::of(&record) {
            let key = map::EdgeKey {
                src: record.src.identity.clone(),
                dst: record.dst.identity.clone(),
                service: record.service.clone(),
                verdict,
                path,
            };
            self.map.count(key, record.time as u64);
        }
        let record = Arc::new(record);
        let mut history = self.history.lock().unwrap();
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(record.clone());
        drop(history);
        let _ = self.live.send(record);
    }

    /// Reads the kernel's ring buffer until the agent stops.
    pub async fn read_kernel_events(self, pin_dir: PathBuf) -> anyhow::Result<()> {
        let path = pin_dir.join(map_names::FLOWS);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let ring: RingBuf<MapData> = Map::from_map_data(data)?.try_into()?;
        let mut fd = async_ring_buf(ring).context("polling the flow ring buffer")?;
        let epoch = monotonic_epoch();
        loop {
            let mut guard = fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                let event = read_pod::<FlowEvent>(&item);
                drop(item);
                if let Some(ev) = event {
                    let names = self.names.lock().unwrap();
                    let record = FlowRecord::from_event(&ev, &names, epoch);
                    let path = map::path_of(&record, &names, self.mtls);
                    drop(names);
                    self.publish(record, path);
                }
                // A pod retrying a denied connect in a tight loop produces
                // events as fast as this loop reads them: without a yield
                // now and then it holds a worker for as long as the flood
                // lasts, starving tunnels and blocking shutdown.
                tokio::task::consume_budget().await;
            }
            guard.clear_ready();
        }
    }

    /// Serves `mesh-agent flows` on `socket` until the agent stops.
    pub async fn serve(self, socket: PathBuf) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(&socket);
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        loop {
            let (conn, _) = listener.accept().await?;
            let hub = self.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.serve_client(conn).await {
                    debug!(error = %e, "flows client went away");
                }
            });
        }
    }

    async fn serve_client(self, conn: UnixStream) -> anyhow::Result<()> {
        let (read, mut write) = conn.into_split();
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        let request: Request = serde_json::from_str(line.trim()).context("bad request")?;
        if let Some(query) = request.map {
            let since = query.since_secs.map(Duration::from_secs);
            let reply = self.map.edges(since, wall_clock().as_secs());
            let mut reply = serde_json::to_vec(&reply)?;
            reply.push(b'\n');
            write.write_all(&reply).await?;
            return Ok(());
        }
        // Subscribe before copying the history, so no event falls between.
        let mut live = self.live.subscribe();
        let history: Vec<Arc<FlowRecord>> = self.history.lock().unwrap().iter().cloned().collect();
        for record in history {
            write_record(&mut write, &record).await?;
        }
        if !request.follow {
            return Ok(());
        }
        loop {
            match live.recv().await {
                Ok(record) => write_record(&mut write, &record).await?,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(missed = n, "a flows client is too slow; events skipped");
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

async fn write_record(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    record: &FlowRecord,
) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(record)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    Ok(())
}

/// One line a client of the agent's socket sends: the flows (recent, and
/// new ones with `follow`), or the service map's edges with `map`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Request {
    #[serde(default)]
    pub follow: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapQuery>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct MapQuery {
    /// Only connections of the last this many seconds (whole minutes, at
    /// most an hour); all since the agent started when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_secs: Option<u64>,
}

/// Whether `identity` (a SPIFFE ID, `world`, a number) is what the
/// operator's `--identity` filter names: equal, or a prefix ending in `*`.
pub fn identity_matches(filter: &str, identity: &str) -> bool {
    match filter.strip_suffix('*') {
        Some(prefix) => identity.starts_with(prefix),
        None => identity == filter,
    }
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.sock")
}

/// A client's connection to the agent's socket, with `request` sent
/// (`flows` and `graph` are its clients; they block, the agent does not).
pub fn ask(state_dir: &Path, request: &Request) -> anyhow::Result<std::os::unix::net::UnixStream> {
    use std::io::Write as _;
    let socket = socket_path(state_dir);
    let mut conn = std::os::unix::net::UnixStream::connect(&socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `mesh-agent run` running with --state-dir {}?)",
            socket.display(),
            state_dir.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    conn.write_all(&line)?;
    Ok(conn)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    hook: String,
    src_identity: String,
    dst_identity: String,
    verdict: String,
    reason: &'static str,
}

/// The flows' metrics: verdicts, as the flow hub names them.
#[derive(Clone, Debug)]
pub struct FlowMetrics {
    verdicts: BoundedFamily<VerdictLabels>,
    service_verdicts: BoundedFamily<ServiceVerdictLabels>,
    evicted: Counter,
}

impl Default for FlowMetrics {
    fn default() -> Self {
        let evicted = Counter::default();
        Self {
            verdicts: BoundedFamily::new(MAX_SERIES, evicted.clone()),
            service_verdicts: BoundedFamily::new(MAX_SERIES, evicted.clone()),
            evicted,
        }
    }
}

/// The most series each verdict family keeps (the least recently counted
/// go first).
pub const MAX_SERIES: usize = 10_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceVerdictLabels {
    service: String,
    verdict: String,
}

impl FlowMetrics {
    /// Made and registered (`verdicts`) in `registry`, the agent's `flow`
    /// sub-registry.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "verdicts",
            "Verdicts on new connections and flows, by where they were judged (connect, \
             sendmsg, ingress: the kernel; tunnel-in, tunnel-out: the agent), the source and \
             destination identities (SPIFFE IDs, world, or the number when no name is known), \
             the verdict and what decided it; at most 10,000 series, the least recently \
             counted dropped first",
            metrics.verdicts.family(),
        );
        registry.register(
            "verdict_series_evicted",
            "Series of verdicts and service_verdicts dropped to stay within 10,000 each",
            metrics.evicted.clone(),
        );
        registry.register(
            "service_verdicts",
            "Verdicts on new connections and datagrams a client sent to a Service address, \
             by Service (namespace/name, or the address when no name is known) and verdict",
            metrics.service_verdicts.family(),
        );
        metrics
    }

    pub fn record(&self, flow: &FlowRecord) {
        let labels = VerdictLabels {
            hook: flow.hook.clone(),
            src_identity: flow.src.identity.clone(),
            dst_identity: flow.dst.identity.clone(),
            verdict: flow.verdict.to_ascii_lowercase(),
            // Tunnel refusals that no rule decided carry rule 0.
            reason: reason_label((flow.rule != 0).then_some(flow.rule)),
        };
        self.verdicts.inc(&labels);
        if let Some(service) = &flow.service {
            let labels = ServiceVerdictLabels {
                service: service.clone(),
                verdict: flow.verdict.to_ascii_lowercase(),
            };
            self.service_verdicts.inc(&labels);
        }
    }
}

/// The `reason` label: the reserved rule that decided, `policy` for a rule
/// of a MeshPolicy, `tunnel` for a tunnel refused for another reason (no
/// certificate, peer unreachable, refused by the peer).
pub fn reason_label(rule: Option<u32>) -> &'static str {
    match rule {
        None => "tunnel",
        Some(RULE_MESH_DEFAULT) => "mesh_default",
        Some(RULE_NON_MESH) => "non_mesh",
        Some(RULE_NOT_ALLOWED) => "not_allowed",
        Some(RULE_NO_POLICY) => "no_policy",
        Some(RULE_STRICT_MTLS) => "strict_mtls",
        Some(RULE_REFUSED_IDENTITY) => "refused_identity",
        Some(RULE_REFUSED_POLICY) => "refused_policy",
        Some(_) => "policy",
    }
}
