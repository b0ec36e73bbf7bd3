//! `cargo xtask demo`: the main job on one machine with no cluster. Two
//! nodes (network namespaces joined by a fabric), four workloads in two
//! namespaces, one agent per node in standalone mode, a policy, connections
//! that succeed and connections that are refused, the flows that say why,
//! and the same-node short-circuit carrying an allowed connection.
use std::time::Duration;

use anyhow::Context as _;
use mesh_tests::{
    agent::{self, Agent},
    topology::{TestBed, wait_for_line},
};

const T: Duration = Duration::from_secs(120);
const FRONTEND: usize = 0;
const CART: usize = 1;
const LEDGER: usize = 2;
const ROBOT: usize = 3;

const POLICY: &str = "\
apiVersion: mesh.dev/v1alpha1
kind: MeshPolicy
metadata:
  name: cart
  namespace: shop
spec:
  selector:
    serviceAccount: cart
  rules:
  - from:
    - identity: spiffe://cluster.local/ns/shop/sa/frontend
    ports:
    - port: 8080
---
apiVersion: mesh.dev/v1alpha1
kind: MeshPolicy
metadata:
  name: no-shop
  namespace: bank
spec:
  action: DENY
  rules:
  - from:
    - namespace: shop
";

pub fn run() -> anyhow::Result<()> {
    crate::build_binaries(false)?;
    let mut bed = TestBed::new("demo")?;
    bed.add_node()?;
    bed.connect_nodes()?;
    let workloads = [
        (0, "shop", "frontend"),
        (0, "shop", "cart"),
        (1, "bank", "ledger"),
        (1, "shop", "robot"),
    ];
    println!(
        "\n== Two nodes, four workloads (Workload documents in {})",
        bed.config_dir().display()
    );
    let mut servers = Vec::new();
    for (i, (node, ns, sa)) in workloads.iter().enumerate() {
        bed.add_pod(*node)?;
        bed.register_workload(i, ns, sa, &[("app", sa)])?;
        let listen = "[::]:8080";
        servers.push(bed.server(i, true, listen.parse()?, "echo")?);
        let mut udp = bed.workload(i, &["serve", "--proto", "udp", "--listen", listen])?;
        wait_for_line(&mut udp, "listening")?;
        servers.push(udp);
        println!(
            "   node-{node}  {:<32} {:<15} {}",
            format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            bed.pods[i].ip4,
            bed.pods[i].ip6
        );
    }

    println!("\n== The policy (policies.yaml):");
    print_indented(POLICY);
    bed.write_config("policies.yaml", POLICY)?;

    println!("\n== Starting mesh-agent on each node (standalone mode, short-circuit on)");
    let mut agents = Vec::new();
    for node in 0..2 {
        let agent = Agent::start_node(&bed, node, &["--short-circuit", "on"])?;
        println!("   node-{node}: agent pid {}", agent.pid());
        agents.push(agent);
    }

    println!("\n== Connections from the workloads (in the mesh):");
    let cases = [
        (
            FRONTEND,
            CART,
            "tcp",
            "frontend -> cart, allowed by shop/cart (same node)",
        ),
        (
            ROBOT,
            CART,
            "tcp",
            "robot -> cart: cart allows only frontend (other node)",
        ),
        (
            FRONTEND,
            LEDGER,
            "udp",
            "frontend -> ledger: bank/no-shop denies shop",
        ),
        (
            LEDGER,
            FRONTEND,
            "tcp",
            "ledger -> frontend: no ALLOW selects frontend",
        ),
    ];
    for (from, to, proto, what) in cases {
        let target = format!("{proto}:{}", bed.pods[to].addr(false, 8080));
        let report = bed.client(from, true, &["probe", "--targets", &target], T)?;
        println!(
            "   {:<10} {what}",
            report["results"][&target].as_str().unwrap_or("?")
        );
    }

    println!("\n== A process in robot's pod but outside the mesh's cgroup is not checked at");
    println!("   connect; node-0's tc program judges its packets by source address:");
    let target = format!("tcp:{}", bed.pods[CART].addr(false, 8080));
    let report = bed.client(
        ROBOT,
        false,
        &["probe", "--targets", &target, "--timeout-ms", "500"],
        T,
    )?;
    println!(
        "   {:<10} robot (outside the cgroup) -> cart: dropped on arrival",
        report["results"][&target].as_str().unwrap_or("?")
    );

    println!("\n== mesh-agent flows (node-0):");
    print_indented(&cli(&bed, 0, &["flows"])?);
    println!("\n== mesh-agent explain --from <robot> --to <cart> --port 8080 (node-0):");
    let robot = bed.pods[ROBOT].ip4.to_string();
    let cart = bed.pods[CART].ip4.to_string();
    print_indented(&cli(
        &bed,
        0,
        &["explain", "--from", &robot, "--to", &cart, "--port", "8080"],
    )?);
    println!("\n== mesh-agent inspect policy (node-0):");
    print_indented(&cli(&bed, 0, &["inspect", "policy"])?);

    println!(
        "\n== The allowed same-node connection is short-circuited: 1 B … 16 MiB, every byte checked"
    );
    let to = bed.pods[CART].addr(false, 8080).to_string();
    let report = bed.client(
        FRONTEND,
        true,
        &["transfer", "--to", &to, "--sizes", "1,65536,16777216"],
        T,
    )?;
    println!("   {report}");
    let stats = agent::stats(&bed.pin_dir(0))?;
    println!(
        "   node-0 counters: msgs_redirected {}, bytes_redirected {}, policy_allowed {}, policy_denied {}",
        stats["counters"]["msgs_redirected"],
        stats["counters"]["bytes_redirected"],
        stats["counters"]["policy_allowed"],
        stats["counters"]["policy_denied"]
    );

    println!("\n== Stopping the agents (the programs stay attached) and cleaning up");
    for mut agent in agents {
        agent.stop().context("stopping an agent")?;
    }
    Ok(())
}

fn cli(bed: &TestBed, node: usize, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(agent::agent_bin())
        .arg("--bpffs")
        .arg(bed.pin_dir(node))
        .arg("--state-dir")
        .arg(bed.state_dir(node))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "mesh-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}
