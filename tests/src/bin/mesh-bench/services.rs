//! `mesh-bench services`: new connections per second through a Service
//! address with 10, 1,000 and 10,000 Services, the mesh's translation in
//! the connect hook against kube-proxy's iptables mode (the very rule
//! shapes kube-proxy writes, `mesh_tests::kube_proxy`) and against no
//! translation at all (the client dials the pod), alternating rounds in
//! one run; medians of the rate and of each connection's latency.
use std::{net::SocketAddr, path::Path, time::Instant};

use anyhow::{Context as _, ensure};
use clap::Args;
use mesh_tests::{
    agent::{self, Agent},
    kube_proxy::{self, ServicePort},
    topology::TestBed,
};
use serde_json::{Value, json};

use crate::{T, apply_mesh, hold_cpu_dma_latency, machine, median, times, two_pod_bed};

#[derive(Args)]
pub struct Services {
    /// Numbers of Services (each one port, one backend: the server pod).
    #[arg(long, value_delimiter = ',', default_values_t = [10, 1_000, 10_000])]
    services: Vec<usize>,
    /// Alternating rounds of each variant, per number of Services.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// New connections per measurement.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
}

const SERVER_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
const VARIANTS: [&str; 4] = ["none", "iptables", "mesh", "mesh-direct"];

/// The address of Service `i` (0-based): 10.96.0.0/16 holds 65,534.
fn service_ip(i: usize) -> String {
    let n = i + 1;
    format!("10.96.{}.{}", n / 256, n % 256)
}

/// `n` Services in a directory's documents, all selecting the server.
fn documents(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        out += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec: {{clusterIP: {}, selector: {{app: server}}, ports: [{{port: {SERVICE_PORT}, targetPort: {SERVER_PORT}}}]}}\n",
            service_ip(i)
        );
    }
    out
}

/// One measurement: the rate and the per-connection latency.
fn measure(
    bed: &TestBed,
    in_mesh: bool,
    to: SocketAddr,
    connections: usize,
) -> anyhow::Result<(f64, f64, f64)> {
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
    let get = |k: &str| {
        report[k]
            .as_f64()
            .with_context(|| format!("no {k} in {report}"))
    };
    Ok((get("per_second")?, get("p50_us")?, get("p99_us")?))
}

