//! `mesh-bench cross-node`: a pod on node 0 talking to a pod on node 1,
//! plain TCP against the mesh's mutual-TLS tunnel (HBONE: HTTP/2 CONNECT
//! over mTLS between the two node agents), in one run.
//!
//! The same tool in the same client pod is either in node 0's mesh cgroup
//! (its connections are steered to the node agent and tunnelled) or outside
//! it (plain TCP over the same veths, bridges and uplinks, past the same tc
//! programs). Throughput, ping-pong latency and the new-connection rate
//! alternate between the two, round by round; then a sustained run of
//! consecutive connections, reported in slices, shows whether the rate
//! holds (TIME_WAIT, port exhaustion) over hundreds of thousands of them.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::Args;
use mesh_tests::{
    agent::{self, Agent},
    netns::Netns,
    process::Spawned,
    topology::TestBed,
};
use serde_json::{Value, json};

use super::{T, hold_cpu_dma_latency, machine, median, times};

#[derive(Args)]
pub struct CrossNode {
    /// Alternating rounds of each variant.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Ping-pong round trips per round.
    #[arg(long, default_value_t = 20_000)]
    pings: usize,
    /// How long each throughput run lasts: its byte count is calibrated
    /// per variant from a warm-up stream.
    #[arg(long, default_value_t = 3.0)]
    stream_seconds: f64,
    /// Short connections per connection-rate round.
    #[arg(long, default_value_t = 2_000)]
    connections: usize,
    /// Consecutive connections of each sustained run (0: no sustained run).
    #[arg(long, default_value_t = 200_000)]
    sustained: usize,
    /// Connections per slice of a sustained run (a rate is reported per slice).
    #[arg(long, default_value_t = 10_000)]
    slice: usize,
    /// Run the sustained run through the mesh only, not over plain TCP.
    #[arg(long)]
    mesh_only_sustained: bool,
    /// Stop a sustained run after the slice that passes this many seconds
    /// (a collapsed rate would otherwise take the run past any budget).
    #[arg(long, default_value_t = 540)]
    sustained_max_seconds: u64,
    /// An argument for both agents, after `--ca-dir` (repeat for more):
    /// `--agent-arg=--bulk-ports=8080,8081` measures bulk tunnels against
    /// plain TCP.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

const TRUST_DOMAIN: &str = "cluster.local";
const NAMESPACE: &str = "bench";
/// The mesh's servers (in node 1's mesh cgroup) …
const MESH_ECHO: u16 = 8080;
const MESH_SINK: u16 = 8081;
/// … and the plain ones (outside it), on the same pod.
const PLAIN_ECHO: u16 = 9080;
const PLAIN_SINK: u16 = 9081;

/// What the issue asks of the tunnel, against plain TCP (issue 18).
const TARGET_THROUGHPUT_RATIO: f64 = 0.5;
const TARGET_ADDED_P50_US: f64 = 30.0;
const TARGET_ADDED_P99_US: f64 = 60.0;
const TARGET_CONNECTION_RATIO: f64 = 0.5;
const TARGET_RST_CONNECTION_RATIO: f64 = 0.35;
const TARGET_IDLE_RSS_MIB: f64 = 15.0;
/// The write size of the main throughput runs (`mesh-pod stream`'s default).
const STREAM_WRITE: usize = 256 << 10;
/// The write size of iperf3's TCP client (its default `--length`).
const IPERF_WRITE: usize = 128 << 10;

#[derive(Clone, Copy)]
pub(crate) struct Variant {
    name: &'static str,
    in_mesh: bool,
    echo: SocketAddr,
    sink: SocketAddr,
}

/// Two connected nodes with a pod each (client on node 0, servers on node
/// 1), their Workload and MeshNode documents, a mesh CA, and an agent per
/// node with `--ca-dir` and nothing else (the agents' defaults).
pub(crate) struct Cluster {
    // Dropped in this order: the processes by PID, then the namespaces.
    _servers: Vec<Spawned>,
    pub(crate) agents: Vec<Agent>,
    pub(crate) bed: TestBed,
    /// Node 1's port settings before its agent started (which may change them).
    node_sysctls_before_agent: Value,
}

impl Cluster {
    pub(crate) fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// [`Self::start`] with `extra` arguments for both agents.
    pub(crate) fn start_with(extra: &[String]) -> anyhow::Result<Self> {
        let mut bed = TestBed::new("xnode-bench")?;
        bed.add_node()?;
        bed.connect_nodes()?;
        bed.add_pod(0)?;
        bed.add_pod(1)?;
        // The client's own choice, the same for both variants (as in the
        // policy benchmark): every ephemeral port, and TIME_WAIT ports
        // reused after a second. Without it, plain TCP's client runs out
        // of ports after ~28,000 connections to one server in a minute.
        // The bench leaves the nodes' settings alone.
        port_reuse(&bed.pods[0].netns)?;
        let node_sysctls_before_agent = port_settings(&bed.nodes[1].netns);

        bed.register_workload(0, NAMESPACE, "client", &[])?;
        bed.register_workload(1, NAMESPACE, "server", &[])?;
        let nodes: Vec<String> = bed
            .nodes
            .iter()
            .enumerate()
            .map(|(n, node)| {
                format!(
                    "apiVersion: mesh.dev/v1alpha1\nkind: MeshNode\nmetadata: {{name: {}}}\nspec: {{addresses: [198.19.255.{}]}}\n",
                    node.name(),
                    n + 1
                )
            })
            .collect();
        bed.write_config("nodes.yaml", &nodes.join("---\n"))?;
        let servers = vec![
            bed.server(1, true, bed.pods[1].addr(false, MESH_ECHO), "echo")?,
            bed.server(1, true, bed.pods[1].addr(false, MESH_SINK), "sink")?,
            bed.server(1, false, bed.pods[1].addr(false, PLAIN_ECHO), "echo")?,
            bed.server(1, false, bed.pods[1].addr(false, PLAIN_SINK), "sink")?,
        ];

        let ca = bed.files.path().join("ca");
        let out = Command::new(agent::agent_bin())
            .args(["ca", "init", "--trust-domain", TRUST_DOMAIN, "--out"])
            .arg(&ca)
            .output()
            .context("running mesh-agent ca init")?;
        ensure!(
            out.status.success(),
            "mesh-agent ca init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ca = ca.display().to_string();
        let mut args = vec!["--ca-dir", ca.as_str()];
        args.extend(extra.iter().map(String::as_str));
        let agents = (0..bed.nodes.len())
            .map(|n| Agent::start_node(&bed, n, &args))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            bed,
            agents,
            _servers: servers,
            node_sysctls_before_agent,
        })
    }

