//! `mesh-bench same-node|policy|cross-node|control-plane|services` (run them with
//! `cargo xtask bench …`):
//!
//! - `same-node`: plain TCP between two pods against two pods of the mesh
//!   that opted in to its short-circuit, on one node, alternating rounds in
//!   one run, medians and ratios.
//! - `policy`: the new-connection rate with 10, 1,000 and 100,000 allow
//!   rules, the mesh's compiled policy against iptables holding the same
//!   rules (and no rules at all), alternating rounds, medians and ratios.
//! - `cross-node`: plain TCP from a pod on one node to a pod on another
//!   against the mesh's mutual-TLS tunnel between the node agents:
//!   throughput, latency, the new-connection rate, and that rate sustained
//!   over hundreds of thousands of connections.
//! - `control-plane`: the agent's Kubernetes mode against an API server
//!   holding 10,000 pods and 1,000 MeshPolicies: initial sync, memory and
//!   event-to-map latency, next to the same state read from files
//!   (standalone mode).
//! - `services`: new connections per second through a Service address with
//!   10, 1,000 and 10,000 Services, the mesh's translation against
//!   kube-proxy's iptables rules and against no translation.
/// When the run started, for the progress lines' timestamps.
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// A progress line on stderr, with the seconds since the run started (the
/// benchmark modules below share it).
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[{:>4.0} s] {}",
            crate::STARTED
                .get_or_init(std::time::Instant::now)
                .elapsed()
                .as_secs_f64(),
            format_args!($($arg)*)
        )
    };
}

#[path = "mesh-bench/control_plane.rs"]
mod control_plane;
#[path = "mesh-bench/cross_node.rs"]
mod cross_node;
#[path = "mesh-bench/plot.rs"]
mod plot;
#[path = "mesh-bench/services.rs"]
mod services;
#[path = "mesh-bench/soak.rs"]
mod soak;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use clap::{Args, Parser, Subcommand};
use mesh_tests::{
    agent::{self, Agent},
    topology::TestBed,
};
use serde_json::{Value, json};

#[derive(Parser)]
struct Cli {
    /// Where to write the JSON report.
    #[arg(long, global = true, default_value = "target/bench")]
    out: PathBuf,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Plain TCP against the mesh's same-node short-circuit.
    SameNode(SameNode),
    /// New connections per second under growing rule sets: mesh vs iptables.
    Policy(Policy),
    /// Plain TCP between pods on two nodes against the mesh's mTLS tunnel.
    CrossNode(cross_node::CrossNode),
    /// Kubernetes mode at scale (sync, memory, event latency) vs standalone.
    ControlPlane(control_plane::ControlPlane),
    /// New connections through a Service address: the mesh vs kube-proxy.
    Services(services::Services),
    /// Thousands of cross-node connections held through the tunnels: each
    /// agent's memory and descriptors per held connection.
    Soak(soak::Soak),
}

#[derive(Args)]
struct SameNode {
    /// Alternating rounds of each variant.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Ping-pong round trips per round.
    #[arg(long, default_value_t = 20000)]
    pings: usize,
    /// Bytes streamed per throughput round.
    #[arg(long, default_value_t = 2 << 30)]
    stream_bytes: u64,
}

#[derive(Args)]
struct Policy {
    /// Rule set sizes, each K synthetic identities × P ports (K = 10·P when
    /// the size allows: 10 = 10×1, 1000 = 100×10, 100000 = 1000×100).
    #[arg(long, value_delimiter = ',', default_values_t = [10, 1_000, 100_000])]
    rules: Vec<usize>,
    /// Alternating rounds of each variant, per rule set size.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// New connections per measurement.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
}

const T: Duration = Duration::from_secs(300);

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.bench {
        Bench::SameNode(args) => same_node(args, &cli.out),
        Bench::Policy(args) => policy(args, &cli.out),
        Bench::CrossNode(args) => cross_node::run(args, &cli.out),
        Bench::ControlPlane(args) => control_plane::run(args, &cli.out),
        Bench::Services(args) => services::run(args, &cli.out),
        Bench::Soak(args) => soak::run(args, &cli.out),
    }
}

