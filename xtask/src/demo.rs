//! `cargo xtask demo`: the main job on one machine with no cluster. Two
//! nodes (network namespaces joined by a fabric), four workloads in two
//! namespaces, one agent per node in standalone mode, a policy, connections
//! that succeed and connections that are refused, mutual TLS between the
//! nodes (and a capture of the wire proving it carries only TLS), the flows
//! that say why, a Service (its address translated in the kernel before
//! policy, a canary split), and the same-node short-circuit carrying an
//! allowed connection. It ends by drawing node-0's service map
//! (target/demo/service-map-node-0.svg).
use std::time::Duration;

use anyhow::Context as _;
use mesh_tests::{
    agent::{self, Agent},
    capture::{self, Capture},
    topology::{TestBed, wait_for_line},
};

const T: Duration = Duration::from_secs(120);
const FRONTEND: usize = 0;
const CART: usize = 1;
const LEDGER: usize = 2;
const ROBOT: usize = 3;
const CART_V2: usize = 4;

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: cart}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: who, port: 81, targetPort: 8081}
---
apiVersion: v1
kind: Service
metadata: {name: cart-v1, namespace: shop}
spec:
  clusterIP: 10.96.0.21
  selector: {app: cart, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: who, port: 81, targetPort: 8081}]
---
apiVersion: v1
kind: Service
metadata: {name: cart-v2, namespace: shop}
spec:
  clusterIP: 10.96.0.22
  selector: {app: cart, version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: who, port: 81, targetPort: 8081}]
---
apiVersion: mesh.dev/v1alpha1
kind: TrafficSplit
metadata: {name: cart-canary, namespace: shop}
spec:
  service: cart
  backends:
  - {service: cart-v1, weight: 90}
  - {service: cart-v2, weight: 10}
";

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
    - port: 8081
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
---
apiVersion: mesh.dev/v1alpha1
kind: PeerAuthentication
metadata:
  name: strict
  namespace: mesh-system
spec:
  mtls:
    mode: STRICT
";

const NODES: &str = "\
apiVersion: mesh.dev/v1alpha1
kind: MeshNode
metadata: {name: node-0}
spec: {addresses: [198.19.255.1]}
---
apiVersion: mesh.dev/v1alpha1
kind: MeshNode
metadata: {name: node-1}
spec: {addresses: [198.19.255.2]}
";