    pub(crate) fn variants(&self) -> [Variant; 2] {
        let server = &self.bed.pods[1];
        [
            Variant {
                name: "plain",
                in_mesh: false,
                echo: server.addr(false, PLAIN_ECHO),
                sink: server.addr(false, PLAIN_SINK),
            },
            Variant {
                name: "mesh",
                in_mesh: true,
                echo: server.addr(false, MESH_ECHO),
                sink: server.addr(false, MESH_SINK),
            },
        ]
    }

    /// Connections node 0's kernel has steered to its agent so far.
    fn tunnelled(&self) -> anyhow::Result<u64> {
        agent::counter(&self.bed.pin_dir(0), "tunnel_redirected")
    }

    /// Waits until a mesh connection to the server goes through (the
    /// agents need their certificates and listeners first), and checks
    /// that it was tunnelled and that a plain one was not.
    pub(crate) fn wait_until_tunnelling(&self, [plain, mesh]: &[Variant; 2]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let target = format!("tcp:{}", mesh.echo);
        loop {
            let before = self.tunnelled()?;
            let probe = self.bed.client(
                0,
                true,
                &["probe", "--targets", &target, "--timeout-ms", "1000"],
                T,
            )?;
            if probe["results"][&target] == "connected" {
                ensure!(
                    self.tunnelled()? > before,
                    "a mesh connection to {} was not steered to the agent",
                    mesh.echo
                );
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "no connection through the tunnel within 30 s: {probe}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let before = self.tunnelled()?;
        self.connection_rate(plain, 10)?;
        ensure!(
            self.tunnelled()? == before,
            "a plain connection (outside the mesh's cgroup) was steered to the agent"
        );
        Ok(())
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .map(|(n, a)| format!("--- agent of node-{n} ---\n{}", a.log()))
            .collect()
    }

    /// Writes each agent's log next to the report; returns the paths.
    pub(crate) fn save_logs(&self, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(out)?;
        self.agents
            .iter()
            .enumerate()
            .map(|(n, a)| {
                let path = out.join(format!("cross-node-agent-node-{n}.log"));
                std::fs::write(&path, a.log())
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(path)
            })
            .collect()
    }

    fn pingpong(&self, v: &Variant, pings: usize) -> anyhow::Result<Value> {
        self.bed.client(
            0,
            v.in_mesh,
            &[
                "pingpong",
                "--to",
                &v.echo.to_string(),
                "--size",
                "64",
                "--count",
                &pings.to_string(),
            ],
            T,
        )
    }

    /// One stream of `bytes`, written `write` bytes at a time.
    fn stream(&self, v: &Variant, bytes: u64, write: usize) -> anyhow::Result<f64> {
        let report = self.bed.client(
            0,
            v.in_mesh,
            &[
                "stream",
                "--to",
                &v.sink.to_string(),
                "--bytes",
                &bytes.to_string(),
                "--chunk",
                &write.to_string(),
            ],
            T,
        )?;
        report["gbit_per_s"]
            .as_f64()
            .with_context(|| format!("no gbit_per_s in {report}"))
    }

    /// `mesh-pod short`: consecutive connections, each a one-byte echo,
    /// closed with a FIN or (`rst`) a reset.
    fn connection_rate(&self, v: &Variant, connections: usize) -> anyhow::Result<Value> {
        self.short(v, connections, false)
    }

    fn short(&self, v: &Variant, connections: usize, rst: bool) -> anyhow::Result<Value> {
        let (echo, count) = (v.echo.to_string(), connections.to_string());
        let mut args = vec!["short", "--to", &echo, "--count", &count];
        if rst {
            args.push("--rst");
        }
        self.bed.client(0, v.in_mesh, &args, T)
    }

    /// Sockets in TIME_WAIT where the sustained runs leave them: the
    /// client pod (the plain client's and the mesh client's, on loopback
    /// to its agent), node 1 (node 1's agent's connections to the server)
    /// and the server pod.
    fn time_wait(&self) -> Value {
        let count = |ns: &Netns| time_wait_in(ns).ok();
        json!({
            "client_pod": count(&self.bed.pods[0].netns),
            "node_1": count(&self.bed.nodes[1].netns),
            "server_pod": count(&self.bed.pods[1].netns),
        })
    }
}

/// The machine's CPU time so far (/proc/stat), to tell how much of it the
/// hypervisor gave to others (steal) while something was measured.
pub(crate) struct CpuTicks {
    total: u64,
    steal: u64,
}

impl CpuTicks {
    pub(crate) fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<u64> = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .filter_map(|t| t.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        // user nice system idle iowait irq softirq steal (guest time is
        // already counted in user).
        Self {
            total: ticks.iter().take(8).sum(),
            steal: ticks.get(7).copied().unwrap_or(0),
        }
    }

    /// Percent of the CPU time since `self` that was stolen.
    pub(crate) fn steal_pct(&self) -> f64 {
        let now = Self::now();
        let total = now.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * now.steal.saturating_sub(self.steal) as f64 / total as f64
    }
}

/// The 1-minute load average. This run keeps about two runnable
/// processes busy; more means someone else is using the machine.
fn load_1m() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0)
}