fn same_node(cli: &SameNode, out: &Path) -> anyhow::Result<()> {
    let latency = hold_cpu_dma_latency();

    let mut bed = TestBed::new("bench")?;
    for _ in 0..4 {
        bed.add_pod(0)?;
    }
    // Mesh: pods 0 and 1, two workloads that opted in, under the default
    // setting: the path an operator's opted-in pair takes (both ends'
    // labels checked per message). Plain: pods 2 and 3, no workloads, their
    // processes outside the mesh's cgroup: no program sees them.
    let opted_in = [("mesh.dev/short-circuit", "enabled")];
    bed.register_workload(0, "bench", "client", &opted_in)?;
    bed.register_workload(1, "bench", "server", &opted_in)?;
    let _agent = Agent::start_node(&bed, 0, &[])?;
    let echo = bed.pods[1].addr(false, 8080);
    let sink = bed.pods[1].addr(false, 8081);
    let plain_echo = bed.pods[3].addr(false, 8080);
    let plain_sink = bed.pods[3].addr(false, 8081);
    let _servers = [
        bed.server(1, true, echo, "echo")?,
        bed.server(1, true, sink, "sink")?,
        bed.server(3, false, plain_echo, "echo")?,
        bed.server(3, false, plain_sink, "sink")?,
    ];

    let mut samples: Vec<(&str, Value)> = Vec::new();
    for round in 0..cli.rounds {
        for (variant, client, in_mesh, echo, sink) in [
            ("plain", 2, false, plain_echo, plain_sink),
            ("mesh", 0, true, echo, sink),
        ] {
            let ping = bed.client(
                client,
                in_mesh,
                &[
                    "pingpong",
                    "--to",
                    &echo.to_string(),
                    "--size",
                    "64",
                    "--count",
                    &cli.pings.to_string(),
                ],
                T,
            )?;
            let stream = bed.client(
                client,
                in_mesh,
                &[
                    "stream",
                    "--to",
                    &sink.to_string(),
                    "--bytes",
                    &cli.stream_bytes.to_string(),
                ],
                T,
            )?;
            eprintln!(
                "round {round} {variant:5}: p50 {:.1} µs, p99 {:.1} µs, {:.2} Gbit/s",
                ping["p50_ns"].as_f64().unwrap() / 1e3,
                ping["p99_ns"].as_f64().unwrap() / 1e3,
                stream["gbit_per_s"].as_f64().unwrap()
            );
            samples.push((variant, json!({ "round": round, "p50_ns": ping["p50_ns"], "p99_ns": ping["p99_ns"], "gbit_per_s": stream["gbit_per_s"] })));
        }
    }

    // The mesh's figures are the short-circuit's only if it carried them.
    let redirected = agent::counter(&bed.pin_dir(0), "bytes_redirected")?;
    anyhow::ensure!(
        redirected > 0,
        "the opted-in pair was not short-circuited: nothing was redirected"
    );

    let median = |variant: &str, key: &str| {
        let mut v: Vec<f64> = samples
            .iter()
            .filter(|(n, _)| *n == variant)
            .map(|(_, s)| s[key].as_f64().unwrap())
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let metrics = [
        ("rtt_p50_us", "p50_ns", 1e-3),
        ("rtt_p99_us", "p99_ns", 1e-3),
        ("throughput_gbit_s", "gbit_per_s", 1.0),
    ];
    let mut table = String::from("METRIC             PLAIN     MESH      MESH/PLAIN\n");
    let mut results = serde_json::Map::new();
    for (name, key, scale) in metrics {
        let (plain, mesh) = (median("plain", key) * scale, median("mesh", key) * scale);
        table += &format!("{name:<18} {plain:<9.2} {mesh:<9.2} {:.2}x\n", mesh / plain);
        results.insert(
            name.into(),
            json!({ "plain": plain, "mesh": mesh, "ratio": mesh / plain }),
        );
    }
    let report = json!({
        "benchmark": "same-node",
        "machine": machine(),
        "cpu_dma_latency_held_at_0": latency.is_some(),
        "rounds": cli.rounds,
        "pings_per_round": cli.pings,
        "stream_bytes_per_round": cli.stream_bytes,
        "message_size": 64,
        "medians": results,
        "samples": samples.iter().map(|(n, s)| json!({ "variant": n, "sample": s })).collect::<Vec<_>>(),
    });
    println!(
        "\nsame-node: two pods on one node, {} alternating rounds, medians",
        cli.rounds
    );
    println!(
        "(64-byte ping-pong RTT; single-stream throughput; /dev/cpu_dma_latency held at 0: {})\n",
        latency.is_some()
    );
    print!("{table}");
    std::fs::create_dir_all(out)?;
    let path = out.join("same-node.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\nJSON: {}", path.display());
    let rounds: Vec<Value> = samples
        .iter()
        .map(|(variant, s)| {
            let mut s = s.clone();
            s["variant"] = json!(variant);
            s
        })
        .collect();
    let panel = |title: &str, unit, key: &str, scale: f64| {
        plot::Panel::of_rounds(
            title,
            unit,
            &rounds,
            &["plain", "mesh"],
            |_| true,
            key,
            scale,
        )
    };
    plot::beside(
        &path,
        "same-node: two pods on one node, plain TCP vs the mesh's short-circuit",
        &[
            panel("single-stream throughput", "Gbit/s", "gbit_per_s", 1.0),
            panel("64-byte round trip, p50", "µs", "p50_ns", 1e-3),
            panel("64-byte round trip, p99", "µs", "p99_ns", 1e-3),
        ],
    )?;
    Ok(())
}

// ------------------------------------------------------------------ policy

/// Where the synthetic rules' ports start (TCP, one per rule column).
const FIRST_RULE_PORT: u16 = 20_000;
/// The server the measured connections go to, in the mesh and in iptables' bed.
const SERVER_PORT: u16 = 8080;
/// The same server outside the mesh, for the baseline with no rules at all.
const PLAIN_PORT: u16 = 9080;
/// Synthetic identities get one address each from 198.19.0.0–198.19.254.254.
const MAX_IDENTITIES: usize = 255 * 254;
const NAMESPACE: &str = "bench";
const VARIANTS: [&str; 3] = ["none", "iptables", "mesh"];

/// One rule set: `identities` synthetic sources × `ports` destination ports.
#[derive(Clone, Copy)]
struct Shape {
    rules: usize,
    identities: usize,
    ports: usize,
}

impl Shape {
    /// K × P = `rules` with K = 10·P where possible (10 = 10×1,
    /// 1000 = 100×10, 100000 = 1000×100), else the nearest divisor below.
    fn of(rules: usize) -> anyhow::Result<Self> {
        ensure!(rules > 0, "a rule set needs at least one rule");
        let mut ports = ((rules as f64 / 10.0).sqrt() as usize).max(1);
        while !rules.is_multiple_of(ports) {
            ports -= 1;
        }
        let identities = rules / ports;
        ensure!(
            identities <= MAX_IDENTITIES,
            "{rules} rules need {identities} synthetic identities, more than the {MAX_IDENTITIES} addresses available"
        );
        ensure!(
            ports <= 1000,
            "{rules} rules need {ports} ports, more than 1000"
        );
        Ok(Self {
            rules,
            identities,
            ports,
        })
    }

    fn ports(&self) -> impl Iterator<Item = u16> {
        (0..self.ports).map(|p| FIRST_RULE_PORT + p as u16)
    }
}

/// Synthetic identity `i`'s address: 198.19.0.1, …, 198.19.0.254,
/// 198.19.1.1, … (never 198.19.255.0/24, the beds' uplink subnet).
fn synthetic_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (i / 254) as u8, (i % 254 + 1) as u8)
}

