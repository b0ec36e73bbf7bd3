//! Identity-based allow/deny on the real kernel: workloads and MeshPolicy
//! documents in a directory, one agent per node (network namespaces joined
//! by a fabric), real connections from real processes in the pods.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    agent::{self, Agent},
    process::Spawned,
    topology::{TestBed, wait_for_line},
};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const PORTS: [u16; 2] = [8080, 9090];
const TD: &str = "spiffe://cluster.local";

/// A workload of the tests: where it runs and who it is.
struct W {
    node: usize,
    namespace: &'static str,
    sa: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

const fn w(
    node: usize,
    namespace: &'static str,
    sa: &'static str,
    labels: &'static [(&'static str, &'static str)],
) -> W {
    W {
        node,
        namespace,
        sa,
        labels,
    }
}

/// Builds the bed: the nodes (connected when more than one), the pods, their
/// Workload documents, TCP and UDP echo servers on both ports in every pod.
fn bed_with(test: &str, nodes: usize, workloads: &[W]) -> (TestBed, Vec<Spawned>) {
    let mut bed = TestBed::new(test).unwrap();
    for _ in 1..nodes {
        bed.add_node().unwrap();
    }
    if nodes > 1 {
        bed.connect_nodes().unwrap();
    }
    let mut servers = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        bed.add_pod(w.node).unwrap();
        bed.register_workload(i, w.namespace, w.sa, w.labels)
            .unwrap();
        for port in PORTS {
            let listen = format!("[::]:{port}");
            servers.push(
                bed.server(i, true, listen.parse().unwrap(), "echo")
                    .unwrap(),
            );
            let mut udp = bed
                .workload(i, &["serve", "--proto", "udp", "--listen", &listen])
                .unwrap();
            wait_for_line(&mut udp, "listening").unwrap();
            servers.push(udp);
        }
    }
    (bed, servers)
}

fn start_agents(bed: &TestBed, extra: &[&str]) -> Vec<Agent> {
    (0..bed.nodes.len())
        .map(|n| Agent::start_node(bed, n, extra).unwrap())
        .collect()
}

fn target(bed: &TestBed, pod: usize, port: u16, udp: bool, v6: bool) -> String {
    let proto = if udp { "udp" } else { "tcp" };
    format!("{proto}:{}", bed.pods[pod].addr(v6, port))
}