pub fn run() -> anyhow::Result<()> {
    crate::build_binaries(false)?;
    let mut bed = TestBed::new("demo")?;
    bed.add_node()?;
    bed.connect_nodes()?;
    type Labels = &'static [(&'static str, &'static str)];
    let workloads: [(usize, &str, &str, Labels); 5] = [
        (0, "shop", "frontend", &[("app", "frontend")]),
        (0, "shop", "cart", &[("app", "cart"), ("version", "v1")]),
        (1, "bank", "ledger", &[("app", "ledger")]),
        (1, "shop", "robot", &[("app", "robot")]),
        (1, "shop", "cart", &[("app", "cart"), ("version", "v2")]),
    ];
    println!(
        "\n== Two nodes, five workloads (Workload documents in {})",
        bed.config_dir().display()
    );
    let mut servers = Vec::new();
    for (i, (node, ns, sa, labels)) in workloads.iter().enumerate() {
        bed.add_pod(*node)?;
        bed.register_workload(i, ns, sa, labels)?;
        let listen = "[::]:8080";
        servers.push(bed.server(i, true, listen.parse()?, "echo")?);
        servers.push(bed.server(i, true, "[::]:8081".parse()?, "whoami")?);
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

    bed.write_config("nodes.yaml", NODES)?;
    println!("\n== Services (services.yaml): cart, and a 90/10 canary split of it");
    print_indented(SERVICES);
    bed.write_config("services.yaml", SERVICES)?;
    let ca = bed.files.path().join("ca");
    let ca_dir = ca.display().to_string();
    cli(
        &bed,
        0,
        &[
            "ca",
            "init",
            "--trust-domain",
            "cluster.local",
            "--out",
            &ca_dir,
        ],
    )?;
    println!(
        "\n== A mesh CA (mesh-agent ca init) in {ca_dir}; MeshNode documents say where each agent listens"
    );

    println!(
        "\n== Starting mesh-agent on each node (standalone mode, mTLS with the CA inside, short-circuit on)"
    );
    let mut agents = Vec::new();
    for node in 0..2 {
        let agent = Agent::start_node(
            &bed,
            node,
            &[
                "--short-circuit",
                "on",
                "--ca-dir",
                &ca_dir,
                "--svid-lifetime",
                "1h",
                "--service-cidr",
                "10.96.0.0/16",
            ],
        )?;
        println!("   node-{node}: agent pid {}", agent.pid());
        agents.push(agent);
    }

    println!("\n== The wire between the nodes while robot sends a secret to frontend:");
    let wire = Capture::start(bed.fabric().context("fabric")?, "n0")?;
    let secret = "robot's plaintext secret";
    let to = bed.pods[FRONTEND].addr(false, 8080).to_string();
    bed.client(
        ROBOT,
        true,
        &["say", "--to", &to, "--text", secret, "--repeat", "500"],
        T,
    )?;
    let frames = wire.stop()?;
    let segments = capture::segments(&frames);
    let tunnel = segments
        .iter()
        .filter(|s| s.proto == 6 && (s.src.1 == 15008 || s.dst.1 == 15008))
        .count();
    let streams = capture::tcp_streams(&segments)?;
    let records: usize = streams
        .values()
        .map(|bytes| capture::tls_records(bytes).map(|r| r.len()))
        .sum::<anyhow::Result<usize>>()?;
    println!(
        "   {} frames, {} TCP segments, {tunnel} of them to or from port 15008 (HBONE)",
        frames.len(),
        segments.len()
    );
    println!(
        "   {} TCP streams, all of them TLS records only ({records} records)",
        streams.len()
    );
    println!(
        "   the secret appears on the wire: {}",
        if capture::contains(&frames, secret.as_bytes()) {
            "YES"
        } else {
            "no"
        }
    );

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
            ROBOT,
            FRONTEND,
            "tcp",
            "robot -> frontend, allowed: crosses the nodes inside mutual TLS",
        ),
        (
            FRONTEND,
            LEDGER,
            "tcp",
            "frontend -> ledger: bank/no-shop denies shop (other node)",
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

    println!("\n== Through the Service address (translated in the kernel, before policy):");
    for (from, target, what) in [
        (
            FRONTEND,
            "tcp:10.96.0.20:80",
            "frontend -> cart's Service: a backend that allows frontend",
        ),
        (
            ROBOT,
            "tcp:10.96.0.20:80",
            "robot -> cart's Service: the backend's policy still decides",
        ),
        (
            FRONTEND,
            "tcp:10.96.0.29:80",
            "frontend -> an address of the Service range no Service has",
        ),
    ] {
        let report = bed.client(from, true, &["probe", "--targets", target], T)?;
        println!(
            "   {:<10} {what}",
            report["results"][target].as_str().unwrap_or("?")
        );
    }
    let report = bed.client(
        FRONTEND,
        true,
        &["tally", "--to", "10.96.0.20:81", "--count", "1000"],
        T,
    )?;
    let v1 = bed.pods[CART].addr(false, 8081).to_string();
    let v2 = bed.pods[CART_V2].addr(false, 8081).to_string();
    println!(
        "   1000 connections to the canary split: cart v1 (node-0) {}, cart v2 (node-1, in mTLS) {}",
        report["answers"][&v1], report["answers"][&v2]
    );
    println!("\n== mesh-agent inspect services (node-0):");
    print_indented(&cli(&bed, 0, &["inspect", "services"])?);
    println!("\n== mesh-agent explain --from <frontend> --to shop/cart:80 (node-0):");
    let frontend = bed.pods[FRONTEND].ip4.to_string();
    print_indented(&cli(
        &bed,
        0,
        &["explain", "--from", &frontend, "--to", "shop/cart:80"],
    )?);

    println!("\n== mesh-agent inspect certs (node-0): the workloads' certificates");
    print_indented(&cli(&bed, 0, &["inspect", "certs"])?);

    println!("\n== A process in robot's pod but outside the mesh's cgroup is not checked at");
    println!("   connect and not tunnelled; cart is STRICT: node-0's tc program drops plaintext:");
    let target = format!("tcp:{}", bed.pods[CART].addr(false, 8080));
    let report = bed.client(
        ROBOT,
        false,
        &["probe", "--targets", &target, "--timeout-ms", "500"],
        T,
    )?;
    println!(
        "   {:<10} robot (outside the cgroup, plaintext) -> cart: dropped on arrival",
        report["results"][&target].as_str().unwrap_or("?")
    );

    println!("\n== mesh-agent flows (node-0): tunnel-in events carry the identity mTLS verified");
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

    println!("\n== mesh-agent graph (node-0): the service map of what the demo did");
    let map = crate::workspace_root().join("target/demo/service-map-node-0.svg");
    std::fs::create_dir_all(map.parent().context("a parent")?)?;
    std::fs::write(&map, cli(&bed, 0, &["graph"])?)
        .with_context(|| format!("writing {}", map.display()))?;
    print_indented(&cli(&bed, 0, &["graph", "-o", "dot"])?);
    println!("   Open {} to see it.", map.display());

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