/// /proc/loadavg's first three fields.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The workspace's commit the binaries were built from (`+dirty` with
/// uncommitted changes), so that figures name what they measured.
pub(crate) fn commit() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"])?;
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])?;
    Some(if dirty.is_empty() {
        head
    } else {
        format!("{head}+dirty")
    })
}

/// Every ephemeral port, and ports in TIME_WAIT reused after a second.
fn port_reuse(netns: &Netns) -> anyhow::Result<()> {
    netns.exec(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=1024 65535"],
    )?;
    netns.exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    Ok(())
}

/// Waits (at most a TIME_WAIT period) until node 1 holds fewer than
/// `below` TIME_WAIT sockets, so that a sustained run starts from a clean
/// node rather than from the rounds' leftovers; returns the seconds waited.
fn settle_node_1(c: &Cluster, below: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    while time_wait_in(&c.bed.nodes[1].netns)? >= below
        && started.elapsed() < Duration::from_secs(65)
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// TIME_WAIT sockets of a namespace (`tw` in its /proc/net/sockstat).
fn time_wait_in(netns: &Netns) -> anyhow::Result<u64> {
    let sockstat = netns.exec("cat", &["/proc/net/sockstat"])?;
    parse_time_wait(&sockstat).with_context(|| format!("no TCP tw in {sockstat:?}"))
}

/// `TCP: inuse 3 orphan 0 tw 17 alloc 5 mem 1` → 17.
fn parse_time_wait(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

/// A namespace's TCP sysctls that decide how TIME_WAIT ports are reused.
fn port_settings(netns: &Netns) -> Value {
    let get = |key: &str| {
        netns
            .exec("sysctl", &["-n", key])
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .ok()
    };
    json!({
        "ip_local_port_range": get("net.ipv4.ip_local_port_range"),
        "tcp_tw_reuse": get("net.ipv4.tcp_tw_reuse"),
        "tcp_max_tw_buckets": get("net.ipv4.tcp_max_tw_buckets"),
    })
}

/// One sustained run: `total` consecutive connections in slices of
/// `slice`, each slice one `mesh-pod short`. A slice that fails ends the
/// run; the failure is recorded, not raised. So does passing `max`.
fn sustained(
    c: &Cluster,
    v: &Variant,
    total: usize,
    slice: usize,
    max: Duration,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let tunnelled_before = c.tunnelled()?;
    let time_wait_at_start = c.time_wait();
    let mut slices = Vec::new();
    let mut done = 0;
    let mut failure = None;
    let mut stopped = None;
    while done < total {
        if started.elapsed() > max {
            progress!(
                "sustained {:5}: stopped after {done} connections: past {max:?}",
                v.name
            );
            stopped = Some(format!("past --sustained-max-seconds ({max:?})"));
            break;
        }
        let n = slice.min(total - done);
        let cpu = CpuTicks::now();
        match c.connection_rate(v, n) {
            Ok(report) => {
                let per_second = report["per_second"].as_f64().unwrap_or(0.0);
                let seconds = report["seconds"].as_f64().unwrap_or(0.0);
                done += n;
                let time_wait = c.time_wait();
                progress!(
                    "sustained {:5}: {done:>7} connections, this slice {per_second:>6.0} conn/s (TIME_WAIT: {time_wait})",
                    v.name
                );
                slices.push(json!({
                    "after": done,
                    "connections": n,
                    "seconds": seconds,
                    "per_second": per_second,
                    "time_wait": time_wait,
                    "load_1m": load_1m(),
                    "steal_pct": cpu.steal_pct(),
                }));
            }
            Err(e) => {
                let time_wait = c.time_wait();
                progress!(
                    "sustained {:5}: FAILED in the slice after {done} connections: {e:#} (TIME_WAIT: {time_wait})",
                    v.name
                );
                failure = Some(json!({
                    "after_connections": done,
                    "slice": slices.len(),
                    "error": format!("{e:#}"),
                    "time_wait": time_wait,
                }));
                break;
            }
        }
    }
    let seconds: f64 = slices.iter().filter_map(|s| s["seconds"].as_f64()).sum();
    let rate = |s: Option<&Value>| s.and_then(|s| s["per_second"].as_f64());
    let tunnelled = c.tunnelled()? - tunnelled_before;
    // Whose sockets they are: a few of each namespace's, as ss lists them.
    let sample = |ns: &Netns| {
        ns.exec("ss", &["-Htan", "state", "time-wait"])
            .map(|out| out.lines().take(3).map(str::to_owned).collect::<Vec<_>>())
            .ok()
    };
    let time_wait_sample = json!({
        "client_pod": sample(&c.bed.pods[0].netns),
        "node_1": sample(&c.bed.nodes[1].netns),
    });
    Ok(json!({
        "variant": v.name,
        "connections_asked": total,
        "connections_done": done,
        "complete": done == total,
        "stopped": stopped,
        "time_wait_at_start": time_wait_at_start,
        "time_wait_sample_at_end": time_wait_sample,
        "seconds": seconds,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "per_second": if seconds > 0.0 { done as f64 / seconds } else { 0.0 },
        "first_slice_per_second": rate(slices.first()),
        "last_slice_per_second": rate(slices.last()),
        "min_slice_per_second": slices.iter().filter_map(|s| s["per_second"].as_f64()).reduce(f64::min),
        "tunnelled": tunnelled,
        "slices": slices,
        "failure": failure,
    }))
}

pub fn run(cli: &CrossNode, out: &Path) -> anyhow::Result<()> {
    ensure!(
        cli.rounds > 0 && cli.pings > 0 && cli.connections > 0 && cli.stream_seconds > 0.0,
        "nothing to measure"
    );
    ensure!(cli.slice > 0, "--slice must be at least 1");
    let run_started = *crate::STARTED.get_or_init(Instant::now);
    let load_at_start = loadavg();
    let cluster = Cluster::start_with(&cli.agent_args)?;
    progress!(
        "two nodes, a pod on each, agents ready (extra arguments: {:?})",
        cli.agent_args
    );
    let result = measure(cli, &cluster, out, run_started, &load_at_start);
    // Always keep what the agents said; a failure prints where.
    let logs = cluster.save_logs(out)?;
    if let Err(e) = &result {
        for path in &logs {
            eprintln!("agent log: {}", path.display());
        }
        eprintln!("cross-node failed: {e:#}");
    }
    result
}

fn measure(
    cli: &CrossNode,
    cluster: &Cluster,
    out: &Path,
    run_started: Instant,
    load_at_start: &str,
) -> anyhow::Result<()> {
    let variants = cluster.variants();
    cluster.wait_until_tunnelling(&variants)?;
    // Idle: ready, one pooled tunnel connection, nothing carried.
    std::thread::sleep(Duration::from_secs(2));
    // Each agent's RSS, and where it goes: the binary's pages (file) or the
    // heap and stacks (anon), from one read so that they add up.
    let idle = cluster
        .agents
        .iter()
        .map(|a| super::status_kibs(a.pid(), ["VmRSS", "RssAnon", "RssFile"]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let idle_rss_kib: Vec<u64> = idle.iter().map(|[rss, ..]| *rss).collect();
    let idle_split: Vec<String> = idle
        .iter()
        .map(|[_, anon, file]| format!("anon {anon} + file {file}"))
        .collect();
    progress!(
        "agents' idle RSS: {idle_rss_kib:?} KiB ({})",
        idle_split.join("; ")
    );

    // Warm-up: caches, the agents' pooled tunnel connection, and the
    // calibration of each variant's stream length.
    let mut stream_bytes = [0u64; 2];
    for (k, v) in variants.iter().enumerate() {
        cluster.connection_rate(v, 500)?;
        cluster.pingpong(v, 1000)?;
        let warm = cluster.stream(v, 512 << 20, STREAM_WRITE)?;
        let bytes = warm / 8.0 * 1e9 * cli.stream_seconds;
        stream_bytes[k] = ((bytes as u64) >> 20).clamp(64, 64 << 10) << 20;
        progress!(
            "warm-up {:5}: {warm:.2} Gbit/s; streaming {} MiB per round",
            v.name,
            stream_bytes[k] >> 20
        );
    }

    let tunnelled_before = cluster.tunnelled()?;
    let mut latency_held = true;
    let mut samples: Vec<Value> = Vec::new();
    for round in 0..cli.rounds {
        for k in 0..variants.len() {
            // Alternate which variant goes first, so drift spreads evenly.
            let k = (round + k) % variants.len();
            let v = &variants[k];
            let cpu = CpuTicks::now();
            let ping = {
                let latency = hold_cpu_dma_latency();
                latency_held &= latency.is_some();
                cluster.pingpong(v, cli.pings)?
            };
            let gbit = cluster.stream(v, stream_bytes[k], STREAM_WRITE)?;
            let gbit_iperf = cluster.stream(v, stream_bytes[k], IPERF_WRITE)?;
            let short = cluster.connection_rate(v, cli.connections)?;
            let short_rst = cluster.short(v, cli.connections, true)?;
            let sample = json!({
                "load_1m": load_1m(),
                "steal_pct": cpu.steal_pct(),
                "round": round,
                "variant": v.name,
                "p50_ns": ping["p50_ns"],
                "p99_ns": ping["p99_ns"],
                "gbit_per_s": gbit,
                "gbit_per_s_128k_writes": gbit_iperf,
                "connections_per_s": short["per_second"],
                "rst_connections_per_s": short_rst["per_second"],
            });
            progress!(
                "round {round} {:5}: p50 {:.1} µs, p99 {:.1} µs, {gbit:.2} Gbit/s ({gbit_iperf:.2} in 128 KiB writes), {:.0} conn/s ({:.0} RST-closed) (load {:.1}, steal {:.1}%)",
                v.name,
                ping["p50_ns"].as_f64().unwrap_or(0.0) / 1e3,
                ping["p99_ns"].as_f64().unwrap_or(0.0) / 1e3,
                short["per_second"].as_f64().unwrap_or(0.0),
                short_rst["per_second"].as_f64().unwrap_or(0.0),
                sample["load_1m"].as_f64().unwrap_or(0.0),
                sample["steal_pct"].as_f64().unwrap_or(0.0),
            );
            samples.push(sample);
        }
    }
    // Every mesh connection of the rounds went through the tunnel: a ping,
    // two streams and two batches of short connections per round.
    let tunnelled = cluster.tunnelled()? - tunnelled_before;
    let expected = (cli.rounds * (2 * cli.connections + 3)) as u64;
    ensure!(
        tunnelled >= expected,
        "only {tunnelled} of the rounds' {expected} mesh connections were steered to the agent"
    );

    // Sustained: plain TCP first (its TIME_WAIT sockets stay in the
    // client pod), while the rounds' leave node 1; then the mesh, from a
    // node 1 with (almost) none left.
    let mut sustained_runs = Vec::new();
    let mut settled_seconds = None;
    if cli.sustained > 0 {
        let [plain, mesh] = &variants;
        let max = Duration::from_secs(cli.sustained_max_seconds);
        if !cli.mesh_only_sustained {
            sustained_runs.push(sustained(cluster, plain, cli.sustained, cli.slice, max)?);
        }
        let waited = settle_node_1(cluster, 2000)?;
        progress!("waited {waited:.0} s for node 1's TIME_WAIT sockets to expire");
        settled_seconds = Some(waited);
        sustained_runs.push(sustained(cluster, mesh, cli.sustained, cli.slice, max)?);
    }

    // ---- medians, ratios, targets
    let med = |variant: &str, key: &str| {
        median(
            samples
                .iter()
                .filter(|s| s["variant"] == variant)
                .filter_map(|s| s[key].as_f64())
                .collect(),
        )
    };
    let gbit = (med("plain", "gbit_per_s"), med("mesh", "gbit_per_s"));
    let gbit_iperf = (
        med("plain", "gbit_per_s_128k_writes"),
        med("mesh", "gbit_per_s_128k_writes"),
    );
    let rst_conns = (
        med("plain", "rst_connections_per_s"),
        med("mesh", "rst_connections_per_s"),
    );
    let idle_rss_mib = idle_rss_kib.iter().copied().max().unwrap_or(0) as f64 / 1024.0;
    let p50 = (med("plain", "p50_ns") / 1e3, med("mesh", "p50_ns") / 1e3);
    let p99 = (med("plain", "p99_ns") / 1e3, med("mesh", "p99_ns") / 1e3);
    let conns = (
        med("plain", "connections_per_s"),
        med("mesh", "connections_per_s"),
    );
    let run_of = |variant: &str| sustained_runs.iter().find(|r| r["variant"] == variant);
    let (mesh_run, plain_run) = (run_of("mesh"), run_of("plain"));
    let rate_of = |r: Option<&Value>, key: &str| r.and_then(|r| r[key].as_f64());

    let mut table = format!(
        "{:<34} {:>12} {:>12} {:>11} {:>11}\n",
        "METRIC", "PLAIN", "MESH", "MESH/PLAIN", "ADDED"
    );
    let mut row =
        |name: &str, plain: Option<f64>, mesh: Option<f64>, digits: usize, added: bool| {
            let show = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.digits$}"));
            let ratio = match (plain, mesh) {
                (Some(p), Some(m)) if p > 0.0 => times(m / p),
                _ => "-".into(),
            };
            let extra = match (plain, mesh) {
                (Some(p), Some(m)) if added => format!("{:+.1} µs", m - p),
                _ => String::new(),
            };
            table += &format!(
                "{name:<34} {:>12} {:>12} {ratio:>11} {extra:>11}\n",
                show(plain),
                show(mesh)
            );
        };
    row("throughput, Gbit/s", Some(gbit.0), Some(gbit.1), 2, false);
    row(
        "  in 128 KiB writes (iperf3's)",
        Some(gbit_iperf.0),
        Some(gbit_iperf.1),
        2,
        false,
    );
    row("64-byte RTT p50, µs", Some(p50.0), Some(p50.1), 1, true);
    row("64-byte RTT p99, µs", Some(p99.0), Some(p99.1), 1, true);
    row(
        &format!("new connections/s ({} per round)", cli.connections),
        Some(conns.0),
        Some(conns.1),
        0,
        false,
    );
    row(
        "  closed with RST, conn/s",
        Some(rst_conns.0),
        Some(rst_conns.1),
        0,
        false,
    );
    if cli.sustained > 0 {
        let n = cli.sustained;
        row(
            &format!("sustained {n} conn, conn/s"),
            rate_of(plain_run, "per_second"),
            rate_of(mesh_run, "per_second"),
            0,
            false,
        );
        row(
            "  first slice, conn/s",
            rate_of(plain_run, "first_slice_per_second"),
            rate_of(mesh_run, "first_slice_per_second"),
            0,
            false,
        );
        row(
            "  last slice, conn/s",
            rate_of(plain_run, "last_slice_per_second"),
            rate_of(mesh_run, "last_slice_per_second"),
            0,
            false,
        );
        row(
            "  slowest slice, conn/s",
            rate_of(plain_run, "min_slice_per_second"),
            rate_of(mesh_run, "min_slice_per_second"),
            0,
            false,
        );
    }

    // Slices side by side.
    let mut slices_table = String::new();
    if let Some(mesh_run) = mesh_run {
        slices_table = format!(
            "{:<12} {:>11} {:>12} {:>18} {:>18}\n",
            "AFTER", "MESH conn/s", "PLAIN conn/s", "TIME_WAIT node-1", "TIME_WAIT client"
        );
        slices_table = slices_table.replace('\n', "   LOAD mesh/plain   STEAL% mesh/plain\n");
        let empty = Vec::new();
        let plain_slices = plain_run
            .and_then(|r| r["slices"].as_array())
            .unwrap_or(&empty);
        let mesh_slices = mesh_run["slices"].as_array().unwrap_or(&empty);
        for i in 0..mesh_slices.len().max(plain_slices.len()) {
            let (m, p) = (mesh_slices.get(i), plain_slices.get(i));
            let rate = |s: Option<&Value>| {
                s.and_then(|s| s["per_second"].as_f64())
                    .map_or("-".into(), |r| format!("{r:.0}"))
            };
            let tw = |key: &str| {
                m.map(|s| s["time_wait"][key].to_string())
                    .unwrap_or_else(|| "-".into())
            };
            let one = |s: Option<&Value>, key: &str| {
                s.and_then(|s| s[key].as_f64())
                    .map_or("-".into(), |l| format!("{l:.1}"))
            };
            let pair = |key: &str| format!("{}/{}", one(m, key), one(p, key));
            slices_table += &format!(
                "{:<12} {:>11} {:>12} {:>18} {:>18}   {:<15}   {}\n",
                m.or(p).map(|s| s["after"].to_string()).unwrap_or_default(),
                rate(m),
                rate(p),
                tw("node_1"),
                tw("client_pod"),
                pair("load_1m"),
                pair("steal_pct"),
            );
        }
        for r in [Some(mesh_run), plain_run].into_iter().flatten() {
            if let Some(why) = r["stopped"].as_str() {
                slices_table += &format!(
                    "{} stopped after {} connections: {why}\n",
                    r["variant"].as_str().unwrap_or_default(),
                    r["connections_done"]
                );
            }
            if let Some(f) = r["failure"].as_object() {
                slices_table += &format!(
                    "{} FAILED after {} connections: {}\n",
                    r["variant"].as_str().unwrap_or_default(),
                    f["after_connections"],
                    f["error"].as_str().unwrap_or_default()
                );
            }
        }
    }

    // Targets: throughput and latency from the rounds' medians; the
    // connection rate over the whole sustained run (against plain's
    // sustained run, else against the rounds' plain median).
    let sustained_ratio = mesh_run.and_then(|m| {
        let mesh = m["per_second"].as_f64()?;
        let plain = rate_of(plain_run, "per_second").unwrap_or(conns.0);
        Some(mesh / plain)
    });
    let mesh_complete = mesh_run.is_some_and(|m| m["complete"] == true);
    let sustained_ok = mesh_complete
        && cli.sustained >= 200_000
        && sustained_ratio.is_some_and(|r| r >= TARGET_CONNECTION_RATIO);
    // A (plain, mesh) pair against a least ratio, or a most added µs.
    let ratio = |what: &str, (plain, mesh): (f64, f64), least: f64| {
        json!({
            "target": format!("{what} >= {least}x plain"),
            "measured": mesh / plain,
            "met": mesh / plain >= least,
        })
    };
    let added = |what: &str, (plain, mesh): (f64, f64), most: f64| {
        json!({
            "target": format!("added {what} <= {most} µs"),
            "measured": mesh - plain,
            "met": mesh - plain <= most,
        })
    };
    let targets = json!([
        ratio("throughput", gbit, TARGET_THROUGHPUT_RATIO),
        ratio("throughput in 128 KiB writes", gbit_iperf, TARGET_THROUGHPUT_RATIO),
        added("p50 RTT", p50, TARGET_ADDED_P50_US),
        added("p99 RTT", p99, TARGET_ADDED_P99_US),
        ratio("new-connection rate (rounds)", conns, TARGET_CONNECTION_RATIO),
        ratio("new-connection rate, RST close,", rst_conns, TARGET_RST_CONNECTION_RATIO),
        {
            "target": format!("new-connection rate >= {TARGET_CONNECTION_RATIO}x plain, sustained over 200,000 connections"),
            "measured": sustained_ratio,
            "mesh_connections_done": mesh_run.map(|m| m["connections_done"].clone()),
            "met": sustained_ok,
        },
        {
            "target": format!("idle agent RSS <= {TARGET_IDLE_RSS_MIB} MiB"),
            "measured_mib": idle_rss_mib,
            "met": idle_rss_mib <= TARGET_IDLE_RSS_MIB,
        },
    ]);
    let mut targets_table = String::new();
    for t in targets.as_array().into_iter().flatten() {
        let measured = t["measured_mib"].as_f64().map(|m| format!("{m:.1} MiB"));
        let measured = measured.unwrap_or_else(|| {
            t["measured"].as_f64().map_or("-".into(), |m| {
                if t["target"].as_str().unwrap_or_default().contains("µs") {
                    format!("{m:+.1} µs")
                } else {
                    times(m)
                }
            })
        });
        targets_table += &format!(
            "{:<78} {measured:>10}  {}\n",
            t["target"].as_str().unwrap_or_default(),
            if t["met"] == true { "met" } else { "NOT MET" }
        );
    }

    // Other work on the machine shows in the load average: this run keeps
    // it near the number of CPUs.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let measured = samples.iter().chain(
        sustained_runs
            .iter()
            .flat_map(|r| r["slices"].as_array().into_iter().flatten()),
    );
    let max_load = measured
        .clone()
        .filter_map(|s| s["load_1m"].as_f64())
        .fold(0.0, f64::max);
    let max_steal = measured
        .clone()
        .filter_map(|s| s["steal_pct"].as_f64())
        .fold(0.0, f64::max);
    let mut busy = Vec::new();
    if max_load > cpus + 1.0 {
        busy.push(format!(
            "the 1-minute load reached {max_load:.1} on {cpus} CPUs (this run alone keeps it near {cpus}): \
             other work shared the machine"
        ));
    }
    if max_steal > 2.0 {
        busy.push(format!(
            "the hypervisor took up to {max_steal:.1}% of this machine's CPU time (steal) during a measurement"
        ));
    }
    let busy = (!busy.is_empty()).then(|| {
        format!(
            "{}; what was measured then may be low (load_1m and steal_pct of each round and slice are in the JSON)",
            busy.join("; ")
        )
    });

    let total = run_started.elapsed().as_secs_f64();
    let report = json!({
        "other_load": busy,
        "benchmark": "cross-node",
        "machine": machine(),
        "commit": commit(),
        "path": {
            "plain": "mesh-pod in the client pod on node 0, outside the mesh's cgroup: plain TCP over the veths, node bridges and the fabric (past the mesh's tc programs on the uplinks)",
            "mesh": "the same tool in node 0's mesh cgroup: steered by the kernel to node 0's agent, HBONE (HTTP/2 CONNECT over mutual TLS 1.3) to node 1's agent, which connects to the server",
        },
        "agents": "mesh-agent run --ca-dir <CA>: default settings (one control-plane worker, one tunnel thread, default TunnelSettings) unless extra arguments are given",
        "agent_extra_arguments": cli.agent_args,
        "cpu_dma_latency_held_at_0": if latency_held { "during the ping-pong runs" } else { "no (could not open /dev/cpu_dma_latency)" },
        "waited_for_node_1_time_wait_s": settled_seconds,
        "sysctls": {
            "client_pod": port_settings(&cluster.bed.pods[0].netns),
            "node_1_before_agent": cluster.node_sysctls_before_agent,
            "node_1": port_settings(&cluster.bed.nodes[1].netns),
        },
        "sysctls_note": "the client pod uses every ephemeral port and tcp_tw_reuse=1, for both variants; the bench leaves the nodes' settings alone (node_1: at the end of the run, after its agent started)",
        "rounds": cli.rounds,
        "pings_per_round": cli.pings,
        "message_size": 64,
        "stream_bytes_per_round": { "plain": stream_bytes[0], "mesh": stream_bytes[1] },
        "connections_per_round": cli.connections,
        "medians": {
            "throughput_gbit_s": { "plain": gbit.0, "mesh": gbit.1, "ratio": gbit.1 / gbit.0 },
            "rtt_p50_us": { "plain": p50.0, "mesh": p50.1, "ratio": p50.1 / p50.0, "added_us": p50.1 - p50.0 },
            "rtt_p99_us": { "plain": p99.0, "mesh": p99.1, "ratio": p99.1 / p99.0, "added_us": p99.1 - p99.0 },
            "connections_per_s": { "plain": conns.0, "mesh": conns.1, "ratio": conns.1 / conns.0 },
            "throughput_128k_writes_gbit_s": { "plain": gbit_iperf.0, "mesh": gbit_iperf.1, "ratio": gbit_iperf.1 / gbit_iperf.0 },
            "rst_connections_per_s": { "plain": rst_conns.0, "mesh": rst_conns.1, "ratio": rst_conns.1 / rst_conns.0 },
        },
        "agents_idle_rss_kib": idle_rss_kib,
        "sustained": sustained_runs,
        "targets": targets,
        "samples": samples,
        "total_seconds": total,
        // The machine is shared: how busy it was around the run.
        "loadavg": { "start": load_at_start, "end": loadavg() },
    });

    println!(
        "\ncross-node: a pod on node 0 to a pod on node 1, plain TCP vs the mesh (HBONE over mTLS),\n\
         {} alternating rounds, medians; /dev/cpu_dma_latency held at 0 during ping-pong: {latency_held}\n",
        cli.rounds
    );
    print!("{table}");
    if !slices_table.is_empty() {
        println!("\nsustained, per slice of {} connections:", cli.slice);
        print!("{slices_table}");
    }
    if let Some(note) = &busy {
        println!("\nNOTE: {note}");
    }
    println!("\ntargets:");
    print!("{targets_table}");
    std::fs::create_dir_all(out)?;
    let path = out.join("cross-node.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let svg = out.join("cross-node.svg");
    plot_rounds(&samples, &svg)?;
    println!(
        "\ntotal {total:.0} s\nJSON: {}\nplot: {}",
        path.display(),
        svg.display()
    );
    // Reported above; a mesh path that broke under load fails the run.
    if let Some(f) = mesh_run.and_then(|m| m["failure"].as_object()) {
        anyhow::bail!(
            "the mesh path failed after {} connections: {}",
            f["after_connections"],
            f["error"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// Each round's figures, plain and mesh side by side.
fn plot_rounds(samples: &[Value], path: &Path) -> anyhow::Result<()> {
    let panel = |title: &str, unit, key: &str, scale: f64| {
        super::plot::Panel::of_rounds(
            title,
            unit,
            samples,
            &["plain", "mesh"],
            |_| true,
            key,
            scale,
        )
    };
    super::plot::rounds(
        path,
        "cross-node: a pod on node 0 to a pod on node 1, plain TCP vs the mesh (mTLS)",
        &[
            panel(
                "single-stream throughput, 256 KiB writes",
                "Gbit/s",
                "gbit_per_s",
                1.0,
            ),
            panel(
                "single-stream throughput, 128 KiB writes",
                "Gbit/s",
                "gbit_per_s_128k_writes",
                1.0,
            ),
            panel("64-byte round trip, p50", "µs", "p50_ns", 1e-3),
            panel("64-byte round trip, p99", "µs", "p99_ns", 1e-3),
            panel(
                "new connections, FIN close",
                "per second",
                "connections_per_s",
                1.0,
            ),
            panel(
                "new connections, RST close",
                "per second",
                "rst_connections_per_s",
                1.0,
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_time_wait_from_sockstat() {
        let sockstat =
            "sockets: used 120\nTCP: inuse 3 orphan 0 tw 17 alloc 5 mem 1\nUDP: inuse 0 mem 0\n";
        assert_eq!(super::parse_time_wait(sockstat), Some(17));
        assert_eq!(super::parse_time_wait("UDP: inuse 0"), None);
    }
}