fn spiffe(service_account: &str) -> String {
    format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{service_account}")
}

/// The mesh's rule set, in one file so that the agent applies it in one
/// reload: the synthetic workloads (on another node, so no netns) and one
/// ALLOW policy selecting the server: rule 0 lets every synthetic identity
/// reach every rule port, rule 1 lets the client reach the server port.
fn mesh_documents(shape: &Shape) -> String {
    use std::fmt::Write as _;
    let mut yaml = String::with_capacity(shape.identities * 200 + shape.ports * 20);
    for i in 0..shape.identities {
        let _ = write!(
            yaml,
            "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: syn-{i}\n  namespace: {NAMESPACE}\nspec:\n  serviceAccount: sa-{i}\n  ips: [\"{}\"]\n  node: elsewhere\n---\n",
            synthetic_ip(i)
        );
    }
    let _ = write!(
        yaml,
        "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata:\n  name: server\n  namespace: {NAMESPACE}\nspec:\n  selector:\n    serviceAccount: server\n  action: ALLOW\n  rules:\n  - from:\n"
    );
    for i in 0..shape.identities {
        let _ = writeln!(yaml, "    - identity: {}", spiffe(&format!("sa-{i}")));
    }
    yaml.push_str("    ports:\n");
    for port in shape.ports() {
        let _ = writeln!(yaml, "    - port: {port}");
    }
    let _ = write!(
        yaml,
        "  - from:\n    - identity: {}\n    ports:\n    - port: {SERVER_PORT}\n",
        spiffe("client")
    );
    yaml
}

