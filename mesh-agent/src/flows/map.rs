//! The service map's counters: connections per edge of "who talks to whom"
//! on this node, counted as the flow hub publishes each verdict, and served
//! to `mesh-agent graph` over the agent's socket.
//!
//! An edge is (source identity, destination identity, the Service dialled,
//! verdict, path). Counts are kept in total and per minute for the last
//! hour, so `graph --since 5m` shows what happened lately. Like the verdict
//! series, at most [`MAX_EDGES`] edges are kept, the least recently counted
//! dropped first: identities come and go with pods.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{FlowRecord, series::Recency};
use mesh_policy::state::NodeState;

/// The most edges the map keeps.
pub const MAX_EDGES: usize = 10_000;
/// How far back `--since` can look: one counter per minute.
pub const WINDOW_MINUTES: u64 = 60;

/// How the connection travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Both ends on this node (the kernel judges it; the short-circuit may
    /// carry it).
    SameNode,
    /// Through the agents' mutual-TLS tunnel.
    Mtls,
    /// Across nodes without a tunnel.
    Plaintext,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::SameNode => "same node",
            Path::Mtls => "mTLS",
            Path::Plaintext => "plaintext",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Denied,
    Audited,
}

impl Verdict {
    /// From a flow record's `ALLOW`, `DENY` or `AUDIT`.
    pub fn of(record: &FlowRecord) -> Option<Self> {
        match record.verdict.as_str() {
            "ALLOW" => Some(Verdict::Allowed),
            "DENY" => Some(Verdict::Denied),
            "AUDIT" => Some(Verdict::Audited),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Audited => "audited",
        }
    }
}

/// What an edge is counted under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EdgeKey {
    /// SPIFFE ID, `world`, or the number when no name is known.
    pub src: String,
    pub dst: String,
    /// The Service the client dialled (`namespace/name` or its address),
    /// when `dst` is the backend the kernel chose for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub verdict: Verdict,
    pub path: Path,
}

/// An edge and its count, as `graph` receives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    #[serde(flatten)]
    pub key: EdgeKey,
    /// Connections (and UDP flows) in the window asked for.
    pub connections: u64,
    /// Seconds since the Unix epoch of the last one counted.
    pub last_seen: u64,
}

/// The agent's answer to a map request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MapReply {
    pub edges: Vec<Edge>,
    /// Edges dropped to stay within [`MAX_EDGES`] since the agent started.
    pub evicted: u64,
}

/// Which path `record` took (or, denied, would have taken): the tunnels'
/// own verdicts are mTLS; a local workload's connection to a workload of
/// this node stays on it; to another node's workload it goes through the
/// tunnel when the agent runs mTLS and it is TCP; anything else crossed
/// the network as it was.
pub fn path_of(record: &FlowRecord, names: &NodeState, mtls: bool) -> Path {
    match record.hook.as_str() {
        "tunnel-in" | "tunnel-out" => Path::Mtls,
        "connect" | "sendmsg" => match record.dst.ip.and_then(|ip| names.workload_at(ip)) {
            Some(w) if w.local => Path::SameNode,
            Some(_) if mtls && record.proto == "tcp" => Path::Mtls,
            _ => Path::Plaintext,
        },
        _ => Path::Plaintext,
    }
}

#[derive(Debug)]
struct Counts {
    total: u64,
    last_seen: u64,
    /// (minute since the epoch, connections in it), at `minute % 60`.
    minutes: [(u32, u32); WINDOW_MINUTES as usize],
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            total: 0,
            last_seen: 0,
            minutes: [(0, 0); WINDOW_MINUTES as usize],
        }
    }
}

impl Counts {
    fn count(&mut self, now: u64) {
        self.total += 1;
        self.last_seen = now;
        let minute = (now / 60) as u32;
        let slot = &mut self.minutes[minute as usize % WINDOW_MINUTES as usize];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 = slot.1.saturating_add(1);
    }

    /// Connections in the `minutes` latest minutes, this one included.
    fn within(&self, minutes: u64, now: u64) -> u64 {
        let this = now / 60;
        self.minutes
            .iter()
            .filter(|(m, _)| u64::from(*m) + minutes > this && u64::from(*m) <= this)
            .map(|(_, n)| u64::from(*n))
            .sum()
    }
}

#[derive(Debug)]
struct Edges {
    counts: HashMap<EdgeKey, Counts>,
    recency: Recency<EdgeKey>,
    evicted: u64,
}

/// The counters, shared by the flow hub's clones.
#[derive(Clone, Debug)]
pub struct ServiceMap {
    edges: Arc<Mutex<Edges>>,
    bound: usize,
}

impl Default for ServiceMap {
    fn default() -> Self {
        Self::with_bound(MAX_EDGES)
    }
}

impl ServiceMap {
    pub fn with_bound(bound: usize) -> Self {
        Self {
            edges: Arc::new(Mutex::new(Edges {
                counts: HashMap::new(),
                recency: Recency::new(),
                evicted: 0,
            })),
            bound,
        }
    }

    /// Counts one connection on `key` at `now` (seconds since the epoch).
    pub fn count(&self, key: EdgeKey, now: u64) {
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        for oldest in edges.recency.touch(&key, self.bound) {
            edges.counts.remove(&oldest);
            edges.evicted += 1;
        }
        edges.counts.entry(key).or_default().count(now);
    }