/// Runs `mesh-pod probe` in `pod` (in the mesh, or outside its cgroup) and
/// returns target → result.
fn probe(
    bed: &TestBed,
    pod: usize,
    in_mesh: bool,
    targets: &[String],
    timeout_ms: u64,
) -> BTreeMap<String, String> {
    let timeout = timeout_ms.to_string();
    let list = targets.join(",");
    let args = ["probe", "--targets", &list, "--timeout-ms", &timeout];
    let report = bed.client(pod, in_mesh, &args, T).unwrap();
    report["results"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

fn probe_one(bed: &TestBed, pod: usize, target: &str) -> String {
    probe(bed, pod, true, &[target.to_string()], 1000)
        .into_values()
        .next()
        .unwrap()
}

fn policy(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

/// `mesh-agent --bpffs … --state-dir … args…` for `node`, stdout.
fn cli(bed: &TestBed, node: usize, args: &[&str]) -> String {
    agent::node_cli(bed, node, args).unwrap()
}

fn cli_json(bed: &TestBed, node: usize, args: &[&str]) -> Value {
    serde_json::from_str(&cli(bed, node, args)).unwrap()
}

/// `mesh-agent explain -o json` on node 0.
fn explain(bed: &TestBed, from: &str, to: &str, port: u16) -> Value {
    let port = port.to_string();
    let args = [
        "explain", "--from", from, "--to", to, "--port", &port, "-o", "json",
    ];
    cli_json(bed, 0, &args)
}

/// The six workloads of the connectivity matrix: two namespaces, two nodes.
const MATRIX: [W; 6] = [
    w(0, "shop", "frontend", &[("app", "frontend")]),
    w(0, "shop", "cart", &[("app", "cart")]),
    w(0, "bank", "ledger", &[("app", "ledger")]),
    w(1, "shop", "payments", &[("app", "payments")]),
    w(1, "bank", "teller", &[("app", "teller")]),
    w(1, "bank", "audit", &[("app", "audit"), ("tier", "ops")]),
];
const FRONTEND: usize = 0;
const CART: usize = 1;
const LEDGER: usize = 2;
const PAYMENTS: usize = 3;
const TELLER: usize = 4;
const AUDIT: usize = 5;

fn matrix_policies(bed: &TestBed) {
    let docs = [
        policy(
            "shop",
            "cart",
            "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n    ports:\n    - port: 8080\n  - from:\n    - namespace: bank\n    ports:\n    - port: 9090\n      protocol: TCP\n    - port: 9090\n      protocol: UDP\n",
        ),
        policy(
            "shop",
            "payments",
            "  selector:\n    matchLabels: {app: payments}\n  action: ALLOW\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/cart\n    ports:\n    - port: 8080\n    - port: 8080\n      protocol: UDP\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/front*\n    ports:\n    - port: 9090\n      protocol: UDP\n",
        ),
        policy(
            "bank",
            "no-shop",
            "  action: DENY\n  rules:\n  - from:\n    - namespace: shop\n",
        ),
        policy(
            "bank",
            "ledger",
            "  selector:\n    serviceAccount: ledger\n  rules:\n  - from:\n    - namespace: bank\n",
        ),
        policy(
            "mesh-system",
            "audit-not-on-9090",
            "  action: DENY\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/bank/sa/audit\n    ports:\n    - port: 9090\n    - port: 9090\n      protocol: UDP\n",
        ),
    ];
    bed.write_config("policies.yaml", &docs.join("---\n"))
        .unwrap();
}

/// What the matrix policies say, written out by hand from the documents
/// above (not computed by the agent's code).
fn matrix_allows(src: usize, dst: usize, port: u16, udp: bool) -> bool {
    let ns = |w: usize| MATRIX[w].namespace;
    // Root-namespace DENY: audit may not reach anything on 9090.
    if src == AUDIT && port == 9090 {
        return false;
    }
    match dst {
        CART => (src == FRONTEND && port == 8080 && !udp) || (ns(src) == "bank" && port == 9090),
        PAYMENTS => (src == CART && port == 8080) || (src == FRONTEND && port == 9090 && udp),
        FRONTEND => true, // selected by no ALLOW: the mesh default (allow)
        LEDGER | TELLER | AUDIT => ns(src) == "bank", // DENY from shop; ledger: ALLOW bank
        _ => unreachable!(),
    }
}

#[test]
fn connectivity_matrix_six_workloads_two_namespaces_two_nodes() {
    let (bed, _servers) = bed_with("matrix", 2, &MATRIX);
    matrix_policies(&bed);
    let agents = start_agents(&bed, &[]);

    let mut failures = Vec::new();
    let mut checked = 0;
    for (src, source) in MATRIX.iter().enumerate() {
        let mut targets = Vec::new();
        let mut expected = BTreeMap::new();
        for dst in (0..MATRIX.len()).filter(|&d| d != src) {
            for port in PORTS {
                for udp in [false, true] {
                    for v6 in [false, true] {
                        let t = target(&bed, dst, port, udp, v6);
                        let want = if matrix_allows(src, dst, port, udp) {
                            "connected"
                        } else {
                            "eperm"
                        };
                        expected.insert(t.clone(), (dst, want));
                        targets.push(t);
                    }
                }
            }
        }
        for (t, got) in probe(&bed, src, true, &targets, 2000) {
            let (dst, want) = expected[&t];
            checked += 1;
            if got != want {
                failures.push(format!(
                    "{} -> {} {t}: expected {want}, got {got}",
                    source.sa, MATRIX[dst].sa
                ));
            }
        }
    }
    assert_eq!(checked, 6 * 5 * 2 * 2 * 2);
    assert!(
        failures.is_empty(),
        "{} of {checked} verdicts wrong:\n{}\nagent 0:\n{}",
        failures.len(),
        failures.join("\n"),
        agents[0].log()
    );

    // Cross-node flows that were allowed passed the destination's tc
    // program, which judged them once per flow and kept the verdict.
    let ct = cli_json(&bed, 1, &["inspect", "conntrack", "-o", "json"]);
    let inbound_allowed = ct
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["direction"] == "inbound" && f["action"] == "ALLOW")
        .count();
    assert!(
        inbound_allowed > 0,
        "no inbound flows in node 1's conntrack: {ct}"
    );
}

#[test]
fn the_destination_node_judges_traffic_that_was_not_checked_at_its_source() {
    let (bed, _servers) = bed_with("ingress", 2, &MATRIX);
    matrix_policies(&bed);
    let _agents = start_agents(&bed, &[]);

    // A process in the frontend pod but outside the mesh's cgroup: its
    // connects are not checked on node 0, so node 1's tc program must judge
    // them by the source address (still frontend's identity).
    let denied = target(&bed, PAYMENTS, 8080, false, false);
    let denied_v6 = target(&bed, PAYMENTS, 8080, false, true);
    let allowed_udp = target(&bed, PAYMENTS, 9090, true, false);
    let allowed_udp_v6 = target(&bed, PAYMENTS, 9090, true, true);
    let results = probe(
        &bed,
        FRONTEND,
        false,
        &[
            denied.clone(),
            denied_v6.clone(),
            allowed_udp.clone(),
            allowed_udp_v6.clone(),
        ],
        400,
    );
    assert_eq!(results[&denied], "timeout", "{results:?}");
    assert_eq!(results[&denied_v6], "timeout", "{results:?}");
    // The reply of an allowed flow gets back through node 0's tc program
    // (a reply to a flow node 0 saw leave).
    assert_eq!(results[&allowed_udp], "connected", "{results:?}");
    assert_eq!(results[&allowed_udp_v6], "connected", "{results:?}");

    let ct = cli_json(&bed, 1, &["inspect", "conntrack", "-o", "json"]);
    let denied_flow = ct.as_array().unwrap().iter().find(|f| {
        f["dst"] == bed.pods[PAYMENTS].addr(false, 8080).to_string() && f["action"] == "DENY"
    });
    assert!(denied_flow.is_some(), "no denied flow in conntrack: {ct}");
    let ct0 = cli_json(&bed, 0, &["inspect", "conntrack", "-o", "json"]);
    assert!(
        ct0.as_array()
            .unwrap()
            .iter()
            .any(|f| f["direction"] == "outbound"),
        "node 0 recorded no outbound flow: {ct0}"
    );
}

/// Another program on the node's interface, attached before the agent
/// starts, as a CNI's would be, that ends the TCX chain with TC_ACT_OK:
/// the mesh's tc programs still judge what arrives (they attach first), and
/// let later programs run when they pass (TCX_NEXT).
#[test]
fn another_tc_program_on_the_interface_does_not_skip_the_mesh() {
    let (bed, _servers) = bed_with("tcx-order", 2, &MATRIX);
    matrix_policies(&bed);
    use mesh_tests::foreign_tc::{Verdict, attach_ingress};
    let uplink = mesh_tests::topology::UPLINK;
    let before = attach_ingress(&bed.nodes[1].netns, uplink, Verdict::Pass).unwrap();
    let _agents = start_agents(&bed, &[]);
    let denied = target(&bed, PAYMENTS, 8080, false, false);
    let allowed_udp = target(&bed, PAYMENTS, 9090, true, false);
    let both = [denied.clone(), allowed_udp.clone()];
    let results = probe(&bed, FRONTEND, false, &both, 400);
    assert_eq!(results[&denied], "timeout", "{results:?}");
    assert_eq!(results[&allowed_udp], "connected", "{results:?}");
    // A program after the mesh's still has its say on what the mesh lets
    // through: this one drops everything. (The pass-all one goes first:
    // its TC_ACT_OK would end the chain before the new one.)
    drop(before);
    let _after = attach_ingress(&bed.nodes[1].netns, uplink, Verdict::Drop).unwrap();
    let results = probe(&bed, FRONTEND, false, &both, 400);
    assert_eq!(results[&allowed_udp], "timeout", "{results:?}");
}

/// Three workloads on one node: a client, a second client, a server.
const TRIO: [W; 3] = [
    w(0, "shop", "frontend", &[("app", "frontend")]),
    w(0, "shop", "robot", &[("app", "robot")]),
    w(0, "shop", "cart", &[("app", "cart")]),
];

#[test]
fn deny_wins_over_allow_and_an_allow_makes_its_workloads_default_deny() {
    let (bed, _servers) = bed_with("denywins", 1, &TRIO);
    let _agent = Agent::start_node(&bed, 0, &[]).unwrap();
    let to_8080 = target(&bed, 2, 8080, false, false);
    let to_9090 = target(&bed, 2, 9090, false, false);
    // No policy: the mesh default (allow).
    assert_eq!(probe_one(&bed, 0, &to_9090), "connected");
    assert_eq!(probe_one(&bed, 1, &to_9090), "connected");

    let allow = policy(
        "shop",
        "cart-allow",
        "  selector:\n    matchLabels: {app: cart}\n  rules:\n  - from:\n    - namespace: shop\n    ports:\n    - port: 8080\n",
    );
    let deny = policy(
        "shop",
        "no-robots",
        "  selector:\n    serviceAccount: cart\n  action: DENY\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/robot\n",
    );
    bed.write_config("allow.yaml", &allow).unwrap();
    bed.write_config("deny.yaml", &deny).unwrap();
    wait_until(&bed, 1, &to_8080, "eperm");
    // frontend: allowed on 8080, and 9090 is now denied (default-deny).
    assert_eq!(probe_one(&bed, 0, &to_8080), "connected");
    assert_eq!(probe_one(&bed, 0, &to_9090), "eperm");
    // robot: the ALLOW matches, the DENY wins.
    assert_eq!(probe_one(&bed, 1, &to_8080), "eperm");

    let answer = explain(
        &bed,
        &bed.pods[1].ip4.to_string(),
        &bed.pods[2].ip4.to_string(),
        8080,
    );
    assert_eq!(answer[0]["verdict"], "DENY", "{answer}");
    assert_eq!(answer[0]["reason"], "shop/no-robots rule 0", "{answer}");
    let answer = explain(
        &bed,
        &format!("{TD}/ns/shop/sa/frontend"),
        &format!("{TD}/ns/shop/sa/cart"),
        9090,
    );
    assert_eq!(answer[0]["verdict"], "DENY", "{answer}");
    assert_eq!(
        answer[0]["rule"],
        mesh_common::policy::RULE_NOT_ALLOWED,
        "{answer}"
    );
}

/// The agent marks its own sockets (`AGENT_SOCKET_MARK`) so that the
/// connect hooks let its tunnels through. Since Linux 5.17 any process with
/// CAP_NET_RAW (granted to pods by default) can set a mark: a workload that
/// borrows the agent's must still be judged.
#[test]
fn a_workload_that_sets_the_agents_socket_mark_is_still_judged() {
    let (bed, _servers) = bed_with("agentmark", 1, &TRIO);
    let _agent = Agent::start_node(&bed, 0, &[]).unwrap();
    let only_frontend = policy(
        "shop",
        "cart-frontend-only",
        "  selector:\n    matchLabels: {app: cart}\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n",
    );
    bed.write_config("cart.yaml", &only_frontend).unwrap();
    let to_cart: Vec<String> = [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .map(|(udp, v6)| target(&bed, 2, 8080, udp, v6))
        .collect();
    wait_until(&bed, 1, &to_cart[0], "eperm");

    let mark = format!("{:#x}", mesh_common::AGENT_SOCKET_MARK);
    let list = to_cart.join(",");
    let args = [
        "probe",
        "--targets",
        &list,
        "--timeout-ms",
        "1000",
        "--mark",
        &mark,
    ];
    let marked = bed.client(1, true, &args, T).unwrap();
    for target in &to_cart {
        assert_eq!(
            marked["results"][target], "eperm",
            "robot with the agent's mark: {marked}"
        );
    }
    // The mark takes nothing away from an allowed workload.
    let marked = bed.client(0, true, &args, T).unwrap();
    for target in &to_cart {
        assert_eq!(
            marked["results"][target], "connected",
            "frontend with the agent's mark: {marked}"
        );
    }
}

/// Workloads are reached over TCP and UDP, the protocols policy speaks of.
/// Any other protocol the connect and sendmsg hooks see (UDP-Lite here;
/// SCTP, when the kernel has it) is refused towards a mesh workload, as the
/// destination node's tc program already drops it: a denied workload must
/// not get through on a protocol no rule can name.
///
/// The UDP-Lite echo server runs in cart's pod but outside the mesh's
/// cgroup, so its answers are not judged: a probe that gets its echo back
/// has reached the pod.
fn udplite_bed(test: &str) -> (TestBed, Vec<Spawned>) {
    let (bed, mut servers) = bed_with(test, 1, &TRIO);
    let mut lite = bed
        .outsider(2, &["serve", "--proto", "udplite", "--listen", "[::]:7070"])
        .unwrap();
    wait_for_line(&mut lite, "listening").unwrap();
    servers.push(lite);
    (bed, servers)
}

fn only_frontend_reaches_cart(bed: &TestBed) {
    let only_frontend = policy(
        "shop",
        "cart-frontend-only",
        "  selector:\n    matchLabels: {app: cart}\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n",
    );
    bed.write_config("cart.yaml", &only_frontend).unwrap();
    wait_until(bed, 1, &target(bed, 2, 8080, false, false), "eperm");
}

fn udplite_targets(bed: &TestBed, kind: &str) -> Vec<String> {
    [false, true]
        .into_iter()
        .map(|v6| format!("{kind}:{}", bed.pods[2].addr(v6, 7070)))
        .collect()
}

#[test]
fn other_transport_protocols_do_not_reach_mesh_workloads() {
    let (bed, _servers) = udplite_bed("udplite");
    let _agent = Agent::start_node(&bed, 0, &[]).unwrap();
    only_frontend_reaches_cart(&bed);
    let to_cart = udplite_targets(&bed, "udplite-sendto");
    // robot (denied), then frontend (allowed TCP and UDP).
    for pod in [1, 0] {
        let results = probe(&bed, pod, true, &to_cart, 1000);
        for target in &to_cart {
            assert_eq!(results[target], "eperm", "pod {pod}: {results:?}");
        }
    }
    // The server is there and answers inside its own pod, outside the
    // mesh's cgroup (no hook, no interface crossed): the refusals above are
    // the mesh's.
    let results = probe(&bed, 2, false, &to_cart, 1000);
    for target in &to_cart {
        assert_eq!(results[target], "connected", "cart itself: {results:?}");
    }
    // A process in robot's pod outside the cgroup passes no hook, and
    // delivery to cart drops what it cannot read the ports of.
    let results = probe(&bed, 1, false, &to_cart, 1000);
    for target in &to_cart {
        assert_eq!(results[target], "timeout", "outside the mesh: {results:?}");
    }
}

/// A connected UDP-Lite socket meets no sock_addr hook: the kernel's
/// UDP-Lite has no pre-connect hook, and a connected socket's sendmsg runs
/// none. The sock_create program refuses the socket itself in workloads'
/// namespaces.
#[test]
fn a_connected_udplite_socket_does_not_reach_a_denied_workload() {
    let (bed, _servers) = udplite_bed("udplite-connected");
    let _agent = Agent::start_node(&bed, 0, &[]).unwrap();
    only_frontend_reaches_cart(&bed);
    let to_cart = udplite_targets(&bed, "udplite");
    let results = probe(&bed, 1, true, &to_cart, 1000);
    for target in &to_cart {
        assert_eq!(results[target], "eperm", "robot: {results:?}");
    }
}

/// cart's IPv6 link-local address, as robot reaches it: `[fe80::…%<robot's
/// eth0 index>]:port`.
fn link_local_target(bed: &TestBed, proto: &str, port: u16) -> String {
    let addr = bed.pods[2]
        .netns
        .exec(
            "ip",
            &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"],
        )
        .unwrap();
    let ip = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("cart has no link-local address: {addr}"))
        .to_string();
    let link = bed.pods[1]
        .netns
        .exec("ip", &["-o", "link", "show", "eth0"])
        .unwrap();
    let index = link.split(':').next().unwrap().trim().to_string();
    format!("{proto}:[{ip}%{index}]:{port}")
}

/// A neighbour's link-local address, a multicast group or the broadcast
/// address names no workload policy could judge: past the connect hook,
/// whoever answers on the bridge would get the traffic unjudged.
#[test]
fn link_local_multicast_and_broadcast_destinations_do_not_reach_neighbours() {
    let (bed, _servers) = bed_with("linklocal", 1, &TRIO);
    let _agent = Agent::start_node(&bed, 0, &[]).unwrap();
    only_frontend_reaches_cart(&bed);
    let targets = vec![
        link_local_target(&bed, "tcp", 8080),
        link_local_target(&bed, "udp-sendto", 9090),
        "udp-sendto:224.0.0.1:9090".to_string(),
        "udp-sendto:[ff02::1%2]:9090".to_string(),
    ];
    // Outside the mesh's cgroup no hook refuses them, but robot's
    // link-local source is no workload address: the check on the node's
    // side of robot's interface drops them.
    let outside = probe(&bed, 1, false, &targets[..2], 1000);
    assert_eq!(outside[&targets[0]], "timeout", "{outside:?}");
    assert_ne!(outside[&targets[1]], "eperm", "{outside:?}");
    // A workload is refused, allowed peers included (policy cannot say
    // who is at the other end).
    for pod in [1, 0] {
        let results = probe(&bed, pod, true, &targets, 1000);
        for target in &targets {
            assert_eq!(results[target], "eperm", "pod {pod}: {results:?}");
        }
    }
}

/// A raw socket sends what its process writes, TCP SYNs included, past
/// connect(2) and every hook of it: in a workload's network namespace the
/// mesh refuses to create one.
#[test]
fn a_raw_socket_does_not_reach_a_denied_workload() {
    let (bed, _servers) = bed_with("rawsyn", 1, &TRIO);
    let _agent = Agent::start_node(&bed, 0, &[]).unwrap();
    only_frontend_reaches_cart(&bed);
    let syn = format!("raw-syn:{}", bed.pods[2].addr(false, 8080));
    // Outside the mesh's cgroup the hand-made SYN passes every connect
    // hook; delivery to cart judges it (see the packet socket test).
    let outside = probe(&bed, 1, false, std::slice::from_ref(&syn), 1000);
    assert_eq!(outside[&syn], "timeout", "{outside:?}");
    assert_eq!(
        probe(&bed, 1, true, std::slice::from_ref(&syn), 1000)[&syn],
        "eperm"
    );
}

/// Runs `mesh-pod args…` in `node`'s network namespace, outside the mesh's
/// cgroup (a host process of that node), and returns its report.
fn on_node(bed: &TestBed, node: usize, args: &[&str]) -> Value {
    let mut cmd = std::process::Command::new(mesh_tests::topology::pod_tool());
    cmd.args(args).stdout(std::process::Stdio::piped());
    let placement = mesh_tests::process::Placement {
        netns: Some(&bed.nodes[node].netns),
        cgroup: None,
    };
    let out = Spawned::spawn(cmd, &placement)
        .unwrap()
        .wait_output(T)
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Someone on another node forges a datagram from frontend (which may
/// reach cart) to cart. Judged as frontend's, it would be delivered, and
/// cart's socket, having heard from frontend, could answer it although
/// policy denies cart → frontend. A workload of this node never arrives
/// through the node's interfaces: such packets are dropped.
#[test]
fn a_packet_from_another_node_claiming_a_local_workload_is_dropped() {
    const FRONTEND: usize = 0;
    const CART: usize = 2;
    let (bed, _servers) = bed_with("spoof", 2, &TRIO);
    let _agents = start_agents(&bed, &[]);
    only_frontend_reaches_cart(&bed);
    let frontend_from_robot_only = policy(
        "shop",
        "frontend-robot-only",
        "  selector:\n    matchLabels: {app: frontend}\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/robot\n",
    );
    bed.write_config("frontend.yaml", &frontend_from_robot_only)
        .unwrap();
    for v6 in [false, true] {
        let back = target(&bed, FRONTEND, 7000, true, v6);
        wait_until(&bed, CART, &back, "eperm");
        // Node 1 takes frontend's address as its own, as a forger would.
        let forged = bed.pods[FRONTEND].addr(v6, 7000);
        let address = format!("{}/{}", forged.ip(), if v6 { 128 } else { 32 });
        let mut add = vec!["addr", "add", &address, "dev", "lo"];
        if v6 {
            add.push("nodad");
        }
        bed.nodes[1].netns.ip(&add).unwrap();
        let listen = if v6 { "[::]:7000" } else { "0.0.0.0:7000" };
        let mut frontend = bed
            .workload(
                FRONTEND,
                &["await-datagram", "--listen", listen, "--timeout-ms", "1500"],
            )
            .unwrap();
        wait_for_line(&mut frontend, "listening").unwrap();
        let cart = bed.pods[CART].addr(v6, 9090).to_string();
        let sent = on_node(
            &bed,
            1,
            &[
                "datagram",
                "--from",
                &forged.to_string(),
                "--to",
                &cart,
                "--text",
                "forged",
            ],
        );
        assert_eq!(sent["ok"], true, "{sent}");
        let out = frontend.wait_output(T).unwrap();
        let heard: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            heard["result"], "timeout",
            "cart answered frontend through a forged datagram: {heard}"
        );
        assert!(counter(&bed, "spoofed_source") > 0);
    }
}

/// A client on node 0 that only robot may reach (so replies to it pass only
/// as replies), a server on node 1 that lets it in.
const ACROSS: [W; 2] = [
    w(0, "shop", "frontend", &[("app", "frontend")]),
    w(1, "shop", "cart", &[("app", "cart")]),
];

fn frontend_reached_by_robot_only(bed: &TestBed) {
    let doc = policy(
        "shop",
        "frontend-robot-only",
        "  selector:\n    matchLabels: {app: frontend}\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/robot\n",
    );
    bed.write_config("frontend.yaml", &doc).unwrap();
}

/// Node 0 forgets nothing its workloads opened when another node floods it
/// with new flows: frontend waits for cart's answer on a connection while
/// 18,000 new flows arrive for frontend, each seen twice, eighteen times
/// what node 0's conntrack holds. Without its record, cart's answer would
/// be judged as a new flow towards frontend, denied (only robot may reach
/// it) and the connection would hang.
#[test]
fn a_flood_from_another_node_does_not_cut_a_live_flow() {
    const FRONTEND: usize = 0;
    const CART: usize = 1;
    let (bed, _servers) = bed_with("ctflood", 2, &ACROSS);
    frontend_reached_by_robot_only(&bed);
    let _agents = [
        Agent::start_node(&bed, 0, &["--max-conntrack", "1024"]).unwrap(),
        Agent::start_node(&bed, 1, &[]).unwrap(),
    ];
    wait_until(
        &bed,
        CART,
        &target(&bed, FRONTEND, 8080, false, false),
        "eperm",
    );
    let mut hold = bed
        .workload(
            CART,
            &[
                "serve",
                "--listen",
                "[::]:7070",
                "--mode",
                "hold",
                "--hold-ms",
                "3000",
            ],
        )
        .unwrap();
    wait_for_line(&mut hold, "listening").unwrap();
    let to = bed.pods[CART].addr(false, 7070).to_string();
    let client = bed
        .workload(FRONTEND, &["flood", "--to", &to, "--bytes", "1000"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let flood_to = bed.pods[FRONTEND].addr(false, 20_000).to_string();
    // Each flow twice in a row (an LRU keeps flows seen twice over flows
    // seen once), 900 flows a round from a new source port, 20 rounds.
    let flood = on_node(
        &bed,
        1,
        &[
            "datagram", "--to", &flood_to, "--text", "x", "--count", "900", "--times", "2",
            "--rounds", "20",
        ],
    );
    assert_eq!(flood["sent"], 36_000, "{flood}");
    let out = client.wait_output(T).unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["ok"], true,
        "the connection did not survive the flood: {report}"
    );
    assert_eq!(report["bytes"], 1000, "{report}");
}

/// A verdict cached for one identity is not reused for another that takes
/// the same address: the same UDP flow from the same address is judged
/// again when the address's workload changes.
#[test]
fn a_cached_verdict_does_not_outlive_the_identity_it_was_given_to() {
    const CART: usize = 0;
    const CLIENT: usize = 1;
    let workloads = [
        w(0, "shop", "cart", &[("app", "cart")]),
        w(1, "shop", "frontend", &[("app", "frontend")]),
    ];
    let (bed, _servers) = bed_with("ctreuse", 2, &workloads);
    let only_frontend = policy(
        "shop",
        "cart-frontend-only",
        "  selector:\n    matchLabels: {app: cart}\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n",
    );
    bed.write_config("cart.yaml", &only_frontend).unwrap();
    let _agents = start_agents(&bed, &[]);
    let from = bed.pods[CLIENT].addr(false, 7001).to_string();
    let to = bed.pods[CART].addr(false, 9090).to_string();
    // Outside the mesh's cgroup: node 1 does not judge it, node 0 does, by
    // the source address.
    let args = [
        "datagram",
        "--from",
        &from,
        "--to",
        &to,
        "--text",
        "hi",
        "--await-ms",
        "1000",
    ];
    let first = bed.client(CLIENT, false, &args, T).unwrap();
    assert_eq!(first["answer"], "received", "frontend's datagram: {first}");
    // The address now belongs to robot.
    bed.register_workload(CLIENT, "shop", "robot", &[("app", "robot")])
        .unwrap();
    let ip = bed.pods[CLIENT].addr(false, 0).ip().to_string();
    let robot = format!("{TD}/ns/shop/sa/robot");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = cli_json(&bed, 0, &["inspect", "endpoints", "-o", "json"]);
        if rows
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["ip"] == ip.as_str() && r["identity"] == robot.as_str())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 never saw robot at {ip}: {rows}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = bed.client(CLIENT, false, &args, T).unwrap();
    assert_eq!(
        again["answer"], "timeout",
        "robot passed on frontend's cached verdict: {again}"
    );
}

/// `mesh-agent status`'s `programs` check on `node`, run in the node's
/// network namespace (where its interfaces are): state and detail.
fn programs_check(bed: &TestBed, node: usize) -> (String, String) {
    let mut cmd = std::process::Command::new(agent::agent_bin());
    cmd.arg("--bpffs")
        .arg(bed.pin_dir(node))
        .arg("--state-dir")
        .arg(bed.state_dir(node))
        .args(["status", "-o", "json"])
        .stdout(std::process::Stdio::piped());
    let placement = mesh_tests::process::Placement {
        netns: Some(&bed.nodes[node].netns),
        cgroup: None,
    };
    let out = Spawned::spawn(cmd, &placement)
        .unwrap()
        .wait_output(T)
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "programs")
        .unwrap_or_else(|| panic!("no programs check: {report}"));
    (
        check["state"].as_str().unwrap().to_string(),
        check["detail"].as_str().unwrap().to_string(),
    )
}

/// An interface deleted and created again (a CNI's device, a re-plugged
/// uplink) has a new index, and the old TCX link, still pinned, guards
/// nothing: a denied SYN from another node reached the workload. A running
/// agent attaches its programs to the new interface within a second; one
/// that starts finds the dead link and attaches anew instead of adopting
/// it; `status` fails while a link guards nothing.
#[test]
fn an_interface_created_again_is_guarded_again() {
    let (bed, _servers) = bed_with("replug", 2, &MATRIX);
    matrix_policies(&bed);
    let mut agents = start_agents(&bed, &[]);
    let denied = target(&bed, PAYMENTS, 8080, false, false);
    let allowed = target(&bed, PAYMENTS, 9090, true, false);
    // The allowed flow proves the new uplink carries traffic; the denied
    // one that it is judged.
    let denied_now = || {
        let results = probe(
            &bed,
            FRONTEND,
            false,
            &[denied.clone(), allowed.clone()],
            400,
        );
        assert_eq!(results[&allowed], "connected", "{results:?}");
        results[&denied] == "timeout"
    };
    assert!(denied_now());

    // While the agent runs: guarded again within a second or so.
    bed.recreate_uplink(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while programs_check(&bed, 1).0 != "ok" {
        assert!(Instant::now() < deadline, "{:?}", programs_check(&bed, 1));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        denied_now(),
        "a denied SYN reached payments through the new uplink"
    );

    // While no agent runs: status says so; the next agent attaches anew.
    agents[1].stop().unwrap();
    bed.recreate_uplink(1).unwrap();
    let (state, detail) = programs_check(&bed, 1);
    assert_eq!(state, "fail", "{detail}");
    assert!(
        detail.contains("the tc links of uplink guard nothing"),
        "{detail}"
    );
    agents[1] = Agent::start_node(&bed, 1, &[]).unwrap();
    assert_eq!(programs_check(&bed, 1).0, "ok");
    assert!(denied_now(), "a restarted agent adopted a dead link");
}

/// An overlay CNI reaches other nodes' pods through its own device
/// (`tunl0`, `flannel.1`…), and their packets arrive there: left out of
/// `--interfaces`, it lets them in unjudged. `status` finds where the
/// routes to other nodes' workloads lead and warns about such a device.
#[test]
fn status_warns_where_other_nodes_workloads_are_reached_past_every_tc_program() {
    let (bed, _servers) = bed_with("unguarded", 2, &MATRIX);
    let _agents = start_agents(&bed, &[]);
    assert_eq!(programs_check(&bed, 0).0, "ok");
    let ns = &bed.nodes[0].netns;
    ns.ip(&["tuntap", "add", "dev", "overlay0", "mode", "tun"])
        .unwrap();
    ns.ip(&["link", "set", "overlay0", "up"]).unwrap();
    ns.ip(&["route", "replace", "198.18.1.0/24", "dev", "overlay0"])
        .unwrap();
    let (state, detail) = programs_check(&bed, 0);
    assert_eq!(state, "warn", "{detail}");
    let payments = bed.pods[PAYMENTS].ip4;
    assert!(
        detail.contains(
            "other nodes' workloads are reached through overlay0 (the route to 198.18.1."
        ),
        "{detail} (payments is {payments})"
    );
}

/// Overlay CNIs hand other nodes' packets to pods through L3 devices
/// (IPIP's `tunl0`, WireGuard's `wg0`…), which have no Ethernet header. A
/// TUN device is one: a SYN arriving on it from an address policy denies
/// was read as a frame of no known type and passed.
#[test]
fn packets_arriving_on_an_l3_device_are_judged() {
    let (bed, _servers) = bed_with("l3dev", 1, &TRIO);
    let ns = &bed.nodes[0].netns;
    ns.ip(&["tuntap", "add", "dev", "mtun0", "mode", "tun"])
        .unwrap();
    ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "mtun0"])
        .unwrap();
    ns.ip(&["link", "set", "mtun0", "up"]).unwrap();
    ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .unwrap();
    let _agent = Agent::start_node(&bed, 0, &["--interfaces", "mtun0"]).unwrap();
    only_frontend_reaches_cart(&bed);
    let syn = |pod: usize| {
        let to = bed.pods[pod].addr(false, 8080).to_string();
        let args = [
            "tun-syn",
            "--device",
            "mtun0",
            "--from",
            "198.51.100.7:40000",
            "--to",
            &to,
        ];
        on_node(&bed, 0, &args)["result"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // No ALLOW selects frontend: anyone reaches it, through the device too.
    assert_eq!(syn(0), "connected");
    assert_eq!(
        syn(2),
        "timeout",
        "a denied SYN reached cart through an L3 device"
    );
}

/// The link-layer address of `pod`'s `eth0`.
fn pod_mac(bed: &TestBed, pod: usize) -> String {
    let out = bed.pods[pod]
        .netns
        .ip(&["-j", "link", "show", "eth0"])
        .unwrap();
    let links: Value = serde_json::from_str(&out).unwrap();
    links[0]["address"].as_str().unwrap().to_string()
}

/// A packet socket (`AF_PACKET`) writes whole frames: no socket hook sees
/// them, and a pod has the CAP_NET_RAW it takes by default. Robot's
/// hand-made SYN got cart's SYN-ACK, and a datagram robot forged from
/// frontend's address got cart's answer sent to frontend, although only
/// frontend may reach cart and no one may reach frontend. What is delivered
/// to a workload is judged again on the node's side of its interface, and
/// what a workload sends there must carry its own address.
#[test]
fn a_packet_socket_neither_reaches_a_denied_workload_nor_speaks_as_a_neighbour() {
    const FRONTEND: usize = 0;
    const ROBOT: usize = 1;
    const CART: usize = 2;
    let (bed, _servers) = bed_with("afpacket", 1, &TRIO);
    let nobody_reaches_frontend = policy(
        "shop",
        "frontend-closed",
        "  selector:\n    matchLabels: {app: frontend}\n  action: DENY\n  rules:\n  - from:\n    - namespace: shop\n",
    );
    bed.write_config("frontend.yaml", &nobody_reaches_frontend)
        .unwrap();
    let _agent = Agent::start_node(&bed, 0, &[]).unwrap();
    only_frontend_reaches_cart(&bed);
    let mac = pod_mac(&bed, CART);
    let cart = bed.pods[CART].addr(false, 8080).to_string();
    let syn = ["packet-send", "--mac", &mac, "--to", &cart];
    let robot = bed.client(ROBOT, true, &syn, T).unwrap();
    assert_eq!(
        robot["result"], "timeout",
        "robot's hand-made SYN reached cart"
    );
    // The check judges; it does not refuse packet sockets: frontend's
    // hand-made SYN is answered.
    let frontend = bed.client(FRONTEND, true, &syn, T).unwrap();
    assert_eq!(frontend["result"], "connected", "{frontend}");

    let mut listener = bed
        .workload(
            FRONTEND,
            &[
                "await-datagram",
                "--listen",
                "0.0.0.0:7000",
                "--timeout-ms",
                "1500",
            ],
        )
        .unwrap();
    wait_for_line(&mut listener, "listening").unwrap();
    let forged_from = bed.pods[FRONTEND].addr(false, 7000).to_string();
    let cart_udp = bed.pods[CART].addr(false, 9090).to_string();
    let forge = [
        "packet-send",
        "--mac",
        &mac,
        "--from",
        &forged_from,
        "--to",
        &cart_udp,
        "--udp",
        "--text",
        "forged",
    ];
    let sent = bed.client(ROBOT, true, &forge, T).unwrap();
    assert_eq!(sent["result"], "sent", "{sent}");
    let heard: Value = serde_json::from_slice(&listener.wait_output(T).unwrap().stdout).unwrap();
    assert_eq!(
        heard["result"], "timeout",
        "cart answered frontend a datagram robot forged: {heard}"
    );
    assert!(counter(&bed, "spoofed_source") > 0);
}

/// With `--established revoke`, a policy change that denies a pair cuts
/// its open connections, also between two pods of one node: their packets
/// are judged again where they are delivered.
#[test]
fn revoke_cuts_an_open_connection_between_two_pods_of_one_node() {
    const FRONTEND: usize = 0;
    const CART: usize = 2;
    let (bed, _servers) = bed_with("revoke", 1, &TRIO);
    let _agent = Agent::start_node(&bed, 0, &["--established", "revoke"]).unwrap();
    let to = bed.pods[CART].addr(false, 8080).to_string();
    let client = bed
        .workload(FRONTEND, &["pingpong", "--to", &to, "--seconds", "4"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let robot_only = policy(
        "shop",
        "cart-robot-only",
        "  selector:\n    matchLabels: {app: cart}\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/robot\n",
    );
    bed.write_config("cart.yaml", &robot_only).unwrap();
    let out = client.wait_output(T).unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["ok"], false,
        "the connection outlived its revocation: {report}"
    );
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("response did not come"),
        "{report}"
    );
}

/// RFC 1858's tiny fragment, across real nodes: a SYN whose first IPv4
/// fragment carries only 8 bytes of its TCP header (the flags come in the
/// second) is dropped by the destination node whoever sends it, while the
/// same SYN fragmented after its whole header is judged like any other and
/// answered where policy allows it.
#[test]
fn a_syn_in_tiny_fragments_from_another_node_is_dropped() {
    let (bed, _servers) = bed_with("tinyfrag", 2, &MATRIX);
    matrix_policies(&bed);
    let _agents = start_agents(&bed, &[]);
    // Frontend (node 0) is selected by no ALLOW: node 1's host reaches it.
    let to = bed.pods[FRONTEND].addr(false, 8080).to_string();
    let frag_syn = |first: &str| {
        let args = ["frag-syn", "--to", &to, "--first", first];
        on_node(&bed, 1, &args)["result"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        frag_syn("24"),
        "connected",
        "fragments do not reassemble here"
    );
    assert_eq!(
        frag_syn("8"),
        "timeout",
        "a tiny first fragment got through"
    );
    assert_eq!(
        frag_syn("16"),
        "timeout",
        "a first fragment without the whole header got through"
    );
}

/// Probes until `target` gives `want` (a reload is asynchronous).
fn wait_until(bed: &TestBed, pod: usize, target: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = probe_one(bed, pod, target);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{target} still {got}, not {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn audit_passes_and_reports_would_deny() {
    let (bed, _servers) = bed_with("audit", 1, &TRIO);
    let agent = Agent::start_node(&bed, 0, &[]).unwrap();
    let audit = policy(
        "shop",
        "robots-dry-run",
        "  selector:\n    serviceAccount: cart\n  action: AUDIT\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/robot\n",
    );
    bed.write_config("audit.yaml", &audit).unwrap();
    agent.wait_log("policy applied", 2, T).unwrap();
    let to = target(&bed, 2, 8080, false, true);
    assert_eq!(probe_one(&bed, 1, &to), "connected");
    assert_eq!(probe_one(&bed, 0, &to), "connected");

    let flows = flows(&bed, &["--verdict", "audit"]);
    assert_eq!(flows.len(), 1, "{flows:?}");
    let f = &flows[0];
    assert_eq!(f["src"]["identity"], format!("{TD}/ns/shop/sa/robot"));
    assert_eq!(f["dst"]["identity"], format!("{TD}/ns/shop/sa/cart"));
    assert_eq!(f["reason"], "shop/robots-dry-run rule 0");
    assert_eq!(f["hook"], "connect");
    let allowed = flows_filtered(
        &bed,
        &[
            "--verdict",
            "allow",
            "--identity",
            &format!("{TD}/ns/shop/sa/frontend"),
        ],
    );
    assert_eq!(allowed.len(), 1, "{allowed:?}");
    assert!(counter(&bed, "policy_audited") >= 1);
}

#[test]
fn one_pods_flood_of_denied_connects_cannot_push_other_denials_out_of_the_flow_events() {
    let (bed, _servers) = bed_with("eventflood", 1, &TRIO);
    let agent = Agent::start_node(&bed, 0, &["--flow-events-per-source", "100"]).unwrap();
    let to_cart = target(&bed, 2, 8080, false, false);
    bed.write_config(
        "deny.yaml",
        &policy("shop", "no-one", "  selector:\n    serviceAccount: cart\n  action: DENY\n  rules:\n  - from:\n    - namespace: shop\n"),
    )
    .unwrap();
    agent.wait_log("policy applied", 2, T).unwrap();
    assert_eq!(probe_one(&bed, 1, &to_cart), "eperm");
    let denied_before = counter(&bed, "policy_denied");

    // robot retries a denied connect as fast as it can for a second and a
    // half; frontend is denied once in the middle of it.
    let flood = bed
        .workload(1, &["probe", "--targets", &to_cart, "--repeat-ms", "1500"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(probe_one(&bed, 0, &to_cart), "eperm");
    let out = flood.wait_output(T).unwrap();
    let report: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let attempts = report["counts"][to_cart.as_str()]["eperm"]
        .as_u64()
        .unwrap();
    assert!(attempts > 2_000, "not a flood: {report}");
    // Past the budget (2 s): robot's next denial carries what was left out.
    std::thread::sleep(Duration::from_millis(2_100));
    assert_eq!(probe_one(&bed, 1, &to_cart), "eperm");

    // Every denial was applied and counted by the kernel.
    assert_eq!(
        counter(&bed, "policy_denied") - denied_before,
        attempts + 2,
        "robot's flood, frontend's denial, robot's last"
    );
    let robot = format!("{TD}/ns/shop/sa/robot");
    let frontend = format!("{TD}/ns/shop/sa/frontend");
    let events = flows(&bed, &[]);
    let from = |who: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["src"]["identity"] == who && e["verdict"] == "DENY")
            .collect()
    };
    // frontend's one denial is there, whatever robot did.
    assert_eq!(from(&frontend).len(), 1, "{:#?}", from(&frontend));
    // robot's events: its rate (100 a second, bursts of 200) plus the
    // probe before and the one after, not one per attempt...
    let reported = from(&robot);
    assert!(
        reported.len() < 400,
        "{} events of robot's {attempts} denials reported",
        reported.len()
    );
    // ...and the ones left out are carried by those reported: none lost
    // (robot's events: the probe before the flood, the flood, the last).
    let carried: u64 = reported
        .iter()
        .map(|e| e["suppressed"].as_u64().unwrap_or(0))
        .sum();
    let carried_denied: u64 = reported
        .iter()
        .map(|e| e["suppressed_denied"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(reported.len() as u64 + carried, attempts + 2);
    assert_eq!(carried_denied, carried);
    assert_eq!(counter(&bed, "flow_events_suppressed"), carried);
    assert_eq!(counter(&bed, "denied_events_suppressed"), carried);
    assert_eq!(counter(&bed, "flow_events_lost"), 0);
}

fn counter(bed: &TestBed, name: &str) -> u64 {
    agent::counter(&bed.pin_dir(0), name).unwrap()
}

/// `mesh-agent flows -o json` (the agent's recent events), parsed.
fn flows(bed: &TestBed, filters: &[&str]) -> Vec<Value> {
    flows_filtered(bed, filters)
}

fn flows_filtered(bed: &TestBed, filters: &[&str]) -> Vec<Value> {
    let mut args = vec!["flows", "-o", "json"];
    args.extend_from_slice(filters);
    cli(bed, 0, &args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn mesh_default_deny_and_the_rule_for_non_mesh_sources() {
    let (bed, _servers) = bed_with("defaults", 1, &TRIO);
    let _agent = Agent::start_node(
        &bed,
        0,
        &["--default-policy", "deny", "--non-mesh", "allow"],
    )
    .unwrap();
    let to = target(&bed, 2, 8080, false, false);
    let to_udp = target(&bed, 2, 9090, true, true);
    // Mesh sources follow the mesh default.
    assert_eq!(probe_one(&bed, 0, &to), "eperm");
    assert_eq!(probe_one(&bed, 0, &to_udp), "eperm");
    // A process in the mesh's cgroup but in no workload's namespace is not a
    // mesh workload: the non-mesh rule (allow) applies. The node's own
    // namespace stands in for "somewhere else on the node".
    let outsider = probe_from_node_cgroup(&bed, &to);
    assert_eq!(outsider, "connected");
    let allow_frontend = policy(
        "shop",
        "cart",
        "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n",
    );
    bed.write_config("cart.yaml", &allow_frontend).unwrap();
    wait_until(&bed, 0, &to, "connected");
    assert_eq!(probe_one(&bed, 0, &to_udp), "connected");
    assert_eq!(probe_one(&bed, 1, &to), "eperm");
    // Now an ALLOW selects cart: a rule with `from` never matches non-mesh
    // sources, so they are denied too.
    assert_eq!(probe_from_node_cgroup(&bed, &to), "eperm");
}

/// Probes from the node's network namespace, in the node's (mesh) cgroup.
fn probe_from_node_cgroup(bed: &TestBed, target: &str) -> String {
    let mut cmd = std::process::Command::new(mesh_tests::topology::pod_tool());
    cmd.args(["probe", "--targets", target, "--timeout-ms", "1000"])
        .stdout(std::process::Stdio::piped());
    let p = Spawned::spawn(
        cmd,
        &mesh_tests::process::Placement {
            netns: Some(&bed.nodes[0].netns),
            cgroup: Some(&bed.nodes[0].cgroup),
        },
    )
    .unwrap();
    let out = p.wait_output(T).unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["results"][target].as_str().unwrap().to_string()
}

#[test]
fn a_policy_change_is_enforced_within_100_ms_of_the_file_change() {
    let (bed, _servers) = bed_with("reload", 1, &TRIO);
    let agent = Agent::start_node(&bed, 0, &[]).unwrap();
    let to = target(&bed, 2, 8080, false, false);
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        // Alternately deny and allow frontend -> cart, measuring each time.
        let (want_before, want_after) = if round % 2 == 0 {
            ("connected", "eperm")
        } else {
            ("eperm", "connected")
        };
        let mut watcher = bed
            .workload(0, &["wait-change", "--target", &to, "--interval-ms", "1"])
            .unwrap();
        let first = wait_for_line(&mut watcher, "first").unwrap();
        assert_eq!(first.trim(), format!("first {want_before}"));
        let written_at = monotonic_ns();
        if round % 2 == 0 {
            let deny = policy(
                "shop",
                "cart-deny",
                "  selector:\n    serviceAccount: cart\n  action: DENY\n  rules:\n  - from:\n    - namespace: shop\n",
            );
            bed.write_config("deny.yaml", &deny).unwrap();
        } else {
            bed.remove_config("deny.yaml").unwrap();
        }
        let out = watcher.wait_output(T).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let report: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(report["to"], want_after, "{report}");
        let changed = report["changed_at_ns"].as_u64().unwrap();
        let took = Duration::from_nanos(changed.saturating_sub(written_at));
        worst = worst.max(took);
        assert!(
            took <= Duration::from_millis(100),
            "round {round}: enforced {took:?} after the file changed\n{}",
            agent.log()
        );
    }
    eprintln!("slowest policy change enforced after {worst:?}");
}

fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[test]
fn bad_documents_are_refused_whole_and_the_old_policy_stays_enforced() {
    let (bed, _servers) = bed_with("badinput", 1, &TRIO);
    let agent = Agent::start_node(&bed, 0, &[]).unwrap();
    let to = target(&bed, 2, 8080, false, false);
    let good = policy(
        "shop",
        "cart",
        "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n",
    );
    bed.write_config("cart.yaml", &good).unwrap();
    wait_until(&bed, 1, &to, "eperm");
    assert_eq!(probe_one(&bed, 0, &to), "connected");

    // Each bad file would, if half-applied, open robot -> cart (the second
    // document of each allows everyone).
    let allow_all = policy(
        "shop",
        "open",
        "  selector:\n    serviceAccount: cart\n  rules:\n  - {}\n",
    );
    let cases: [(&str, String, &[&str]); 4] = [
        (
            "malformed YAML",
            format!(
                "{allow_all}---\napiVersion: mesh.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: x\n"
            ),
            &["bad.yaml", "document 2"],
        ),
        (
            "unknown field",
            format!(
                "{allow_all}---\n{}",
                policy("shop", "typo", "  selectr:\n    serviceAccount: cart\n")
            ),
            &["bad.yaml", "document 2", "MeshPolicy shop/typo", "selectr"],
        ),
        (
            "bad selector",
            format!(
                "{allow_all}---\n{}",
                policy(
                    "shop",
                    "badlabel",
                    "  selector:\n    matchLabels: {\"-bad key\": x}\n"
                )
            ),
            &[
                "bad.yaml",
                "document 2",
                "MeshPolicy shop/badlabel",
                "spec.selector.matchLabels",
            ],
        ),
        (
            "duplicate name",
            format!("{allow_all}---\n{}", good),
            &["bad.yaml", "MeshPolicy shop/cart", "cart.yaml"],
        ),
    ];
    for (n, (what, yaml, must_name)) in cases.iter().enumerate() {
        bed.write_config("bad.yaml", yaml).unwrap();
        agent.wait_log("configuration refused", n + 1, T).unwrap();
        let log = agent.log();
        let refusal = log
            .lines()
            .filter(|l| l.contains("configuration refused"))
            .nth(n)
            .unwrap();
        for needle in *must_name {
            assert!(
                refusal.contains(needle),
                "{what}: refusal does not name {needle:?}: {refusal}"
            );
        }
        assert_eq!(
            probe_one(&bed, 1, &to),
            "eperm",
            "{what}: denied traffic was opened"
        );
        assert_eq!(
            probe_one(&bed, 0, &to),
            "connected",
            "{what}: allowed traffic was closed"
        );
    }
    bed.remove_config("bad.yaml").unwrap();
    agent.wait_log("policy applied", 2, T).unwrap();
}

#[test]
fn sigkill_keeps_enforcing_and_a_restarted_agent_adopts_without_a_window() {
    let (bed, _servers) = bed_with("restart", 1, &TRIO);
    let mut agent = Agent::start_node(&bed, 0, &[]).unwrap();
    let deny = policy(
        "shop",
        "cart",
        "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n",
    );
    bed.write_config("cart.yaml", &deny).unwrap();
    let allowed = target(&bed, 2, 8080, false, false);
    let denied = target(&bed, 2, 8080, false, true);
    let denied_udp = target(&bed, 2, 9090, true, false);
    wait_until(&bed, 1, &denied, "eperm");
    let policy_before = cli(&bed, 0, &["inspect", "policy", "-o", "json"]);

    // Probe without pause from both clients while the agent is killed,
    // stays down, and comes back three times.
    let robot = bed
        .workload(
            1,
            &[
                "probe",
                "--targets",
                &format!("{denied},{denied_udp}"),
                "--repeat-ms",
                "4000",
                "--timeout-ms",
                "1000",
            ],
        )
        .unwrap();
    let frontend = bed
        .workload(
            0,
            &[
                "probe",
                "--targets",
                &allowed,
                "--repeat-ms",
                "4000",
                "--timeout-ms",
                "1000",
            ],
        )
        .unwrap();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        agent.kill().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        agent = Agent::start_node(&bed, 0, &[]).unwrap();
        assert!(
            agent.log().contains("adopted pinned link"),
            "{}",
            agent.log()
        );
    }
    let counts = |p: Spawned| -> Value {
        let out = p.wait_output(T).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        serde_json::from_str::<Value>(text.lines().last().unwrap()).unwrap()["counts"].clone()
    };
    let robot = counts(robot);
    let frontend = counts(frontend);
    for t in [&denied, &denied_udp] {
        let results = robot[t].as_object().unwrap();
        assert_eq!(
            results.keys().collect::<Vec<_>>(),
            ["eperm"],
            "{t}: {robot}"
        );
    }
    let results = frontend[&allowed].as_object().unwrap();
    assert_eq!(
        results.keys().collect::<Vec<_>>(),
        ["connected"],
        "{frontend}"
    );
    assert!(results["connected"].as_u64().unwrap() > 10);
    // The restarted agent converged to the same entries (a diff of nothing).
    assert_eq!(
        cli(&bed, 0, &["inspect", "policy", "-o", "json"]),
        policy_before
    );
    assert!(agent.log().contains("upserted=0"), "{}", agent.log());
}

#[test]
fn inspect_shows_endpoints_identities_and_policy() {
    let (bed, _servers) = bed_with("inspect", 1, &TRIO);
    let _agent = Agent::start_node(&bed, 0, &[]).unwrap();
    bed.write_config(
        "cart.yaml",
        &policy("shop", "cart", "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - namespace: shop\n    ports:\n    - port: 8080\n"),
    )
    .unwrap();
    wait_until(&bed, 0, &target(&bed, 2, 9090, false, false), "eperm");

    let endpoints = cli_json(&bed, 0, &["inspect", "endpoints", "-o", "json"]);
    let endpoints = endpoints.as_array().unwrap();
    assert_eq!(
        endpoints.len(),
        6,
        "two addresses per workload: {endpoints:?}"
    );
    let cart = endpoints
        .iter()
        .find(|e| e["ip"] == bed.pods[2].ip6.to_string())
        .unwrap();
    assert_eq!(cart["identity"], format!("{TD}/ns/shop/sa/cart"));
    assert_eq!(cart["local"], true);

    let identities = cli_json(&bed, 0, &["inspect", "identities", "-o", "json"]);
    let names: Vec<&str> = identities
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["spiffe_id"].as_str().unwrap())
        .collect();
    for sa in ["frontend", "robot", "cart"] {
        assert!(
            names.contains(&format!("{TD}/ns/shop/sa/{sa}").as_str()),
            "{names:?}"
        );
    }

    let policy = cli_json(&bed, 0, &["inspect", "policy", "-o", "json"]);
    assert!(
        policy.as_array().unwrap().iter().any(|p| p["destination"]
            == format!("{TD}/ns/shop/sa/cart")
            && p["port"] == 8080
            && p["action"] == "ALLOW"
            && p["reason"] == "shop/cart rule 0"),
        "{policy:#}"
    );
    let table = cli(&bed, 0, &["inspect", "policy"]);
    assert!(table.starts_with("SUBJECT"), "{table}");
    let stats = agent::stats(&bed.pin_dir(0)).unwrap();
    assert_eq!(stats["maps"]["ENDPOINTS"]["entries"], 6);
    assert!(stats["maps"]["POLICY"]["entries"].as_u64().unwrap() > 0);
    assert!(stats["counters"]["policy_denied"].as_u64().unwrap() >= 1);
}

#[test]
fn a_policy_that_would_overflow_the_map_is_refused_alone_and_what_it_selects_fails_closed() {
    let (bed, _servers) = bed_with("overflow", 1, &TRIO);
    // Room for 20 entries (half the map): the three workloads need 12.
    let agent = Agent::start_node(&bed, 0, &["--max-policy", "40"]).unwrap();
    let to_cart = target(&bed, 2, 8080, false, false);
    let to_frontend = target(&bed, 0, 8080, false, false);
    assert_eq!(probe_one(&bed, 1, &to_cart), "connected");
    assert_eq!(probe_one(&bed, 1, &to_frontend), "connected");

    // An entry per source identity and port: 30 for cart alone.
    let ports: String = (1..=10)
        .map(|p| format!("    - port: {}\n", 1000 + p))
        .collect();
    bed.write_config(
        "big.yaml",
        &policy("shop", "big", &format!("  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - namespace: shop\n    ports:\n{ports}")),
    )
    .unwrap();
    agent.wait_log("document refused on its own", 1, T).unwrap();
    let log = agent.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("document refused on its own"))
        .unwrap();
    assert!(
        refusal.contains("big.yaml") && refusal.contains("shop/big") && refusal.contains("budget"),
        "{refusal}"
    );
    // Refusing a policy never opens what it would deny: what it selects
    // accepts nothing until it fits.
    assert_eq!(probe_one(&bed, 1, &to_cart), "eperm");

    // The rest of the configuration still converges: a DENY for frontend.
    bed.write_config(
        "deny.yaml",
        &policy("shop", "deny", "  selector:\n    serviceAccount: frontend\n  action: DENY\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/robot\n"),
    )
    .unwrap();
    let started = Instant::now();
    while probe_one(&bed, 1, &to_frontend) != "eperm" {
        assert!(
            started.elapsed() < T,
            "the DENY beside a refused policy was not applied: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(probe_one(&bed, 1, &to_cart), "eperm");

    // Gone: cart is as it was.
    bed.remove_config("big.yaml").unwrap();
    agent
        .wait_log("no document is refused any more", 1, T)
        .unwrap();
    assert_eq!(probe_one(&bed, 1, &to_cart), "connected");
    assert_eq!(probe_one(&bed, 1, &to_frontend), "eperm");
    assert!(
        !agent.log().contains("configuration refused"),
        "{}",
        agent.log()
    );
}

#[test]
fn short_circuit_only_for_allowed_pairs_and_stops_when_policy_denies_them() {
    let (bed, _servers) = bed_with("shortcircuit", 1, &TRIO);
    let _agent = Agent::start_node(&bed, 0, &["--short-circuit", "on"]).unwrap();
    let to: SocketAddr = bed.pods[2].addr(false, 8080);
    // A long ping-pong: redirected while allowed.
    let pinger = bed
        .workload(0, &["pingpong", "--to", &to.to_string(), "--seconds", "3"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let redirected_before = counter(&bed, "msgs_redirected");
    assert!(redirected_before > 0, "allowed pair not short-circuited");
    // Deny the pair: the open connection keeps working (established
    // connections are kept by default) but leaves the short-circuit.
    bed.write_config(
        "deny.yaml",
        &policy("shop", "deny", "  selector:\n    serviceAccount: cart\n  action: DENY\n  rules:\n  - from:\n    - namespace: shop\n"),
    )
    .unwrap();
    leaves_the_short_circuit_unbroken(&bed, pinger, "a denied pair");
    // A new connection is refused.
    assert_eq!(probe_one(&bed, 0, &format!("tcp:{to}")), "eperm");
}

/// After a change that takes a short-circuited pair off the redirect path:
/// within half a second no message of `pinger`'s connection is redirected
/// any more, they take the stack, and the connection ends well.
fn leaves_the_short_circuit_unbroken(bed: &TestBed, pinger: Spawned, pair: &str) {
    std::thread::sleep(Duration::from_millis(500));
    let redirected = counter(bed, "msgs_redirected");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        counter(bed, "msgs_redirected"),
        redirected,
        "{pair} is still being redirected"
    );
    assert!(counter(bed, "msgs_stack_only") > 0);
    let out = pinger.wait_output(T).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Frontend and cart opted in to the short-circuit, robot not.
const OPTED_IN: [W; 3] = [
    w(
        0,
        "shop",
        "frontend",
        &[("mesh.dev/short-circuit", "enabled")],
    ),
    w(0, "shop", "robot", &[]),
    w(0, "shop", "cart", &[("mesh.dev/short-circuit", "enabled")]),
];

/// By default (`opted-in`) the short-circuit is for the workloads labelled
/// `mesh.dev/short-circuit: enabled`, both ends of a connection: a
/// workload without the label is never in the socket maps, and taking the
/// label away sends an open connection's next messages through the stack,
/// in order, without breaking it.
#[test]
fn only_workloads_that_opt_in_are_short_circuited() {
    let (bed, _servers) = bed_with("optin", 1, &OPTED_IN);
    let agent = Agent::start_node(&bed, 0, &[]).unwrap();
    assert_eq!(
        agent::cli(&bed.pin_dir(0), &["short-circuit", "status"])
            .unwrap()
            .trim(),
        "short-circuit: opted-in"
    );
    let to = bed.pods[2].addr(false, 8080).to_string();
    let pingpong = |pod: usize, seconds: &str| {
        bed.workload(pod, &["pingpong", "--to", &to, "--seconds", seconds])
            .unwrap()
    };
    // robot (no label) to cart: neither end is tracked.
    let robot = pingpong(1, "1").wait_output(T).unwrap();
    assert!(robot.status.success(), "{robot:?}");
    assert_eq!(counter(&bed, "sockets_tracked"), 0);
    assert_eq!(counter(&bed, "msgs_redirected"), 0);
    // frontend to cart: both opted in.
    let pinger = pingpong(0, "4");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(counter(&bed, "sockets_tracked"), 2);
    assert!(
        counter(&bed, "msgs_redirected") > 0,
        "opted-in pair not short-circuited"
    );
    // cart opts out: the open connection leaves the short-circuit.
    bed.register_workload(2, "shop", "cart", &[]).unwrap();
    leaves_the_short_circuit_unbroken(&bed, pinger, "a pair no longer opted in");
    // A label value the mesh does not know is refused, with the field.
    bed.register_workload(1, "shop", "robot", &[("mesh.dev/short-circuit", "yes")])
        .unwrap();
    agent.wait_log("configuration refused", 1, T).unwrap();
    let log = agent.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("configuration refused"))
        .unwrap();
    assert!(
        refusal.contains("Workload shop/pod-1")
            && refusal.contains("metadata.labels.mesh.dev/short-circuit")
            && refusal.contains("`yes`"),
        "{refusal}"
    );
}

/// `count` remote workloads `bulk-<i>` (one address each, on a node that is
/// not in the bed) in one document file.
fn bulk_workloads(count: usize) -> String {
    (0..count)
        .map(|i| {
            format!(
                "apiVersion: mesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: bulk-{i}\n  namespace: bulk\nspec:\n  serviceAccount: sa-{i}\n  ips: [\"198.19.{}.{}\"]\n  node: elsewhere\n",
                i / 200,
                i % 200 + 1
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn one_hundred_thousand_policy_entries_load_and_enforce() {
    let (bed, _servers) = bed_with("100k", 1, &TRIO);
    let agent = Agent::start_node(&bed, 0, &[]).unwrap();
    bed.write_config("bulk.yaml", &bulk_workloads(1000))
        .unwrap();
    let identities: String = (0..1000)
        .map(|i| format!("    - identity: spiffe://cluster.local/ns/bulk/sa/sa-{i}\n"))
        .collect();
    let ports: String = (0..100)
        .map(|p| format!("    - port: {}\n", 20000 + p))
        .collect();
    let spec = format!(
        "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n{identities}    ports:\n{ports}  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n    ports:\n    - port: 8080\n"
    );
    bed.write_config("big.yaml", &policy("shop", "big", &spec))
        .unwrap();
    let to = target(&bed, 2, 8080, false, false);
    wait_until(&bed, 1, &to, "eperm");
    assert_eq!(probe_one(&bed, 0, &to), "connected");
    assert_eq!(
        probe_one(&bed, 0, &target(&bed, 2, 9090, false, true)),
        "eperm"
    );

    let entries = agent::stats(&bed.pin_dir(0)).unwrap()["maps"]["POLICY"]["entries"]
        .as_u64()
        .unwrap();
    assert!(entries >= 100_000, "only {entries} policy entries");
    let applied = agent
        .log()
        .lines()
        .rfind(|l| l.contains("policy applied"))
        .unwrap()
        .to_string();
    eprintln!("{entries} entries: {applied}");
    // A bulk identity is allowed on its ports, from the kernel's own entries.
    let answer = explain(&bed, "198.19.4.200", &bed.pods[2].ip4.to_string(), 20099);
    assert_eq!(answer[0]["verdict"], "ALLOW", "{answer}");
    assert_eq!(
        answer[0]["source"], "spiffe://cluster.local/ns/bulk/sa/sa-999",
        "{answer}"
    );
    assert_eq!(answer[0]["matched_entry"], "source+port", "{answer}");
}

#[test]
fn workloads_come_and_go_without_a_transient_deny() {
    // cart admits only frontend and the newcomers; the mesh default and the
    // non-mesh rule are deny, so a workload whose identity were missing for
    // a moment would be refused.
    let (mut bed, _servers) = bed_with("churn", 1, &TRIO);
    let agent =
        Agent::start_node(&bed, 0, &["--default-policy", "deny", "--non-mesh", "deny"]).unwrap();
    let allow = policy(
        "shop",
        "cart",
        "  selector:\n    serviceAccount: cart\n  rules:\n  - from:\n    - identity: spiffe://cluster.local/ns/shop/sa/frontend\n    - identity: spiffe://cluster.local/ns/shop/sa/new-*\n",
    );
    bed.write_config("cart.yaml", &allow).unwrap();
    let to = target(&bed, 2, 8080, false, false);
    wait_until(&bed, 0, &to, "connected");

    // frontend keeps connecting while workloads are added and removed.
    let steady = bed
        .workload(
            0,
            &[
                "probe",
                "--targets",
                &to,
                "--repeat-ms",
                "3000",
                "--timeout-ms",
                "1000",
            ],
        )
        .unwrap();
    let mut workloads = TRIO.len();
    for i in 0..10 {
        let pod = bed.add_pod(0).unwrap().name.clone();
        let index = bed.pods.len() - 1;
        // Registration first, as a CNI plugin does before the pod starts.
        bed.register_workload(index, "shop", &format!("new-{i}"), &[])
            .unwrap();
        workloads += 1;
        wait_applied(&agent, workloads);
        assert_eq!(
            probe_one(&bed, index, &to),
            "connected",
            "new workload {pod} refused"
        );
        if i % 2 == 1 {
            bed.remove_config(&format!("workload-{}.yaml", index - 1))
                .unwrap();
            workloads -= 1;
            wait_applied(&agent, workloads);
        }
    }
    let out = steady.wait_output(T).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let counts: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let results = counts["counts"][&to].as_object().unwrap();
    assert_eq!(
        results.keys().collect::<Vec<_>>(),
        ["connected"],
        "{counts}"
    );
}

/// Waits until the agent's latest applied configuration has `workloads`.
fn wait_applied(agent: &Agent, workloads: usize) {
    let needle = format!("workloads={workloads} ");
    let deadline = Instant::now() + T;
    loop {
        let log = agent.log();
        if log
            .lines()
            .rfind(|l| l.contains("policy applied"))
            .is_some_and(|l| l.contains(&needle))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never applied {workloads} workloads:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `--tc-attach tcx` takes TCX links where the kernel has them, and
/// elsewhere (before 6.6: the 6.1 of the kernel matrix) refuses to start,
/// naming the feature and the kernel that has it, before it changes
/// anything; `auto` there attaches clsact filters instead.
#[test]
fn asked_for_tcx_the_agent_uses_it_or_refuses_naming_it() {
    let mut bed = TestBed::new("tcxask").unwrap();
    bed.add_node().unwrap();
    bed.connect_nodes().unwrap();
    // The kernel's answer, asked independently of the agent: a TCX link of
    // another program, or a clsact filter where there is no TCX.
    let foreign = mesh_tests::foreign_tc::attach_ingress(
        &bed.nodes[1].netns,
        mesh_tests::topology::UPLINK,
        mesh_tests::foreign_tc::Verdict::Pass,
    )
    .unwrap();
    let has_tcx = matches!(foreign, mesh_tests::foreign_tc::Foreign::Link(_));
    drop(foreign);
    let mut agent = Agent::spawn_node(&bed, 0, &["--tc-attach", "tcx"]).unwrap();
    if has_tcx {
        agent = agent.wait_until_ready().unwrap();
        assert!(agent.log().contains("tc=\"tcx\""), "{}", agent.log());
    } else {
        let status = agent.wait_exit(T).unwrap();
        assert!(!status.success(), "{}", agent.log());
        let log = agent.log();
        assert!(
            log.contains(
                "this kernel lacks TCX links for tc programs (--tc-attach tcx) (Linux 6.6+)"
            ),
            "{log}"
        );
        // Nothing was attached: no pin of any hook.
        let pins: Vec<String> = std::fs::read_dir(bed.pin_dir(0))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            pins.iter()
                .all(|p| !p.contains("_cgroup_") && !p.starts_with("tc_")),
            "{pins:?}"
        );
        let agent = Agent::start_node(&bed, 0, &[]).unwrap();
        assert!(agent.log().contains("tc=\"netlink\""), "{}", agent.log());
    }
}