/// kube-proxy's nat rules for `n` Services in the node's namespace; how
/// long `iptables-restore` took (ms).
fn install_kube_proxy(bed: &TestBed, n: usize, backend: SocketAddr) -> anyhow::Result<f64> {
    let ns = &bed.nodes[0].netns;
    let ports: Vec<ServicePort> = (0..n)
        .map(|i| ServicePort {
            name: format!("bench/svc-{i}:"),
            address: format!("{}:{SERVICE_PORT}", service_ip(i)).parse().unwrap(),
            protocol: "tcp",
            endpoints: vec![backend],
        })
        .collect();
    let started = Instant::now();
    kube_proxy::install(ns, &ports)?;
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

pub fn run(cli: &Services, out: &Path) -> anyhow::Result<()> {
    ensure!(!cli.services.is_empty(), "--services is empty");
    ensure!(cli.rounds > 0 && cli.connections > 0, "nothing to measure");
    ensure!(
        cli.services.iter().all(|&n| (1..65_000).contains(&n)),
        "--services: 1 to 64,999 each"
    );
    let run_started = Instant::now();
    let latency = hold_cpu_dma_latency();

    // One pair of beds per number of Services, all alive at once, so that
    // every round measures every size and variant in turn and the
    // machine's drift spreads over all of them alike.
    let mut setups = Vec::new();
    for &n in &cli.services {
        progress!("{n} Services: setting up");
        setups.push(Setup::new(n)?);
    }
    let mut samples: Vec<Value> = Vec::new();
    let warm = (cli.connections / 10).max(1);
    for setup in &setups {
        for variant in VARIANTS {
            setup.measure(variant, warm)?;
        }
    }
    let translated_before: Vec<u64> = setups
        .iter()
        .map(|s| agent::counter(&s.mesh_bed.pin_dir(0), "service_translated"))
        .collect::<anyhow::Result<_>>()?;
    for round in 0..cli.rounds {
        for (i, setup) in setups.iter().enumerate() {
            for k in 0..VARIANTS.len() {
                // Rotate the order every round and size.
                let variant = VARIANTS[(round + i + k) % VARIANTS.len()];
                let (per_second, p50, p99) = setup.measure(variant, cli.connections)?;
                let n = setup.services;
                progress!(
                    "{n} Services, round {round} {variant:11}: {per_second:.0} conn/s, p50 {p50:.0} µs, p99 {p99:.0} µs"
                );
                samples.push(json!({
                    "services": n, "round": round, "variant": variant,
                    "per_second": per_second, "p50_us": p50, "p99_us": p99,
                }));
            }
        }
    }
    let mut sizes: Vec<Value> = Vec::new();
    for (setup, before) in setups.iter().zip(translated_before) {
        // Every measured mesh connection was translated in the kernel.
        let measured = (cli.rounds * cli.connections) as u64;
        let translated = agent::counter(&setup.mesh_bed.pin_dir(0), "service_translated")? - before;
        ensure!(
            translated >= measured,
            "the mesh translated {translated} of {measured} connections"
        );
        sizes.push(json!({
            "services": setup.services,
            "mesh_apply_ms": setup.mesh_apply_ms,
            "iptables_restore_ms": setup.restore_ms,
            "translated_during_rounds": translated,
        }));
    }

    let med = |n: usize, variant: &str, key: &str| {
        median(
            samples
                .iter()
                .filter(|s| s["services"] == n && s["variant"] == variant)
                .map(|s| s[key].as_f64().unwrap_or(0.0))
                .collect(),
        )
    };
    let first = cli.services[0];
    let mut table = format!(
        "{:<9} {:<12} {:<15} {:<12} {:<12} {:<13} {:<14} {:<22} {:<22} {}\n",
        "SERVICES",
        "NONE conn/s",
        "KUBE-PROXY c/s",
        "MESH conn/s",
        "MESH DIRECT",
        "MESH/IPTABLES",
        format!("MESH vs {first}"),
        "p50 none/ipt/mesh µs",
        "p99 none/ipt/mesh µs",
        "IPT vs first"
    );
    let mut medians = Vec::new();
    for &n in &cli.services {
        let (none, ipt, mesh) = (
            med(n, "none", "per_second"),
            med(n, "iptables", "per_second"),
            med(n, "mesh", "per_second"),
        );
        let p50 = [
            med(n, "none", "p50_us"),
            med(n, "iptables", "p50_us"),
            med(n, "mesh", "p50_us"),
        ];
        let p99 = [
            med(n, "none", "p99_us"),
            med(n, "iptables", "p99_us"),
            med(n, "mesh", "p99_us"),
        ];
        let direct = med(n, "mesh-direct", "per_second");
        let mesh_rel = mesh / med(first, "mesh", "per_second");
        let ipt_rel = ipt / med(first, "iptables", "per_second");
        table += &format!(
            "{n:<9} {none:<12.0} {ipt:<15.0} {mesh:<12.0} {direct:<12.0} {:<13} {:<14} {:<22} {:<22} {}\n",
            times(mesh / ipt),
            times(mesh_rel),
            format!("{:.0}/{:.0}/{:.0}", p50[0], p50[1], p50[2]),
            format!("{:.0}/{:.0}/{:.0}", p99[0], p99[1], p99[2]),
            times(ipt_rel),
        );
        medians.push(json!({
            "services": n,
            "none_per_second": none,
            "iptables_per_second": ipt,
            "mesh_per_second": mesh,
            "mesh_direct_per_second": direct,
            "mesh_over_iptables": mesh / ipt,
            "mesh_over_mesh_direct": mesh / direct,
            "mesh_vs_first": mesh_rel,
            "iptables_vs_first": ipt_rel,
            "p50_us": { "none": p50[0], "iptables": p50[1], "mesh": p50[2] },
            "p99_us": { "none": p99[0], "iptables": p99[1], "mesh": p99[2] },
        }));
    }
    let total = run_started.elapsed().as_secs_f64();
    let report = json!({
        "benchmark": "services",
        "machine": machine(),
        "cpu_dma_latency_held_at_0": latency.is_some(),
        "rounds": cli.rounds,
        "connections_per_measurement": cli.connections,
        "variants": {
            "none": "the client dials the server pod's address, outside the mesh's cgroup, no nat rule anywhere",
            "iptables": "a separate bed: kube-proxy's iptables-mode rules for every Service in the node's nat table; the client dials the last Service's address",
            "mesh": "client and server in the mesh's cgroup; the client dials the last Service's address, translated by the connect hook",
            "mesh-direct": "the same mesh client dialling the server pod's own address: the mesh's per-connection work (policy, flow events, socket tracking) without the translation",
        },
        "sizes": sizes,
        "medians": medians,
        "samples": samples,
        "total_seconds": total,
    });
    println!(
        "\nservices: new connections per second (connect, 1 byte each way, close) through a Service address,\n\
         {} alternating rounds of {} connections, medians; latency per connection;\n\
         /dev/cpu_dma_latency held at 0: {}\n",
        cli.rounds,
        cli.connections,
        latency.is_some()
    );
    print!("{table}");
    std::fs::create_dir_all(out)?;
    let path = out.join("services.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\ntotal {total:.0} s\nJSON: {}", path.display());
    let mut panels = Vec::new();
    for size in &sizes {
        let n = size["services"].clone();
        let keep = |s: &Value| s["services"] == n;
        panels.push(super::plot::Panel::of_rounds(
            format!("new connections per second, {n} Services"),
            "conn/s",
            &samples,
            &VARIANTS,
            keep,
            "per_second",
            1.0,
        ));
        panels.push(super::plot::Panel::of_rounds(
            format!("connection latency p99, {n} Services"),
            "µs",
            &samples,
            &VARIANTS,
            keep,
            "p99_us",
            1.0,
        ));
    }
    super::plot::beside(
        &path,
        "services: connections through a Service address, kube-proxy (iptables) vs the mesh",
        &panels,
    )?;
    drop(setups);
    Ok(())
}

/// The beds of one number of Services: the mesh's (an agent holding `n`
/// Services) and kube-proxy's (its rules for `n` Services).
struct Setup {
    services: usize,
    mesh_bed: TestBed,
    ipt_bed: TestBed,
    _servers: Vec<mesh_tests::process::Spawned>,
    _agent: Agent,
    server: SocketAddr,
    ipt_vip: SocketAddr,
    vip: SocketAddr,
    mesh_apply_ms: f64,
    restore_ms: f64,
}

impl Setup {
    fn new(n: usize) -> anyhow::Result<Self> {
        // The mesh: the agent on node 0, client and server in its cgroup;
        // the same client outside the cgroup dials the server's own
        // address for "none" (no program sees it, no nat rule anywhere).
        let mesh_bed = two_pod_bed(&format!("svc-m{n}"))?;
        mesh_bed.register_workload(0, "bench", "client", &[])?;
        mesh_bed.register_workload(1, "bench", "server", &[("app", "server")])?;
        let server = mesh_bed.pods[1].addr(false, SERVER_PORT);
        let mesh_server = mesh_bed.server(1, true, server, "echo")?;
        let agent = Agent::start_node(&mesh_bed, 0, &[])?;
        let applied = apply_mesh(&mesh_bed, &agent, &documents(n))?;
        let stats = agent::stats(&mesh_bed.pin_dir(0))?;
        let entries = stats["maps"]["SERVICES"]["entries"].as_u64().unwrap_or(0);
        ensure!(
            entries == n as u64,
            "SERVICES holds {entries} entries for {n} Services"
        );
        // kube-proxy: a bed of its own, where no agent ever ran; its rules
        // in the node's namespace, where pods' packets to a Service
        // address are routed (PREROUTING), and forwarding on, as on every
        // Kubernetes node.
        let ipt_bed = two_pod_bed(&format!("svc-i{n}"))?;
        ipt_bed.nodes[0]
            .netns
            .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let ipt_server = ipt_bed.pods[1].addr(false, SERVER_PORT);
        let plain_server = ipt_bed.server(1, false, ipt_server, "echo")?;
        let restore_ms = install_kube_proxy(&ipt_bed, n, ipt_server)?;
        // The measured Service is the last one: kube-proxy's KUBE-SERVICES
        // chain is walked in order, the mesh's map is not.
        let vip: SocketAddr = format!("{}:{SERVICE_PORT}", service_ip(n - 1)).parse()?;
        progress!(
            "{n} Services: mesh applied in {:.1} ms, iptables-restore in {restore_ms:.0} ms",
            applied.elapsed_ms
        );
        Ok(Self {
            services: n,
            mesh_bed,
            ipt_bed,
            _servers: vec![mesh_server, plain_server],
            _agent: agent,
            server,
            ipt_vip: vip,
            vip,
            mesh_apply_ms: applied.elapsed_ms,
            restore_ms,
        })
    }

    fn measure(&self, variant: &str, connections: usize) -> anyhow::Result<(f64, f64, f64)> {
        match variant {
            "none" => measure(&self.mesh_bed, false, self.server, connections),
            "iptables" => measure(&self.ipt_bed, false, self.ipt_vip, connections),
            "mesh" => measure(&self.mesh_bed, true, self.vip, connections),
            _ => measure(&self.mesh_bed, true, self.server, connections),
        }
    }
}