    /// The edges with connections in the last `since` (rounded up to whole
    /// minutes, at most an hour), or since the agent started; in order.
    pub fn edges(&self, since: Option<Duration>, now: u64) -> MapReply {
        let minutes = since.map(|d| d.as_secs().div_ceil(60).clamp(1, WINDOW_MINUTES));
        let edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<Edge> = edges
            .counts
            .iter()
            .filter_map(|(key, counts)| {
                let connections = match minutes {
                    Some(m) => counts.within(m, now),
                    None => counts.total,
                };
                (connections > 0).then(|| Edge {
                    key: key.clone(),
                    connections,
                    last_seen: counts.last_seen,
                })
            })
            .collect();
        list.sort_by(|a, b| a.key.cmp(&b.key));
        MapReply {
            edges: list,
            evicted: edges.evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::FlowEnd;

    fn key(src: &str, dst: &str, verdict: Verdict) -> EdgeKey {
        EdgeKey {
            src: src.into(),
            dst: dst.into(),
            service: None,
            verdict,
            path: Path::SameNode,
        }
    }

    #[test]
    fn counts_by_edge_and_by_minute() {
        let map = ServiceMap::default();
        let t0 = 1_800_000_000 / 60 * 60;
        map.count(key("a", "b", Verdict::Allowed), t0);
        map.count(key("a", "b", Verdict::Allowed), t0 + 59);
        map.count(key("a", "b", Verdict::Denied), t0 + 30);
        // Ten minutes later, once more.
        map.count(key("a", "b", Verdict::Allowed), t0 + 600);
        let now = t0 + 610;
        let all = map.edges(None, now).edges;
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].key.verdict, Verdict::Allowed);
        assert_eq!((all[0].connections, all[0].last_seen), (3, t0 + 600));
        assert_eq!(all[1].connections, 1);
        // The last 5 minutes: one allowed, and no denied edge at all.
        let recent = map.edges(Some(Duration::from_secs(300)), now).edges;
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].connections, 1);
        // 61 s rounds up to two minutes; an hour and more is the whole window.
        assert_eq!(map.edges(Some(Duration::from_secs(61)), now).edges.len(), 1);
        let hour = map.edges(Some(Duration::from_secs(86_400)), now).edges;
        assert_eq!(hour.iter().map(|e| e.connections).sum::<u64>(), 4);
        // A minute's slot is reused an hour later, not added to.
        map.count(key("a", "b", Verdict::Denied), t0 + 3600 + 5);
        let later = map
            .edges(Some(Duration::from_secs(60)), t0 + 3600 + 6)
            .edges;
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].connections, 1);
    }

    #[test]
    fn keeps_at_most_its_bound_least_recent_first() {
        let map = ServiceMap::with_bound(2);
        map.count(key("a", "b", Verdict::Allowed), 100);
        map.count(key("c", "d", Verdict::Allowed), 100);
        map.count(key("a", "b", Verdict::Allowed), 100);
        map.count(key("e", "f", Verdict::Allowed), 100);
        let reply = map.edges(None, 100);
        let srcs: Vec<_> = reply.edges.iter().map(|e| e.key.src.as_str()).collect();
        assert_eq!(srcs, ["a", "e"]);
        assert_eq!(reply.evicted, 1);
    }

    fn record(hook: &str, dst: &str, proto: &str) -> FlowRecord {
        let end = |ip: &str| FlowEnd {
            identity: "x".into(),
            id: "1".into(),
            ip: Some(ip.parse().unwrap()),
            port: Some(80),
        };
        FlowRecord {
            time: 0.0,
            verdict: "ALLOW".into(),
            hook: hook.into(),
            proto: proto.into(),
            src: end("10.0.1.1"),
            dst: end(dst),
            rule: 0,
            reason: String::new(),
            mtls: None,
            service: None,
            suppressed: 0,
            suppressed_denied: 0,
        }
    }

    #[test]
    fn the_path_follows_where_the_destination_lives() {
        let workload = |ip: &str, local| mesh_policy::WorkloadInfo {
            namespace: "shop".into(),
            name: "w".into(),
            spiffe_id: "spiffe://t/ns/shop/sa/w".into(),
            identity: 7,
            subject: 7,
            ips: vec![ip.parse().unwrap()],
            node: "n".into(),
            local,
            mtls: Default::default(),
            netns: None,
        };
        let mut names = NodeState::default();
        names.workloads = Arc::new(vec![
            workload("10.0.1.2", true),
            workload("10.0.2.2", false),
        ]);
        let path = |hook, dst, proto, mtls| path_of(&record(hook, dst, proto), &names, mtls);
        assert_eq!(path("connect", "10.0.1.2", "tcp", true), Path::SameNode);
        // An IPv4-mapped address names the same workload.
        assert_eq!(
            path("connect", "::ffff:10.0.1.2", "tcp", true),
            Path::SameNode
        );
        assert_eq!(path("connect", "10.0.2.2", "tcp", true), Path::Mtls);
        assert_eq!(path("connect", "10.0.2.2", "tcp", false), Path::Plaintext);
        // UDP is never tunnelled.
        assert_eq!(path("sendmsg", "10.0.2.2", "udp", true), Path::Plaintext);
        // Outside the mesh.
        assert_eq!(path("connect", "192.0.2.1", "tcp", true), Path::Plaintext);
        assert_eq!(path("tunnel-in", "10.0.1.2", "tcp", true), Path::Mtls);
        assert_eq!(path("ingress", "10.0.1.2", "tcp", true), Path::Plaintext);
    }
}