/// The same allow list as a firewall holds it: established traffic first,
/// then one rule per (synthetic address, port), then the client, then a
/// drop for everyone else. A new connection from the client walks them all.
fn iptables_rules(shape: &Shape, client: Ipv4Addr) -> String {
    use std::fmt::Write as _;
    let mut rules = String::with_capacity(shape.rules * 64 + 512);
    rules.push_str("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    rules.push_str("-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n");
    for i in 0..shape.identities {
        let ip = synthetic_ip(i);
        for port in shape.ports() {
            let _ = writeln!(rules, "-A INPUT -s {ip}/32 -p tcp --dport {port} -j ACCEPT");
        }
    }
    let _ = writeln!(
        rules,
        "-A INPUT -s {client}/32 -p tcp --dport {SERVER_PORT} -j ACCEPT"
    );
    let _ = writeln!(rules, "-A INPUT -p tcp --dport {SERVER_PORT} -j DROP");
    rules.push_str("COMMIT\n");
    rules
}

/// What the agent logged for one reload.
struct MeshApply {
    policy_entries: u64,
    elapsed_ms: f64,
    upserted: u64,
    deleted: u64,
    /// From writing the file to the log line (inotify, settle, reload).
    wall_ms: f64,
}

/// `key=value` of a log line.
fn log_field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

fn log_tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Writes the rule set and waits for the agent's `policy applied` line.
fn apply_mesh(bed: &TestBed, agent: &Agent, documents: &str) -> anyhow::Result<MeshApply> {
    let before = agent.log();
    let applied_before = before.matches("policy applied").count();
    let refused_before = before.matches("configuration refused").count();
    let started = Instant::now();
    bed.write_config("bench.yaml", documents)?;
    let deadline = started + Duration::from_secs(240);
    loop {
        let log = agent.log();
        ensure!(
            log.matches("configuration refused").count() == refused_before,
            "the agent refused the rule set:\n{}",
            log_tail(&log)
        );
        if log.matches("policy applied").count() > applied_before {
            let wall_ms = started.elapsed().as_secs_f64() * 1e3;
            let line = log
                .lines()
                .rfind(|l| l.contains("policy applied"))
                .expect("counted above");
            let get = |key| log_field(line, key).with_context(|| format!("no {key}= in {line:?}"));
            return Ok(MeshApply {
                policy_entries: get("policy_entries")? as u64,
                elapsed_ms: get("elapsed_ms")?,
                upserted: get("upserted")? as u64,
                deleted: get("deleted")? as u64,
                wall_ms,
            });
        }
        ensure!(
            Instant::now() < deadline,
            "the agent did not apply the rule set within 240 s:\n{}",
            log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Loads a rule set into `pod`'s network namespace with iptables-restore
/// (which replaces the filter table) and returns how long that took.
fn iptables_load(bed: &TestBed, pod: usize, rules: &str) -> anyhow::Result<Duration> {
    let netns = &bed.pods[pod].netns;
    netns.exec("iptables", &["-F", "INPUT"])?;
    let path = bed.files.path().join("iptables.rules");
    std::fs::write(&path, rules)?;
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", netns.name(), "iptables-restore"])
        .stdin(std::fs::File::open(&path)?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running iptables-restore")?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "iptables-restore failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(took)
}

/// Rules in INPUT, as `iptables -S` lists them.
fn iptables_rule_count(bed: &TestBed, pod: usize) -> anyhow::Result<usize> {
    let listing = bed.pods[pod].netns.exec("iptables", &["-S", "INPUT"])?;
    Ok(listing
        .lines()
        .filter(|l| l.starts_with("-A INPUT"))
        .count())
}

/// Packets that matched INPUT rule number `rule` (1-based).
fn iptables_packets(bed: &TestBed, pod: usize, rule: usize) -> anyhow::Result<u64> {
    let line = bed.pods[pod].netns.exec(
        "iptables",
        &["-L", "INPUT", &rule.to_string(), "-n", "-v", "-x"],
    )?;
    line.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no packet count in {line:?}"))
}

/// New connections per second from pod 0 to `to` (`mesh-pod short`).
fn connection_rate(
    bed: &TestBed,
    in_mesh: bool,
    to: SocketAddr,
    connections: usize,
) -> anyhow::Result<f64> {
    let report = bed.client(
        0,
        in_mesh,
        &[
            "short",
            "--to",
            &to.to_string(),
            "--count",
            &connections.to_string(),
        ],
        T,
    )?;
    report["per_second"]
        .as_f64()
        .with_context(|| format!("no per_second in {report}"))
}

/// Two pods on node 0: pod 0 the client, pod 1 the server. Every
/// measured connection leaves a socket in TIME_WAIT in the client for a
/// minute; tens of thousands of them to one destination make connect(2)
/// scan the port range for a free port, which would measure the port
/// search rather than the rules. So the client may use every ephemeral
/// port and reuse TIME_WAIT ones (`tcp_tw_reuse`, as busy clients do).
fn two_pod_bed(name: &str) -> anyhow::Result<TestBed> {
    let mut bed = TestBed::new(name)?;
    bed.add_pod(0)?;
    bed.add_pod(0)?;
    let client = &bed.pods[0].netns;
    client.exec(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=1024 65535"],
    )?;
    client.exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    Ok(bed)
}

/// A ratio as the tables print it: `1.23x`.
fn times(ratio: f64) -> String {
    format!("{ratio:.2}x")
}

/// A memory field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
fn status_kib(pid: u32, name: &str) -> anyhow::Result<u64> {
    let [kib] = status_kibs(pid, [name])?;
    Ok(kib)
}

/// Several memory fields of `/proc/<pid>/status`, in KiB, from one read of
/// it (so that they describe the same moment).
fn status_kibs<const N: usize>(pid: u32, names: [&str; N]) -> anyhow::Result<[u64; N]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let mut kibs = [0; N];
    for (kib, name) in kibs.iter_mut().zip(names) {
        *kib = status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
    }
    Ok(kibs)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn policy(cli: &Policy, out: &Path) -> anyhow::Result<()> {
    ensure!(!cli.rules.is_empty(), "--rules is empty");
    ensure!(cli.rounds > 0 && cli.connections > 0, "nothing to measure");
    let shapes = cli
        .rules
        .iter()
        .map(|&n| Shape::of(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let run_started = Instant::now();
    let latency = hold_cpu_dma_latency();

    // The mesh: the agent on node 0, the client and server in its cgroup.
    let mesh_bed = two_pod_bed("pol-mesh")?;
    mesh_bed.register_workload(0, NAMESPACE, "client", &[])?;
    mesh_bed.register_workload(1, NAMESPACE, "server", &[("app", "server")])?;
    let mesh_to = mesh_bed.pods[1].addr(false, SERVER_PORT);
    let _mesh_server = mesh_bed.server(1, true, mesh_to, "echo")?;
    let agent = Agent::start_node(&mesh_bed, 0, &[])?;
    let pins = mesh_bed.pin_dir(0);

    // The baseline without rules ("none"): a bed of its own where no agent
    // ever ran and no iptables rule is written (in the mesh's bed, the
    // checks on the pods' interfaces judge every process's packets).
    let none_bed = two_pod_bed("pol-none")?;
    let none_to = none_bed.pods[1].addr(false, PLAIN_PORT);
    let _none_server = none_bed.server(1, false, none_to, "echo")?;

    // iptables: a bed of its own, where no agent ever ran, so no mesh
    // program is attached anywhere on its path; the rules live in the
    // server pod's namespace (its INPUT chain).
    let ipt_bed = two_pod_bed("pol-ipt")?;
    let ipt_to = ipt_bed.pods[1].addr(false, SERVER_PORT);
    let _ipt_server = ipt_bed.server(1, false, ipt_to, "echo")?;
    let iptables_version = ipt_bed.pods[1]
        .netns
        .exec("iptables", &["--version"])
        .context("iptables is not installed (cargo xtask setup installs it)")?
        .trim()
        .to_string();
    let backend = if iptables_version.contains("nf_tables") {
        "nf_tables"
    } else if iptables_version.contains("legacy") {
        "legacy"
    } else {
        "unknown"
    };
    let client_ip = ipt_bed.pods[0].ip4;

    let mut samples: Vec<Value> = Vec::new();
    let mut sizes: Vec<Value> = Vec::new();
    for shape in &shapes {
        let n = shape.rules;
        eprintln!(
            "{n} rules ({} identities × {} ports): applying",
            shape.identities, shape.ports
        );
        let applied = apply_mesh(&mesh_bed, &agent, &mesh_documents(shape))?;
        let stats = agent::stats(&pins)?;
        let entries = |map: &str| stats["maps"][map]["entries"].as_u64().unwrap_or(0);
        ensure!(
            entries("POLICY") == applied.policy_entries,
            "POLICY holds {} entries, the agent logged {}",
            entries("POLICY"),
            applied.policy_entries
        );
        // The policy is in force: the client may reach the server port and
        // nothing else of the server.
        let denied_to = mesh_bed.pods[1].addr(false, FIRST_RULE_PORT);
        let probe = mesh_bed.client(
            0,
            true,
            &[
                "probe",
                "--targets",
                &format!("tcp:{mesh_to},tcp:{denied_to}"),
            ],
            T,
        )?;
        let result = |to: SocketAddr| probe["results"][format!("tcp:{to}")].as_str();
        ensure!(
            result(mesh_to) == Some("connected") && result(denied_to) == Some("eperm"),
            "the mesh's policy is not what the benchmark wrote: {probe}"
        );

        let restore = iptables_load(&ipt_bed, 1, &iptables_rules(shape, client_ip))?;
        let loaded = iptables_rule_count(&ipt_bed, 1)?;
        ensure!(
            loaded == n + 3,
            "INPUT holds {loaded} rules, expected {}",
            n + 3
        );
        eprintln!(
            "{n} rules: mesh applied {} POLICY entries in {:.1} ms (agent; {:.0} ms from the write), iptables-restore {loaded} rules in {:.0} ms ({backend})",
            applied.policy_entries,
            applied.elapsed_ms,
            applied.wall_ms,
            restore.as_secs_f64() * 1e3
        );

        // Warm-up: fill caches, conntrack and the agent's flow reader.
        let warm = (cli.connections / 10).max(1);
        connection_rate(&none_bed, false, none_to, warm)?;
        connection_rate(&ipt_bed, false, ipt_to, warm)?;
        connection_rate(&mesh_bed, true, mesh_to, warm)?;
        let client_rule = n + 2;
        let ipt_packets_before = iptables_packets(&ipt_bed, 1, client_rule)?;
        let counters_before = agent::stats(&pins)?["counters"].clone();

        for round in 0..cli.rounds {
            for k in 0..VARIANTS.len() {
                // Rotate the order every round, so drift spreads evenly.
                let variant = VARIANTS[(round + k) % VARIANTS.len()];
                let per_second = match variant {
                    "none" => connection_rate(&none_bed, false, none_to, cli.connections)?,
                    "iptables" => connection_rate(&ipt_bed, false, ipt_to, cli.connections)?,
                    _ => connection_rate(&mesh_bed, true, mesh_to, cli.connections)?,
                };
                eprintln!("{n} rules, round {round} {variant:8}: {per_second:.0} conn/s");
                samples.push(json!({ "rules": n, "round": round, "variant": variant, "per_second": per_second }));
            }
        }

        // Every measured connection took the path it was meant to: through
        // all of iptables' rules to the client's, through the mesh's check.
        let measured = (cli.rounds * cli.connections) as u64;
        let ipt_packets = iptables_packets(&ipt_bed, 1, client_rule)? - ipt_packets_before;
        ensure!(
            ipt_packets >= measured,
            "iptables' client rule matched {ipt_packets} packets for {measured} connections"
        );
        let counters = agent::stats(&pins)?["counters"].clone();
        let delta = |name: &str| {
            counters[name].as_u64().unwrap_or(0) - counters_before[name].as_u64().unwrap_or(0)
        };
        ensure!(
            delta("policy_allowed") >= measured && delta("policy_denied") == 0,
            "the mesh allowed {} and denied {} of {measured} connections",
            delta("policy_allowed"),
            delta("policy_denied")
        );
        sizes.push(json!({
            "rules": n,
            "identities": shape.identities,
            "ports": shape.ports,
            "mesh": {
                "policy_entries": applied.policy_entries,
                "endpoints_entries": entries("ENDPOINTS"),
                "apply_ms": applied.elapsed_ms,
                "apply_wall_ms": applied.wall_ms,
                "upserted": applied.upserted,
                "deleted": applied.deleted,
                "policy_allowed_during_rounds": delta("policy_allowed"),
            },
            "iptables": {
                "input_rules": loaded,
                "restore_ms": restore.as_secs_f64() * 1e3,
                "client_rule_packets_during_rounds": ipt_packets,
            },
        }));
    }
    ipt_bed.pods[1].netns.exec("iptables", &["-F", "INPUT"])?;

    let med = |n: usize, variant: &str| {
        median(
            samples
                .iter()
                .filter(|s| s["rules"] == n && s["variant"] == variant)
                .map(|s| s["per_second"].as_f64().unwrap_or(0.0))
                .collect(),
        )
    };
    let first = shapes[0].rules;
    let (ipt_vs, mesh_vs) = (format!("IPTABLES vs {first}"), format!("MESH vs {first}"));
    let mut table = format!(
        "{:<9} {:<12} {:<16} {:<12} {:<14} {ipt_vs:<15} {mesh_vs}\n",
        "RULES", "NONE conn/s", "IPTABLES conn/s", "MESH conn/s", "MESH/IPTABLES",
    );
    let mut medians = Vec::new();
    for shape in &shapes {
        let n = shape.rules;
        let (none, ipt, mesh) = (med(n, "none"), med(n, "iptables"), med(n, "mesh"));
        let (ipt_rel, mesh_rel) = (ipt / med(first, "iptables"), mesh / med(first, "mesh"));
        table += &format!(
            "{n:<9} {none:<12.0} {ipt:<16.0} {mesh:<12.0} {:<14} {:<15} {}\n",
            times(mesh / ipt),
            times(ipt_rel),
            times(mesh_rel),
        );
        medians.push(json!({
            "rules": n,
            "none_per_second": none,
            "iptables_per_second": ipt,
            "mesh_per_second": mesh,
            "mesh_over_iptables": mesh / ipt,
            "iptables_vs_first": ipt_rel,
            "mesh_vs_first": mesh_rel,
        }));
    }
    let mut setup = format!(
        "{:<9} {:<18} {:<15} {:<15} {:<15} {}\n",
        "RULES",
        "IDENTITIES×PORTS",
        "POLICY ENTRIES",
        "MESH APPLY ms",
        "IPTABLES RULES",
        "IPTABLES-RESTORE ms"
    );
    for s in &sizes {
        setup += &format!(
            "{:<9} {:<18} {:<15} {:<15.1} {:<15} {:.0}\n",
            s["rules"].to_string(),
            format!("{}×{}", s["identities"], s["ports"]),
            s["mesh"]["policy_entries"].to_string(),
            s["mesh"]["apply_ms"].as_f64().unwrap_or(0.0),
            s["iptables"]["input_rules"].to_string(),
            s["iptables"]["restore_ms"].as_f64().unwrap_or(0.0),
        );
    }
    let total = run_started.elapsed().as_secs_f64();
    let report = json!({
        "benchmark": "policy",
        "machine": machine(),
        "cpu_dma_latency_held_at_0": latency.is_some(),
        "rounds": cli.rounds,
        "connections_per_measurement": cli.connections,
        "rules": cli.rules,
        "iptables": { "version": iptables_version, "backend": backend },
        "variants": {
            "none": "client and server outside the mesh's cgroup, no rules anywhere",
            "iptables": "a separate bed (no agent ever started), the rules in the server pod's INPUT chain",
            "mesh": "client and server in the mesh's cgroup, one ALLOW MeshPolicy compiled by the agent",
        },
        "sizes": sizes,
        "medians": medians,
        "samples": samples,
        "total_seconds": total,
    });
    println!(
        "\npolicy: new connections per second (1-byte echo each) from one pod to another on one node,\n\
         {} alternating rounds of {} connections, medians; iptables {backend} ({iptables_version});\n\
         /dev/cpu_dma_latency held at 0: {}\n",
        cli.rounds,
        cli.connections,
        latency.is_some()
    );
    print!("{table}\n{setup}");
    std::fs::create_dir_all(out)?;
    let path = out.join("policy.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\ntotal {total:.0} s\nJSON: {}", path.display());
    let panels: Vec<plot::Panel> = shapes
        .iter()
        .map(|shape| {
            let n = shape.rules;
            plot::Panel::of_rounds(
                format!("new connections per second, {n} rules"),
                "conn/s",
                &samples,
                &["none", "iptables", "mesh"],
                |s| s["rules"] == n,
                "per_second",
                1.0,
            )
        })
        .collect();
    plot::beside(
        &path,
        "policy: new connections per second under growing rule sets, iptables vs the mesh",
        &panels,
    )?;
    drop(agent);
    Ok(())
}

/// Keeps idle CPUs out of deep sleep while held (as tuned's latency
/// profiles do): waking one adds ~60 µs to a round trip on these VMs.
fn hold_cpu_dma_latency() -> Option<std::fs::File> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .ok()?;
    file.write_all(&0i32.to_ne_bytes()).ok()?;
    Some(file)
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown cpu")
        .trim()
        .to_string();
    format!(
        "{} CPUs ({cpu}), kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_fields_come_from_one_read_and_add_up() {
        let pid = std::process::id();
        let [rss, anon, file, shmem] =
            super::status_kibs(pid, ["VmRSS", "RssAnon", "RssFile", "RssShmem"]).unwrap();
        assert!(rss > 0);
        assert_eq!(rss, anon + file + shmem);
        let missing = super::status_kibs(pid, ["VmRSS", "NoSuchField"]).unwrap_err();
        assert!(missing.to_string().contains("no NoSuchField"), "{missing}");
    }
}
